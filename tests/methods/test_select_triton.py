"""The Triton block selector (kernels/select_triton.py) against the PyTorch path it replaces:
``BlockPlan.from_block_mask(select_topk / select_threshold(...))``.

On the CPU the kernel runs in the Triton interpreter (conftest.py), so the shapes are small.
Scores on a 1/64 grid with small numerators make every partial sum exact, so both paths must
agree exactly in both modes; with random floats top-k must still agree exactly and threshold
rows may differ only where a cumulative mass lands within rounding of ``tau * total``.
"""

import pytest
import torch

from sparseattn.methods import base
from sparseattn.methods.base import forced_blocks, select_threshold, select_topk, visible_blocks
from sparseattn.plan import BlockPlan

from ..conftest import requires_cuda, triton_importable

pytestmark = [pytest.mark.skipif(not triton_importable(), reason="triton is not importable"),
              # +-inf scores overflow sums in both paths on purpose (numpy warns in the interpreter)
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]


# Without CUDA the kernel runs in the interpreter on CPU tensors; with CUDA the same tests run compiled.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _kernel():
    from sparseattn.kernels.select_triton import select_blocks_triton

    return select_blocks_triton


def cdiv(a, b):
    return -(-a // b)


def reference(scores, geo, *, causal, sink_blocks, local_blocks, diagonal, mode, values):
    vis = visible_blocks(**geo, causal=causal, device=scores.device)
    forced = forced_blocks(**geo, sink_blocks=sink_blocks, local_blocks=local_blocks, diagonal=diagonal,
                           device=scores.device)
    if mode == "topk":
        keep = select_topk(scores, vis, forced, values)
    else:
        keep = select_threshold(scores, vis, forced, values.to(scores.dtype))
    return BlockPlan.from_block_mask(keep, **geo, causal=causal)


def check_same(scores, geo, *, causal=True, sink_blocks=1, local_blocks=0, diagonal=True, mode="topk", values,
               boundary_ok=False, **kw):
    """Run both paths; return the kernel's plan. ``boundary_ok``: threshold rows may differ only at
    the cut (the mass before every differing block is within 1e-5 relative of tau * total)."""
    scores, values = scores.to(DEVICE), values.to(DEVICE)
    opts = dict(causal=causal, sink_blocks=sink_blocks, local_blocks=local_blocks, diagonal=diagonal, mode=mode,
                values=values)
    counts, indices = _kernel()(scores, **geo, **opts, **kw)
    ref = reference(scores, geo, **opts)
    nK = scores.shape[-1]
    assert counts.dtype == indices.dtype == torch.int32
    assert counts.shape == ref.kv_counts.shape and indices.shape == ref.kv_indices.shape == (*counts.shape, nK)
    plan = BlockPlan(counts, indices, **geo).validate(causal=causal)
    # zero padding after the count, as from_block_mask writes it
    pad = torch.arange(nK, device=counts.device) >= counts.unsqueeze(-1).long()
    assert not indices[pad].any()
    if not boundary_ok:
        assert torch.equal(counts, ref.kv_counts)
        assert torch.equal(indices, ref.kv_indices)
        return plan
    mine, theirs = plan.block_mask(), ref.block_mask()
    differ = (mine != theirs).any(-1)
    if differ.any():
        _check_boundary_rows(scores, geo, opts, mine, theirs, differ)
    return plan


def _check_boundary_rows(scores, geo, opts, mine, theirs, differ):
    vis = visible_blocks(**geo, causal=opts["causal"], device=scores.device)
    forced = forced_blocks(**geo, sink_blocks=opts["sink_blocks"], local_blocks=opts["local_blocks"],
                           diagonal=opts["diagonal"], device=scores.device) & vis
    s = torch.nan_to_num(scores.double(), nan=0.0).clamp(min=0)
    tau = opts["values"].to(scores.dtype).double()
    for b, h, m in differ.nonzero().tolist():
        row, v, f = s[b, h, m], vis[m], forced[m]
        total = row[v].sum()
        target = tau[h] * total
        before = row[f].sum()
        cand = (v & ~f).nonzero().view(-1).tolist()
        cand.sort(key=lambda n: (-row[n].item(), n))
        for n in cand:
            if mine[b, h, m, n] != theirs[b, h, m, n]:
                assert abs(before - target) <= 1e-5 * total + 1e-30, (b, h, m, n, before.item(), target.item())
            before = before + row[n]


def grid_scores(shape, seed, *, nan=True, signed=False):
    """Multiples of 1/64 with numerators 0..7 (many ties; every partial sum exact), some NaN/inf."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 8, shape, generator=g).float() / 64
    if signed:
        s = s - 4 / 64
    if nan:
        u = torch.rand(shape, generator=g)
        s[u < 0.03] = float("nan")
        if signed:
            s[(u >= 0.03) & (u < 0.05)] = float("-inf")
        s[(u >= 0.05) & (u < 0.06)] = float("inf")
    return s


# (block_q, block_k, q_len, k_len, causal): aligned / ragged, bottom-right straddling diagonals,
# block_q != block_k, Lq > Lk (rows that see nothing), non-causal, a single block.
GEOMETRIES = [
    (16, 16, 100, 100, True),
    (16, 16, 40, 130, True),
    (16, 32, 70, 150, True),
    (32, 16, 50, 300, True),
    (16, 16, 60, 40, True),
    (16, 16, 50, 90, False),
    (16, 16, 70, 40, False),
    (64, 64, 30, 30, True),
]
FORCED = [dict(sink_blocks=1, local_blocks=0, diagonal=True), dict(sink_blocks=0, local_blocks=0, diagonal=False),
          dict(sink_blocks=2, local_blocks=3, diagonal=True)]


@pytest.mark.parametrize("mode", ["topk", "threshold"])
@pytest.mark.parametrize("gi", range(len(GEOMETRIES)))
def test_grid_scores_match_exactly(gi, mode):
    bq, bk, Lq, Lk, causal = GEOMETRIES[gi]
    geo = dict(block_q=bq, block_k=bk, q_len=Lq, k_len=Lk)
    shape = (2, 3, cdiv(Lq, bq), cdiv(Lk, bk))
    scores = grid_scores(shape, seed=gi, signed=mode == "topk")
    # per head: nothing beyond forced, a few, more than there are candidates / tau 0, mid, 1
    values = torch.tensor([0, 3, 100]) if mode == "topk" else torch.tensor([0.0, 0.5, 1.0])
    check_same(scores, geo, causal=causal, mode=mode, values=values, **FORCED[gi % 3])
    values = torch.tensor([1, 5, 2]) if mode == "topk" else torch.tensor([0.3, 0.75, 0.9])
    check_same(scores, geo, causal=causal, mode=mode, values=values, **FORCED[(gi + 1) % 3])


@pytest.mark.parametrize("mode", ["topk", "threshold"])
def test_random_floats(mode):
    geo = dict(block_q=16, block_k=16, q_len=120, k_len=200)
    g = torch.Generator().manual_seed(7)
    scores = torch.rand(2, 3, 8, 13, generator=g) ** 3  # spread over several binades
    if mode == "topk":
        scores = scores - 0.1  # negatives too
        check_same(scores, geo, mode=mode, values=torch.tensor([2, 4, 7]), local_blocks=1)
    else:
        check_same(scores, geo, mode=mode, values=torch.tensor([0.5, 0.8, 0.95]), local_blocks=1, boundary_ok=True)


@pytest.mark.parametrize("mode", ["topk", "threshold"])
def test_split_tiles_and_strided_input(mode):
    """Causal rows on half / quarter tiles (forced on at a small tile), a non-contiguous input."""
    geo = dict(block_q=8, block_k=8, q_len=300, k_len=330)  # nQ = 38, nK = 42 -> tile 64
    full = grid_scores((1, 2, 42, 38), seed=3).transpose(-1, -2)  # [1, 2, 38, 42], strided
    assert not full.is_contiguous()
    values = torch.tensor([4, 9]) if mode == "topk" else torch.tensor([0.6, 0.85])
    check_same(full, geo, mode=mode, values=values, local_blocks=2, min_split_tile=16)


def test_signed_zeros_and_infinities_tie():
    """-0.0 ties with 0.0, +-inf with +-max (nan_to_num), NaN with 0: ties go to lower indices."""
    geo = dict(block_q=16, block_k=16, q_len=16, k_len=160)  # one query block, 10 key blocks
    big = torch.finfo(torch.float32).max
    row = [-0.0, 0.0, float("nan"), -0.0, float("inf"), big, float("-inf"), -big, 0.0, -0.0]
    scores = torch.tensor(row).view(1, 1, 1, 10).repeat(1, 4, 1, 1)
    for mode, values in (("topk", torch.tensor([2, 3, 5, 8])), ("threshold", torch.tensor([0.0, 0.2, 0.6, 1.0]))):
        check_same(scores, geo, mode=mode, values=values, sink_blocks=0, diagonal=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_topk(dtype):
    geo = dict(block_q=16, block_k=16, q_len=90, k_len=140)
    g = torch.Generator().manual_seed(11)
    scores = (torch.randn(1, 3, 6, 9, generator=g) * 4).to(dtype)  # many ties after rounding
    scores[0, 0, 3, 2] = float("inf")
    scores[0, 1, 4, 5] = torch.finfo(dtype).max  # ties with +inf after nan_to_num
    check_same(scores, geo, mode="topk", values=torch.tensor([3, 5, 1]))


def test_input_checks():
    sel = _kernel()
    geo = dict(block_q=16, block_k=16, q_len=32, k_len=32)
    opts = dict(causal=True, sink_blocks=1, local_blocks=0, diagonal=True)
    s = torch.rand(1, 2, 2, 2)
    with pytest.raises(ValueError, match="float32"):
        sel(s.double(), **geo, **opts, mode="topk", values=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=r"\(nQ, nK\)"):
        sel(torch.rand(1, 2, 2, 3), **geo, **opts, mode="topk", values=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="values"):
        sel(s, **geo, **opts, mode="topk", values=torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match="integers"):
        sel(s, **geo, **opts, mode="topk", values=torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="floating"):
        sel(s, **geo, **opts, mode="threshold", values=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="mode"):
        sel(s, **geo, **opts, mode="mass", values=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="sink_blocks"):
        sel(s, **geo, causal=True, sink_blocks=-1, local_blocks=0, diagonal=True, mode="topk",
            values=torch.tensor([1, 1]))


@pytest.mark.parametrize("policy,mode", [("per_q_head", "topk"), ("group_sum", "threshold")])
def test_plan_uses_the_kernel(monkeypatch, policy, mode):
    """ScoreBasedMethod._plan with the Triton path forced on (interpreter) gives the PyTorch plan;
    GQA groups 3 (Hq=6, Hkv=2) and 1, batch 2, per-head budgets."""
    import sparseattn.kernels.select_triton as st
    from sparseattn.methods import get_method

    calls = []
    real = st.select_blocks_triton
    monkeypatch.setattr(st, "select_blocks_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    g = torch.Generator().manual_seed(5)
    for hkv in (2, 6):
        q = torch.randn(2, 6, 70, 16, generator=g).to(DEVICE)
        k = torch.randn(2, hkv, 100, 16, generator=g).to(DEVICE)
        method = get_method("block_topk", block_size=16, selection=mode, topk=[2, 4] * (hkv // 2),
                            threshold=[0.6, 0.9] * (hkv // 2), gqa_policy=policy, local_blocks=1)
        monkeypatch.setattr(base, "use_triton_estimator", lambda x: False)
        ref = method._plan(q, k, k, causal=True, layer_idx=None)  # _plan: no graph replay in between
        monkeypatch.setattr(base, "use_triton_estimator", lambda x: True)
        n = len(calls)
        plan = method._plan(q, k, k, causal=True, layer_idx=None)
        assert len(calls) == n + 1
        plan.validate(causal=True)
        assert plan.kv_counts.shape == ref.kv_counts.shape
        if mode == "topk":
            assert torch.equal(plan.kv_counts, ref.kv_counts) and torch.equal(plan.kv_indices, ref.kv_indices)
            continue
        # softmax masses: rows may differ only at the cut
        mine, theirs = plan.block_mask(), ref.block_mask()
        differ = (mine != theirs).any(-1)
        if differ.any():
            scores = method.score(q, k, causal=True)
            scores = scores.view(2, hkv, 6 // hkv, *scores.shape[2:]).sum(2)
            opts = dict(causal=True, sink_blocks=1, local_blocks=1, diagonal=True,
                        values=torch.tensor([0.6, 0.9] * (hkv // 2)))
            _check_boundary_rows(scores, dict(block_q=16, block_k=16, q_len=70, k_len=100), opts, mine, theirs,
                                 differ)


# ----------------------------------------------------------------------------- the radix select itself
if triton_importable():
    import triton
    import triton.language as tl

    from sparseattn.kernels.select_triton import _inclusive_count, _top_lanes

    @triton.jit
    def _inclusive_count_rows(Flags, Out, TILE: tl.constexpr):
        offs = tl.program_id(0) * TILE + tl.arange(0, TILE)
        tl.store(Out + offs, _inclusive_count(tl.load(Flags + offs), TILE))

    @triton.jit
    def _top_lanes_rows(X, Cand, Want, Out, TILE: tl.constexpr, PROBE_LANES: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, TILE)
        x = tl.load(X + row * TILE + offs)
        cand = tl.load(Cand + row * TILE + offs) != 0
        tl.store(Out + row * TILE + offs, _top_lanes(x, cand, tl.load(Want + row), TILE, PROBE_LANES).to(tl.int8))


@pytest.mark.parametrize("tile,probe_lanes", [(16, 8), (256, 2), (256, 8), (2048, 4), (2048, 16)])
def test_top_lanes_is_the_stable_sorts_prefix(tile, probe_lanes):
    """``_top_lanes`` (bisection and k-ary) keeps the first ``n_best`` candidates of a stable descending sort, for
    n_best below 0, 0, 1, in between, equal to and above the candidate count; rows with many
    ties (a few distinct values, signed zeros, +-inf, values sharing their top bytes) and rows
    without candidates."""
    g = torch.Generator().manual_seed(tile)
    rows = []
    for kind in range(6):
        if kind == 0:
            x = torch.randn(tile, generator=g)
        elif kind == 1:  # few distinct values: ties at the cut in every row
            x = torch.randint(-3, 4, (tile,), generator=g).float()
        elif kind == 2:  # signed zeros and infinities
            x = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1.0, -1.0])[
                torch.randint(0, 6, (tile,), generator=g)]
        elif kind == 3:  # distinct floats that share their top three bytes: the last pass decides
            x = (1.0 + torch.randint(0, 256, (tile,), generator=g).float() * 2.0 ** -23)
        elif kind == 4:  # negative only
            x = -torch.rand(tile, generator=g) - 0.5
        else:
            x = torch.randn(tile, generator=g) * 1e30
        rows.append(x)
    x = torch.stack(rows)
    cand = torch.rand(x.shape, generator=g) < 0.7
    cand[-1] = False  # a row without candidates
    n_cand = cand.sum(-1)
    cases = []
    for want_of in (lambda n: -3, lambda n: 0, lambda n: 1, lambda n: n // 3, lambda n: n - 1, lambda n: n,
                    lambda n: n + 5):
        want = torch.tensor([want_of(int(n)) for n in n_cand])
        cases.append(want)
    for want in cases:
        out = torch.empty(x.shape, dtype=torch.int8, device=DEVICE)
        _top_lanes_rows[(x.shape[0],)](x.to(DEVICE), cand.to(DEVICE, torch.int8), want.to(DEVICE, torch.int32), out,
                              TILE=tile, PROBE_LANES=probe_lanes)
        for r in range(x.shape[0]):
            lanes = cand[r].nonzero().flatten()
            values = x[r, lanes].masked_fill(x[r, lanes] == 0, 0.0)  # -0.0 ties with 0.0
            order = lanes[torch.sort(values, descending=True, stable=True).indices]
            keep = torch.zeros(tile, dtype=torch.bool)
            keep[order[:max(0, min(int(want[r]), int(n_cand[r])))]] = True
            assert torch.equal(out[r].cpu().bool(), keep), (tile, r, int(want[r]))


@pytest.mark.parametrize("tile", [16, 32, 64, 1024])
def test_inclusive_count_is_the_cumsum(tile):
    """The two-level scan (tiles of 64 lanes and more) and the plain one equal torch.cumsum, on rows
    that are empty, full, sparse, dense, and set only at the ends."""
    g = torch.Generator().manual_seed(tile)
    rows = [torch.zeros(tile), torch.ones(tile), (torch.rand(tile, generator=g) < 0.05).float(),
            (torch.rand(tile, generator=g) < 0.6).float(), torch.zeros(tile).index_fill_(0, torch.tensor([0, tile - 1]), 1)]
    flags = torch.stack(rows).to(torch.int32)
    out = torch.empty_like(flags, device=DEVICE)
    _inclusive_count_rows[(flags.shape[0],)](flags.to(DEVICE), out, TILE=tile)
    assert torch.equal(out.cpu(), torch.cumsum(flags, 1).to(torch.int32))


# ----------------------------------------------------------------------------- GPU twin
@requires_cuda
@pytest.mark.parametrize("mode", ["topk", "threshold"])
def test_cuda_matches_torch_path(mode):
    """[1, 32, 1024, 1024] on the GPU (the compiled kernel, split tiles on): bf16 scores for top-k
    (exact), and for threshold exact grid masses plus random float32 masses (boundary rows only)."""
    dev = torch.device("cuda")
    geo = dict(block_q=64, block_k=64, q_len=65536, k_len=65536)
    H, n = 32, 1024
    g = torch.Generator(device=dev).manual_seed(0)
    if mode == "topk":
        scores = torch.randn(1, H, n, n, generator=g, device=dev).to(torch.bfloat16)
        values = torch.randint(0, 200, (H,), generator=g, device=dev)
        check_same(scores, geo, mode=mode, values=values, local_blocks=1)
        check_same(scores.float(), geo, mode=mode, values=values, sink_blocks=0, diagonal=False, causal=False)
    else:
        grid = torch.randint(0, 8, (1, H, n, n), generator=g, device=dev).float() / 64
        values = torch.rand(H, generator=g, device=dev)
        values[:3] = torch.tensor([0.0, 1.0, 0.9], device=dev)
        check_same(grid, geo, mode=mode, values=values, local_blocks=1)
        masses = torch.rand(1, H, n, n, generator=g, device=dev) ** 4
        check_same(masses, geo, mode=mode, values=values, boundary_ok=True)



@requires_cuda
def test_cuda_plan_dispatch(monkeypatch):
    """block_topk / xattention plans on CUDA (bf16 q/k) take the kernel and equal the PyTorch
    selection on the same scores (only base.py's dispatch is switched, not the scorers')."""
    import sparseattn.kernels.select_triton as st
    from sparseattn.methods import get_method

    calls = []
    real = st.select_blocks_triton
    monkeypatch.setattr(st, "select_blocks_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(1)
    q = torch.randn(1, 32, 8192, 128, generator=g, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, 8, 8192, 128, generator=g, device=dev, dtype=torch.bfloat16)
    for method in (get_method("block_topk", block_size=64, topk=40), get_method("xattention", threshold=0.9)):
        n = len(calls)
        # _plan directly: the eager pipeline this kernel plugs into (plan() may replay a CUDA graph)
        plan = method._plan(q, k, k, causal=True, layer_idx=None)
        assert len(calls) == n + 1
        with monkeypatch.context() as mp:
            mp.setattr(base, "use_triton_estimator", lambda x: False)
            ref = method._plan(q, k, k, causal=True, layer_idx=None)
        assert len(calls) == n + 1
        plan.validate(causal=True)
        if method.name == "block_topk":
            assert torch.equal(plan.kv_counts, ref.kv_counts) and torch.equal(plan.kv_indices, ref.kv_indices)
        else:  # masses: rows may differ only where a cumulative sum meets the cut within rounding
            assert (plan.block_mask() != ref.block_mask()).any(-1).float().mean() <= 1e-3
