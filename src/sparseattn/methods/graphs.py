"""CUDA-graph replay of plan estimators.

An estimator is a few dozen to a few hundred small tensor operations. On the GPU its time is
mostly the host issuing them (the H100 profile of FlexPrefill at 32K: 5.3 ms wall for 1.9 ms of
GPU work, 218 kernels), not the GPU running them. The estimators never sync with the host and
produce fixed-shape plans, so a call can be captured once per (method config, input shapes) and
replayed: the host then issues one graph launch, the GPU runs the same kernels.

:meth:`PrefillMethod.plan` uses this on CUDA for value-dependent methods. The first call with a
new key runs eagerly with host syncs turned into errors (a method that syncs is found there and
stays eager, with one log line); the second call captures; later calls copy q, k, v into the
graph's static inputs (only the parts the estimate reads: ``PrefillMethod.query_rows_read``,
``reads_values``), replay, and return a copy of the plan (a later call does not change a plan
already returned). One-off shapes therefore never pay for a capture, and the layers of one
forward share a graph (``layer_idx`` is part of the key only for per-layer tables). With
``plan(..., transient=True)`` a replay returns the graph's own plan tensors instead of the copy
(the graph's next replay overwrites them): for callers that hand the plan to the kernel at once,
as ``sparse_attention`` and the Hugging Face integration do (the copy is up to ~20 us per call,
e.g. vertical-slash's extra columns at 32K on SmolLM2's heads).

*Direct graphs.* When a call brings inputs at the very addresses (and strides) of the previous
call with that key, a second graph is captured that reads those addresses directly, and later
calls with them replay it without the copy (at 32K on 9/3/64 heads the copy is ~37 us of a
~0.3 ms estimate). A replay reads whatever those addresses hold at that moment, so it is correct
for any tensor the caller passes there, including a new one the allocator placed at a freed
address (PyTorch's caching allocator often does so, layer after layer). Each graph
keeps its own memory pool (the estimator's temporaries); at most ``MAX_GRAPHS`` are kept, least
recently used dropped, and all of them are dropped when an allocation fails. Switch off with
``sparseattn.set_estimator_graphs(False)`` or ``SPARSEATTN_ESTIMATOR_GRAPHS=0``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from typing import Optional

import torch

logger = logging.getLogger("sparseattn")

_enabled = os.environ.get("SPARSEATTN_ESTIMATOR_GRAPHS", "1") != "0"
MAX_GRAPHS = 8  # captured estimators kept (least recently used dropped)
_EAGER, _SEEN = "eager", "seen"  # key states before a capture: never capture / captured on the next call
_graphs: "collections.OrderedDict[tuple, object]" = collections.OrderedDict()


def set_estimator_graphs(enabled: bool) -> None:
    """Turn CUDA-graph replay of estimators on or off (on by default); off also frees the graphs."""
    global _enabled
    if not isinstance(enabled, bool):
        raise ValueError(f"enabled must be a bool, got {enabled!r}")
    _enabled = enabled
    if not enabled:
        clear_estimator_graphs()


def estimator_graphs_enabled() -> bool:
    return _enabled


def clear_estimator_graphs() -> None:
    """Drop every captured estimator graph (their memory returns to PyTorch's allocator)."""
    _graphs.clear()


@dataclasses.dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: Optional[tuple]  # the static inputs a replay copies into; None: a direct graph
    plan: object  # the BlockPlan whose tensors the replay rewrites
    last_reads: Optional[tuple] = None  # _reads_signature of the previous call (copy graphs)


def _layer_dependent(method) -> bool:
    """Whether some field is a per-(layer, head) table (then plans differ by layer_idx)."""
    return any(isinstance(v, tuple) and v and isinstance(v[0], tuple) for v in method.config().values())


def _key(method, q, k, v, causal, layer_idx) -> tuple:
    return (type(method), repr(method.config()), tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype,
            q.device, causal, layer_idx if _layer_dependent(method) else None)


def _copy_plan(plan):
    fields = {}
    for f in dataclasses.fields(plan):
        value = getattr(plan, f.name)
        fields[f.name] = value.clone() if isinstance(value, torch.Tensor) else value
    return type(plan)(**fields)


def _read_views(method, q, k, v) -> tuple:
    """The parts of ``(q, k, v)`` the estimate reads (``query_rows_read``, ``reads_values``): only
    these are copied into a graph's inputs before a replay (at 32K on 9/3/64 heads, q and v are
    38 + 13 MB of the 63 MB a full copy moves)."""
    rows = method.query_rows_read(q.shape[2])
    views = (q[:, :, q.shape[2] - rows:], k)
    return views + (v,) if method.reads_values else views


def _reads_signature(method, q, k, v) -> tuple:
    """Where the estimate's inputs live: the addresses and strides of the tensors it reads."""
    tensors = (q, k, v) if method.reads_values else (q, k)
    return tuple((t.data_ptr(), t.stride()) for t in tensors)


def _capture_direct(method, q, k, v, causal, layer_idx) -> _Graph:
    """A graph whose kernels read the caller's q, k (and v) at their addresses: no input copies."""
    torch.cuda.current_stream(q.device).synchronize()  # q, k are written before the capture stream starts
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan = method._plan(q, k, v, causal=causal, layer_idx=layer_idx)
    return _Graph(graph, None, plan)


def _capture(method, q, k, v, causal, layer_idx) -> _Graph:
    # v's shape only where the estimate never reads it (no memory).
    v_in = torch.empty_like(v) if method.reads_values else torch.zeros((), dtype=v.dtype, device=v.device).expand(v.shape)
    inputs = (torch.empty_like(q), torch.empty_like(k), v_in)
    if method.query_rows_read(q.shape[2]) < q.shape[2]:
        inputs[0].zero_()  # rows the estimate never reads: defined values all the same
    for dst, src in zip(_read_views(method, *inputs), _read_views(method, q, k, v)):
        dst.copy_(src)
    torch.cuda.current_stream(q.device).synchronize()  # the inputs are written before the capture stream starts
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # a private pool: dropping the graph frees its temporaries
        plan = method._plan(*inputs, causal=causal, layer_idx=layer_idx)
    return _Graph(graph, inputs, plan)


def _remember(key, value) -> None:
    _graphs[key] = value
    _graphs.move_to_end(key)
    while sum(isinstance(x, _Graph) for x in _graphs.values()) > MAX_GRAPHS:
        oldest = next(k for k, x in _graphs.items() if isinstance(x, _Graph))
        del _graphs[oldest]
    while len(_graphs) > 64 * MAX_GRAPHS:  # key states of one-off shapes
        _graphs.popitem(last=False)


def _give_up(method, key, exc) -> None:
    logger.warning("sparseattn: method %r runs without a CUDA graph (%s: %s)", method.name, type(exc).__name__,
                   str(exc).splitlines()[0] if str(exc) else "")
    _remember(key, _EAGER)


def graphed_plan(method, q, k, v, *, causal: bool, layer_idx: Optional[int], transient: bool = False):
    """The plan of ``method`` for these inputs, through a CUDA graph once the key repeats; None when
    graphs do not apply (off, not CUDA, inside a capture, a method that syncs) and the caller
    should run the method eagerly. ``transient``: a replayed plan is the graph's own tensors
    (valid until the graph's next replay) instead of a copy."""
    if not _enabled or not q.is_cuda or torch.cuda.is_current_stream_capturing():
        return None
    with torch.no_grad():  # a plan is integers: no autograd history inside a captured graph
        return _graphed_plan(method, q, k, v, causal, layer_idx, transient)


def _graphed_plan(method, q, k, v, causal, layer_idx, transient):
    key = _key(method, q, k, v, causal, layer_idx)
    state = _graphs.get(key)
    try:
        if state is None:  # first call: eager, with host syncs turned into errors
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            try:
                plan = method._plan(q, k, v, causal=causal, layer_idx=layer_idx)
            except RuntimeError as exc:
                if "synchroniz" not in str(exc).lower():
                    raise
                _give_up(method, key, exc)
                return None
            finally:
                torch.cuda.set_sync_debug_mode(previous)
            _remember(key, _SEEN)
            return plan
        if state == _EAGER:
            _graphs.move_to_end(key)
            return None
        if state == _SEEN:
            try:
                state = _capture(method, q, k, v, causal, layer_idx)
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # an operation the capture refuses: run this method eagerly
                torch.cuda.synchronize(q.device)
                _give_up(method, key, exc)
                return None
            state.last_reads = _reads_signature(method, q, k, v)
            _remember(key, state)
        else:
            _graphs.move_to_end(key)
            reads = _reads_signature(method, q, k, v)
            direct_key = key + ("direct", reads)
            direct = _graphs.get(direct_key)
            if direct is None and reads == state.last_reads:  # the same addresses twice in a row
                try:
                    direct = _capture_direct(method, q, k, v, causal, layer_idx)
                except torch.OutOfMemoryError:
                    raise
                except Exception:  # refused here although the copy graph was not: keep copying
                    torch.cuda.synchronize(q.device)
                    direct = None
                else:
                    _remember(direct_key, direct)
                    _graphs.move_to_end(key)  # the copy graph stays the more recently used
            state.last_reads = reads
            if direct is not None:
                _graphs.move_to_end(direct_key)
                direct.graph.replay()
                return direct.plan if transient else _copy_plan(direct.plan)
            for dst, src in zip(_read_views(method, *state.inputs), _read_views(method, q, k, v)):
                dst.copy_(src)
        state.graph.replay()
        return state.plan if transient else _copy_plan(state.plan)
    except torch.OutOfMemoryError:
        # Captured graphs hold their temporaries: free them all and let the caller run eagerly.
        clear_estimator_graphs()
        torch.cuda.empty_cache()
        return None
