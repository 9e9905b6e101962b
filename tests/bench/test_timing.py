"""The benches' one timer: how each figure is taken (CPU here; the CUDA modes in the GPU twin)."""

import time

import pytest
import torch

from sparseattn.bench.timing import BenchTimer, keep_busy

from ..conftest import requires_cuda


def test_cpu_mean_of_three_runs_after_a_warmup():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.01)

    timer = BenchTimer("cpu", graphs=True)
    ms = timer(fn)
    assert len(calls) == 4 and timer.last["mode"] == "eager"
    assert 9.0 <= ms < 200.0
    assert timer.timed(lambda: None)[1] == "eager"


def test_keep_busy_calls_for_the_given_time():
    calls, syncs = [], []
    t0 = time.perf_counter()
    n = keep_busy(lambda: calls.append(time.sleep(0.002)), 40.0, lambda: syncs.append(1))
    assert 1000.0 * (time.perf_counter() - t0) >= 40.0
    assert n == len(calls) >= 2 and len(syncs) == n // 8 + 1
    assert keep_busy(lambda: calls.append(1), 0.0, lambda: None) == 1  # always at least one call


@requires_cuda
def test_cuda_settles_after_a_slow_warmup():
    x = torch.zeros(1 << 20, device="cuda")
    first = []

    def fn():
        if not first:
            first.append(time.sleep(0.08))  # a "compile" on the first call
        x.add_(1.0)

    # A warm-up slower than slow_ms that is a compile, not a slow function: timed as usual.
    timer = BenchTimer("cuda", rep_ms=20, settle_ms=100.0, slow_ms=50.0)
    timer(fn)
    assert timer.last["mode"] == "eager"
    assert timer.last["warmup_ms"] >= 80 and timer.last["settled_ms"] >= 100.0
    timer(lambda: x.add_(1.0))
    assert timer.last["settled_ms"] == 0.0  # a fast warm-up: no settling


@requires_cuda
def test_cuda_modes():
    x = torch.zeros(1 << 20, device="cuda")
    timer = BenchTimer("cuda", rep_ms=20, graphs=True)
    ms, mode = timer.timed(lambda: x.add_(1.0))
    assert mode == "graph" and ms > 0
    assert timer.timed(lambda: x.add_(1.0), graph_ok=False)[1] == "eager"
    # A host sync cannot be captured: timed eagerly, and the mode says why.
    ms, mode = timer.timed(lambda: x.sum().item())
    assert mode.startswith("eager (") and ms > 0
    slow = BenchTimer("cuda", rep_ms=20, slow_ms=0.0)  # every call counts as slow: one timed call
    assert slow.timed(lambda: x.add_(1.0))[1] == "single" and slow.last["warmup_ms"] >= 0
    with pytest.raises(TypeError):
        timer()  # no function to time
