"""ProxyAttn: proxy scores and per-head budgets against loops; a planted column; head sparsity."""

import math

import pytest
import torch

from sparseattn.methods import get_method


def qkv(B=1, Hq=4, Hkv=2, L=300, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, L, D, generator=g, dtype=torch.float64),
            torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64),
            torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("proxy_heads,pool", [(None, "mean"), (4, "max"), (1, "mean")])
def test_proxy_scores_match_a_loop(proxy_heads, pool):
    q, k, _ = qkv()
    bs, S = 32, 8
    m = get_method("proxy", block_size=bs, q_stride=S, proxy_heads=proxy_heads, head_pool=pool)
    got = m.proxy_scores(q, k, causal=True)
    Hq, Hkv, L, D = 4, 2, 300, 16
    P = Hkv if proxy_heads is None else proxy_heads
    nb = math.ceil(L / bs)
    want = torch.zeros(1, P, nb, nb, dtype=torch.float64)
    rows = sorted(set(range(S - 1, L, S)) | {L - 1})
    for p in range(P):
        heads = range(p * Hq // P, (p + 1) * Hq // P)
        kv = sorted({h // (Hq // Hkv) for h in heads})
        kp = k[0, kv].mean(0)
        for i in rows:
            qs = torch.stack([q[0, h, i] for h in heads])
            qp = qs.mean(0) if pool == "mean" else qs.amax(0)
            probs = torch.softmax(kp[: i + 1] @ qp / math.sqrt(D), 0)
            for j in range(i + 1):
                want[0, p, i // bs, j // bs] += probs[j]
    assert torch.allclose(got, want, atol=1e-10)


def test_head_budget_fraction_matches_a_loop():
    q, k, _ = qkv(L=256)
    m = get_method("proxy", block_size=32, gamma=0.7)
    got = m.head_budget_fraction(q, k)
    for h in range(4):
        a = torch.softmax((q[0, h, -32:] @ k[0, h // 2].T) / 4.0 + torch.triu(
            torch.full((32, 256), float("-inf"), dtype=torch.float64), diagonal=256 - 32 + 1), -1)
        mass = a.sum(0).view(8, 32).sum(1)
        csum = torch.cumsum(torch.sort(mass, descending=True).values, 0)
        need = int((csum < 0.7 * mass.sum()).sum()) + 1
        assert math.isclose(float(got[0, h]), need / 8)


def planted(L=640, D=32, Hq=4, Hkv=2, j_star=300, seed=0, flat_heads=()):
    """Every query aligns with u; key j_star is 8 u. Heads in ``flat_heads`` get tiny queries:
    their attention is flat, so they need many blocks."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(D, generator=g)
    u = u / u.norm() * math.sqrt(D)
    q = u + 0.5 * torch.randn(1, Hq, L, D, generator=g)
    for h in flat_heads:
        q[:, h] *= 0.01
    k = 0.5 * torch.randn(1, Hkv, L, D, generator=g)
    k[:, :, j_star] = 8 * u
    return q, k, torch.randn(1, Hkv, L, D, generator=g)


def test_planted_column_is_kept_and_flat_heads_get_bigger_budgets():
    q, k, v = planted(flat_heads=(1,))
    plan = get_method("proxy", block_size=64, gamma=0.9).plan(q, k, v)
    plan.validate(causal=True)
    bm = plan.block_mask()[0]  # [Hq, nQ, nK]
    assert bm[:, 300 // 64 + 1:, 300 // 64].all()  # every head, every later query block
    counts = plan.kv_counts[0].sum(-1)
    # the flat head 1 shares head 0's proxy (KV head 0) but needs far more blocks
    assert counts[1] > 2 * counts[0]
    assert plan.density() < 0.8


def test_group_union_and_bad_proxy_heads():
    q, k, v = qkv(Hq=6, Hkv=2, L=400)
    per_q = get_method("proxy", block_size=64, gamma=0.6).plan(q, k, v).block_mask()
    union = get_method("proxy", block_size=64, gamma=0.6, gqa_policy="group_union").plan(q, k, v)
    assert union.heads == 2
    assert torch.equal(union.block_mask(), per_q.view(1, 2, 3, *per_q.shape[2:]).any(2))
    with pytest.raises(ValueError, match="proxy_heads"):
        get_method("proxy", block_size=64, proxy_heads=4).plan(q, k, v)  # 4 does not divide Hq=6


def test_defaults():
    m = get_method("proxy")  # all [unverified]: see the class docstring
    assert (m.block_size, m.proxy_heads, m.head_pool, m.q_stride, m.gamma, m.probe_q) == (128, None, "mean", 16, 0.9,
                                                                                          None)
    assert (m.sink_blocks, m.local_blocks, m.keep_diagonal, m.gqa_policy) == (1, 0, True, "per_q_head")
