"""Vertical-slash's top-n selections on real q/k by row-selection config, on a GPU.

    python scripts/sweep_vs_selection.py --model ~/smol/smol.gguf --haystack DIR [--length 32768]
        [--layers 3,15] [--configs one,1024x2x32,1024x4x32,512x2x64,1024x2x16,2048x4x16] [--rounds 2]

Per layer the method's selection scores (the last-64-query profiles with the forced sink columns
and local diagonals, both stacked: 2 x Hq rows of Lk) and its default budgets (1000 columns, 6096
diagonals) go to ``rank_mask_triton`` under each config ``BLOCKxWARPSxSPLIT`` (``one``: one program
per row, the library's defaults). Each config is captured in a CUDA graph and timed by replay
(do_bench median, us, one figure per round); its mask must equal the one-program mask.
"""

import argparse

import torch
import triton.testing

from sparseattn.bench.methods import add_capture_args, captured_from_args
from sparseattn.kernels.last_queries_triton import last_queries_profiles_triton
from sparseattn.kernels.row_select_triton import rank_mask_triton

p = argparse.ArgumentParser()
add_capture_args(p)
p.add_argument("--configs", default="one,1024x2x32,1024x4x32,512x2x64,1024x2x16,2048x4x16")
p.add_argument("--rounds", type=int, default=2)
args = p.parse_args()


def graph_us(fn) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=25, rep=200, return_mode="median") * 1e3


configs = [(c, {} if c == "one" else dict(zip(("block", "num_warps", "split"), (int(x) for x in c.split("x")))))
           for c in args.configs.split(",") if c]
layers, captured = captured_from_args(args)
print(f"{args.model}, {args.length} tokens, {torch.cuda.get_device_name()}")
for layer in layers:
    q, k, _ = captured[layer]
    H, L = q.shape[1], k.shape[2]
    scores = torch.empty(2, 1, H, L, dtype=torch.float32, device="cuda")
    last_queries_profiles_triton(q, k, 64, sink_columns=30, local_diagonals=100, out=scores)
    n = torch.tensor([1000, 6096], device="cuda").view(2, 1, 1).expand(2, 1, H).contiguous()
    want = rank_mask_triton(scores, n)
    for name, kw in configs:
        if not torch.equal(rank_mask_triton(scores, n, **kw), want):
            raise SystemExit(f"layer {layer} {name}: mask differs from one program per row")
        times = [graph_us(lambda: rank_mask_triton(scores, n, **kw)) for _ in range(args.rounds)]
        print(f"layer {layer:3d} {name:>12}: " + " / ".join(f"{t:.1f}" for t in times) + " us")
