"""Triton row selections (kernels/row_select_triton.py) against their PyTorch twins, and the
FlexPrefill / vertical-slash plans that use them against the PyTorch path.

On the CPU the kernels run in the Triton interpreter (conftest.py), so rows are short except one
long row for ``rank_mask``; ``block=128`` forces many chunks, compactions into the lane-major
scratch and the register finish on short rows. Top-n selections and compactions must agree
exactly. Mass selections (``cover_count`` / ``cumsum_mask``) must agree exactly where every
partial sum is exact (multiples of 1/64) and, on random floats, wherever the target is not
within 1e-5 relative of a prefix sum (float64 oracle; the two paths sum in different orders).
"""

import pytest
import torch

from sparseattn.bench.synthetic import structured_qkv
from sparseattn.methods import get_method
from sparseattn.methods import flexprefill as flexprefill_module
from sparseattn.methods import vertical_slash as vertical_slash_module
from sparseattn.methods.base import compact_rows, rank_mask
from sparseattn.methods.flexprefill import _cover_count

from ..conftest import requires_cuda, triton_importable
from .cases import assert_same_plan, assert_triton_plan_equals_torch, torch_profiles

pytestmark = pytest.mark.skipif(not triton_importable(), reason="triton is not importable")

# Without CUDA the kernels run in the interpreter on CPU tensors; with CUDA the same tests run compiled.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def rs():
    from sparseattn.kernels import row_select_triton

    return row_select_triton


# ----------------------------------------------------------------------------- oracles
def cumsum_mask_ref(x, target, active=None):
    """The FlexPrefill block-map rule: sort descending (stable), keep cumsum <= target, scatter back."""
    values, order = torch.sort(x.float(), dim=-1, descending=True, stable=True)
    keep = torch.cumsum(values, -1) <= target.unsqueeze(-1)
    out = torch.zeros_like(keep).scatter_(-1, order, keep)
    return out if active is None else out & active.unsqueeze(-1)


def cut_margin(x, target):
    """Per row: min over prefixes of |prefix sum - target| / target, in float64 (sorted descending)."""
    csum = torch.cumsum(torch.sort(x.double(), dim=-1, descending=True).values, -1)
    t = target.double().unsqueeze(-1)
    return ((csum - t).abs() / t.abs().clamp(min=1e-30)).amin(-1)


def grid_rows(shape, seed, *, special=False, zero_rows=True):
    """Multiples of 1/64 with numerators 0..7: many ties and zeros, every partial sum exact.
    ``special`` adds NaN, +-inf, -0.0 and negatives (top-n only)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 8, shape, generator=g).float() / 64
    if special:
        x = x - 3 / 64
        u = torch.rand(shape, generator=g)
        x[u < 0.03] = float("nan")
        x[(u >= 0.03) & (u < 0.06)] = float("inf")
        x[(u >= 0.06) & (u < 0.08)] = float("-inf")
        x[(u >= 0.08) & (u < 0.12)] = -0.0
    if zero_rows and x.dim() > 1 and x.shape[0] > 1:
        x.view(-1, shape[-1])[-1] = 0.0  # a row of zeros: all ties
    return x


def ragged_n(lead, N, seed):
    """Per-row budgets covering nothing (< 0, 0), a few, about half, all and more than all."""
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(-2, N + 3, lead, generator=g)
    flat = n.view(-1)
    for i, v in enumerate((0, 1, N, N + 5, -1, N // 2)):
        if i < flat.numel():
            flat[i] = v
    return n


# ----------------------------------------------------------------------------- rank_mask
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,block", [(1, None), (2, None), (37, None), (300, 128), (1000, 128)])
def test_rank_mask_matches_torch(dtype, N, block):
    x = grid_rows((2, 3, N), seed=N, special=True).to(dtype)
    x[0, 1] = torch.rand(N, generator=torch.Generator().manual_seed(5)).to(dtype) ** 3  # few ties
    n = ragged_n((2, 3), N, seed=N + 1)
    got = rs().rank_mask_triton(x.to(DEVICE), n.to(DEVICE), block=block)
    assert got.dtype == torch.bool and got.shape == x.shape
    assert torch.equal(got.cpu(), rank_mask(x, n))


def test_rank_mask_long_row_broadcast_n_and_strided_input():
    """A 70000-entry row (default chunking: 18 chunks), n broadcast from [1, H], a transposed input."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 2, 70000, generator=g) ** 6
    x[..., :30] = float("inf")  # forced entries, as vertical-slash sets them
    x[0, 1, 100:4000] = 0.25  # a tie block straddling the cut
    n = torch.tensor([[1000, 3000]])
    got = rs().rank_mask_triton(x.to(DEVICE), n.to(DEVICE))
    assert torch.equal(got.cpu(), rank_mask(x, n))
    y = grid_rows((300, 4), seed=9, special=True).t()  # [4, 300], not contiguous
    assert not y.is_contiguous()
    assert torch.equal(rs().rank_mask_triton(y.to(DEVICE), 77, block=128).cpu(), rank_mask(y, torch.tensor(77)))


def test_fused_reduction_path():
    """The one-reduction pass the GPU runs (element by element in the interpreter: small rows)."""
    g = torch.Generator().manual_seed(4)
    x = torch.rand(2, 300, generator=g) ** 4
    x[0, :50] = float("inf")
    n = torch.tensor([37, 200])
    assert torch.equal(rs().rank_mask_triton(x.to(DEVICE), n.to(DEVICE), block=128, fused=True).cpu(),
                       rank_mask(x, n))
    m = grid_rows((2, 300), seed=5, zero_rows=False)
    target = m.sum(-1) * torch.tensor([0.3, 0.8])
    assert torch.equal(rs().cover_count_triton(m.to(DEVICE), target.to(DEVICE), block=128, fused=True).cpu(),
                       torch.stack([_cover_count(m[i], float(target[i])) for i in range(2)]))
    assert torch.equal(rs().cumsum_mask_triton(m.to(DEVICE), target.to(DEVICE), block=128, fused=True).cpu(),
                       cumsum_mask_ref(m, target))


# ----------------------------------------------------------------------------- cover_count
@pytest.mark.parametrize("N,block", [(1, None), (50, None), (400, 128)])
@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.7, 1e6])
def test_cover_count_exact_on_grid_values(N, block, gamma):
    x = grid_rows((2, 3, N), seed=N)
    got = rs().cover_count_triton(x.to(DEVICE), gamma, block=block)
    assert got.dtype == torch.int64 and got.shape == (2, 3)
    assert torch.equal(got.cpu(), _cover_count(x, gamma))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cover_count_random_floats_away_from_the_cut(dtype):
    g = torch.Generator().manual_seed(DTYPES.index(dtype))
    x = (torch.rand(2, 3, 1000, generator=g) ** 8).to(dtype)  # spread over many binades
    x = x / x.float().sum(-1, keepdim=True).to(dtype)  # profile-like: each row sums to about 1
    for gamma in (0.5, 0.9, 0.95):
        got = rs().cover_count_triton(x.to(DEVICE), gamma, block=256).cpu()
        want = _cover_count(x.float(), gamma)
        clear = cut_margin(x, torch.full(x.shape[:-1], gamma)) > 1e-5
        assert clear.sum() >= 4  # the comparison is not vacuous
        assert torch.equal(got[clear], want[clear])
        assert ((got - want).abs() <= 1).all()  # a boundary row may differ by one entry at most


def piece_extremes(x, parts):
    """Per row, the (min, max) keys (float32 bits: values >= 0) of ``parts`` pieces covering it."""
    keys = x.float().contiguous().view(torch.int32)
    piece = -(-x.shape[-1] // parts)
    out = torch.empty(*x.shape[:-1], parts, 2, dtype=torch.int32)
    for c in range(parts):
        part = keys[..., c * piece:(c + 1) * piece]
        out[..., c, 0], out[..., c, 1] = part.amin(-1), part.amax(-1)
    return out


@pytest.mark.parametrize("N,parts", [(1, 1), (400, 3), (1000, 16)])
def test_cover_count_from_given_extremes(N, parts):
    """The search started from per-piece key ranges (no pass of its own) gives the same counts;
    rows of one repeated value (lo = hi - 1 at the start)."""
    x = grid_rows((2, 3, N), seed=N + 1)
    x[1, 2] = 0.25
    ext = piece_extremes(x, parts)
    for gamma in (0.0, 0.3, 1.7, 1e6):
        want = rs().cover_count_triton(x.to(DEVICE), gamma, block=128).cpu()
        got = rs().cover_count_triton(x.to(DEVICE), gamma, block=128, extremes=ext.to(DEVICE)).cpu()
        assert torch.equal(got, want) and torch.equal(got, _cover_count(x, gamma))
    with pytest.raises(ValueError, match="extremes"):
        rs().cover_count_triton(x.to(DEVICE), 0.5, extremes=ext[0].to(DEVICE))
    with pytest.raises(ValueError, match="extremes"):
        rs().cover_count_triton(x.to(DEVICE), 0.5, extremes=ext.long().to(DEVICE))


# ----------------------------------------------------------------------------- cumsum_mask
@pytest.mark.parametrize("N,block", [(1, None), (90, None), (300, 128)])
def test_cumsum_mask_exact_on_grid_values(N, block):
    x = grid_rows((2, 3, N), seed=N + 7)
    frac = torch.tensor([[0.0, 0.25, 0.5], [0.9, 1.0, 3.0]])
    target = x.sum(-1) * frac  # nothing, part, all (and the zero row)
    active = torch.tensor([[True, True, False], [True, True, True]])
    got = rs().cumsum_mask_triton(x.to(DEVICE), target.to(DEVICE), active=active.to(DEVICE), block=block).cpu()
    assert torch.equal(got, cumsum_mask_ref(x, target, active))
    # targets equal to a prefix sum (exact on this grid): the entry ending there is kept (<=)
    csum = torch.cumsum(torch.sort(x, dim=-1, descending=True).values, -1)
    exact = csum[..., (N - 1) // 3]
    got = rs().cumsum_mask_triton(x.to(DEVICE), exact.to(DEVICE), block=block).cpu()
    assert torch.equal(got, cumsum_mask_ref(x, exact))
    want = torch.stack([_cover_count(r, float(e)) for r, e in zip(x.view(-1, N), exact.view(-1))]).view(2, 3)
    assert torch.equal(rs().cover_count_triton(x.to(DEVICE), exact.to(DEVICE), block=block).cpu(), want)
    # a scalar target and a 0-dim tensor target broadcast to every row
    assert torch.equal(rs().cumsum_mask_triton(x.to(DEVICE), 0.75, block=block).cpu(),
                       cumsum_mask_ref(x, torch.full(x.shape[:-1], 0.75)))
    t0 = torch.tensor(0.5)
    assert torch.equal(rs().cumsum_mask_triton(x.to(DEVICE), t0.to(DEVICE), block=block).cpu(),
                       cumsum_mask_ref(x, t0.expand(x.shape[:-1])))


def test_mass_rules_at_the_boundary():
    """Hand-checked rows (the register finish, N <= FIN): an entry whose cumulative sum equals the
    target is kept, so are zeros after it, and a tie group can be split."""
    x = torch.tensor([[0.5, 0.0, 0.25, 0.0, 0.25]] * 4)
    target = torch.tensor([1.0, 0.75, 0.5, 0.25])
    want = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(rs().cumsum_mask_triton(x.to(DEVICE), target.to(DEVICE)).cpu(), want)
    assert torch.equal(cumsum_mask_ref(x, target), want)
    assert rs().cover_count_triton(x.to(DEVICE), target.to(DEVICE)).cpu().tolist() == [6, 3, 2, 1]


def test_cumsum_mask_block_map_like_rows():
    """Rows like FlexPrefill's block map: softmax rows with zeros past the causal limit, target
    gamma * rows; compared where the target is clear of every prefix sum."""
    g = torch.Generator().manual_seed(12)
    nQ = nK = 24
    logits = torch.randn(2, 3, nQ, nK, generator=g) * 2
    visible = torch.arange(nK).view(1, -1) <= torch.arange(nQ).view(-1, 1)
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), -1).view(2, 3, nQ * nK)
    for gamma in (0.3, 0.9):
        target = torch.full((2, 3), gamma) * nQ
        got = rs().cumsum_mask_triton(probs.to(DEVICE), target.to(DEVICE), block=128).cpu()
        clear = cut_margin(probs, target) > 1e-5
        assert clear.sum() >= 4
        assert torch.equal(got[clear], cumsum_mask_ref(probs, target)[clear])


# ----------------------------------------------------------------------------- split rows
# A row over several programs (one slice each, a barrier per round; in the interpreter one round
# per launch). Small blocks make many slices on short rows; (split, block) pairs where the slice is
# one block run the register-resident variant (ONE_CHUNK), the others loop over chunks.
SPLITS = [(2, 32), (3, 32), (7, 64)]


@pytest.mark.parametrize("split,block", [(2, 32), (5, 64)])
def test_split_rank_mask_matches_torch(split, block):
    x = grid_rows((2, 3, 300), seed=11, special=True)
    x[0, 1] = torch.rand(300, generator=torch.Generator().manual_seed(6)) ** 3  # few ties
    n = ragged_n((2, 3), 300, seed=12)
    got = rs().rank_mask_triton(x.to(DEVICE), n.to(DEVICE), block=block, split=split)
    assert torch.equal(got.cpu(), rank_mask(x, n))


@pytest.mark.parametrize("split,block", SPLITS)
def test_split_tie_groups_across_slices(split, block):
    """A tie group straddling slices, cut inside it: with few candidates (the register finish from
    the shared tile) and with more ties than the tile holds (the bracket closes on one key)."""
    g = torch.Generator().manual_seed(7)
    x = torch.rand(2, 400, generator=g) + 1.0
    x[0, ::7] += 2.0
    x[0, 137:400:13] = 1.5  # 21 ties spread over every slice
    x[1, 30:370] = 1.25  # 340 ties, more than FIN
    x[1, :10] = 3.0
    n = torch.tensor([int((x[0] > 1.5).sum()) + 9, int((x[1] > 1.25).sum()) + 200])
    got = rs().rank_mask_triton(x.to(DEVICE), n.to(DEVICE), block=block, split=split)
    assert torch.equal(got.cpu(), rank_mask(x, n))
    m = x.clone()
    m[1] = 0.0
    m[1, 20:380] = 1 / 64  # mass ties: the cut keeps a prefix of them
    target = torch.tensor([float(m[0][m[0] > 1.5].sum()) + 4 * 1.5 + 0.01, 150 / 64])
    assert torch.equal(rs().cumsum_mask_triton(m.to(DEVICE), target.to(DEVICE), block=block, split=split).cpu(),
                       cumsum_mask_ref(m, target))


@pytest.mark.parametrize("split,block", [(2, 32), (5, 64)])
def test_split_mass_selections_exact_on_grid_values(split, block):
    N = 300
    x = grid_rows((2, 3, N), seed=13)
    frac = torch.tensor([[0.0, 0.25, 0.5], [0.9, 1.0, 3.0]])
    target = x.sum(-1) * frac
    active = torch.tensor([[True, True, False], [True, True, True]])
    got = rs().cumsum_mask_triton(x.to(DEVICE), target.to(DEVICE), active=active.to(DEVICE), block=block,
                                  split=split).cpu()
    assert torch.equal(got, cumsum_mask_ref(x, target, active))
    csum = torch.cumsum(torch.sort(x, dim=-1, descending=True).values, -1)
    exact = csum[..., N // 3]  # a target equal to a prefix sum: the entry ending there is kept
    want = torch.stack([_cover_count(r, float(e)) for r, e in zip(x.view(-1, N), exact.view(-1))]).view(2, 3)
    got = rs().cover_count_triton(x.to(DEVICE), exact.to(DEVICE), block=block, split=split).cpu()
    assert torch.equal(got, want)
    for gamma in (0.0, 1e6):
        got = rs().cover_count_triton(x.to(DEVICE), gamma, block=block, split=split).cpu()
        assert torch.equal(got, _cover_count(x, gamma))


@pytest.mark.parametrize("split", [3])
def test_split_cover_count_random_floats_away_from_the_cut(split):
    g = torch.Generator().manual_seed(split)
    x = torch.rand(2, 3, 1000, generator=g) ** 8
    x = x / x.sum(-1, keepdim=True)
    for gamma in (0.5, 0.9, 0.95):
        got = rs().cover_count_triton(x.to(DEVICE), gamma, block=128, split=split).cpu()
        want = _cover_count(x, gamma)
        clear = cut_margin(x, torch.full(x.shape[:-1], gamma)) > 1e-5
        assert clear.sum() >= 4
        assert torch.equal(got[clear], want[clear])
        assert ((got - want).abs() <= 1).all()


def test_split_argument_checks_and_short_rows():
    x = torch.rand(2, 5, device=DEVICE)
    with pytest.raises(ValueError, match="split"):
        rs().rank_mask_triton(x, 1, split=0)
    # a row shorter than two chunks runs on one program whatever split asks
    assert torch.equal(rs().rank_mask_triton(x, 2, split=4).cpu(), rank_mask(x.cpu(), torch.tensor(2)))


@requires_cuda
@pytest.mark.gpu
def test_cuda_split_equals_one_program_on_long_rows():
    """The split path (slices of one chunk in registers, and of several chunks) against the
    one-program search: top-n masks equal; mass selections equal on exact grid values."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.rand(18, 32768, device="cuda", generator=g) ** 6
    x[:, 5000:9000] = 0.5  # a tie block over several slices
    n = torch.randint(0, 32768, (18,), device="cuda", generator=g)
    n[0], n[1] = 0, 32768
    one = rs().rank_mask_triton(x, n, split=1)
    for split, block in ((32, None), (16, 2048), (2, None), (7, 1024)):
        assert torch.equal(rs().rank_mask_triton(x, n, split=split, block=block), one)
    grid = torch.randint(0, 8, (9, 65536), device="cuda", generator=g).float() / 64
    target = grid.sum(-1) * torch.linspace(0.0, 1.0, 9, device="cuda")
    one = rs().cumsum_mask_triton(grid, target, split=1)
    counts = rs().cover_count_triton(grid, target, split=1)
    for split, block in ((64, None), (3, None), (14, 1024)):
        assert torch.equal(rs().cumsum_mask_triton(grid, target, split=split, block=block), one)
        assert torch.equal(rs().cover_count_triton(grid, target, split=split, block=block), counts)


# ----------------------------------------------------------------------------- compact_rows
def prefix_ref(mask):
    return torch.nn.functional.pad(torch.cumsum(mask, -1), (1, 0)).to(torch.int32)


@pytest.mark.parametrize("N,chunked", [(1, False), (300, False), (300, True), (256, True)])
def test_compact_rows_matches_torch(N, chunked):
    # chunked: rows split over programs of 64 entries (5 chunks at N = 300, the last partial; 4 whole
    # ones at 256), each packing after the counts of the chunks before it.
    g = torch.Generator().manual_seed(N)
    mask = torch.rand(2, 3, 5, N, generator=g) < 0.3
    mask[0, 0, 0] = True
    mask[0, 0, 1] = False
    vals = torch.randint(0, 10 ** 6, (2, 3, 1, N), generator=g)
    k = rs().compact_rows_triton
    md = mask.to(DEVICE)
    for width in (0, 7, N + 3):
        counts, packed, pre = k(md, None, width, prefix=True, block=64 if chunked else 128, chunked=chunked)
        want_c, want_p = compact_rows(mask, torch.arange(N).expand(mask.shape), width)
        assert torch.equal(counts.cpu(), want_c) and torch.equal(packed.cpu(), want_p)
        assert torch.equal(pre.cpu(), prefix_ref(mask))
        # values shared along the next-to-last dim (read in place), and full values
        counts, packed = k(md, vals.to(DEVICE), width, chunked=chunked, block=64 if chunked else None)
        want_c, want_p = compact_rows(mask, vals.expand(mask.shape), width)
        assert torch.equal(counts.cpu(), want_c) and torch.equal(packed.cpu(), want_p)
        full = vals.expand(mask.shape).contiguous() + 1
        counts, packed = k(md, full.to(DEVICE), width, chunked=chunked, block=64 if chunked else None)
        want_c, want_p = compact_rows(mask, full, width)
        assert torch.equal(counts.cpu(), want_c) and torch.equal(packed.cpu(), want_p)


def test_input_checks():
    k = rs()
    x = torch.rand(2, 5, device=DEVICE)
    with pytest.raises(ValueError, match="float32"):
        k.rank_mask_triton(x.double(), 2)
    with pytest.raises(ValueError, match="integer"):
        k.rank_mask_triton(x, torch.tensor([1.0, 2.0], device=DEVICE))
    with pytest.raises(ValueError, match="broadcast"):
        k.rank_mask_triton(x, torch.tensor([1, 2, 3], device=DEVICE))
    with pytest.raises(ValueError, match="tensor"):
        k.rank_mask_triton([1.0, 2.0], 1)
    with pytest.raises(ValueError, match="gamma"):
        k.cover_count_triton(x, float("nan"))
    with pytest.raises(ValueError, match="target"):
        k.cumsum_mask_triton(x, torch.tensor([1, 2], device=DEVICE))
    with pytest.raises(ValueError, match="active"):
        k.cumsum_mask_triton(x, 0.5, active=torch.ones(2, device=DEVICE))
    with pytest.raises(ValueError, match="block"):
        k.rank_mask_triton(x, 1, block=100)
    with pytest.raises(ValueError, match="bool"):
        k.compact_rows_triton(x, None, 2)
    with pytest.raises(ValueError, match="width"):
        k.compact_rows_triton(x > 0.5, None, -1)
    with pytest.raises(ValueError, match="integer"):
        k.compact_rows_triton(x > 0.5, x, 2)
    with pytest.raises(ValueError, match="broadcast"):
        k.compact_rows_triton(x > 0.5, torch.zeros(3, 5, dtype=torch.int64, device=DEVICE), 2)
    # empty rows and no rows
    assert k.rank_mask_triton(torch.rand(2, 0, device=DEVICE), 1).shape == (2, 0)
    empty = k.cover_count_triton(torch.rand(2, 0, device=DEVICE), 0.5).cpu()
    assert torch.equal(empty, torch.ones(2, dtype=torch.int64))
    assert k.cumsum_mask_triton(torch.rand(0, 4, device=DEVICE), 0.5).shape == (0, 4)


# ----------------------------------------------------------------------------- plans
PLAN_CASES = [
    ("flexprefill", flexprefill_module, dict(block_size=64, tau=1.0, gamma=0.8)),  # every head query-aware
    ("flexprefill", flexprefill_module, dict(block_size=128, tau=0.1)),
    ("vertical_slash", vertical_slash_module, dict(vertical_size=90, slash_size=300)),
    ("vertical_slash", vertical_slash_module, dict(block_size=32, vertical_size=(40, 100), slash_size=64,
                                                   gqa_policy="group_union")),
]


@pytest.mark.parametrize("case", range(len(PLAN_CASES)))
def test_plans_equal_the_pytorch_path(case, monkeypatch):
    name, module, opts = PLAN_CASES[case]
    from sparseattn.kernels import last_queries_triton

    monkeypatch.setattr(last_queries_triton, "last_queries_profiles_triton", torch_profiles)
    q, k, v = structured_qkv(2, 6, 2, 1500 if case % 2 else 1100, 32, seed=case, device=DEVICE)
    m = get_method(name, **opts)
    assert_triton_plan_equals_torch(module, m, q, k, v, monkeypatch)


# ----------------------------------------------------------------------------- GPU twin
def torch_twins(monkeypatch):
    """Swap the kernels for their PyTorch twins, so that both plans start from the same profiles."""
    k = rs()

    def rank_mask_twin(scores, n, **kw):
        return rank_mask(scores, n.expand(scores.shape[:-1]) if isinstance(n, torch.Tensor) else torch.tensor(n))

    def cover_count_twin(x, gamma, **kw):  # gamma: a float or a per-row tensor (FlexPrefill's)
        return _cover_count(x, gamma.unsqueeze(-1) if isinstance(gamma, torch.Tensor) else gamma)

    def cumsum_mask_twin(x, target, active=None, **kw):
        t = target.expand(x.shape[:-1]) if isinstance(target, torch.Tensor) else torch.full(x.shape[:-1], target)
        return cumsum_mask_ref(x, t.to(x.device), None if active is None else active.expand(x.shape[:-1]))

    def compact_rows_twin(mask, values=None, width=0, prefix=False, **kw):
        vals = torch.arange(mask.shape[-1], device=mask.device) if values is None else values
        out = compact_rows(mask, vals.expand(mask.shape), width)
        return (*out, prefix_ref(mask)) if prefix else out

    for name, fn in (("rank_mask_triton", rank_mask_twin), ("cover_count_triton", cover_count_twin),
                     ("cumsum_mask_triton", cumsum_mask_twin), ("compact_rows_triton", compact_rows_twin)):
        monkeypatch.setattr(k, name, fn)


@requires_cuda
@pytest.mark.gpu
def test_cuda_plans_at_32k(monkeypatch):
    """SmolLM2-like heads at 32K in bf16: the plans with the kernels equal those with their PyTorch
    twins on the same Triton profiles (vertical-slash: exactly; FlexPrefill: up to blocks at a
    float32 rounding boundary of a cumulative mass), and each kernel equals its twin on the
    estimator's real rows."""
    q, k, v = structured_qkv(1, 9, 3, 32768, 64, seed=0, device="cuda", dtype=torch.bfloat16)
    cases = [("vertical_slash", {}), ("vertical_slash", {"gqa_policy": "group_union"}),
             ("flexprefill", {}), ("flexprefill", {"tau": 1.0})]
    plans = {}
    for i, (name, opts) in enumerate(cases):
        m = get_method(name, **opts)
        m._plan(q, k, v, causal=True, layer_idx=None)  # warm-up (compiles, lazy init may sync)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            plans[i] = m._plan(q, k, v, causal=True, layer_idx=None)  # eager, never syncs
        finally:
            torch.cuda.set_sync_debug_mode("default")
        for _ in range(3):  # eager, capture, replay
            assert_same_plan(m.plan(q, k, v), plans[i])
    with monkeypatch.context() as mp:
        torch_twins(mp)
        for i, (name, opts) in enumerate(cases):
            want = get_method(name, **opts)._plan(q, k, v, causal=True, layer_idx=None)
            plans[i].validate(causal=True)
            if name == "vertical_slash":
                assert_same_plan(plans[i], want)
            else:
                a, b = plans[i].block_mask(), want.block_mask()
                assert (a != b).sum() <= 1e-3 * b.sum(), (name, opts)
    # The kernels on the real profile rows (not through a CUDA graph).
    from sparseattn.kernels.last_queries_triton import last_queries_profiles_triton

    columns, diagonals = last_queries_profiles_triton(q, k, 64)
    rows = torch.stack((columns, diagonals))  # [2, 1, 9, 32768]
    n = torch.tensor([1000, 6096], device="cuda").view(2, 1, 1).expand(2, 1, 9)
    assert torch.equal(rs().rank_mask_triton(rows, n), rank_mask(rows, n))
    prof = rows / 64
    for gamma in (0.9, 0.95):
        got, want = rs().cover_count_triton(prof, gamma), _cover_count(prof, gamma)
        clear = cut_margin(prof, torch.full(prof.shape[:-1], gamma, device="cuda")) > 1e-5
        assert torch.equal(got[clear], want[clear]) and ((got - want).abs() <= 1).all()
    keep = rank_mask(rows, n)
    want_c, want_p = compact_rows(keep, torch.arange(32768, device="cuda").expand(keep.shape), 1000)
    for chunked in (None, False, True):  # the default is chunked here (18 rows)
        counts, packed, pre = rs().compact_rows_triton(keep, None, 1000, prefix=True, chunked=chunked)
        assert torch.equal(counts, want_c) and torch.equal(packed, want_p) and torch.equal(pre, prefix_ref(keep))


def test_top_n_split_rule():
    """The split path for a few long rows only (vertical-slash's 2 x Hq rows at >= 16K keys)."""
    k = rs()
    split, block, warps = k.TOP_N_SPLIT
    assert k.top_n_split(18, 32768) == dict(split=split, block=block, num_warps=warps)
    assert k.top_n_split(k.TOP_N_SPLIT_ROWS + 1, 32768) == {}
    assert k.top_n_split(18, k.TOP_N_SPLIT_MIN_LEN - 1) == {}
