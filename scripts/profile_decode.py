"""Where a decode step's time goes on the GPU: the CUDA kernels of one layer step (selection + sparse
decode kernel) per method, from torch.profiler, next to the step's CUDA-graph replay time.

    python scripts/profile_decode.py [--shape 32/8/128] [--length 131072] [--batch 1] [--budget 2048]
                                     [--methods quest,h2o] [--top 10]

Same cache, queries and budget knobs as ``sparseattn bench decode`` (random K/V, layer 1 timed).
"""

import argparse

import torch
import triton.testing

from sparseattn.bench.decode import SHAPES, build_cache, method_for
from sparseattn.bench.timing import BenchTimer
from sparseattn.decode_api import sparse_decode_attention

p = argparse.ArgumentParser()
p.add_argument("--shape", default="32/8/128")
p.add_argument("--length", type=int, default=131072)
p.add_argument("--batch", type=int, default=1)
p.add_argument("--budget", type=int, default=2048)
p.add_argument("--page-size", type=int, default=16)
p.add_argument("--methods", default="quest,block_topk,tokenselect,h2o,tova,double_sparsity,recycled")
p.add_argument("--top", type=int, default=10)
args = p.parse_args()

Hq, Hkv, D = SHAPES.get(args.shape) or tuple(int(x) for x in args.shape.split("/"))
B, L = args.batch, args.length
cache = build_cache(B, Hkv, D, L, torch.bfloat16, "cuda", args.page_size)
gen = torch.Generator(device="cpu").manual_seed(1)
q = torch.randn(B, Hq, 1, D, generator=gen).to(device="cuda", dtype=torch.bfloat16)
prompt_q = torch.randn(B, Hq, 64, D, generator=gen).to(device="cuda", dtype=torch.bfloat16)
print(f"shape {args.shape}, L={L}, B={B}, budget {args.budget}, device {torch.cuda.get_device_name()}")


def graph_ms(fn):
    """Median ms of a CUDA-graph replay of ``fn`` (None when the capture fails)."""
    timer = BenchTimer("cuda", graphs=True)
    ms = timer(fn)
    if timer.last["mode"] != "graph":
        print(f"   (graph capture failed: {timer.last['mode']})")
        return None
    return ms


for name in args.methods.split(","):
    method = method_for(name, args.budget, args.page_size)
    cache.method_state.clear()
    for layer in range(2):
        method.on_prefill(prompt_q, cache, layer)

    def step():
        return sparse_decode_attention(q, cache, 1, method.select(q, cache, 1))

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    eager = triton.testing.do_bench(step, warmup=5, rep=50, return_mode="median")
    graphed = graph_ms(step) if getattr(method, "graph_safe", True) else None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = list(prof.key_averages())
    kernels = sum(e.count for e in events if e.device_time_total > 0)
    busy = sum(e.device_time_total for e in events) / 1e3
    gtxt = f"{graphed:.3f}" if graphed is not None else "-"
    print(f"\n== {name}: eager {eager:.3f} ms, graph {gtxt} ms, kernels {kernels}, GPU busy {busy:.3f} ms")
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=args.top, max_name_column_width=70))
