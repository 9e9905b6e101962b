"""The benches' one timer: how each figure is taken (CPU here; the CUDA modes in the GPU twin)."""

import time

import pytest
import torch

from sparseattn.bench.timing import BenchTimer

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
