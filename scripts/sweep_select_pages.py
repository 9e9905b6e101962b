"""Time the page selection of Quest / block top-k (scores -> ascending page lists) on the GPU:
the bisection kernel at several warp counts and the two-stage selection at several chunk sizes
against ``torch.topk`` + assembly, on random scores.

    python scripts/sweep_select_pages.py [--pages 2048,8192] [--rows 8,64] [--budget 128]
"""

import argparse

import torch
from sparseattn.bench.timing import BenchTimer
from sparseattn.kernels.page_score_triton import top_pages_selection

p = argparse.ArgumentParser()
p.add_argument("--pages", default="2048,8192,16384")
p.add_argument("--rows", default="8,64")
p.add_argument("--budget", type=int, default=128)
p.add_argument("--warps", default="2,4,8,16")
p.add_argument("--chunks", default="512,1024,2048", help="two_stage chunk sizes (pages)")
args = p.parse_args()

print(f"device {torch.cuda.get_device_name()}; us per call (CUDA-graph replay, median)")
timer = BenchTimer("cuda", rep_ms=200, graphs=True)
for pages in (int(x) for x in args.pages.split(",")):
    for rows in (int(x) for x in args.rows.split(",")):
        B, H = max(1, rows // 8), min(rows, 8)
        lengths = torch.full((B,), pages * 16, dtype=torch.int32, device="cuda")
        scores = torch.randn(B, H, pages, device="cuda")
        scores[..., -1] = float("-inf")  # the step's own page: forced, not a candidate
        kw = dict(page_size=16, budget=args.budget, recent=1, width=args.budget + 2, forced_in_budget=True)
        variants = [("topk", dict(method="topk"))] + [(f"bisect w{w}", dict(method="bisect", num_warps=int(w)))
                                                      for w in args.warps.split(",")]
        variants += [(f"two_stage c{c}", dict(method="two_stage", chunk=int(c))) for c in args.chunks.split(",")]
        ref = top_pages_selection(scores, lengths, method="topk", **kw)
        line = []
        for name, extra in variants:
            sel = top_pages_selection(scores, lengths, **kw, **extra)
            same = torch.equal(sel.pages, ref.pages) and torch.equal(sel.page_counts, ref.page_counts)
            us = 1e3 * timer(lambda: top_pages_selection(scores, lengths, **kw, **extra))
            line.append(f"{name} {us:.1f}{'' if same else ' (DIFF)'}")
        print(f"pages {pages:6d} rows {rows:3d}: " + ", ".join(line))
