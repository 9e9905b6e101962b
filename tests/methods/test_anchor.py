"""AnchorAttention: the element mask against a loop; a planted column becomes a stripe."""

import math

import pytest
import torch

from sparseattn.methods import get_method


def loop_mask(q, k, bs, step, theta, init_groups=1, local_groups=1, dense_tail=True):
    """bool [Hq, Lq, Lk]: anchors row by row, stripes per group, forced init/local blocks."""
    _, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G, gl, off = Hq // Hkv, step * bs, Lk - Lq
    nQ = math.ceil(Lq / bs)
    init_end = min(init_groups * gl, Lk)
    out = torch.zeros(Hq, Lq, Lk, dtype=torch.bool)
    for h in range(Hq):
        qq, kk = q[0, h], k[0, h // G]
        s = qq @ kk.T / math.sqrt(D)
        for g in range(math.ceil(nQ / step)):
            tail = dense_tail and Lq % gl and g >= Lq // gl
            g_start = off + g * gl
            l_start = max(0, off + (g - local_groups + 1) * gl)
            stripes = set()
            for m in range(g * step, min((g + 1) * step, nQ)):
                rows = range(m * bs, min((m + 1) * bs, Lq))
                anchors = []
                for i in rows:
                    p = off + i
                    keys = [j for j in range(min(p + 1, Lk)) if j < init_end or j >= l_start]
                    if keys:
                        anchors.append(float(s[i, keys].max()))
                a_bar = sum(anchors) / len(anchors) if anchors else float("inf")
                q_bar = qq[rows[0]:rows[-1] + 1].mean(0)
                for j in range(max(0, min(g_start, Lk))):
                    if float(q_bar @ kk[j]) / math.sqrt(D) + theta >= a_bar:
                        stripes.add(j)
            for m in range(g * step, min((g + 1) * step, nQ)):  # the group's stripes are complete now
                rows = range(m * bs, min((m + 1) * bs, Lq))
                last = off + rows[-1]
                d_hi = last // bs if last >= 0 else -1
                for i in rows:
                    p = off + i
                    for j in range(min(p + 1, Lk)):
                        n = j // bs
                        if tail or n * bs < init_end or l_start // bs <= n <= d_hi or (j in stripes and not tail):
                            out[h, i, j] = True
    return out


@pytest.mark.parametrize("Lq,Lk", [(300, 300), (200, 330), (260, 200)])
@pytest.mark.parametrize("theta", [2.0, 2.6])
def test_element_mask_matches_a_loop(Lq, Lk, theta):
    g = torch.Generator().manual_seed(Lq + Lk)
    q = torch.randn(1, 2, Lq, 16, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, Lk, 16, generator=g, dtype=torch.float64)
    plan = get_method("anchor", block_size=16, step=3, theta=theta).plan(q, k, k)
    plan.validate(causal=True)  # also: extras strictly ascending and never inside a kept block
    assert torch.equal(plan.to_dense_mask()[0], loop_mask(q, k, 16, 3, theta))


def column_qkv(L, D=32, Hq=2, Hkv=1, j_star=300, sink=0.0, seed=0):
    """Queries follow u; key j_star is 8 u (a vertical column); key 0 is ``sink`` u, an attention
    sink that lifts the anchor as in real models."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(D, generator=g)
    u = u / u.norm() * math.sqrt(D)
    q = u + 0.5 * torch.randn(1, Hq, L, D, generator=g)
    k = 0.5 * torch.randn(1, Hkv, L, D, generator=g)
    k[:, :, j_star] = 8 * u
    k[:, :, 0] += sink * u
    return q, k, torch.randn(1, Hkv, L, D, generator=g)


def test_planted_column_is_a_stripe_not_a_block():
    q, k, v = column_qkv(2048, j_star=300)
    plan = get_method("anchor", block_size=64, step=4, theta=0.0).plan(q, k, v)
    plan.validate(causal=True)
    bm = plan.block_mask()[0, 0]
    later = torch.arange(32) >= 8  # query blocks of groups 2.. (the column sits in group 1)
    assert not bm[later, 300 // 64].any()
    for m in later.nonzero().view(-1).tolist():
        cols = plan.extra_indices[0, 0, m, : plan.extra_counts[0, 0, m]].tolist()
        assert 300 in cols and cols == sorted(set(cols))
    assert plan.to_dense_mask()[..., 300:, 300].all()
    assert plan.density() < 0.35
    blocky = get_method("anchor", block_size=64, step=4, theta=0.0, granularity="block").plan(q, k, v)
    assert not blocky.has_extra and blocky.block_mask()[0, 0][later, 300 // 64].all()
    assert blocky.density() > plan.density()


def test_official_defaults_on_a_longer_input():
    # block 128, step 16: groups of 2048 rows; init = keys < 2048; the column sits in group 1.
    # theta=12 is tuned to real logit ranges: a sink 16 above the rest makes it selective.
    q, k, v = column_qkv(6144, D=16, j_star=3000, sink=4.0)
    plan = get_method("anchor").plan(q, k, v)
    plan.validate(causal=True)
    mask = plan.to_dense_mask(q_start=4096)[0]
    assert mask[:, :, 3000].all()
    assert mask[:, :, :2048].all()  # init region
    # groups 0 and 1 are dense (init + local); group 2 adds few stripes to init + local
    assert 0 < int(plan.extra_counts.max()) <= 40
    assert float(mask[:, :, 2048:4096].float().mean()) < 0.02


def test_dense_tail_and_group_union():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 300, 16, generator=g)
    k = torch.randn(1, 2, 300, 16, generator=g)
    plan = get_method("anchor", block_size=32, step=4, theta=2.5).plan(q, k, k)
    assert torch.equal(plan.kv_counts[0, 0, 8:], torch.arange(9, 11, dtype=torch.int32))  # rows >= 256: dense
    union = get_method("anchor", block_size=32, step=4, theta=2.5, gqa_policy="group_union").plan(q, k, k)
    union.validate(causal=True)
    assert union.heads == 2
    assert torch.equal(union.to_dense_mask()[0], plan.to_dense_mask()[0].view(2, 2, 300, 300).any(1))


def test_official_defaults():
    m = get_method("anchor")
    assert (m.block_size, m.theta, m.step, m.init_groups, m.local_groups) == (128, 12.0, 16, 1, 1)
    assert (m.granularity, m.dense_tail, m.gqa_policy) == ("stripe", True, "per_q_head")
    q = torch.randn(1, 2, 300, 16)
    with pytest.raises(NotImplementedError, match="causal"):
        get_method("anchor").plan(q, q, q, causal=False)
