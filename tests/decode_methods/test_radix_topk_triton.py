"""The radix top-k of long rows (``kernels/radix_topk_triton.py``) against a stable descending sort.

Reference: the ``k`` first positions of ``torch.sort(descending=True, stable=True)`` over the
scores with NaN and ``-inf`` removed (they never count), ascending, ``N`` in the slots a short row
cannot fill. Cases: tie-free and tie-heavy rows (also at the budget's edge), values that differ only
in their lowest bits (the last digit pass decides), ``+-inf``, NaN, ``-0.0`` vs ``+0.0``, rows with
fewer candidates than ``k`` and with none, ``k`` of 0, 1 and ``N``, one chunk and many (lengths not a
multiple of the chunk), float16 / bfloat16 / float32, leading dimensions and a strided view. On the
CPU the kernels run in the Triton interpreter; the ``requires_cuda`` twins use 128K-token rows and a
CUDA-graph capture.
"""

import pytest
import torch

from sparseattn.kernels.radix_topk_triton import radix_top_positions

from ..conftest import HAS_CUDA, requires_cuda

DEVICE = "cuda" if HAS_CUDA else "cpu"
NEG, POS, NAN = float("-inf"), float("inf"), float("nan")


def reference(score: torch.Tensor, k: int) -> torch.Tensor:
    N = score.shape[-1]
    s = score.float()
    s = torch.where(torch.isnan(s), torch.full_like(s, NEG), s)
    vals, idx = torch.sort(s, dim=-1, descending=True, stable=True)
    idx = torch.where(vals[..., :k] > NEG, idx[..., :k], N)
    return idx.sort(dim=-1).values.to(torch.int32)


def rows(kind: str, R: int, N: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "distinct":
        return torch.randn(R, N, generator=g)
    if kind == "ties":  # seven values (and -0.0 next to +0.0): ties everywhere, also at the cut
        s = torch.randint(-3, 4, (R, N), generator=g).float() * 0.5
        return torch.where((torch.rand(R, N, generator=g) < 0.5) & (s == 0), -s, s)
    if kind == "low_bits":  # one exponent, nearly one mantissa: only the low digits tell them apart
        base = torch.tensor(1.0 + 2.0 ** -10)
        bits = base.view(torch.int32) + torch.randint(0, 600, (R, N), generator=g, dtype=torch.int32)
        return bits.view(torch.float32) * torch.where(torch.rand(R, N, generator=g) < 0.3, -1.0, 1.0)
    if kind == "holes":  # mostly -inf, some NaN and +inf: fewer candidates than many a k
        s = torch.randn(R, N, generator=g) * 1e3
        s[torch.rand(R, N, generator=g) < 0.8] = NEG
        s[torch.rand(R, N, generator=g) < 0.05] = NAN
        s[torch.rand(R, N, generator=g) < 0.02] = POS
        return s
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["distinct", "ties", "low_bits", "holes"])
@pytest.mark.parametrize("N,chunk", [(200, 16), (300, 64), (1000, 1024)])
def test_picks_equal_the_stable_sort(kind, N, chunk):
    score = rows(kind, 3, N, seed=N + chunk).to(DEVICE)
    for k in (1, 7, N // 3, N):
        got = radix_top_positions(score, k, chunk=chunk)
        assert torch.equal(got.cpu(), reference(score.cpu(), k)), (kind, N, chunk, k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_half_precision_scores_and_leading_dimensions(dtype):
    score = rows("distinct", 2 * 3 * 2, 150, seed=5).to(dtype).view(2, 3, 2, 150).to(DEVICE)
    got = radix_top_positions(score, 20, chunk=32)
    assert got.shape == (2, 3, 2, 20) and got.dtype == torch.int32
    assert torch.equal(got.cpu(), reference(score.cpu(), 20))  # bf16 rounding makes ties: stable order


def test_special_rows_and_a_strided_view():
    N = 96
    special = torch.full((4, N), NEG)
    special[1, 5] = NAN  # NaN only: nothing to pick
    special[2] = torch.tensor([0.0, -0.0] * (N // 2))  # all equal: the first k positions
    special[3, 10], special[3, 50], special[3, 90] = POS, 1.0, -POS
    wide = torch.zeros(4, 2 * N)
    wide[:, ::2] = special  # every other column: a non-contiguous row view
    view = wide.to(DEVICE)[:, ::2]
    for k in (1, 4, N):
        got = radix_top_positions(view, k, chunk=16).cpu()
        assert torch.equal(got, reference(special, k)), k
    assert got[0].tolist() == [N] * N and got[3, :2].tolist() == [10, 50]


def test_nothing_to_pick_and_input_checks():
    score = torch.randn(2, 50, device=DEVICE)
    assert radix_top_positions(score, 0).shape == (2, 0)
    assert radix_top_positions(score[:0], 5).shape == (0, 5)
    with pytest.raises(ValueError, match="k must be"):
        radix_top_positions(score, 51)
    with pytest.raises(ValueError, match="k must be"):
        radix_top_positions(score, -1)
    with pytest.raises(ValueError, match="score must be"):
        radix_top_positions(score.double(), 5)
    with pytest.raises(ValueError, match="chunk must be"):
        radix_top_positions(score, 5, chunk=24)


# ----------------------------------------------------------------------------- GPU twins
@requires_cuda
@pytest.mark.parametrize("kind", ["distinct", "ties", "holes"])
def test_long_rows_on_cuda(kind):
    score = rows(kind, 16, 131072, seed=1).cuda()
    for k in (1, 2048):
        got = radix_top_positions(score, k)  # default chunks
        assert torch.equal(got.cpu(), reference(score.cpu(), k)), (kind, k)


@requires_cuda
def test_cuda_graph_replays_on_new_scores():
    score = torch.randn(8, 32768, device="cuda")
    radix_top_positions(score, 2048)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = radix_top_positions(score, 2048)
    for seed in range(3):
        score.copy_(torch.randn(8, 32768, generator=torch.Generator().manual_seed(seed)))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out.cpu(), reference(score.cpu(), 2048)), seed
