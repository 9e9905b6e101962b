"""Row selections of the FlexPrefill / vertical-slash estimates by block and warps, on a GPU.

    python scripts/sweep_row_select.py [--length 32768] [--shape 9/3/64] [--configs 1024x16,1024x16x7,...]

Inputs are the last-queries profiles of structured synthetic q/k (seed 0, bf16): FlexPrefill's
cover counts (P = 128, gamma 0.9, both profiles: 2 x Hq rows of L) and vertical-slash's top-n
masks (P = 64, n = 1000 / 6096); and a random query-aware block map (Hq rows of (L / 128)^2
entries) for FlexPrefill's cumulative selection. Each config ``BLOCKxWARPS[xSPLIT]`` (``SPLIT`` programs per
row; left out: one; ``auto``: the library's default for that field) is captured in a CUDA graph and timed by replay (do_bench median,
us), and its output compared with the one-program default's (mass selections may differ where a float32
sum meets the target).
"""

import argparse

import torch
import triton.testing

from sparseattn.bench.synthetic import structured_qkv
from sparseattn.kernels import row_select_triton
from sparseattn.kernels.last_queries_triton import last_queries_profiles_triton
from sparseattn.kernels.row_select_triton import cover_count_triton, cumsum_mask_triton, rank_mask_triton

p = argparse.ArgumentParser()
p.add_argument("--length", type=int, default=32768)
p.add_argument("--shape", default="9/3/64")
p.add_argument("--configs", default="1024x16,1024x4x32,1024x2x32,512x2x64,2048x8x16")
p.add_argument("--probes", default="8", help="probes per round of the split path (comma list)")
args = p.parse_args()
Hq, Hkv, D = (int(x) for x in args.shape.split("/"))
q, k, _ = structured_qkv(1, Hq, Hkv, args.length, D, seed=0, device="cuda", dtype=torch.bfloat16)
print(f"{args.shape} L={args.length}, {torch.cuda.get_device_name()}")
flex = torch.stack(last_queries_profiles_triton(q, k, 128)) / 128  # [2, 1, Hq, L], each row sums to ~1
vs = torch.stack(last_queries_profiles_triton(q, k, 64))
n = torch.tensor([1000, 6096], device="cuda").view(2, 1, 1).expand(2, 1, Hq)
# FlexPrefill's query-aware block map: per head, a softmax over each query block's visible key
# blocks, flattened to nQ * nK entries; every head active (the worst case), target 0.9 x rows.
nB = args.length // 128
g = torch.Generator(device="cuda").manual_seed(0)
logits = torch.randn(1, Hq, nB, nB, device="cuda", generator=g) * 2
logits = logits.masked_fill(torch.ones(nB, nB, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
block_map = torch.softmax(logits, -1).view(1, Hq, nB * nB)
cases = {"cover_count P=128": lambda b, w, s: cover_count_triton(flex, 0.9, block=b, num_warps=w, split=s),
         "rank_mask P=64": lambda b, w, s: rank_mask_triton(vs, n, block=b, num_warps=w, split=s),
         "cumsum_mask map": lambda b, w, s: cumsum_mask_triton(block_map, 0.9 * nB, block=b, num_warps=w, split=s)}


def parse(config):
    """``BLOCKxWARPS[xSPLIT]`` -> (block, warps, split); ``auto`` -> None (the default)."""
    parts = (config.split("x") + ["1"])[:3]
    return tuple(None if x == "auto" else int(x) for x in parts)


runs = [(c, int(p)) for p in args.probes.split(",") for c in args.configs.split(",")
        if c.count("x") == 2 or p == args.probes.split(",")[0]]  # the one-program configs once
for name, fn in cases.items():
    ref = fn(None, None, 1)
    for c, probes in runs:
        b, w, s = parse(c)
        row_select_triton.SPLIT_PROBES = probes
        c = f"{c} p{probes}" if c.count("x") == 2 else c
        try:
            out = fn(b, w, s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = fn(b, w, s)
            graph.replay()
            torch.cuda.synchronize()
        except Exception as exc:
            print(f"{name:>18} {c:>8}: failed: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        us = triton.testing.do_bench(graph.replay, warmup=25, rep=200, return_mode="median") * 1e3
        diff = int((out != ref).sum())
        print(f"{name:>18} {c:>14}: {us:7.1f} us  entries differing from one program: {diff}")
