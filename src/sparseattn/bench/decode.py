"""``sparseattn bench decode``: decode-step attention time per method vs SDPA dense on the same cache.

For every shape ``Hq/Hkv/D``, context length, batch and token budget, one
:class:`~sparseattn.cache.PagedKVCache` of two layers (same random K/V in both) is built and a
decode step (``q [B, Hq, 1, D]``) is timed:

* ``sdpa_ms``: SDPA on the cache gathered into dense ``[B, Hkv, L, D]`` tensors, the fastest of
  cuDNN / FlashAttention / efficient (GQA native where the backend has it);
* ``ours_dense_ms``: :func:`sparseattn.sparse_decode_attention` with no selection;
* per method, at its official defaults with the budget mapped onto its own knob
  (:data:`BUDGET_KNOBS`) and ``dense_layers=()``: ``layer_ms`` = ``select`` + the sparse kernel at
  layer 1 (the steady-state layer: reuse layers of TidalDecode/DELTA, recycled steps of Recycled
  Attention amortised with its full steps, ...), ``sel_layer_ms`` = the same at layer 0, which
  cross-layer methods configure as their selection layer (they read all keys there);
  ``select_ms`` and ``kernel_ms`` split ``layer_ms``.

Floors: ``floor_ms`` = the bytes the layer step must read (selected K/V + the method's page
metadata or scoring keys, :func:`metadata_bytes`) at ``--bandwidth`` (3.0 TB/s, the H100's copy
rate in ``GPU.md``) plus ``--latency-us``; ``target_ms`` = 1.5 x the bytes' time + ``--latency-us``
(issue 4: "within 1.5x its byte floor + 10 us"), ``meets_target`` = ``layer_ms <= target_ms``.
``kernel_tbs`` = selected K/V bytes / ``kernel_ms``.

CUDA graphs (``--graphs``, default on): each timed closure is captured once and replayed, which
removes the Python/launch overhead of the many small ops of a selection; methods whose step
depends on host state (``graph_safe = False``, e.g. a host step counter) or whose capture fails
are timed eagerly, and the row says which (``mode``). Recycled Attention (a host counter picks a
full or a recycle step) is timed per phase (:func:`time_phases`): one captured full step and one
captured recycle step, ``layer_ms = (full_ms + (stride - 1) * recycle_ms) / stride``, ``mode``
"graph (phases)"; its ``select_ms`` / ``kernel_ms`` / ``read_tokens`` are the recycle step's.

Results: ``OUT/results.json`` (rows + environment) and ``OUT/table.md``; rows are printed as they
finish. On a CPU the same code runs with ``time.perf_counter`` and the reference kernels (for
tests, not figures).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from ..cache import PagedKVCache
from ..decode_api import sparse_decode_attention
from .timing import BenchTimer

SHAPES = {"32/8/128": (32, 8, 128), "9/3/64": (9, 3, 64)}
DEFAULT_OUT = "runs/bench_decode"

# method -> function(budget tokens, page_size) -> overrides that give the method that budget.
# Cross-layer methods also get their roles: layer 0 selects, layer 1 (timed as layer_ms) reuses.
BUDGET_KNOBS: Dict[str, Callable[[int, int], dict]] = {
    "streaming": lambda b, p: {"sink": 4, "window": max(1, b - 4)},
    "quest": lambda b, p: {"token_budget": b},
    "tidaldecode": lambda b, p: {"token_budget": b, "selection_layers": (0,)},
    "recycled": lambda b, p: {"top_k": b},
    "delta": lambda b, p: {"page_budget": max(1, b // p), "delta_layers": (0,)},
    "h2o": lambda b, p: {"hh_size": b // 2, "recent_size": b - b // 2},
    "tova": lambda b, p: {"cache_size": b},
    "snapkv": lambda b, p: {"max_capacity_prompt": b},
    "pyramidkv": lambda b, p: {"max_capacity_prompt": b},
    "double_sparsity": lambda b, p: {"token_budget": b, "dense_below": 0},
    "block_topk": lambda b, p: {"topk_pages": max(1, b // p)},
    "tokenselect": lambda b, p: {"n_init": min(128, b // 8), "n_local": min(512, b // 4),
                                 "top_k": b - min(128, b // 8) - min(512, b // 4)},
}


def _parse_len(text: str) -> int:
    t = text.strip().lower()
    try:
        return int(float(t[:-1]) * 1024) if t.endswith("k") else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad length {text!r}; use e.g. 32k or 4096") from None


def _int_list(text: str, flag: str) -> List[int]:
    out = []
    for part in text.split(","):
        value = _parse_len(part)
        if value <= 0:
            raise SystemExit(f"{flag}: values must be positive, got {text!r}")
        out.append(value)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--contexts", default="32k,128k", help="context lengths (default 32k,128k)")
    p.add_argument("--batches", default="1,8", help="batch sizes (default 1,8)")
    p.add_argument("--budgets", default="512,2048,4096", help="token budgets (default 512,2048,4096)")
    p.add_argument("--shapes", default="32/8/128,9/3/64",
                   help="Hq/Hkv/D shapes, comma-separated (default 32/8/128,9/3/64)")
    p.add_argument("--methods", default=None, help="decode methods (default: every registered one)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="time through CUDA graphs where the method allows (default on)")
    p.add_argument("--bandwidth", type=float, default=3.0, help="copy bandwidth in TB/s for the floors (3.0)")
    p.add_argument("--latency-us", type=float, default=10.0, help="launch latency added to each floor (10 us)")
    p.add_argument("--rep-ms", type=int, default=100, help="timing repetitions per figure (ms of GPU time)")
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu (tests only)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")


# ----------------------------------------------------------------------------- timing
def sdpa_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """The fastest SDPA backend for one decode step (no causal mask: q sits after every key)."""
    import torch.nn.functional as F

    if q.device.type != "cuda":
        return (lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)), "math"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    best = None
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def call(backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        try:
            call()
            torch.cuda.synchronize()
        except Exception:
            continue
        import triton.testing

        ms = triton.testing.do_bench(call, warmup=10, rep=50, return_mode="median")
        if best is None or ms < best[0]:
            best = (ms, call, name)
    if best is None:
        raise RuntimeError("no SDPA backend runs this decode shape")
    return best[1], best[2]


# ----------------------------------------------------------------------------- bytes
def metadata_bytes(method, cache: PagedKVCache, layer_role: str, read_tokens: Optional[float] = None) -> int:
    """Bytes a method reads besides the selected K/V at one layer step (an estimate by kind of scorer):
    page min/max (Quest), page mean keys (block top-k), label channels (Double Sparsity), every key
    (exact scoring: TokenSelect, and the selection layers / full steps of the reuse methods; full
    steps of Recycled Attention amortised over its stride), the keys of the tokens the step reads
    once more (H2O, TOVA: they score the kept tokens; ``read_tokens`` per (sequence, KV head),
    default all)."""
    B, H, D = cache.batch, cache.num_kv_heads, cache.head_dim
    N = cache.max_length(0)
    pages = -(-N // cache.page_size)
    item = torch.finfo(cache.dtype).bits // 8
    name = method.name
    all_keys = B * H * N * D * item
    if name == "quest":
        return 2 * B * H * pages * D * item
    if name == "block_topk":
        return B * H * pages * D * 4
    if name == "double_sparsity":
        r = getattr(method, "num_channels", None) or getattr(method, "r", None) or 16
        return B * H * N * int(r) * 2
    if name == "tokenselect":
        return all_keys
    if name in ("h2o", "tova"):
        return all_keys if read_tokens is None else int(B * H * read_tokens * D * item)
    if name in ("tidaldecode", "delta"):
        return all_keys if layer_role == "selection" else 0
    if name == "recycled":
        stride = getattr(method, "stride", None) or 1
        return all_keys // int(stride)
    return 0


def _selected_tokens(sel, cache: PagedKVCache, layer: int) -> float:
    """Mean tokens read per (sequence, KV head)."""
    lengths = cache.layer_lengths(layer)
    if sel is None:
        return float(lengths.float().mean())
    picked = sel.token_mask(lengths, cache.max_length(layer)).sum()
    return float(picked) / (lengths.shape[0] * sel.heads)


# ----------------------------------------------------------------------------- one case
def build_cache(B: int, Hkv: int, D: int, L: int, dtype, device, page_size: int, seed: int = 0) -> PagedKVCache:
    gen = torch.Generator(device=device).manual_seed(seed)  # on the device: a 128K cache is GBs
    cache = PagedKVCache(2, Hkv, D, page_size=page_size, dtype=dtype, device=device, max_batch=B)
    cache.reserve(L + 16)
    chunk = 16384
    for start in range(0, L, chunk):
        n = min(chunk, L - start)
        k = torch.randn(B, Hkv, n, D, generator=gen, device=device).to(dtype)
        v = torch.randn(B, Hkv, n, D, generator=gen, device=device).to(dtype)
        for layer in range(2):
            cache.append(layer, k, v)
    return cache


def method_for(name: str, budget: Optional[int], page_size: int):
    from ..methods.registry import get_method

    overrides = {"dense_layers": ()}
    knob = BUDGET_KNOBS.get(name)
    if budget is not None and knob is not None:
        overrides.update(knob(budget, page_size))
    cls = type(get_method(name, kind="decode"))
    overrides.update(getattr(cls, "bench_roles", {}))  # e.g. selection layer 0, reuse at layer 1
    valid = {f for f in getattr(cls, "__dataclass_fields__", {})}
    return get_method(name, kind="decode", **{k: v for k, v in overrides.items() if k in valid})


def time_phases(method, cache: PagedKVCache, q: torch.Tensor, layer: int, timer: BenchTimer) -> dict:
    """Recycled Attention at ``layer``: its full step and its recycle step each timed as its own
    closure (through a CUDA graph where the timer allows: :meth:`set_phase` pins the phase, a host
    write that runs at capture), amortised over the stride. The captured full step refreshes the
    stored set in place, so the recycle step's capture reads the same buffers."""

    def step(phase):
        method.set_phase(cache, layer, phase)
        return sparse_decode_attention(q, cache, layer, method.select(q, cache, layer))

    stride = method.stride
    full_ms, full_mode = timer.timed(lambda: step("full"), True)
    if stride == 1:  # every step is a full step
        recycle_ms, recycle_mode = None, full_mode
    else:
        recycle_ms, recycle_mode = timer.timed(lambda: step("recycle"), True)
    modes = {full_mode, recycle_mode}
    mode = "graph (phases)" if modes == {"graph"} else " + ".join(sorted(modes)) + " (phases)"
    layer_ms = full_ms if recycle_ms is None else (full_ms + (stride - 1) * recycle_ms) / stride
    return {"layer_ms": layer_ms, "full_ms": full_ms, "recycle_ms": recycle_ms, "mode": mode}


def run_method(name: str, budget: Optional[int], cache: PagedKVCache, q: torch.Tensor, prompt_q: torch.Tensor,
               timer: BenchTimer, args) -> dict:
    method = method_for(name, budget, args.page_size)
    cache.method_state.clear()
    for layer in range(2):
        method.on_prefill(prompt_q, cache, layer)
    graph_ok = getattr(method, "graph_safe", True)
    row = {"method": name, "budget": budget}

    def layer_step(layer):
        sel = method.select(q, cache, layer)
        return sparse_decode_attention(q, cache, layer, sel)

    # The selection layer runs first in a step; the steady-state layer after it.
    layer_step(0)
    sel1 = method.select(q, cache, 1)
    row["read_tokens"] = _selected_tokens(sel1, cache, 1)
    if callable(getattr(method, "set_phase", None)):  # Recycled Attention: each phase on its own
        row["sel_layer_ms"] = time_phases(method, cache, q, 0, timer)["layer_ms"]
        row.update(time_phases(method, cache, q, 1, timer))
        if method.stride > 1:  # the recycle step's select (sel1 above is a recycle step's selection)
            row["select_ms"], _ = timer.timed(
                lambda: (method.set_phase(cache, 1, "recycle"), method.select(q, cache, 1)), True)
        else:
            row["select_ms"], _ = timer.timed(lambda: method.select(q, cache, 1), True)
    else:
        row["sel_layer_ms"], _ = timer.timed(lambda: layer_step(0), graph_ok)
        layer_step(0)
        row["layer_ms"], row["mode"] = timer.timed(lambda: layer_step(1), graph_ok)
        row["select_ms"], _ = timer.timed(lambda: method.select(q, cache, 1), graph_ok)
    row["kernel_ms"], _ = timer.timed(lambda: sparse_decode_attention(q, cache, 1, sel1), True)
    B, H, D = cache.batch, cache.num_kv_heads, cache.head_dim
    item = torch.finfo(cache.dtype).bits // 8
    kv_bytes = 2 * B * H * row["read_tokens"] * D * item
    meta = metadata_bytes(method, cache, "steady", row["read_tokens"])
    row.update(floors(kv_bytes + meta, row["layer_ms"], args))
    row["kernel_tbs"] = kv_bytes / (row["kernel_ms"] * 1e9)
    return row


def floors(read_bytes: float, layer_ms: float, args) -> dict:
    """``floor_ms`` (the bytes at ``--bandwidth`` plus ``--latency-us``), ``vs_floor``, and issue 4's
    target: ``target_ms`` = 1.5 x the bytes' time + the latency, ``meets_target``."""
    bytes_ms = read_bytes / (args.bandwidth * 1e9)
    latency_ms = args.latency_us / 1000.0
    floor_ms, target_ms = bytes_ms + latency_ms, 1.5 * bytes_ms + latency_ms
    return dict(floor_ms=floor_ms, vs_floor=layer_ms / floor_ms, target_ms=target_ms,
                meets_target=bool(layer_ms <= target_ms))


def run_case(shape: str, L: int, B: int, budgets: List[int], methods: List[str], timer: BenchTimer, args, device,
             emit) -> None:
    Hq, Hkv, D = SHAPES[shape] if shape in SHAPES else tuple(int(x) for x in shape.split("/"))
    dtype = getattr(torch, args.dtype)
    cache = build_cache(B, Hkv, D, L, dtype, device, args.page_size)
    gen = torch.Generator(device="cpu").manual_seed(1)
    q = torch.randn(B, Hq, 1, D, generator=gen).to(device=device, dtype=dtype)
    prompt_q = torch.randn(B, Hq, min(64, L), D, generator=gen).to(device=device, dtype=dtype)
    base = {"shape": shape, "L": L, "B": B}
    k, v = cache.gather(1)
    sdpa, sdpa_name = sdpa_decode(q, k, v)
    sdpa_ms, _ = timer.timed(sdpa, False)
    del k, v
    dense_ms, dense_mode = timer.timed(lambda: sparse_decode_attention(q, cache, 1, None), True)
    item = torch.finfo(dtype).bits // 8
    all_bytes = 2 * B * Hkv * L * D * item
    dense_row = dict(base, method="ours_dense", budget=None, layer_ms=dense_ms, mode=dense_mode, sdpa_ms=sdpa_ms,
                     sdpa_backend=sdpa_name, read_tokens=float(L), kernel_ms=dense_ms,
                     kernel_tbs=all_bytes / (dense_ms * 1e9), **floors(all_bytes, dense_ms, args))
    dense_row["speedup_vs_sdpa"] = sdpa_ms / dense_ms
    emit(dense_row)
    for name in methods:
        for budget in (budgets if name in BUDGET_KNOBS else [None]):
            try:
                row = run_method(name, budget, cache, q, prompt_q, timer, args)
                row.update(base, sdpa_ms=sdpa_ms)
                row["speedup_vs_sdpa"] = sdpa_ms / row["layer_ms"]
            except Exception as exc:  # one method failing must not lose the others' figures
                row = dict(base, method=name, budget=budget, error=f"{type(exc).__name__}: {exc}"[:300])
            emit(row)
    del cache
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- output
COLUMNS = ("shape", "L", "B", "method", "budget", "read_tokens", "select_ms", "kernel_ms", "layer_ms",
           "sel_layer_ms", "floor_ms", "vs_floor", "target_ms", "meets_target", "kernel_tbs", "sdpa_ms",
           "speedup_vs_sdpa", "mode")


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown_table(rows: List[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['L']} | {r['B']} | {r['method']} | {_cell(r.get('budget'))} | "
                         f"error: {r['error'][:80]} |")
            continue
        lines.append("| " + " | ".join(_cell(r.get(c)) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def _write(out: Path, env: dict, rows: List[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps({"environment": env, "rows": rows}, indent=1, default=str) + "\n")
    os.replace(tmp, out / "results.json")
    (out / "table.md").write_text(markdown_table(rows))


def run(args) -> int:
    from ..methods.registry import list_methods
    from .kernel import environment

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    available = list_methods("decode")
    methods = [m for m in available if m != "dense"] if not args.methods else \
        [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in available]
    if unknown:
        raise SystemExit(f"unknown decode method(s) {unknown}; choose from {available}")
    for shape in args.shapes.split(","):
        if shape not in SHAPES and not (shape.count("/") == 2 and all(x.isdigit() for x in shape.split("/"))):
            raise SystemExit(f"bad shape {shape!r}; use Hq/Hkv/D such as {list(SHAPES)}")
    contexts = _int_list(args.contexts, "--contexts")
    batches = _int_list(args.batches, "--batches")
    budgets = _int_list(args.budgets, "--budgets")
    if args.page_size <= 0:
        raise SystemExit("--page-size must be positive")
    env = environment()
    env["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    timer = BenchTimer(device, rep_ms=args.rep_ms, graphs=args.graphs)
    rows: List[dict] = []
    out = Path(args.out)

    def emit(row):
        rows.append(row)
        if "error" in row:
            print(f"{row['shape']:>9} L={row['L']:>6} B={row['B']} {row['method']:>16} {_cell(row.get('budget')):>5}  "
                  f"error: {row['error']}", flush=True)
        else:
            print(f"{row['shape']:>9} L={row['L']:>6} B={row['B']} {row['method']:>16} {_cell(row.get('budget')):>5}  "
                  f"{row['layer_ms']:8.4f} ms  floor {row['floor_ms']:7.4f}  x{row['speedup_vs_sdpa']:6.2f} vs SDPA "
                  f"({row['mode']})", flush=True)
        _write(out, env, rows)

    for shape in args.shapes.split(","):
        for L in contexts:
            for B in batches:
                run_case(shape, L, B, budgets, methods, timer, args, device, emit)
    print(f"wrote {out / 'results.json'} and {out / 'table.md'}")
    return 0


__all__ = ["add_arguments", "run", "markdown_table", "metadata_bytes", "time_phases", "BUDGET_KNOBS"]
