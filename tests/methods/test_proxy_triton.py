"""ProxyAttn's Triton estimate (kernels/proxy_triton.py, ``ProxyAttn._plan_triton``) against the
PyTorch path.

Each kernel is checked against the PyTorch pieces it replaces (``proxy_scores``, the probe's block
masses, the selection's forced blocks and budgets), and whole plans against the PyTorch path (the
oracle). Float sums run in another order in the two paths, so a plan may differ only where the
PyTorch values sit at a decision boundary within rounding: two candidate tile scores tied at a
row's top-n cut, or a prefix of a head's sorted block masses within rounding of ``gamma`` times
their total. The CPU tests check that their inputs keep clear margins there (``margins``) and then
require identical plans; the CUDA test at 32K requires every difference to be such a near-tie.

Without CUDA the kernels run in the Triton interpreter on CPU tensors (conftest.py).
"""

import math

import pytest
import torch

from sparseattn.bench.synthetic import structured_qkv
from sparseattn.methods import get_method
from sparseattn.methods import proxy as pm
from sparseattn.methods.base import cdiv, forced_blocks, last_queries_attention, sum_pool_last, visible_blocks
from sparseattn.plan import BlockPlan

from ..conftest import requires_cuda, triton_importable
from .cases import assert_same_plan, count_launches, plan_without_sync, replays_and_torch_plan

pytestmark = pytest.mark.skipif(not triton_importable(), reason="triton is not importable")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MARGIN = 1e-5  # relative: far above float32 rounding of these sums (~1e-6), far below real gaps
SMALL = (16, 16, 3, 4, 1, 8, 8)  # ProxyConfig: several row tiles, key chunks, sub-tiles and reduction steps


def pt():
    from sparseattn.kernels import proxy_triton

    return proxy_triton


def rand_qkv(B, Hq, Hkv, Lq, Lk, D, dtype, seed, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, Hq, Lq, D, generator=g) * scale).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    return q.to(DEVICE), k.to(DEVICE)


def structured(B, Hq, Hkv, Lq, Lk, D, dtype, seed):
    q, k, v = structured_qkv(B, Hq, Hkv, max(Lq, Lk), D, seed=seed, device=DEVICE, dtype=dtype)
    L = max(Lq, Lk)
    return q[:, :, L - Lq:], k[:, :, L - Lk:], v[:, :, L - Lk:]


# ----------------------------------------------------------------------------- PyTorch pieces
def probe_mass_ref(q, k, bs, n_last):
    return sum_pool_last(last_queries_attention(q, k, n_last).sum(-2), bs)  # [B, Hq, nK]


def need_ref(mass, gamma, nK):
    """head_budget_fraction's block count (before / nK)."""
    total = mass.sum(-1, keepdim=True)
    csum = torch.cumsum(torch.sort(mass, dim=-1, descending=True).values, dim=-1)
    return torch.where(gamma * total > 0, (csum < gamma * total).sum(-1, keepdim=True) + 1,
                       torch.zeros_like(total, dtype=torch.long)).squeeze(-1).clamp(max=nK)


def selection_ref(m, Lq, Lk, need, causal, device):
    """ProxyAttn._plan's forced / visible blocks and each (head, row)'s budget ``n`` (as there)."""
    bs = m.block_size
    geo = dict(block_q=bs, block_k=bs, q_len=Lq, k_len=Lk)
    visible = visible_blocks(**geo, causal=causal, device=device)
    forced = forced_blocks(**geo, sink_blocks=m.sink_blocks, local_blocks=m.local_blocks,
                           diagonal=m.keep_diagonal, device=device) & visible
    frac = need.double() / cdiv(Lk, bs)
    n = torch.ceil(frac.unsqueeze(-1) * visible.sum(-1).double() - 1e-9).long()  # [B, Hq, nQ]
    return visible, forced, n


def margins(m, q, k, causal=True):
    """The smallest relative gaps at the PyTorch path's decisions: (budget, selection).

    Budget: ``|prefix sum - gamma * total| / total`` over every head's sorted prefixes. Selection:
    per (head, row) with a partial cut, the gap between the last kept and the first dropped
    candidate's proxy score, relative to the kept one."""
    B, Hq, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    bs, nK = m.block_size, cdiv(Lk, m.block_size)
    budget_gap = math.inf
    if m.gamma < 1:
        mass = probe_mass_ref(q, k, bs, bs if m.probe_q is None else m.probe_q).double()
        total = mass.sum(-1, keepdim=True)
        csum = torch.cumsum(torch.sort(mass, dim=-1, descending=True).values, dim=-1)
        budget_gap = float(((csum - m.gamma * total).abs() / total).min())
        need = need_ref(mass.float(), m.gamma, nK)
    else:
        need = torch.full((B, Hq), nK, device=q.device)
    visible, forced, n = selection_ref(m, Lq, Lk, need, causal, q.device)
    P = m._num_proxies(Hq, Hkv)
    scores = m.proxy_scores(q, k, causal=causal).double()  # [B, P, nQ, nK]
    cand = visible & ~forced
    s = torch.sort(scores.masked_fill(~cand, -1.0), dim=-1, descending=True).values  # -1: below any score
    s = s.repeat_interleave(Hq // P, dim=1)  # per query head
    n_cand = cand.sum(-1)
    partial = (n > 0) & (n < n_cand)
    if not partial.any():
        return budget_gap, math.inf
    kept = torch.gather(s, -1, (n - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)
    dropped = torch.gather(s, -1, n.clamp(max=nK - 1).unsqueeze(-1)).squeeze(-1)
    gap = (kept - dropped) / kept.clamp(min=1e-30)
    return budget_gap, float(gap[partial].min())


def plans(m, q, k, v, monkeypatch, causal=True):
    monkeypatch.setattr(pm, "use_triton_estimator", lambda x: False)
    want = m._plan(q, k, v, causal=causal, layer_idx=None)  # _plan: no CUDA-graph caching
    monkeypatch.setattr(pm, "use_triton_estimator", lambda x: True)
    got = m._plan(q, k, v, causal=causal, layer_idx=None)
    got.validate(causal=causal)
    return got, want


# ----------------------------------------------------------------------------- kernels
SCORE_CASES = [
    # (B, Hq, Hkv, Lq, Lk, D, dtype, block, q_stride, proxy_heads, pool, causal, config)
    (1, 4, 2, 200, 200, 16, torch.float32, 32, 8, None, "mean", True, SMALL),  # multi-tile paths
    (2, 6, 2, 200, 517, 32, torch.bfloat16, 64, 16, None, "max", True, None),  # Lq < Lk; 3-part split
    (1, 4, 4, 517, 300, 16, torch.float16, 48, 16, 2, "mean", True, None),  # Lq > Lk: blind rows; mean keys
    (1, 4, 2, 150, 150, 16, torch.bfloat16, 32, 4, 4, "mean", False, SMALL),  # one head per proxy; not causal
    (1, 2, 1, 100, 130, 16, torch.float16, 16, 1, 1, "max", True, None),  # every row sampled
    (1, 3, 1, 70, 70, 16, torch.bfloat16, 64, 64, None, "mean", True, None),  # one slot per block, a tail
]


@pytest.mark.parametrize("case", range(len(SCORE_CASES)))
def test_proxy_scores_match_torch(case):
    B, Hq, Hkv, Lq, Lk, D, dtype, bs, S, P, pool, causal, cfg = SCORE_CASES[case]
    q, k = rand_qkv(B, Hq, Hkv, Lq, Lk, D, dtype, seed=case)
    m = get_method("proxy", block_size=bs, q_stride=S, proxy_heads=P, head_pool=pool)
    want = m.proxy_scores(q, k, causal=causal)
    got = pt().proxy_scores_triton(q, k, proxies=want.shape[1], head_pool=pool, block_size=bs, q_stride=S,
                                   causal=causal, config=cfg)
    assert got.dtype == torch.float32 and got.shape == want.shape
    # A 16-bit rounding of a pooled query would be off by ~1e-2 here: the split parts must be exact.
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=2e-5, atol=1e-6)
    assert torch.equal(got.cpu() == 0, want.cpu() == 0)  # invisible tiles are exactly 0
    per_row = want.sum(-1)  # each sampled row that sees a key adds 1 per query block
    assert torch.allclose(got.sum(-1).cpu(), per_row.cpu(), rtol=1e-5)


@pytest.mark.parametrize("Lq,Lk,bs,n_last,dtype", [(200, 200, 32, 32, torch.float32),
                                                   (200, 517, 64, 100, torch.bfloat16),
                                                   (400, 250, 48, 48, torch.float16),
                                                   (40, 300, 32, 64, torch.bfloat16)])
def test_probe_mass_and_target_match_torch(Lq, Lk, bs, n_last, dtype):
    """Lq == Lk, Lq < Lk, Lq > Lk (probe rows that see nothing), n_last > Lq; the gamma target is
    the float32 just below float32(gamma) * total (cover count: prefix sums < gamma * total)."""
    q, k = rand_qkv(2, 4, 2, Lq, Lk, 16, dtype, seed=Lq)
    want = probe_mass_ref(q, k, bs, n_last)
    runs = ((0.7, None), (0.95, SMALL), (0.0, None)) if Lq == Lk else ((0.7, None),)
    for gamma, cfg in runs:
        mass, target = pt().probe_block_mass_triton(q, k, n_last=n_last, block_size=bs, gamma=gamma, config=cfg)
        torch.testing.assert_close(mass.cpu(), want.cpu(), rtol=2e-5, atol=1e-6)
        t = (gamma * mass.sum(-1)).cpu()  # float32, as in head_budget_fraction
        if gamma == 0:
            assert torch.equal(target.cpu(), torch.full_like(t, -1.0))
        else:
            # one float32 step below gamma * (the kernel's total, within rounding of PyTorch's)
            up = torch.nextafter(target.cpu(), torch.tensor(math.inf))
            torch.testing.assert_close(up, t, rtol=2e-6, atol=0)
            assert torch.equal(torch.nextafter(up, torch.tensor(-math.inf)), target.cpu())


def test_memory_chunks(monkeypatch):
    """A tiny scratch cap: the proxies run in chunks of 2 query blocks (the last one partial) and
    one (batch, proxy) pair, the probe one pair at a time; the results do not change."""
    q, k = rand_qkv(2, 4, 2, 200, 200, 16, torch.bfloat16, seed=5)
    m = get_method("proxy", block_size=32, q_stride=8)
    want = m.proxy_scores(q, k, causal=True)
    want_mass = probe_mass_ref(q, k, 32, 32)
    monkeypatch.setattr(pt(), "SCRATCH_ELEMENTS", 60)  # 2 groups of 4 rows x 7 key blocks
    got = pt().proxy_scores_triton(q, k, proxies=2, block_size=32, q_stride=8)
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=2e-5, atol=1e-6)
    mass, _ = pt().probe_block_mass_triton(q, k, n_last=32, block_size=32, gamma=0.9)
    torch.testing.assert_close(mass.cpu(), want_mass.cpu(), rtol=2e-5, atol=1e-6)


def test_cover_count_on_the_target_is_the_budget_rule():
    """cover_count_triton(mass, target) == head_budget_fraction's count on the same masses,
    including prefixes that hit gamma * total exactly (where < and <= differ)."""
    from sparseattn.kernels.row_select_triton import cover_count_triton

    mass = torch.tensor([[[4.0, 1.0, 2.0, 3.0], [0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]]], device=DEVICE)
    for gamma in (0.5, 0.7, 0.75, 0.9, 1e-9):
        total = mass.sum(-1)
        t = gamma * total
        target = torch.where(t > 0, torch.nextafter(t, torch.zeros_like(t)), torch.full_like(t, -1.0))
        got = cover_count_triton(mass, target).clamp(max=4)
        assert torch.equal(got.cpu(), need_ref(mass, gamma, 4).cpu()), gamma


def test_budget_boundary_is_strict():
    """A prefix of masses exactly at gamma * total is not counted (``csum < gamma * total``).

    Every probe row puts exactly 1/2 on key 3 (block 0) and 1/2 on key 40 (block 1): the other
    logits are 200 below, so their probabilities underflow to exactly 0 on both paths, and the
    masses (8, 8) and total 16 are exact. gamma = 0.5: the first prefix equals the target, so
    one block is needed (two under ``<=``)."""
    from sparseattn.kernels.row_select_triton import cover_count_triton

    D, L = 16, 96
    a = math.sqrt(200.0 * math.sqrt(D))  # a * a / sqrt(D) = 200
    q = torch.zeros(1, 2, L, D)
    q[..., 0] = a
    k = torch.zeros(1, 1, L, D)
    k[0, 0, 3, 0] = k[0, 0, 40, 0] = a
    q, k = q.to(DEVICE), k.to(DEVICE)
    want_mass = torch.zeros(1, 2, 3)
    want_mass[..., :2] = 8.0
    assert torch.equal(probe_mass_ref(q, k, 32, 16).cpu(), want_mass)
    for gamma, need in ((0.5, 1), (0.75, 2), (0.25, 1)):
        mass, target = pt().probe_block_mass_triton(q, k, n_last=16, block_size=32, gamma=gamma)
        assert torch.equal(mass.cpu(), want_mass)
        got = cover_count_triton(mass, target).clamp(max=3)
        assert torch.equal(got.cpu(), torch.full((1, 2), need)), gamma
        assert torch.equal(need_ref(want_mass, gamma, 3), torch.full((1, 2), need)), gamma


CAND_CASES = [
    # (Lq, Lk, bs, S, options)
    (300, 300, 32, 8, dict(sink_blocks=1)),
    (200, 517, 64, 16, dict(sink_blocks=2, local_blocks=1)),  # Lq < Lk: a diagonal straddling two blocks
    (450, 300, 48, 16, dict(sink_blocks=3, local_blocks=2, keep_diagonal=False)),  # Lq > Lk: blind rows, and
    # rows that see fewer blocks than the sink has (forced but invisible)
    (300, 300, 32, 8, dict(sink_blocks=0, local_blocks=1)),
    (300, 300, 32, 8, dict(sink_blocks=1, need_all=True)),  # gamma = 1: every visible block
]


@pytest.mark.parametrize("case", range(len(CAND_CASES)))
def test_candidates_match_the_selection_inputs(case):
    Lq, Lk, bs, S, opts = CAND_CASES[case]
    opts = dict(opts)
    need_all = opts.pop("need_all", False)
    B, Hq, Hkv = 2, 6, 2
    q, k = rand_qkv(B, Hq, Hkv, Lq, Lk, 16, torch.bfloat16, seed=case)
    m = get_method("proxy", block_size=bs, q_stride=S, **opts)
    nK = cdiv(Lk, bs)
    g = torch.Generator().manual_seed(case)
    count = torch.randint(1, nK + 2, (B, Hq), generator=g)  # includes nK + 1 (clamped)
    target = torch.rand(B, Hq, generator=g) * 10
    target[0, 1] = -1.0  # need = 0: forced blocks only
    if need_all:
        count = target = None
        need = torch.full((B, Hq), nK)
    else:
        need = torch.where(target >= 0, count.clamp(max=nK), 0)
        count, target = count.to(DEVICE), target.to(DEVICE)
    scores, n = pt().proxy_candidates_triton(q, k, proxies=Hkv, block_size=bs, q_stride=S, causal=True,
                                             sink_blocks=m.sink_blocks, local_blocks=m.local_blocks,
                                             diagonal=m.keep_diagonal, count=count, target=target)
    visible, forced, want_n = selection_ref(m, Lq, Lk, need.to(q.device), True, q.device)
    cand = visible & ~forced
    want_n = forced.sum(-1) + torch.minimum(want_n, cand.sum(-1))
    assert torch.equal(n.cpu(), want_n.cpu())
    scores = scores.cpu()
    assert torch.equal(scores == float("inf"), forced.cpu().expand_as(scores))
    assert torch.equal(scores == float("-inf"), (~visible).cpu().expand_as(scores))
    raw = m.proxy_scores(q, k, causal=True).repeat_interleave(Hq // Hkv, dim=1).cpu()
    c = cand.cpu().expand_as(scores)
    torch.testing.assert_close(scores[c], raw[c], rtol=2e-5, atol=1e-6)


def test_argument_checks():
    q, k = rand_qkv(1, 4, 2, 64, 64, 16, torch.float32, seed=0)
    f = pt().proxy_scores_triton
    with pytest.raises(ValueError, match="proxies"):
        f(q, k, proxies=3)
    with pytest.raises(ValueError, match="head_pool"):
        f(q, k, proxies=2, head_pool="min")
    with pytest.raises(ValueError, match="multiple of q_stride"):
        f(q, k, proxies=2, block_size=32, q_stride=12)
    with pytest.raises(ValueError, match="config"):
        f(q, k, proxies=2, config=(16, 8, 2, 4, 1, 4, 4))
    with pytest.raises(ValueError, match="dtype"):
        f(q.double(), k.double(), proxies=2)
    with pytest.raises(ValueError, match="gamma"):
        pt().probe_block_mass_triton(q, k, n_last=16, block_size=32, gamma=1.5)
    with pytest.raises(ValueError, match="count"):
        pt().proxy_candidates_triton(q, k, proxies=2, count=torch.ones(1, 4, dtype=torch.int64, device=DEVICE))


# ----------------------------------------------------------------------------- whole plans
PLAN_CASES = [
    # (B, Hq, Hkv, Lq, Lk, dtype, options, causal)
    (1, 4, 2, 600, 600, torch.float32, dict(block_size=64, gamma=0.8), True),
    (2, 4, 2, 300, 520, torch.bfloat16, dict(block_size=64, q_stride=8, head_pool="max", gamma=0.9), True),
    (1, 6, 3, 520, 400, torch.float16, dict(block_size=48, proxy_heads=1, local_blocks=1, gamma=0.7), True),
    (1, 4, 2, 500, 500, torch.bfloat16, dict(block_size=64, gamma=0.6, gqa_policy="group_union",
                                             keep_diagonal=False, sink_blocks=2), True),
    (1, 4, 4, 300, 300, torch.bfloat16, dict(block_size=32, proxy_heads=2, probe_q=50, gamma=0.9), False),
    (1, 2, 1, 333, 333, torch.float32, dict(block_size=32, gamma=1.0), True),
    (1, 2, 1, 333, 333, torch.bfloat16, dict(block_size=32, gamma=0.0, sink_blocks=2), True),
]


@pytest.mark.parametrize("case", range(len(PLAN_CASES)))
def test_plans_equal_the_pytorch_path(case, monkeypatch):
    B, Hq, Hkv, Lq, Lk, dtype, opts, causal = PLAN_CASES[case]
    q, k, v = structured(B, Hq, Hkv, Lq, Lk, 32, dtype, seed=20 + case)
    m = get_method("proxy", **opts)
    budget_gap, select_gap = margins(m, q, k, causal=causal)
    assert budget_gap > MARGIN and select_gap > MARGIN, (budget_gap, select_gap)  # rounding cannot flip a block
    got, want = plans(m, q, k, v, monkeypatch, causal=causal)
    assert_same_plan(got, want)
    d = want.density()
    assert d == 1.0 if m.gamma == 1 else 0.0 < d < 1.0


def test_launches_cpu_twin(monkeypatch):
    """The whole estimate is 7 Triton launches (probe 2, cover count, candidates 2, top-n, plan
    rows) and no PyTorch op; 4 for gamma = 1 (no probe, no cover count). The CUDA test checks syncs
    and graphs."""
    q, k, v = structured(1, 4, 2, 200, 200, 16, torch.bfloat16, seed=3)
    monkeypatch.setattr(pm, "use_triton_estimator", lambda x: True)
    BlockPlan.causal_block_limits(block_q=32, block_k=32, q_len=200, k_len=200, device=q.device)  # cached
    for gamma, launches in ((0.9, 7), (1.0, 4)):
        m = get_method("proxy", block_size=32, gamma=gamma)
        # The plan rows: one compaction launch on CUDA (kernels/plan_triton.py), PyTorch ops on the CPU.
        plan, counter = count_launches(lambda: m._plan(q, k, v, causal=True, layer_idx=None), monkeypatch,
                                       single=[(BlockPlan, "from_block_mask")])
        plan.validate(causal=True)
        assert len(counter.triton) == launches, counter.triton
        assert counter.torch_ops == [], counter.torch_ops


# ----------------------------------------------------------------------------- GPU
def unexplained_differences(m, q, k, got, want, rel=1e-4):
    """Blocks where two plans differ that no near-tie explains, as a count.

    A (head, row) may differ when the head's budget sits within ``rel`` of gamma (its count may
    flip), or, for the blocks where the two keep sets differ, when their PyTorch proxy scores lie
    within ``rel`` of the row's cut score (the last kept candidate's), or both are ~0."""
    B, Hq, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    bs, nK = m.block_size, cdiv(Lk, m.block_size)
    a, b = got.block_mask(), want.block_mask()  # [B, H, nQ, nK]
    if torch.equal(a, b):
        return 0
    assert m.gqa_policy == "per_q_head"
    mass = probe_mass_ref(q, k, bs, bs if m.probe_q is None else m.probe_q).double()
    total = mass.sum(-1, keepdim=True)
    csum = torch.cumsum(torch.sort(mass, dim=-1, descending=True).values, dim=-1)
    near_gamma = (((csum - m.gamma * total).abs() / total) < rel).any(-1)  # [B, Hq]
    need = need_ref(mass.float(), m.gamma, nK)
    visible, forced, n = selection_ref(m, Lq, Lk, need, True, q.device)
    P = m._num_proxies(Hq, Hkv)
    scores = m.proxy_scores(q, k, causal=True).repeat_interleave(Hq // P, dim=1).double()
    cand = visible & ~forced
    s = torch.sort(scores.masked_fill(~cand, -1.0), dim=-1, descending=True).values
    cut = torch.gather(s, -1, (n - 1).clamp(min=0, max=nK - 1).unsqueeze(-1))  # [B, Hq, nQ, 1]
    near_cut = (scores - cut).abs() <= rel * cut.abs() + 1e-30  # masses below 1e-30 count as ties (0 / denormals)
    diff = a != b
    explained = near_gamma.view(B, Hq, 1, 1) | near_cut
    return int((diff & ~explained).sum())


@requires_cuda
@pytest.mark.gpu
def test_cuda_plan_at_32k():
    """SmolLM2-like heads at 32K in bf16: no host sync, the same plan through a CUDA graph, and the
    PyTorch path's plan up to near-ties (see unexplained_differences)."""
    q, k, v = structured_qkv(1, 9, 3, 32768, 64, seed=0, device="cuda", dtype=torch.bfloat16)
    for opts in ({}, {"head_pool": "max", "gamma": 0.95}):
        m = get_method("proxy", **opts)
        plan = plan_without_sync(m, q, k, v)
        want = replays_and_torch_plan(m, q, k, v, plan)
        a, b = plan.block_mask(), want.block_mask()
        assert (a != b).sum() <= 1e-3 * b.sum(), opts
        assert unexplained_differences(m, q, k, plan, want) == 0, opts
