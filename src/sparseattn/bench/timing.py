"""One timer for the benches (``bench methods``, ``bench decode``) and the GPU scripts.

``BenchTimer(device, ...)(fn, graph_ok) -> ms``, and ``timer.last`` says how the figure was taken:

* ``"graph"``: ``fn`` captured once in a CUDA graph (after a warm-up call on a side stream, as
  the CUDA-graph docs ask), the median of ``triton.testing.do_bench`` over replays: no Python or
  launch overhead of the many small ops of a step (``graphs=True`` and ``graph_ok``);
* ``"eager"``: the median of ``do_bench`` over direct calls (``"eager (RuntimeError)"`` when a
  capture was asked for and refused: a host sync, a host-to-device copy, ...);
* ``"single"``: one call timed with CUDA events, when a call after the warm-up call took longer
  than ``slow_ms`` (``do_bench`` would repeat it at least 7 times);
* on a CPU: the mean of 3 ``perf_counter`` runs after one warm-up call, ``"eager"`` (for tests,
  not figures).

A warm-up call slower than ``settle_after_ms`` (a kernel compiled, a cache filled: the GPU sat
idle meanwhile and lowered its clocks) is followed by ``settle_ms`` of back-to-back calls before
anything is timed (``timer.last["settled_ms"]``). Before, a compile longer than ``slow_ms`` made
the first figure of a run a "single" call at idle clocks, up to 2.5x too slow on the H100
(BENCHMARKS.md, prefill methods, session 8).
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Tuple

import torch


def keep_busy(fn: Callable[[], object], ms: float, sync: Callable[[], object]) -> int:
    """Call ``fn`` back to back until ``ms`` of wall time have passed (at least once), then
    ``sync()``; returns the number of calls."""
    calls = 0
    t0 = time.perf_counter()
    while calls == 0 or 1000.0 * (time.perf_counter() - t0) < ms:
        fn()
        calls += 1
        if calls % 8 == 0:
            sync()  # keep the queue short, so the wall time is GPU time
    sync()
    return calls


def capture_graph(fn: Callable[[], object]) -> Tuple["torch.cuda.CUDAGraph", object]:
    """``fn`` warmed up on a side stream, then captured: ``(graph, what the captured call returned)``.
    Raises what the capture raises."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


class BenchTimer:
    """``timer(fn, graph_ok=True) -> ms`` (see the module docstring); ``timer.last`` holds
    ``{"mode": ..., "warmup_ms": ...}`` of the latest figure, :meth:`timed` returns ``(ms, mode)``.

    Args:
        device: where ``fn`` runs (CUDA: ``do_bench``; else ``perf_counter``).
        warmup_ms, rep_ms: ``do_bench``'s warm-up and repetition budgets.
        graphs: replay through a CUDA graph where the call allows (``graph_ok``).
        slow_ms: a call slower than this after the warm-up is its own figure, alone (None: never).
        settle_after_ms, settle_ms: a warm-up call slower than ``settle_after_ms`` is followed by
            ``settle_ms`` of calls before timing (clocks back up after a compile).
    """

    def __init__(self, device, *, warmup_ms: int = 10, rep_ms: int = 100, graphs: bool = False,
                 slow_ms: Optional[float] = None, settle_after_ms: float = 50.0, settle_ms: float = 300.0):
        self.device = torch.device(device)
        self.warmup_ms, self.rep_ms, self.graphs, self.slow_ms = warmup_ms, rep_ms, graphs, slow_ms
        self.settle_after_ms, self.settle_ms = settle_after_ms, settle_ms
        self.last: dict = {}

    def timed(self, fn, graph_ok: bool = True) -> Tuple[float, str]:
        ms = self(fn, graph_ok)
        return ms, self.last["mode"]

    def __call__(self, fn, graph_ok: bool = True) -> float:
        if self.device.type != "cuda":
            fn()
            t0 = time.perf_counter()
            n = 3
            for _ in range(n):
                fn()
            self.last = {"mode": "eager"}
            return 1000.0 * (time.perf_counter() - t0) / n
        import triton.testing

        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()  # warm-up: compiles, fills caches
        torch.cuda.synchronize()
        warm = round(1000.0 * (time.perf_counter() - t0), 1)
        settled = 0.0
        if warm > self.settle_after_ms or (self.slow_ms is not None and warm > self.slow_ms):
            # A slow warm-up is a compile or a slow function: one more call, alone, tells which.
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            once = float(start.elapsed_time(end))
            if self.slow_ms is not None and once > self.slow_ms:
                self.last = {"mode": "single", "warmup_ms": warm}
                return once
            if warm > self.settle_after_ms:
                t1 = time.perf_counter()
                keep_busy(fn, self.settle_ms, torch.cuda.synchronize)
                settled = round(1000.0 * (time.perf_counter() - t1), 1)
        mode = "eager"
        if self.graphs and graph_ok:
            try:
                graph, _ = capture_graph(fn)
                ms = triton.testing.do_bench(graph.replay, warmup=self.warmup_ms, rep=self.rep_ms,
                                             return_mode="median")
                self.last = {"mode": "graph", "warmup_ms": warm, "settled_ms": settled}
                return float(ms)
            except Exception as exc:  # capture refused: time it eagerly and say why
                torch.cuda.synchronize()
                mode = f"eager ({type(exc).__name__})"
        ms = triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median")
        self.last = {"mode": mode, "warmup_ms": warm, "settled_ms": settled}
        return float(ms)


__all__ = ["BenchTimer", "capture_graph"]
