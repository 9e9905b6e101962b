"""Where an estimator's time goes on the GPU: host time per plan() call, GPU time, and the CUDA
kernels it launches (torch.profiler), for prefill methods on structured synthetic q/k/v or on
q/k/v captured from a model.

    python scripts/profile_estimators.py [--length 32768] [--shape 9/3/64] [--methods a,b,c] [--top 12]
        [--model PATH --haystack DIR --layers 3,15,24] [--sequence]

``--model``: capture the layers' q/k/v from that model (bf16) instead of the synthetic generator.
``--sequence``: also list every kernel of one plan() call in launch order with its start (us after the
first kernel's) and its GPU time.
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
p.add_argument("--model", default=None)
p.add_argument("--haystack", default=None)
p.add_argument("--layers", default="3,15,24")
p.add_argument("--sequence", action="store_true")
args = p.parse_args()


def inputs():
    if args.model is None:
        Hq, Hkv, D = (int(x) for x in args.shape.split("/"))
        yield "synthetic", structured_qkv(1, Hq, Hkv, args.length, D, seed=0, device="cuda", dtype=torch.bfloat16)
        return
    from sparseattn.bench.methods import captured_inputs

    layers = [int(x) for x in args.layers.split(",")]
    qkv = captured_inputs(args.model, args.haystack, args.length, layers)
    for layer in layers:
        yield f"layer {layer}", qkv.pop(layer)


print(f"L={args.length}, device {torch.cuda.get_device_name()}")
for case, (q, k, v) in inputs():
    print(f"\n##### {case}: q {tuple(q.shape)}, k {tuple(k.shape)}")
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
        print(f"\n== {name}: wall {gpu_ms:.3f} ms, host issue {host_ms:.3f} ms, kernels {kernels}, "
              f"GPU busy {busy:.3f} ms")
        print(prof.key_averages().table(sort_by="device_time_total", row_limit=args.top, max_name_column_width=70))
        if args.sequence:
            seq = sorted((e for e in prof.events() if e.device_time_total > 0 and e.device_type.name == "CUDA"),
                         key=lambda e: e.time_range.start)
            t0 = seq[0].time_range.start if seq else 0
            # start offset and GPU time of each kernel: overlapping kernels (a second stream) show
            # as starts before the previous kernel's end
            print("   launch order (start us / GPU us): " + ", ".join(
                f"{e.name[:28]} @{e.time_range.start - t0:.0f}/{e.device_time_total:.1f}" for e in seq))
