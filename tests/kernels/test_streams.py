"""``dispatch.concurrent_branch``: two branches of work, joined on exit (FlexPrefill's estimate)."""

import pytest
import torch

from sparseattn.kernels.dispatch import concurrent_branch

from ..conftest import requires_cuda


def test_branches_run_in_order_off_cuda():
    """The CPU twin: both branches run on the one stream, in the order they are issued."""
    x = torch.zeros(4)
    with concurrent_branch(x.device) as side:
        x += 1
        with side:
            x *= 3
        y = x + 1
    assert torch.equal(x, torch.full((4,), 3.0)) and torch.equal(y, torch.full((4,), 4.0))
    with pytest.raises(RuntimeError, match="inside"):
        with concurrent_branch(x.device) as side:
            with side:
                raise RuntimeError("inside")


def _branch_work(x, out):
    """The side branch writes ``x`` late (after a ~50 ms spin); the current stream reads it after
    the join: a missing join reads zeros."""
    with concurrent_branch(x.device) as side:
        with side:
            torch.cuda._sleep(50_000_000)
            x.fill_(7.0)
        assert torch.cuda.current_stream(x.device) != side.stream  # back on the first stream
    out.copy_(x + 1)


@requires_cuda
@pytest.mark.gpu
def test_cuda_join_waits_for_the_side_branch():
    x = torch.zeros(1 << 20, device="cuda")
    out = torch.empty_like(x)
    main = torch.cuda.current_stream()
    _branch_work(x, out)
    assert torch.cuda.current_stream() == main
    assert torch.equal(out, torch.full_like(x, 8.0))


@requires_cuda
@pytest.mark.gpu
def test_cuda_branch_inside_a_graph_capture():
    """Forked and joined inside a capture: the graph replays both branches, joined."""
    x = torch.zeros(1 << 20, device="cuda")
    out = torch.empty_like(x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _branch_work(x, out)
    x.zero_()
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, torch.full_like(x, 8.0))
