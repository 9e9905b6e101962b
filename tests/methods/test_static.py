"""Static patterns: streaming, tri_shape, power, moa - exact element rules."""

import pytest
import torch

from sparseattn.methods import get_method
from sparseattn.plan import NO_WINDOW


def qkv(Hq=2, Hkv=1, Lq=333, Lk=333):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, Hq, Lq, 8, generator=g), torch.randn(1, Hkv, Lk, 8, generator=g),
            torch.randn(1, Hkv, Lk, 8, generator=g))


def band(Lq, Lk, sink, window):
    pos = torch.arange(Lq).view(-1, 1) + (Lk - Lq)
    j = torch.arange(Lk).view(1, -1)
    return (j <= pos) & ((j < sink) | (pos - j < window))


@pytest.mark.parametrize("lq,lk", [(333, 333), (100, 333)])
def test_streaming_has_exact_token_edges(lq, lk):
    q, k, v = qkv(Lq=lq, Lk=lk)
    plan = get_method("streaming", block_size=64, sink=10, window=70).plan(q, k, v)
    assert torch.equal(plan.to_dense_mask()[0, 0], band(lq, lk, 10, 70))


def test_tri_shape_rounds_the_dense_tail_up_to_whole_query_blocks():
    q, k, v = qkv()
    plan = get_method("tri_shape", block_size=64, sink=10, window=70, last_q=50).plan(q, k, v)
    mask = plan.to_dense_mask()[0, 0]
    # The last 50 rows (283..332) live in query blocks 4 and 5, so rows 256.. are dense.
    assert torch.equal(mask[256:], band(333, 333, 0, NO_WINDOW)[256:])
    assert torch.equal(mask[:256], band(333, 333, 10, 70)[:256])
    assert torch.equal(get_method("tri_shape", block_size=64, sink=10, window=70, last_q=0).plan(q, k, v)
                       .to_dense_mask()[0, 0], band(333, 333, 10, 70))


def test_causal_only_patterns_refuse_non_causal():
    q, k, v = qkv()
    for name in ("streaming", "tri_shape", "power", "moa", "duo", "flexprefill", "vertical_slash"):
        with pytest.raises(NotImplementedError, match="causal"):
            get_method(name).plan(q, k, v, causal=False)


@pytest.mark.parametrize("max_power", [None, 2])
def test_power_pattern_matches_a_loop(max_power):
    q, k, v = qkv(Lq=1000, Lk=1000)
    plan = get_method("power", block_size=64, max_power=max_power).plan(q, k, v)
    bm = plan.block_mask()[0, 0]
    nb = 16
    want = torch.zeros(nb, nb, dtype=torch.bool)
    for m in range(nb):
        keep = {0, m, m - 1}
        d = 1
        while d <= m and (max_power is None or d <= 2 ** max_power):
            keep.add(m - d)
            d *= 2
        for n in keep:
            if 0 <= n <= m:
                want[m, n] = True
    assert torch.equal(bm, want)


def test_moa_per_head_spans_and_group_max():
    q, k, v = qkv(Hq=4, Hkv=2)
    m = get_method("moa", block_size=64, sink=0, alphas=[0.0, 10.0, 0.0, 33.3], betas=[1.0, 0.0, 0.1, 0.0])
    plan = m.plan(q, k, v)
    assert plan.heads == 4
    mask = plan.to_dense_mask()[0]
    assert torch.equal(mask[0], band(333, 333, 0, 333))  # span = N: dense
    assert torch.equal(mask[1], band(333, 333, 0, 10))
    assert torch.equal(mask[2], band(333, 333, 0, 33))  # round(0.1 * 333)
    assert torch.equal(mask[3], band(333, 333, 0, 33))
    grouped = m.replace(gqa_policy="group_max").plan(q, k, v)
    assert grouped.heads == 2
    assert torch.equal(grouped.to_dense_mask()[0, 0], mask[0])  # widest of heads 0 and 1
    assert torch.equal(grouped.to_dense_mask()[0, 1], mask[2])


def test_moa_layer_table_and_negative_alpha():
    q, k, v = qkv(Hq=2, Hkv=2)
    m = get_method("moa", block_size=64, sink=4, alphas=[[0.0, 0.0], [-1024.0, 50.0]], betas=[[0.5, 0.5], [0.0, 0.0]])
    first = m.plan(q, k, v, layer_idx=0).to_dense_mask()[0]
    assert torch.equal(first[0], band(333, 333, 4, 166))  # round(0.5 * 333) = 166 (round half to even)
    second = m.plan(q, k, v, layer_idx=1).to_dense_mask()[0]
    assert torch.equal(second[0], band(333, 333, 4, 1))  # a negative span is clamped to the query itself
    assert torch.equal(second[1], band(333, 333, 4, 50))
