"""Block top-k: the pooled score, the threshold mode and per-head budgets."""

import math

import torch

from sparseattn.methods import get_method


def qkv(Hq=2, Hkv=1, L=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, Hq, L, 16, generator=g), torch.randn(1, Hkv, L, 16, generator=g),
            torch.randn(1, Hkv, L, 16, generator=g))


def test_score_is_a_row_softmax_of_mean_pooled_logits():
    q, k, _ = qkv(Hq=1, L=150)
    m = get_method("block_topk", block_size=64)
    got = m.score(q, k, causal=True)[0, 0]
    qb = [q[0, 0, a:a + 64].mean(0) for a in (0, 64, 128)]
    kb = [k[0, 0, a:a + 64].mean(0) for a in (0, 64, 128)]
    for i in range(3):
        logits = torch.tensor([float(qb[i] @ kb[j]) / math.sqrt(16) for j in range(i + 1)])
        want = torch.zeros(3)
        want[: i + 1] = torch.softmax(logits, 0)
        assert torch.allclose(got[i], want, atol=1e-6)


def test_topk_per_head_and_counts():
    q, k, v = qkv()
    plan = get_method("block_topk", block_size=64, topk=[2, 4]).plan(q, k, v)
    counts = plan.kv_counts[0]
    visible = torch.arange(1, 8).clamp(max=7)
    assert torch.equal(counts[0], visible.clamp(max=2).to(torch.int32))
    assert torch.equal(counts[1], visible.clamp(max=4).to(torch.int32))


def test_threshold_mode_keeps_more_blocks_for_a_higher_threshold():
    q, k, v = qkv(seed=1)
    low = get_method("block_topk", block_size=64, selection="threshold", threshold=0.3).plan(q, k, v)
    high = get_method("block_topk", block_size=64, selection="threshold", threshold=0.95).plan(q, k, v)
    assert not (low.block_mask() & ~high.block_mask()).any()
    assert high.kv_counts.sum() > low.kv_counts.sum()


def test_without_forcing_budget_zero_is_an_empty_plan_and_zero_output():
    q, k, v = qkv()
    plan = get_method("block_topk", block_size=64, topk=0, sink_blocks=0, keep_diagonal=False).plan(q, k, v)
    assert int(plan.kv_counts.sum()) == 0
    from sparseattn import block_sparse_attention

    out = block_sparse_attention(q, k, v, plan, backend="reference")
    assert torch.equal(out, torch.zeros_like(out))
