"""``sparseattn bench decode``: decode-step attention time per method vs SDPA dense on the same cache.

For every shape ``Hq/Hkv/D``, context length, batch and token budget, one
:class:`~sparseattn.cache.PagedKVCache` of ``max(2, --graph-layers)`` layers (the same random K/V
in every layer: identical content at distinct addresses, so no L2 reuse across layers) is built
and a decode step (``q [B, Hq, 1, D]``) is timed:

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

In a model's decode graph (``--graph-layers N``, default 8; 0 or 1 turns it off): ``layer_ms`` is
one graph replay of one layer step timed alone, so every row pays a whole graph launch (about
5-7 us on an H100), and it stays the conservative figure. A model's decode step runs all its
layers back to back, usually captured in one CUDA graph, so that launch is paid once per token.
``graph_layer_ms`` is the per-layer cost inside such a graph (launch latency amortised):
``(T_N - T_1) / (N - 1)``, where ``T_n`` is the timer's figure for one closure that runs the layer
steps (``select`` + the sparse kernel, as ``layer_ms``) of layers ``0 .. n-1`` in order, captured
as one graph (:func:`time_chain`). Layer 0 runs in both closures, so the figure is the marginal
cost of the steady layers 1 .. N-1: the reuse layers of the cross-layer methods (layer 0 is their
selection layer), as ``layer_ms``. Recycled Attention: one chain per phase, amortised over the
stride as ``layer_ms`` (``graph_full_ms``, ``graph_recycle_ms``). ``graph_mode`` says how the
figure was taken ("graph", "graph (phases)", "eager (cpu)") or why there is none
(``graph_layer_ms = None``): the method is not graph-safe, the capture was refused (the timer's
eager mode, e.g. "eager (RuntimeError)"), ``--no-graphs``, or the option is off.
``graph_chain_ms`` holds ``[T_1, T_N]`` (per phase for Recycled Attention), ``graph_layers`` N,
``cache_layers`` the cache's layer count (every row).
Derived as the per-replay figures: ``graph_vs_floor`` (over the same ``floor_ms``),
``meets_target_in_graph`` (``graph_layer_ms <= target_ms``, the same target), and
``graph_speedup_vs_sdpa`` = ``sdpa_graph_layer_ms / graph_layer_ms``, where
``sdpa_graph_layer_ms`` is the same formula for SDPA over per-layer gathered K/V
(``cache.gather(layer)``) with ``n = min(N, 3)`` layers (``sdpa_graph_layers``; each gathered
128K cache at B=8, 32/8/128 is 4.3 GB), same backend as ``sdpa_ms`` (which is one eager call;
the chain is captured), ``sdpa_graph_mode`` on the ``ours_dense`` row. The floors and the target
keep their ``--latency-us`` term, which a step inside a graph mostly does not pay. Methods whose
budget depends on the layer (PyramidKV's pyramid over ``cache.num_layers``) read different
amounts in the chain's layers, and their layer 1 depends on N: ``read_tokens`` and the floors are
layer 1's. Figures of the same shape are comparable only within one column: in-graph figures
with in-graph figures, per-replay ones with per-replay ones.

Results: ``OUT/results.json`` (rows + environment) and ``OUT/table.md``; rows are printed as they
finish. On a CPU the same code runs with ``time.perf_counter`` and the reference kernels (for
tests, not figures; the in-graph figures are then eager differences, "eager (cpu)").
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
    p.add_argument("--graph-layers", type=int, default=8,
                   help="layers in one captured graph for the in-graph per-layer figures (graph_layer_ms; "
                        "default 8; 0 or 1: off). The cache holds max(2, N) layers")
    p.add_argument("--bandwidth", type=float, default=3.0, help="copy bandwidth in TB/s for the floors (3.0)")
    p.add_argument("--latency-us", type=float, default=10.0, help="launch latency added to each floor (10 us)")
    p.add_argument("--rep-ms", type=int, default=100, help="timing repetitions per figure (ms of GPU time)")
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu (tests only)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")


# ----------------------------------------------------------------------------- timing
_SDPA_BACKENDS = ("cudnn", "flash", "efficient")


def sdpa_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str):
    """A closure running SDPA for one decode step with ``backend`` ("math": the CPU default; else one
    of cuDNN / FlashAttention / efficient, forced)."""
    import torch.nn.functional as F

    if backend == "math":
        return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kind = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend]

    def call():
        with sdpa_kernel([kind]):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    return call


def sdpa_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """The fastest SDPA backend for one decode step (no causal mask: q sits after every key):
    ``(closure, backend name)``."""
    if q.device.type != "cuda":
        return sdpa_call(q, k, v, "math"), "math"
    best = None
    for name in _SDPA_BACKENDS:
        call = sdpa_call(q, k, v, name)
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
def build_cache(B: int, Hkv: int, D: int, L: int, dtype, device, page_size: int, seed: int = 0,
                layers: int = 2) -> PagedKVCache:
    """A cache of ``layers`` layers holding the same random K/V (``L`` tokens per sequence) in every
    layer: identical content at distinct addresses (no L2 reuse across layers)."""
    if layers < 1:
        raise ValueError(f"layers must be at least 1, got {layers}")
    gen = torch.Generator(device=device).manual_seed(seed)  # on the device: a 128K cache is GBs
    cache = PagedKVCache(layers, Hkv, D, page_size=page_size, dtype=dtype, device=device, max_batch=B)
    cache.reserve(L + 16)
    chunk = 16384
    for start in range(0, L, chunk):
        n = min(chunk, L - start)
        k = torch.randn(B, Hkv, n, D, generator=gen, device=device).to(dtype)
        v = torch.randn(B, Hkv, n, D, generator=gen, device=device).to(dtype)
        for layer in range(layers):
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


# ----------------------------------------------------------------------------- in a model's graph
def _chain_mode(timer: BenchTimer, modes) -> str:
    """How chain figures taken in ``modes`` were measured: "graph", "eager (cpu)" (the CPU
    fallback: the code path, not a figure), else what the timer fell back to."""
    modes = set(modes)
    if modes == {"graph"}:
        return "graph"
    if timer.device.type != "cuda" and modes == {"eager"}:
        return "eager (cpu)"
    return " + ".join(sorted(modes))


def _chain_ok(mode: str) -> bool:
    return mode in ("graph", "eager (cpu)")


def time_chain(timer: BenchTimer, step: Callable[[int], object], layers: int, graph_ok: bool = True) -> dict:
    """One layer step's marginal cost inside a graph of ``layers`` layer steps.

    ``T_n`` = the timer's figure for one closure running ``step(0), ..., step(n - 1)`` in order
    (captured as one CUDA graph where the timer allows), for ``n = 1`` and ``n = layers``:
    ``{"ms": (T_layers - T_1) / (layers - 1)`` (None unless both were graph figures, or the CPU
    fallback), ``"chain_ms": [T_1, T_layers], "mode": ..., "ok": ...}``. A refused capture reads
    ``"capture refused: eager (RuntimeError)"`` (the timer's eager mode).
    """
    if layers < 2:
        raise ValueError(f"a chain needs at least 2 layers, got {layers}")

    def chain(n):
        def run():
            out = None
            for layer in range(n):
                out = step(layer)
            return out
        return run

    t1, m1 = timer.timed(chain(1), graph_ok)
    tn, mn = timer.timed(chain(layers), graph_ok)
    mode = _chain_mode(timer, (m1, mn))
    ok = _chain_ok(mode)
    if not ok:  # name what the timer fell back to
        mode = "capture refused: " + _chain_mode(timer, {m for m in (m1, mn) if m != "graph"})
    return {"ms": (tn - t1) / (layers - 1) if ok else None, "chain_ms": [t1, tn], "mode": mode, "ok": ok}


def time_phase_chains(method, cache: PagedKVCache, q: torch.Tensor, layers: int, timer: BenchTimer) -> dict:
    """Recycled Attention in a graph of ``layers`` layer steps: one chain per phase
    (:func:`time_chain`, :meth:`set_phase` pinning the phase of every layer at capture), amortised
    over the stride as :func:`time_phases` does."""

    def step_for(phase):
        def step(layer):
            method.set_phase(cache, layer, phase)
            return sparse_decode_attention(q, cache, layer, method.select(q, cache, layer))
        return step

    stride = method.stride
    full = time_chain(timer, step_for("full"), layers)
    recycle = None if stride == 1 else time_chain(timer, step_for("recycle"), layers)
    parts = [full] + ([] if recycle is None else [recycle])
    ok = all(part["ok"] for part in parts)
    chains = {"full": full["chain_ms"]}
    if recycle is not None:
        chains["recycle"] = recycle["chain_ms"]
    out = {"graph_layers": layers, "graph_full_ms": full["ms"],
           "graph_recycle_ms": None if recycle is None else recycle["ms"], "graph_chain_ms": chains}
    if not ok:
        bad = sorted({part["mode"] for part in parts if not part["ok"]})
        return dict(out, graph_layer_ms=None, graph_mode=" + ".join(bad) + " (phases)")
    mode = full["mode"]
    out["graph_mode"] = "eager (cpu, phases)" if mode == "eager (cpu)" else f"{mode} (phases)"
    out["graph_layer_ms"] = full["ms"] if recycle is None else (full["ms"] + (stride - 1) * recycle["ms"]) / stride
    return out


def _graph_off(args, timer: BenchTimer) -> Optional[str]:
    """Why no in-graph figure is taken at all (None: take them)."""
    n = getattr(args, "graph_layers", 0) or 0
    if n < 2:
        return f"off (--graph-layers {n})"
    if not timer.graphs:
        return "off (--no-graphs)"
    return None


def _no_graph(reason: str) -> dict:
    return {"graph_layer_ms": None, "graph_mode": reason}


def graph_figures(method, cache: PagedKVCache, q: torch.Tensor, timer: BenchTimer, args,
                  layer_step: Callable[[int], object]) -> dict:
    """A method row's in-graph fields: ``graph_layer_ms`` (None and ``graph_mode`` saying why, when
    off, not graph-safe, refused or failed), ``graph_chain_ms``, ``graph_layers``."""
    reason = _graph_off(args, timer)
    if reason:
        return _no_graph(reason)
    layers = args.graph_layers
    if cache.num_layers < layers:
        return _no_graph(f"error: the cache has {cache.num_layers} layers, --graph-layers {layers}")
    try:
        if method is not None and callable(getattr(method, "set_phase", None)):
            return time_phase_chains(method, cache, q, layers, timer)
        if method is not None and not getattr(method, "graph_safe", True):
            return _no_graph("not graph-safe (host state)")
        chain = time_chain(timer, layer_step, layers)
    except Exception as exc:  # the row keeps its per-replay figures
        return _no_graph(f"error: {type(exc).__name__}: {exc}"[:200])
    return {"graph_layer_ms": chain["ms"], "graph_mode": chain["mode"], "graph_chain_ms": chain["chain_ms"],
            "graph_layers": layers}


def sdpa_graph_figures(q: torch.Tensor, cache: PagedKVCache, backend: str, timer: BenchTimer, args,
                       gathered: Optional[dict] = None) -> dict:
    """SDPA in a graph of ``min(N, 3)`` layers over per-layer gathered K/V (``cache.gather(layer)``;
    ``gathered`` may hold some already): ``sdpa_graph_layer_ms``, ``sdpa_graph_layers``,
    ``sdpa_graph_mode``. The gathered copies are dropped on return."""
    reason = _graph_off(args, timer)
    if reason:
        return {"sdpa_graph_layer_ms": None, "sdpa_graph_layers": None, "sdpa_graph_mode": reason}
    layers = min(args.graph_layers, 3, cache.num_layers)
    kv = dict(gathered or {})
    try:
        for layer in range(layers):
            if layer not in kv:
                kv[layer] = cache.gather(layer)
        calls = [sdpa_call(q, *kv[layer], backend) for layer in range(layers)]
        chain = time_chain(timer, lambda layer: calls[layer](), layers)
        out = {"sdpa_graph_layer_ms": chain["ms"], "sdpa_graph_layers": layers, "sdpa_graph_mode": chain["mode"],
               "sdpa_graph_chain_ms": chain["chain_ms"]}
    except Exception as exc:
        out = {"sdpa_graph_layer_ms": None, "sdpa_graph_layers": layers,
               "sdpa_graph_mode": f"error: {type(exc).__name__}: {exc}"[:200]}
    finally:
        kv.clear()
        calls = None
    return out


def graph_derived(row: dict) -> dict:
    """``graph_vs_floor``, ``meets_target_in_graph`` (the row's ``target_ms``) and
    ``graph_speedup_vs_sdpa`` from ``graph_layer_ms`` / ``sdpa_graph_layer_ms`` (None where missing)."""
    g, s = row.get("graph_layer_ms"), row.get("sdpa_graph_layer_ms")
    have = g is not None
    return {"graph_vs_floor": g / row["floor_ms"] if have and row.get("floor_ms") else None,
            "meets_target_in_graph": bool(g <= row["target_ms"]) if have and row.get("target_ms") is not None
            else None,
            "graph_speedup_vs_sdpa": s / g if have and s is not None and g > 0 else None}


def run_method(name: str, budget: Optional[int], cache: PagedKVCache, q: torch.Tensor, prompt_q: torch.Tensor,
               timer: BenchTimer, args) -> dict:
    method = method_for(name, budget, args.page_size)
    cache.method_state.clear()
    for layer in range(cache.num_layers):
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
    # Last, so the per-replay figures above see the state they always saw.
    row.update(graph_figures(method, cache, q, timer, args, layer_step))
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
    cache = build_cache(B, Hkv, D, L, dtype, device, args.page_size,
                        layers=max(2, getattr(args, "graph_layers", 0) or 0))
    gen = torch.Generator(device="cpu").manual_seed(1)
    q = torch.randn(B, Hq, 1, D, generator=gen).to(device=device, dtype=dtype)
    prompt_q = torch.randn(B, Hq, min(64, L), D, generator=gen).to(device=device, dtype=dtype)
    base = {"shape": shape, "L": L, "B": B, "cache_layers": cache.num_layers}
    k, v = cache.gather(1)
    sdpa, sdpa_name = sdpa_decode(q, k, v)
    sdpa_ms, _ = timer.timed(sdpa, False)
    sdpa_graph = sdpa_graph_figures(q, cache, sdpa_name, timer, args, gathered={1: (k, v)})
    del k, v, sdpa
    dense_ms, dense_mode = timer.timed(lambda: sparse_decode_attention(q, cache, 1, None), True)
    item = torch.finfo(dtype).bits // 8
    all_bytes = 2 * B * Hkv * L * D * item
    dense_row = dict(base, method="ours_dense", budget=None, layer_ms=dense_ms, mode=dense_mode, sdpa_ms=sdpa_ms,
                     sdpa_backend=sdpa_name, read_tokens=float(L), kernel_ms=dense_ms,
                     kernel_tbs=all_bytes / (dense_ms * 1e9), **floors(all_bytes, dense_ms, args))
    dense_row["speedup_vs_sdpa"] = sdpa_ms / dense_ms
    dense_row.update(sdpa_graph)
    dense_row.update(graph_figures(None, cache, q, timer, args,
                                   lambda layer: sparse_decode_attention(q, cache, layer, None)))
    dense_row.update(graph_derived(dense_row))
    emit(dense_row)
    for name in methods:
        for budget in (budgets if name in BUDGET_KNOBS else [None]):
            try:
                row = run_method(name, budget, cache, q, prompt_q, timer, args)
                row.update(base, sdpa_ms=sdpa_ms, sdpa_graph_layer_ms=sdpa_graph["sdpa_graph_layer_ms"])
                row["speedup_vs_sdpa"] = sdpa_ms / row["layer_ms"]
                row.update(graph_derived(row))
            except Exception as exc:  # one method failing must not lose the others' figures
                row = dict(base, method=name, budget=budget, error=f"{type(exc).__name__}: {exc}"[:300])
            emit(row)
    del cache
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- output
COLUMNS = ("shape", "L", "B", "method", "budget", "read_tokens", "select_ms", "kernel_ms", "layer_ms",
           "sel_layer_ms", "floor_ms", "vs_floor", "target_ms", "meets_target", "kernel_tbs", "sdpa_ms",
           "speedup_vs_sdpa", "mode", "graph_layer_ms", "graph_vs_floor", "meets_target_in_graph",
           "sdpa_graph_layer_ms", "graph_speedup_vs_sdpa", "graph_mode")


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
                  f"({row['mode']})" + (f"  in graph {row['graph_layer_ms']:8.4f} ms"
                                         if row.get("graph_layer_ms") is not None else ""), flush=True)
        _write(out, env, rows)

    for shape in args.shapes.split(","):
        for L in contexts:
            for B in batches:
                run_case(shape, L, B, budgets, methods, timer, args, device, emit)
    print(f"wrote {out / 'results.json'} and {out / 'table.md'}")
    return 0


__all__ = ["add_arguments", "run", "markdown_table", "metadata_bytes", "time_phases", "time_chain",
           "time_phase_chains", "graph_figures", "sdpa_graph_figures", "BUDGET_KNOBS"]
