"""Summaries of evaluation records: ``report.md`` tables and PNG plots.

* accuracy (or perplexity) per task x length x method, each with the achieved mean density;
* ``depth_<task>.png``: accuracy heatmap depth x length, one panel per method, for every task
  with a needle depth;
* ``pareto.png``: accuracy (perplexity) against achieved density, one panel per task, one
  point per (method, length);
* ``layer_density.png``: mean achieved density per layer, one row per (method, length).

Density is the share of the causal prefill attention area the plans computed (1.0 for dense),
weighted by area over the layers of a sample and averaged over samples.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .tasks import TASKS


def _mean(xs: Iterable[Optional[float]]) -> Optional[float]:
    vals = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(vals) / len(vals) if vals else None


def _order(seen: Iterable, preferred: Optional[Sequence] = None) -> List:
    out = [x for x in (preferred or []) if x in set(seen)]
    for x in seen:
        if x not in out:
            out.append(x)
    return out


def aggregate(records: Sequence[Dict[str, Any]]) -> Dict[Tuple[str, str, int], Dict[str, Any]]:
    """``{(task, method, length): {"value", "metric", "n", "density"}}``.

    ``value`` is the mean score (accuracy in [0, 1]) for generation tasks and the perplexity
    ``exp(sum nll / sum tokens)`` for ``perplexity``.
    """
    groups: Dict[tuple, List[dict]] = defaultdict(list)
    for r in records:
        groups[(r["task"], r["method"], int(r["length"]))].append(r)
    out = {}
    for key, rs in groups.items():
        if rs[0].get("metric") == "nll":
            tokens = sum(r.get("scored_tokens", 0) for r in rs)
            nll = sum(r.get("nll_sum", 0.0) for r in rs)
            value, metric = (math.exp(nll / tokens) if tokens else float("nan")), "perplexity"
        else:
            value, metric = _mean(r["score"] for r in rs), "accuracy"
        out[key] = {"value": value, "metric": metric, "n": len(rs), "density": _mean(r.get("density") for r in rs)}
    return out


def depth_grid(records: Sequence[Dict[str, Any]], task: str, method: str):
    """``(depths, lengths, acc[depth][length])`` for one depth task and method (None where empty)."""
    cells: Dict[tuple, List[float]] = defaultdict(list)
    for r in records:
        if r["task"] == task and r["method"] == method and r.get("depth") is not None:
            cells[(float(r["depth"]), int(r["length"]))].append(r["score"])
    depths = sorted({d for d, _ in cells})
    lengths = sorted({n for _, n in cells})
    grid = [[_mean(cells.get((d, n), [])) for n in lengths] for d in depths]
    return depths, lengths, grid


def layer_density(records: Sequence[Dict[str, Any]], method: str, length: int) -> List[Optional[float]]:
    """Mean achieved density per layer over the records of ``(method, length)``."""
    rows = [r.get("layer_density") or [] for r in records if r["method"] == method and int(r["length"]) == length]
    n = max((len(x) for x in rows), default=0)
    return [_mean(x[i] for x in rows if i < len(x)) for i in range(n)]


def _fmt_len(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _cell(agg: Optional[dict]) -> str:
    if agg is None or agg["value"] is None:
        return "-"
    dens = "-" if agg["density"] is None else f"{agg['density']:.2f}"
    if agg["metric"] == "perplexity":
        return f"{agg['value']:.2f} (d {dens}, n {agg['n']})"
    return f"{100 * agg['value']:.1f} (d {dens}, n {agg['n']})"


def tables(records: Sequence[Dict[str, Any]], methods: Optional[Sequence[str]] = None,
           tasks: Optional[Sequence[str]] = None) -> str:
    """Markdown: one table per task, rows = lengths, columns = methods, cells "score (d density, n N)"."""
    agg = aggregate(records)
    methods = _order([r["method"] for r in records], methods)
    tasks = _order([r["task"] for r in records], tasks)
    parts = []
    for task in tasks:
        lengths = sorted({int(r["length"]) for r in records if r["task"] == task})
        metric = "perplexity (lower is better)" if task == "perplexity" else "accuracy %"
        parts.append(f"### {task}: {metric}\n")
        parts.append("| length | " + " | ".join(methods) + " |")
        parts.append("|---|" + "---:|" * len(methods))
        for n in lengths:
            parts.append(f"| {_fmt_len(n)} | " + " | ".join(_cell(agg.get((task, m, n))) for m in methods) + " |")
        row = []
        for m in methods:
            rs = [r for r in records if r["task"] == task and r["method"] == m]
            if not rs:
                row.append("-")
                continue
            sub = aggregate([{**r, "length": 0} for r in rs])[(task, m, 0)]
            row.append(_cell(sub))
        parts.append("| all | " + " | ".join(row) + " |")
        parts.append("")
    return "\n".join(parts)


def summary_table(records: Sequence[Dict[str, Any]], methods: Optional[Sequence[str]] = None) -> str:
    """Markdown: per method, mean accuracy over the generation tasks' cells and mean density."""
    methods = _order([r["method"] for r in records], methods)
    lines = ["| method | mean accuracy % (generation tasks) | mean density | cells |", "|---|---:|---:|---:|"]
    for m in methods:
        rs = [r for r in records if r["method"] == m]
        acc = _mean(r["score"] for r in rs if r.get("metric") != "nll")
        dens = _mean(r.get("density") for r in rs)
        lines.append(f"| {m} | {'-' if acc is None else f'{100 * acc:.1f}'} | "
                     f"{'-' if dens is None else f'{dens:.3f}'} | {len(rs)} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_niah(records, task: str, methods: Sequence[str], path: Path) -> Optional[Path]:
    """Depth x length accuracy heatmap, one panel per method."""
    methods = [m for m in methods if any(r["task"] == task and r["method"] == m for r in records)]
    if not methods:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods) + 1, 3.6), squeeze=False)
    im = None
    for ax, m in zip(axes[0], methods):
        depths, lengths, grid = depth_grid(records, task, m)
        data = [[float("nan") if v is None else v for v in row] for row in grid]
        im = ax.imshow(data, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [_fmt_len(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
        for i, row in enumerate(data):
            for j, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=8)
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("context length")
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    fig.suptitle(f"{task}: accuracy by needle depth and context length", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_pareto(records, tasks: Sequence[str], methods: Sequence[str], path: Path) -> Optional[Path]:
    """Accuracy (or perplexity) against achieved density, one panel per task."""
    if not tasks:
        return None
    plt = _plt()
    agg = aggregate(records)
    ncols = min(3, len(tasks))
    nrows = -(-len(tasks) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.6 * nrows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[len(tasks):]:
        ax.axis("off")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "os^Dv<>pP*"
    lengths = sorted({int(r["length"]) for r in records})
    for ax, task in zip(flat, tasks):
        for i, m in enumerate(methods):
            for j, n in enumerate(lengths):
                a = agg.get((task, m, n))
                if a is None or a["value"] is None or a["density"] is None:
                    continue
                y = a["value"] if a["metric"] == "perplexity" else 100 * a["value"]
                ax.scatter(a["density"], y, color=colors[i % len(colors)], marker=markers[j % len(markers)],
                           label=f"{m} @ {_fmt_len(n)}", s=36)
        ax.set_xlabel("achieved density (share of causal attention)")
        ax.set_ylabel("perplexity" if task == "perplexity" else "accuracy %")
        ax.set_xlim(0, 1.05)
        if task != "perplexity":
            ax.set_ylim(-3, 103)
        ax.set_title(task, fontsize=10)
        ax.grid(alpha=0.3)
    handles, labels = flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    fig.suptitle("accuracy vs achieved density", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_layer_density(records, methods: Sequence[str], path: Path) -> Optional[Path]:
    """Heatmap of mean achieved density per layer; rows = (method, length)."""
    lengths = sorted({int(r["length"]) for r in records})
    rows, labels = [], []
    for m in methods:
        for n in lengths:
            dens = layer_density(records, m, n)
            if dens and any(d is not None for d in dens):
                rows.append([float("nan") if d is None else d for d in dens])
                labels.append(f"{m} @ {_fmt_len(n)}")
    if not rows:
        return None
    width = max(len(r) for r in rows)
    rows = [r + [float("nan")] * (width - len(r)) for r in rows]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * width + 3), 0.38 * len(rows) + 1.6))
    im = ax.imshow(rows, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("layer")
    ax.set_title("achieved prefill density per layer (mean over samples)", fontsize=10)
    fig.colorbar(im, ax=ax, label="density")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- report
def write_report(out_dir, records: Sequence[Dict[str, Any]], *, info: Optional[Dict[str, Any]] = None,
                 methods: Optional[Sequence[str]] = None, tasks: Optional[Sequence[str]] = None,
                 plots: bool = True) -> Path:
    """Write ``report.md`` (and the PNG plots) for ``records`` into ``out_dir``; returns its path.

    ``info`` adds "key: value" lines to the header (command, model, device, date, wall time, ...).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    methods = _order([r["method"] for r in records], methods)
    tasks = _order([r["task"] for r in records], tasks)
    images = []
    if plots and records:
        for task in tasks:
            if task in TASKS and TASKS[task].uses_depth:
                p = plot_niah(records, task, methods, out / f"depth_{task}.png")
                if p:
                    images.append((f"{task}: depth x length", p.name))
        p = plot_pareto(records, tasks, methods, out / "pareto.png")
        if p:
            images.append(("accuracy vs density", p.name))
        p = plot_layer_density(records, methods, out / "layer_density.png")
        if p:
            images.append(("density per layer", p.name))
    lines = ["# sparseattn eval", ""]
    for key, value in (info or {}).items():
        lines.append(f"- {key}: {value}")
    lines += ["", "Cells: accuracy in % (perplexity for `perplexity`), then the achieved mean density and the number "
              "of samples. Density: for prefill methods the share of the causal attention area the plans computed; "
              "for `decode:` methods (dense prefill) the mean share of the cached tokens a decode step read. "
              "1.00 = dense.", "",
              summary_table(records, methods), "", tables(records, methods, tasks)]
    for title, name in images:
        lines += [f"![{title}]({name})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


__all__ = ["aggregate", "depth_grid", "layer_density", "tables", "summary_table", "plot_niah", "plot_pareto",
           "plot_layer_density", "write_report"]
