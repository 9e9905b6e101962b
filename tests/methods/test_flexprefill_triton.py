"""FlexPrefill's fused Triton estimate (kernels/flexprefill_triton.py, ``FlexPrefill._plan_triton``)
against the PyTorch path.

Each kernel is checked against the PyTorch ops it replaces, and whole plans against the PyTorch
path (the oracle) on the same profiles. Integer logic (budgets, ranks, the slash shift, forced and
visible blocks, the compaction) must agree exactly; float parts (block sums, pooled means,
softmaxes, the JSD) may differ in the last bits, which can only matter at a decision boundary: the
tests assert that every head's JSD is more than 1e-5 from ``tau`` (a flip there would not be a
bug) and that the query-aware pattern is the intended one (all / none / a mix).

Without CUDA the kernels run in the Triton interpreter on CPU tensors (conftest.py); with CUDA the
same tests run compiled, and the ``requires_cuda`` test checks launches, syncs and graphs at 32K.
"""

import math

import pytest
import torch

from sparseattn.bench.synthetic import structured_qkv
from sparseattn.methods import flexprefill as fm
from sparseattn.methods import get_method
from sparseattn.methods.base import (cdiv, diagonal_sums, forced_blocks, last_queries_attention, pool_blocks,
                                     query_block_positions, rank_mask, sum_pool_last, visible_blocks)
from sparseattn.plan import BlockPlan

from ..conftest import requires_cuda, triton_importable
from .cases import (assert_triton_plan_equals_torch, count_launches, plan_without_sync,
                    replays_and_torch_plan)

pytestmark = pytest.mark.skipif(not triton_importable(), reason="triton is not importable")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
JSD_MARGIN = 1e-5


def fk():
    from sparseattn.kernels import flexprefill_triton

    return flexprefill_triton


# ----------------------------------------------------------------------------- PyTorch twins
def heads_ref(profiles, tokens, q, k, *, bs, min_blocks, max_blocks, legacy, tau):
    """FlexPrefill._plan's PyTorch steps 2-3 and 4's forced +inf, from given profiles and counts."""
    vertical, slash = profiles[0], profiles[1]
    B, Hq, Lq, D = q.shape
    Hkv, nK = k.shape[1], cdiv(k.shape[2], bs)
    tokens_v, tokens_s = tokens[0], tokens[1]
    if legacy:
        n_v, n_s = tokens_v // 128 + 1, tokens_s // 128 + 1
    else:
        n_v, n_s = (tokens_v + bs - 1) // bs, (tokens_s + bs - 1) // bs
    n_v, n_s = n_v.clamp(min_blocks, max_blocks), n_s.clamp(min_blocks, max_blocks)
    vertical_b, slash_b = sum_pool_last(vertical, bs), sum_pool_last(slash, bs)
    P = min(bs, Lq)
    k_pool = pool_blocks(k, bs).float()
    q_last_mean = q[:, :, Lq - P:].float().mean(2)
    est = torch.matmul(q_last_mean.view(B, Hkv, Hq // Hkv, D), k_pool.transpose(-1, -2)).view(B, Hq, nK)
    est = torch.softmax(est / math.sqrt(D), dim=-1)
    jsd = fm._sqrt_js_divergence(est, vertical_b)
    query_aware = jsd < tau
    n_v, n_s = torch.where(query_aware, min_blocks, n_v), torch.where(query_aware, min_blocks, n_s)
    vertical_b[..., 0] = float("inf")
    slash_b[..., nK - 1] = float("inf")
    return torch.stack((vertical_b, slash_b)), torch.stack((n_v, n_s)), query_aware, jsd


def probs_ref(q_pool, k_pool, *, bs, Lq, Lk):
    B, Hq, nQ, D = q_pool.shape
    Hkv, nK = k_pool.shape[1], k_pool.shape[2]
    visible = visible_blocks(block_q=bs, block_k=bs, q_len=Lq, k_len=Lk, causal=True, device=q_pool.device)
    logits = torch.matmul(q_pool.view(B, Hkv, Hq // Hkv * nQ, D), k_pool.transpose(-1, -2)).view(B, Hq, nQ, nK)
    probs = torch.softmax((logits / math.sqrt(D)).masked_fill(~visible, float("-inf")), dim=-1)
    return torch.nan_to_num(probs, nan=0.0)


def plan_rows_ref(keep, block_map, query_aware, *, bs, Lq, Lk):
    """FlexPrefill._plan's PyTorch mask (steps 4-5) and BlockPlan.from_block_mask."""
    _, B, Hq, nK = keep.shape
    nQ, dev = cdiv(Lq, bs), keep.device
    geo = dict(block_q=bs, block_k=bs, q_len=Lq, k_len=Lk)
    keep_v, keep_s = keep[0], keep[1]
    _, last = query_block_positions(nQ, bs, Lq, Lk, dev)
    diag = (last.clamp(min=0) // bs).view(-1, 1)
    n = torch.arange(nK, device=dev).view(1, -1)
    s_idx = n - diag + (nK - 1)
    s_ok = (s_idx >= 0) & (s_idx < nK)
    from_slash = torch.gather(keep_s.unsqueeze(2).expand(B, Hq, nQ, nK), -1,
                              s_idx.clamp(0, nK - 1).expand(B, Hq, nQ, nK)) & s_ok
    diagonal = forced_blocks(**geo, sink_blocks=1, local_blocks=0, diagonal=True, device=dev)
    mask = keep_v.unsqueeze(2) | from_slash | diagonal
    mask = mask | (block_map.view(B, Hq, nQ, nK) & query_aware.view(B, Hq, 1, 1))
    visible = visible_blocks(**geo, causal=True, device=dev)
    plan = BlockPlan.from_block_mask((mask & visible).cpu(), **geo, causal=True)  # the PyTorch compaction
    return plan.kv_counts, plan.kv_indices


def torch_profiles(q, k, n_last, pool_block=None):
    """The PyTorch twin of last_queries_profiles_triton (tested in its own file; too slow for the
    interpreter here, and both paths then start from the same attention rows)."""
    a = last_queries_attention(q, k, n_last)
    pooled = (pool_blocks(k, pool_block).float(),) if pool_block is not None else ()
    return (a.sum(-2), diagonal_sums(a)) + pooled


def oracle_profiles(q, k, bs):
    """The profiles, cover counts and budgets' inputs as the PyTorch path computes them."""
    a = last_queries_attention(q, k, bs)
    vertical, slash = a.mean(-2), diagonal_sums(a) / a.shape[2]
    return torch.stack((vertical, slash))


def tau_between(jsd):
    """A tau in the widest gap between the heads' JSD values (some heads on each side)."""
    s = torch.sort(jsd.flatten().double()).values
    gaps = s[1:] - s[:-1]
    i = int(torch.argmax(gaps))
    return float((s[i] + s[i + 1]) / 2)


# ----------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pool_blocks_matches_torch(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 200, 32, generator=g).to(dtype)  # 3 blocks of 64 and a tail of 8
    y = torch.randn(2, 130, 6, 32, generator=g).to(dtype).transpose(1, 2)  # strided; tail of 2
    for src in (x, y):
        got, want = fk().pool_blocks_triton(src.to(DEVICE), 64), pool_blocks(src, 64)
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-6)
    single = fk().pool_blocks_triton(x.to(DEVICE), 48)  # a block size that is no power of two
    torch.testing.assert_close(single.cpu(), pool_blocks(x, 48), rtol=1e-6, atol=1e-6)
    active = torch.tensor([[True, False, True], [False, False, True]])
    some = fk().pool_blocks_triton(x.to(DEVICE), 64, active=active.to(DEVICE))
    torch.testing.assert_close(some.cpu()[active], pool_blocks(x, 64)[active], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="B, H, L, D"):
        fk().pool_blocks_triton(x[0].to(DEVICE), 64)
    with pytest.raises(ValueError, match="active"):
        fk().pool_blocks_triton(x.to(DEVICE), 64, active=active[:, :2].to(DEVICE))


@pytest.mark.parametrize("Lk,bs,P,block_n", [(1000, 64, 64, 16), (900, 48, 37, None), (130, 128, 128, None)])
def test_profile_blocks_match_torch(Lk, bs, P, block_n):
    """Scaled and stacked profiles (bit for bit what ``x / P`` gives on CUDA: a multiply by
    float32(1 / P)), their block sums (a tail block, a block size that is no power of two, several
    chunks of blocks per row) and the per-row gamma."""
    g = torch.Generator().manual_seed(Lk)
    cols = torch.rand(2, 3, Lk, generator=g) * 5
    diags = torch.rand(2, 3, Lk, generator=g) * 5
    profiles, blocks, gammas, extremes = fk().profile_blocks_triton(cols.to(DEVICE), diags.to(DEVICE), P, bs, 0.9,
                                                                    block_n=block_n)
    inv = torch.ones((), dtype=torch.float32) / P
    want = torch.stack((cols, diags)) * inv
    assert torch.equal(profiles.cpu(), want)
    if P & (P - 1) == 0:  # a power of two: the same as a true division
        assert torch.equal(profiles.cpu(), torch.stack((cols, diags)) / P)
    torch.testing.assert_close(blocks.cpu(), sum_pool_last(want, bs), rtol=1e-6, atol=1e-6)
    assert blocks.shape == (2, 2, 3, cdiv(Lk, bs))
    assert torch.equal(gammas.cpu(), torch.full((2, 2, 3), 0.9))
    # each program's piece of a row: block_n blocks; its (min, max) float32 bits (values >= 0)
    piece = (block_n or 16) * bs
    keys = want.view(torch.int32)
    n_parts = extremes.shape[-2]
    assert n_parts == cdiv(Lk, piece)
    for c in range(n_parts):
        part = keys[..., c * piece:(c + 1) * piece]
        assert torch.equal(extremes[..., c, 0].cpu(), part.amin(-1))
        assert torch.equal(extremes[..., c, 1].cpu(), part.amax(-1))
    with pytest.raises(ValueError, match="contiguous float32"):
        fk().profile_blocks_triton(cols.to(DEVICE), diags.double().to(DEVICE), P, bs, 0.9)


HEAD_CASES = [
    # (Hq, Hkv, Lq, Lk, bs, dtype, legacy, min_blocks, max_blocks, tau)
    (3, 1, 700, 700, 64, torch.float32, False, 1, None, 1.0),  # every head query-aware
    (4, 2, 300, 1000, 64, torch.bfloat16, True, 2, 6, 0.0),  # none; legacy budgets, clamped
    (6, 3, 520, 900, 48, torch.float32, False, 3, 8, "mix"),  # block 48: masked tiles and a tail
    (2, 2, 1100, 1100, 128, torch.bfloat16, False, 1, None, "mix"),
]


@pytest.mark.parametrize("case", range(len(HEAD_CASES)))
def test_heads_match_torch(case):
    """The pattern test (and its forced blocks), and the top-n blocks at the budgets, against the
    PyTorch steps."""
    Hq, Hkv, Lq, Lk, bs, dtype, legacy, min_b, max_b, tau = HEAD_CASES[case]
    q, k, _ = structured_qkv(1, Hq, Hkv, Lk, 32, seed=case, dtype=dtype)
    q = q[:, :, Lk - Lq:]
    nK = cdiv(Lk, bs)
    max_b = nK if max_b is None else max_b
    profiles = oracle_profiles(q, k, bs)
    tokens = torch.stack([fm._cover_count(p, 0.9) for p in profiles])
    _, _, _, jsd = heads_ref(profiles, tokens, q, k, bs=bs, min_blocks=min_b, max_blocks=max_b, legacy=legacy,
                             tau=0.0)
    if tau == "mix":
        tau = tau_between(jsd)
    want_blocks, want_n, want_qa, jsd = heads_ref(profiles, tokens, q, k, bs=bs, min_blocks=min_b, max_blocks=max_b,
                                                  legacy=legacy, tau=tau)
    assert (jsd - tau).abs().min() > JSD_MARGIN  # rounding cannot flip a head
    if case >= 2:
        assert 0 < int(want_qa.sum()) < want_qa.numel()
    k_pool = pool_blocks(k, bs).float()
    for block_n in (16, None):  # several chunks of key blocks, then the default (one)
        blocks = torch.stack([sum_pool_last(p, bs) for p in profiles]).to(DEVICE).contiguous()
        qa, targets = fk().flexprefill_test_triton(blocks, q.to(DEVICE), k_pool.to(DEVICE), block_size=bs, tau=tau,
                                                   target=12.5, block_n=block_n)
        assert torch.equal(qa.cpu(), want_qa)
        assert torch.equal(torch.isinf(blocks.cpu()), torch.isinf(want_blocks))  # forced after the test read them
        torch.testing.assert_close(blocks.cpu(), want_blocks, rtol=1e-5, atol=1e-7)
        assert torch.equal(targets.cpu(), torch.full((1, Hq), 12.5))
    # the ranks of these blocks give the PyTorch top-n masks at the PyTorch budgets
    ranks = fk().block_ranks_triton(want_blocks.to(DEVICE).contiguous()).cpu()
    assert torch.equal(ranks < want_n.unsqueeze(-1), rank_mask(want_blocks, want_n))


def stable_descending_ranks(x):
    """Each entry's position in torch's stable descending sort of its row."""
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices
    return torch.argsort(order, dim=-1).to(torch.int32)


@pytest.mark.parametrize("N,block_c,block_j", [(256, None, None), (300, 16, 16), (37, 16, 32)])
def test_block_ranks_equal_the_stable_sort(N, block_c, block_j):
    """Ties (to the lower index), +-inf, NaN (above +inf, tied), -0.0 == +0.0, a row tail; every
    budget n: ranks < n is rank_mask(x, n)."""
    g = torch.Generator().manual_seed(N)
    x = torch.randint(0, 12, (2, 3, N), generator=g).float() / 4  # many ties
    x[0, 0, 5] = float("inf")
    x[0, 1, :4] = float("nan")
    x[0, 2, 7] = float("-inf")
    x[1, 0, 3], x[1, 0, 9] = -0.0, 0.0
    x[1, 1] = torch.rand(N, generator=g)  # distinct values
    ranks = fk().block_ranks_triton(x.to(DEVICE), block_c=block_c, block_j=block_j).cpu()
    assert ranks.dtype == torch.int32
    assert torch.equal(ranks, stable_descending_ranks(x))
    for n in (0, 1, N // 3, N - 1, N, N + 5):
        want = rank_mask(x, torch.full((2, 3), n))
        assert torch.equal(ranks < n, want), n
    with pytest.raises(ValueError, match="float32"):
        fk().block_ranks_triton(x.double().to(DEVICE))


@pytest.mark.parametrize("Lq,Lk,bs", [(500, 500, 64), (300, 1000, 64), (700, 400, 128), (200, 1070, 48)])
def test_pooled_probs_match_torch(Lq, Lk, bs):
    """Lq == Lk, Lq < Lk, Lq > Lk (query blocks that see nothing: rows of 0), a block of 48."""
    g = torch.Generator().manual_seed(Lq)
    B, Hq, Hkv, D = 2, 6, 2, 32
    q_pool = torch.randn(B, Hq, cdiv(Lq, bs), D, generator=g) * 2
    k_pool = torch.randn(B, Hkv, cdiv(Lk, bs), D, generator=g) * 2
    want = probs_ref(q_pool, k_pool, bs=bs, Lq=Lq, Lk=Lk)
    limits = BlockPlan.causal_block_limits(block_q=bs, block_k=bs, q_len=Lq, k_len=Lk, device=DEVICE)
    got = fk().pooled_probs_triton(q_pool.to(DEVICE), k_pool.to(DEVICE), limits, block_i=16, block_n=16).cpu()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert torch.equal(got == 0, want == 0)  # exactly 0 where not visible
    active = torch.tensor([[True, False, True, False, False, True], [False] * 5 + [True]])
    got = fk().pooled_probs_triton(q_pool.to(DEVICE), k_pool.to(DEVICE), limits, active=active.to(DEVICE)).cpu()
    torch.testing.assert_close(got[active], want[active], rtol=1e-5, atol=1e-7)  # the others are not written


PLAN_ROW_CASES = [
    # (Lq, Lk, bs, legacy, min_blocks, max_blocks or None = nK)
    (640, 640, 64, False, 1, None),
    (300, 1000, 64, True, 2, 9),  # legacy budgets, clamped from above
    (200, 517, 64, False, 3, None),
    (517, 300, 64, False, 1, 2),
    (129, 1000, 128, True, 1, None),
    (1000, 1000, 48, False, 2, 12),
]


@pytest.mark.parametrize("case", range(len(PLAN_ROW_CASES)))
def test_plan_rows_match_torch(case):
    """Random block orders, token counts and block maps; the budgets (every rule); bottom-right
    offsets that straddle a block edge (two diagonal blocks), Lq > Lk (rows that see nothing), a
    block of 48."""
    Lq, Lk, bs, legacy, min_b, max_b = PLAN_ROW_CASES[case]
    g = torch.Generator().manual_seed(Lq + Lk)
    B, Hq = 2, 3
    nQ, nK = cdiv(Lq, bs), cdiv(Lk, bs)
    max_b = nK if max_b is None else max_b
    ranks = stable_descending_ranks(torch.rand(2, B, Hq, nK, generator=g))
    tokens = torch.randint(1, 4 * Lk // 3, (2, B, Hq), generator=g)
    block_map = torch.rand(B, Hq, nQ * nK, generator=g) < 0.1
    query_aware = torch.tensor([[True, False, True], [False, False, True]])
    n = ((tokens // 128 + 1) if legacy else (tokens + bs - 1) // bs).clamp(min_b, max_b)
    n = torch.where(query_aware, min_b, n)
    want_c, want_i = plan_rows_ref(ranks < n.unsqueeze(-1), block_map, query_aware, bs=bs, Lq=Lq, Lk=Lk)
    limits = BlockPlan.causal_block_limits(block_q=bs, block_k=bs, q_len=Lq, k_len=Lk, device=DEVICE)
    counts, indices = fk().flexprefill_plan_triton(
        ranks.to(DEVICE), tokens.to(DEVICE), block_map.to(DEVICE), query_aware.to(DEVICE), limits, block_size=bs,
        q_len=Lq, k_len=Lk, min_blocks=min_b, max_blocks=max_b, legacy_budget=legacy, block=16)
    assert torch.equal(counts.cpu(), want_c) and torch.equal(indices.cpu(), want_i)
    with pytest.raises(ValueError, match="int32"):
        fk().flexprefill_plan_triton(ranks.long().to(DEVICE), tokens.to(DEVICE), block_map.to(DEVICE),
                                     query_aware.to(DEVICE), limits, block_size=bs, q_len=Lq, k_len=Lk,
                                     min_blocks=min_b, max_blocks=max_b, legacy_budget=legacy)


def test_visible_rows_and_target_rounding():
    for Lq in (1, 63, 64, 65, 200, 517):
        for Lk in (1, 64, 100, 300, 517):
            for bs in (16, 48, 64):
                visible = visible_blocks(block_q=bs, block_k=bs, q_len=Lq, k_len=Lk, causal=True, device="cpu")
                assert fm._visible_rows(Lq, Lk, bs) == int(visible.any(-1).sum()), (Lq, Lk, bs)
    rows = torch.arange(1, 3000)
    for gamma in (0.9, 0.95, 0.3, 0.77, 1.0 / 3):
        want = (gamma * rows).tolist()  # the PyTorch code's float32 target
        assert [fm._float32(fm._float32(gamma) * r) for r in range(1, 3000)] == want


# ----------------------------------------------------------------------------- whole plans
PLAN_CASES = [
    # (B, Hq, Hkv, Lq, Lk, dtype, options, query-aware heads)
    (1, 2, 2, 700, 700, torch.float32, dict(block_size=64, tau=1.0, gamma=0.8), "all"),  # G = 1, 700 = 10 * 64 + 60
    (2, 6, 2, 600, 1100, torch.bfloat16, dict(block_size=128, tau=0.0), "none"),  # batch 2, G = 3, Lq < Lk
    (1, 6, 2, 1000, 1000, torch.float32, dict(block_size=64, min_budget=150, max_budget=400), "mix"),
    (2, 3, 1, 450, 1000, torch.bfloat16, dict(block_size=64, legacy_budget=True, gamma=0.95), "mix"),  # straddles
    (1, 3, 3, 1300, 1300, torch.bfloat16, dict(block_size=128), "mix"),
]


@pytest.mark.parametrize("case", range(len(PLAN_CASES)))
def test_plans_equal_the_pytorch_path(case, monkeypatch):
    B, Hq, Hkv, Lq, Lk, dtype, opts, pattern = PLAN_CASES[case]
    from sparseattn.kernels import last_queries_triton

    monkeypatch.setattr(last_queries_triton, "last_queries_profiles_triton", torch_profiles)
    q, k, v = structured_qkv(B, Hq, Hkv, Lk, 32, seed=10 + case, device=DEVICE, dtype=dtype)
    q = q[:, :, Lk - Lq:]
    m = get_method("flexprefill", **opts)
    bs = m.block_size
    profiles = oracle_profiles(q, k, bs)
    nK = cdiv(Lk, bs)
    _, _, _, jsd = heads_ref(profiles, torch.ones(2, B, Hq, dtype=torch.int64, device=q.device), q, k, bs=bs,
                             min_blocks=1, max_blocks=nK, legacy=False, tau=0.0)
    if pattern == "mix":
        m = m.replace(tau=tau_between(jsd))
    assert (jsd - m.tau).abs().min() > JSD_MARGIN  # rounding cannot flip a head
    n_aware = int((jsd < m.tau).sum())
    assert n_aware == {"all": B * Hq, "none": 0}.get(pattern, n_aware) and (pattern != "mix" or 0 < n_aware < B * Hq)

    assert_triton_plan_equals_torch(fm, m, q, k, v, monkeypatch)


# ----------------------------------------------------------------------------- launches
def test_launches_cpu_twin(monkeypatch):
    """The fused path's launches, counted: 11 Triton kernels (12 where the last-queries key tile is
    not the block size: the keys are then pooled by a launch of their own) and no PyTorch op. The
    CUDA twin counts real kernels at 32K."""
    q, k, v = structured_qkv(1, 3, 1, 330, 32, seed=3, device=DEVICE)
    m = get_method("flexprefill", block_size=64, tau=0.3)
    monkeypatch.setattr(fm, "use_triton_estimator", lambda x: True)
    BlockPlan.causal_block_limits(block_q=64, block_k=64, q_len=330, k_len=330, device=q.device)  # cached
    plan, counter = count_launches(lambda: m._plan(q, k, v, causal=True, layer_idx=None), monkeypatch)
    plan.validate(causal=True)
    from sparseattn.kernels.last_queries_triton import default_config

    pooled_in_logits = default_config(q.dtype, q.shape[-1]).block_n == 64
    assert len(counter.triton) == (11 if pooled_in_logits else 12), counter.triton
    # one pooling launch for q (its programs skip heads that are not query-aware), one more for k
    assert counter.triton.count("_pool_blocks") == (1 if pooled_in_logits else 2), counter.triton
    assert counter.torch_ops == [], counter.torch_ops


@requires_cuda
@pytest.mark.gpu
def test_cuda_plan_at_32k():
    """SmolLM2-like heads at 32K in bf16: at most 12 kernels, no host sync, the same plan through a
    CUDA graph, and the plan of the PyTorch path up to float32 rounding at cumulative-mass cuts."""
    from torch.profiler import ProfilerActivity, profile

    q, k, v = structured_qkv(1, 9, 3, 32768, 64, seed=0, device="cuda", dtype=torch.bfloat16)
    for opts in ({}, {"tau": 1.0}):
        m = get_method("flexprefill", **opts)
        plan = plan_without_sync(m, q, k, v)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            m._plan(q, k, v, causal=True, layer_idx=None)
            torch.cuda.synchronize()
        kernels = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
        assert len(kernels) <= 12, kernels
        want = replays_and_torch_plan(m, q, k, v, plan)
        a, b = plan.block_mask(), want.block_mask()
        assert (a != b).sum() <= 1e-3 * b.sum(), opts
