"""Where the split row selection's time goes, round by round, on a GPU (a diagnostic).

    python scripts/trace_row_select.py [--length 32768] [--split 32] [--probes 8] [--block B] [--warps W]

FlexPrefill-like cover counts (as in ``sweep_row_select.py``). Each program of the split path
stamps the GPU's global timer at the start of each round, after publishing its partials and after
the barrier; printed per round: the slowest program's work (start -> published) and wait
(published -> released), and the spread of the release times over the programs of a row.
"""

import argparse

import torch
import triton

from sparseattn.bench.synthetic import structured_qkv
from sparseattn.kernels import row_select_triton as rs
from sparseattn.kernels.last_queries_triton import last_queries_profiles_triton

p = argparse.ArgumentParser()
p.add_argument("--length", type=int, default=32768)
p.add_argument("--shape", default="9/3/64")
p.add_argument("--split", type=int, default=32, help="programs per row (fewer if they would not all be resident)")
p.add_argument("--probes", type=int, default=None)
p.add_argument("--block", type=int, default=None)
p.add_argument("--warps", type=int, default=None)
args = p.parse_args()
Hq, Hkv, D = (int(x) for x in args.shape.split("/"))
q, k, _ = structured_qkv(1, Hq, Hkv, args.length, D, seed=0, device="cuda", dtype=torch.bfloat16)
flex = torch.stack(last_queries_profiles_triton(q, k, 128)) / 128
rows = flex.reshape(-1, args.length)
R = rows.shape[0]
param = torch.full((R,), 0.9, device="cuda")
for mass, name in ((True, "cover_count"), (False, "rank_mask n=1000")):
    prm = param if mass else torch.full((R,), 1000, dtype=torch.int64, device="cuda")
    for rep in range(3):
        trace = torch.zeros(R * triton.cdiv(args.length, 16), 64, 3, dtype=torch.int64, device="cuda")
        t0 = torch.cuda.Event(enable_timing=True)
        t1 = torch.cuda.Event(enable_timing=True)
        t0.record()
        rs._select(rows, prm, mass=mass, write_mask=not mass, write_count=mass, count_bias=1 if mass else 0,
                   split=args.split, probes=args.probes, block=args.block, num_warps=args.warps, trace=trace)
        t1.record()
        torch.cuda.synchronize()
    n_prog = int((trace[:, 0, 0] > 0).sum())
    tr = trace[:n_prog].cpu()
    start = tr[:, 0, 0].min()
    print(f"{name}: R={R}, {n_prog // R} programs per row, probes={args.probes or rs.SPLIT_PROBES}: "
          f"{t0.elapsed_time(t1) * 1e3:.1f} us (events, eager, incl. allocations)")
    rounds = int((tr[:, :, 0] > 0).sum(1).max())
    for r in range(rounds):
        st, pub, rel = tr[:, r, 0], tr[:, r, 1], tr[:, r, 2]
        ok = st > 0
        work = (pub - st)[ok & (pub > 0)]
        wait = (rel - pub)[ok & (pub > 0)]
        line = f"  round {r:2d}: start +{(st[ok].min() - start) / 1e3:6.2f} us"
        if work.numel():
            line += f"  work max {work.max() / 1e3:5.2f} us  wait max {wait.max() / 1e3:5.2f} us"
            spread = (rel.view(R, -1).max(1).values - rel.view(R, -1).min(1).values)[ok.view(R, -1).all(1)]
            if spread.numel():
                line += f"  release spread max {spread.max() / 1e3:5.2f} us"
        print(line)
    last = tr[:, :, 0].max()
    print(f"  last round start +{(last - start) / 1e3:.2f} us")
