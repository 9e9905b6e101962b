"""Time the top-k of long rows on the GPU: the radix select (``radix_top_positions``, ascending picks)
at several chunk sizes and warp counts against ``torch.topk`` + a sort of the picks (what the
token-level decode methods ran before), on random float32 scores.

    python scripts/sweep_topk.py [--rows 1,8,64] [--lengths 32768,131072] [--k 2048]
                                 [--chunks 0,1024,2048,4096] [--warps 0,4,8]

Chunk / warps 0 = the default choice. us per call, CUDA-graph replay (median); every variant's picks are
checked against the torch path's (random scores: no ties, so the sets are equal).
"""

import argparse

import torch

from sparseattn.bench.timing import BenchTimer
from sparseattn.kernels.radix_topk_triton import _chunk_for, radix_top_positions

p = argparse.ArgumentParser()
p.add_argument("--rows", default="1,8,64")
p.add_argument("--lengths", default="32768,131072")
p.add_argument("--k", type=int, default=2048)
p.add_argument("--chunks", default="0,1024,2048,4096")
p.add_argument("--warps", default="0,4,8", help="0 = the default choice")
args = p.parse_args()

print(f"device {torch.cuda.get_device_name()}; k={args.k}; us per call (CUDA-graph replay, median)")
timer = BenchTimer("cuda", rep_ms=200, graphs=True)


def torch_path(score, k):
    return torch.topk(score, k, dim=-1, sorted=False).indices.to(torch.int32).sort(dim=-1).values


for N in (int(x) for x in args.lengths.split(",")):
    for R in (int(x) for x in args.rows.split(",")):
        score = torch.randn(R, N, device="cuda")
        want = torch_path(score, args.k)
        line = [f"torch.topk+sort {1e3 * timer(lambda: torch_path(score, args.k)):.1f}"]
        for chunk in (int(x) for x in args.chunks.split(",")):
            for warps in (int(x) for x in args.warps.split(",")):
                kw = dict(chunk=chunk or None, num_warps=warps or None)
                same = torch.equal(radix_top_positions(score, args.k, **kw), want)
                us = 1e3 * timer(lambda: radix_top_positions(score, args.k, **kw))
                name = f"c{chunk or _chunk_for(R, N)}{'*' if not chunk else ''} w{warps or '*'}"
                line.append(f"{name} {us:.1f}{'' if same else ' (DIFF)'}")
        print(f"N {N:6d} rows {R:3d}: " + ", ".join(line), flush=True)
