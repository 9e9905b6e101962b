"""Vertical-slash: kept key columns become extra token columns, outside the kept blocks."""

import math

import torch

from sparseattn import block_sparse_attention
from sparseattn.methods import get_method


def column_qkv(L=700, D=32, Hq=2, Hkv=1, j_star=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(D, generator=g)
    u = u / u.norm() * math.sqrt(D)
    q = u + 0.5 * torch.randn(1, Hq, L, D, generator=g)
    k = 0.5 * torch.randn(1, Hkv, L, D, generator=g)
    k[:, :, j_star] = 8 * u
    v = torch.randn(1, Hkv, L, D, generator=g)
    return q, k, v


def test_planted_column_is_an_extra_column_not_a_block():
    q, k, v = column_qkv()
    plan = get_method("vertical_slash", vertical_size=31, slash_size=100).plan(q, k, v)
    plan.validate(causal=True)
    bm = plan.block_mask()[0, 0]
    far = torch.arange(700 // 64 + 1) >= 300 // 64 + 3  # query blocks well past the column
    assert not bm[far, 300 // 64].any()  # its block is not computed there...
    ecount, eidx = plan.extra_counts[0, 0], plan.extra_indices[0, 0]
    for m in far.nonzero().view(-1).tolist():
        cols = eidx[m, : ecount[m]].tolist()
        assert 300 in cols and cols == sorted(set(cols))  # ...the column is, as a token extra
        assert set(range(30)) <= set(cols)  # and so are the 30 forced sink tokens
    # The extras cost little: far fewer keys than blocks would.
    assert plan.density() < 0.5
    out = block_sparse_attention(q, k, v, plan, backend="reference")
    assert torch.isfinite(out).all()


def test_columns_before_a_query_block_only():
    q, k, v = column_qkv(j_star=600)
    plan = get_method("vertical_slash", vertical_size=31, slash_size=100).plan(q, k, v)
    ecount, eidx = plan.extra_counts[0, 0], plan.extra_indices[0, 0]
    last = torch.clamp((torch.arange(len(ecount)) + 1) * 64, max=700) - 1
    for m in range(len(ecount)):
        assert all(c <= int(last[m]) for c in eidx[m, : ecount[m]].tolist())


def test_group_union_is_the_union_of_the_group():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 500, 16, generator=g)
    k, v = torch.randn(2, 1, 2, 500, 16, generator=g)
    opts = dict(vertical_size=40, slash_size=120)
    per_q = get_method("vertical_slash", **opts).plan(q, k, v).to_dense_mask()[0]
    union = get_method("vertical_slash", gqa_policy="group_union", **opts).plan(q, k, v)
    union.validate(causal=True)
    assert union.heads == 2
    assert torch.equal(union.to_dense_mask()[0], per_q.view(2, 2, 500, 500).any(1))
