"""BENCHMARKS.md's decode tables from a `sparseattn bench decode` results.json: one table per (shape,
context, budget), batch 1 and batch 8 side by side; "target" is issue 4's bound (1.5 x the bytes'
time at 3 TB/s + 10 us) and whether the step meets it.

    python scripts/decode_table.py docs/bench/decode_results_s3.json [--budget 2048]
"""

import argparse
import json
from collections import defaultdict

p = argparse.ArgumentParser()
p.add_argument("results")
p.add_argument("--budget", type=int, default=2048)
args = p.parse_args()
rows = json.load(open(args.results))["rows"]

groups = defaultdict(dict)
for r in rows:
    if "error" in r or (r.get("budget") not in (None, args.budget)):
        continue
    groups[(r["shape"], r["L"])][(r["method"], r["B"])] = r


def f(x, p=3):
    return "-" if x is None else f"{x:.{p}f}"


def target(row):
    """Issue 4's bound (1.5 x the bytes' time + 10 us) and whether the step is within it."""
    if row.get("target_ms") is None:
        return "-"
    return f"{row['target_ms']:.3f} {'yes' if row['layer_ms'] <= row['target_ms'] else 'no'}"


for (shape, L), cells in groups.items():
    methods = list(dict.fromkeys(m for m, _ in cells))
    print(f"\n**{shape}, {L // 1024}K context, budget {args.budget}** (ms per layer step; SDPA = cuDNN on the "
          "gathered cache)\n")
    print("| method | B=1 step | B=1 target | B=1 x floor | B=1 vs SDPA | B=8 step | B=8 target | B=8 x floor | "
          "B=8 vs SDPA | B=8 select / kernel | B=8 kernel TB/s | timing |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    sdpa = {b: next((c["sdpa_ms"] for (m, bb), c in cells.items() if bb == b), None) for b in (1, 8)}
    print(f"| SDPA cuDNN | {f(sdpa[1])} | | | 1.00 | {f(sdpa[8])} | | | 1.00 | | | |")
    for m in methods:
        one, eight = cells.get((m, 1), {}), cells.get((m, 8), {})
        name = "ours, dense" if m == "ours_dense" else m
        sel = f"{f(eight.get('select_ms'))} / {f(eight.get('kernel_ms'))}"
        print(f"| {name} | {f(one.get('layer_ms'))} | {target(one)} | {f(one.get('vs_floor'), 1)} | "
              f"{f(one.get('speedup_vs_sdpa'), 2)} | {f(eight.get('layer_ms'))} | {target(eight)} | "
              f"{f(eight.get('vs_floor'), 1)} | "
              f"{f(eight.get('speedup_vs_sdpa'), 2)} | {sel} | {f(eight.get('kernel_tbs'), 2)} | {eight.get('mode', '')} |")
