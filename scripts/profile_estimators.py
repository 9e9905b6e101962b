"""Where an estimator's time goes on the GPU: host time per plan() call, GPU time, and the CUDA
kernels it launches (torch.profiler), for prefill methods on structured synthetic q/k/v.

    python scripts/profile_estimators.py [--length 32768] [--shape 9/3/64] [--methods a,b,c] [--top 12]
"""

import argparse
import time

import torch
import triton.testing

import sparseattn as sa
from sparseattn.bench.synthetic import structured_qkv

p = argparse.ArgumentParser()
p.add_argument("--length", type=int, default=32768)
p.add_argument("--shape", default="9/3/64")
p.add_argument("--methods", default="block_topk,xattention,flexprefill,vertical_slash")
p.add_argument("--top", type=int, default=12)
args = p.parse_args()

Hq, Hkv, D = (int(x) for x in args.shape.split("/"))
q, k, v = structured_qkv(1, Hq, Hkv, args.length, D, seed=0, device="cuda", dtype=torch.bfloat16)
print(f"shape {args.shape}, L={args.length}, device {torch.cuda.get_device_name()}")

for name in args.methods.split(","):
    method = sa.get_method(name)
    method.plan(q, k, v)  # compile / warm up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = 5
    for _ in range(n):
        method.plan(q, k, v)
    host_ms = (time.perf_counter() - t0) / n * 1e3  # time to issue (GPU may still run)
    torch.cuda.synchronize()
    gpu_ms = triton.testing.do_bench(lambda: method.plan(q, k, v), warmup=25, rep=200)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        method.plan(q, k, v)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages()]
    kernels = sum(e.count for e in events if e.device_time_total > 0)
    busy = sum(e.device_time_total for e in events) / 1e3
    print(f"\n== {name}: wall {gpu_ms:.3f} ms, host issue {host_ms:.3f} ms, kernels {kernels}, GPU busy {busy:.3f} ms")
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=args.top, max_name_column_width=70))
