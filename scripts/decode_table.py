"""BENCHMARKS.md's decode tables from a `sparseattn bench decode` results.json: one table per (shape,
context, budget), batch 1 and batch 8 side by side; "target" is issue 4's bound (1.5 x the bytes'
time at 3 TB/s + 10 us) and whether the step meets it.

When the rows have the in-graph figures (``graph_layer_ms``: one steady layer step's marginal cost
inside a CUDA graph of many layer steps, launch latency amortised; ``--graph-layers``), the table
gets "B=1 in graph" / "B=8 in graph" columns (the figure and whether it meets the same target) and
"B=8 in graph vs SDPA"; the SDPA row shows SDPA's in-graph figure there. Per-replay and in-graph
figures are comparable only within their own columns. Results files without them render as before.

    python scripts/decode_table.py docs/bench/decode_results_s3.json [--budget 2048]
"""

import argparse
import json
from collections import defaultdict


def f(x, p=3):
    return "-" if x is None else f"{x:.{p}f}"


def target(row):
    """Issue 4's bound (1.5 x the bytes' time + 10 us) and whether the step is within it."""
    if row.get("target_ms") is None:
        return "-"
    return f"{row['target_ms']:.3f} {'yes' if row['layer_ms'] <= row['target_ms'] else 'no'}"


def in_graph(row):
    """The in-graph per-layer figure and whether it meets the same target ("-" when absent)."""
    ms = row.get("graph_layer_ms")
    if ms is None:
        return "-"
    if row.get("target_ms") is None:
        return f(ms)
    return f"{f(ms)} {'yes' if ms <= row['target_ms'] else 'no'}"


def render(rows, budget=2048):
    """The markdown tables (a string) of ``rows`` at ``budget``."""
    groups = defaultdict(dict)
    for r in rows:
        if "error" in r or (r.get("budget") not in (None, budget)):
            continue
        groups[(r["shape"], r["L"])][(r["method"], r["B"])] = r
    graph = any(r.get("graph_layer_ms") is not None or r.get("sdpa_graph_layer_ms") is not None
                for cells in groups.values() for r in cells.values())
    out = []
    for (shape, L), cells in groups.items():
        methods = list(dict.fromkeys(m for m, _ in cells))
        out.append(f"\n**{shape}, {L // 1024}K context, budget {budget}** (ms per layer step; SDPA = cuDNN on the "
                   "gathered cache" + ("; in graph = one steady layer step inside a CUDA graph of many layer steps, "
                                       "launch amortised" if graph else "") + ")\n")
        head = ("| method | B=1 step | B=1 target | B=1 x floor | B=1 vs SDPA | B=8 step | B=8 target | B=8 x floor | "
                "B=8 vs SDPA | B=8 select / kernel | B=8 kernel TB/s |")
        rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        if graph:
            head += " B=1 in graph | B=8 in graph | B=8 in graph vs SDPA |"
            rule += "---:|---:|---:|"
        out.append(head + " timing |")
        out.append(rule + "---|")
        sdpa = {b: next((c["sdpa_ms"] for (m, bb), c in cells.items() if bb == b), None) for b in (1, 8)}
        line = f"| SDPA cuDNN | {f(sdpa[1])} | | | 1.00 | {f(sdpa[8])} | | | 1.00 | | |"
        if graph:
            sg = {b: next((c["sdpa_graph_layer_ms"] for (m, bb), c in cells.items()
                           if bb == b and c.get("sdpa_graph_layer_ms") is not None), None) for b in (1, 8)}
            line += f" {f(sg[1])} | {f(sg[8])} | {'1.00' if sg[8] is not None else '-'} |"
        out.append(line + " |")
        for m in methods:
            one, eight = cells.get((m, 1), {}), cells.get((m, 8), {})
            name = "ours, dense" if m == "ours_dense" else m
            sel = f"{f(eight.get('select_ms'))} / {f(eight.get('kernel_ms'))}"
            line = (f"| {name} | {f(one.get('layer_ms'))} | {target(one)} | {f(one.get('vs_floor'), 1)} | "
                    f"{f(one.get('speedup_vs_sdpa'), 2)} | {f(eight.get('layer_ms'))} | {target(eight)} | "
                    f"{f(eight.get('vs_floor'), 1)} | "
                    f"{f(eight.get('speedup_vs_sdpa'), 2)} | {sel} | {f(eight.get('kernel_tbs'), 2)} |")
            timing = eight.get("mode", "")
            if graph:
                line += f" {in_graph(one)} | {in_graph(eight)} | {f(eight.get('graph_speedup_vs_sdpa'), 2)} |"
                gm = eight.get("graph_mode")
                if gm and not str(gm).startswith("graph"):
                    timing += f"; in graph: {gm}"
            out.append(f"{line} {timing} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("results")
    p.add_argument("--budget", type=int, default=2048)
    args = p.parse_args(argv)
    with open(args.results) as fh:
        rows = json.load(fh)["rows"]
    print(render(rows, args.budget), end="")


if __name__ == "__main__":
    main()
