"""CUDA-graph replay of plan estimators.

An estimator is a few dozen to a few hundred small tensor operations. On the GPU its time is
mostly the host issuing them (the H100 profile of FlexPrefill at 32K: 5.3 ms wall for 1.9 ms of
GPU work, 218 kernels), not the GPU running them. The estimators never sync with the host and
produce fixed-shape plans, so one forward can be captured once per (method config, input shapes)
and replayed: the host then issues one graph launch, the GPU runs the same kernels.

:meth:`PrefillMethod.plan` uses this on CUDA for value-dependent methods. Each call copies q, k,
v into the graph's static inputs, replays, and returns a copy of the plan (a later call does not
change a plan already returned). A method that cannot be captured (an operation the capture
refuses) runs eagerly from then on, with one log line. Switch off with
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
MAX_GRAPHS = 32  # captured estimators kept (least recently used dropped)
_graphs: "collections.OrderedDict[tuple, Optional[_Graph]]" = collections.OrderedDict()
_pools = {}


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
    _pools.clear()


@dataclasses.dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: tuple
    plan: object  # the BlockPlan whose tensors the replay rewrites


def _key(method, q, k, v, causal, layer_idx) -> tuple:
    return (type(method), repr(method.config()), tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype,
            q.device, causal, layer_idx)


def _copy_plan(plan):
    fields = {}
    for f in dataclasses.fields(plan):
        value = getattr(plan, f.name)
        fields[f.name] = value.clone() if isinstance(value, torch.Tensor) else value
    return type(plan)(**fields)


def _capture(method, q, k, v, causal, layer_idx) -> _Graph:
    inputs = tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    for dst, src in zip(inputs, (q, k, v)):
        dst.copy_(src)
    # Warm up on a side stream (Triton compiles, lazy device constants upload), then capture. The
    # warm-up runs with host syncs turned into errors: a method that syncs is found here, not by
    # a failed capture (which can leave the CUDA RNG in capture state).
    side = torch.cuda.Stream(q.device)
    side.wait_stream(torch.cuda.current_stream(q.device))
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(side):
            method._plan(*inputs, causal=causal, layer_idx=layer_idx)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.current_stream(q.device).wait_stream(side)
    pool = _pools.get(q.device)
    if pool is None:  # one pool for all estimator graphs: their temporaries are never live at once
        pool = _pools[q.device] = torch.cuda.graph_pool_handle()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        plan = method._plan(*inputs, causal=causal, layer_idx=layer_idx)
    return _Graph(graph, inputs, plan)


def graphed_plan(method, q, k, v, *, causal: bool, layer_idx: Optional[int]):
    """The plan of ``method`` for these inputs through a captured CUDA graph, or None when graphs
    do not apply (off, not CUDA, already inside a capture, or the method is not capturable)."""
    if not _enabled or not q.is_cuda or torch.cuda.is_current_stream_capturing():
        return None
    key = _key(method, q, k, v, causal, layer_idx)
    if key in _graphs:
        entry = _graphs[key]
        _graphs.move_to_end(key)
        if entry is None:
            return None
        for dst, src in zip(entry.inputs, (q, k, v)):
            dst.copy_(src)
    else:
        try:
            entry = _capture(method, q, k, v, causal, layer_idx)
        except Exception as exc:  # an operation the capture refuses: run this method eagerly
            torch.cuda.synchronize(q.device)
            logger.warning("sparseattn: method %r runs without a CUDA graph (%s: %s)", method.name,
                           type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            _graphs[key] = None
            return None
        _graphs[key] = entry
        while len(_graphs) > MAX_GRAPHS:
            _graphs.popitem(last=False)
    entry.graph.replay()
    return _copy_plan(entry.plan)
