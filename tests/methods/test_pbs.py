"""PBS-Attn: permutation, permuted-block selection and both mappings against a loop; scattered
needles that the permutation gathers into one block."""

import math

import pytest
import torch

from sparseattn.methods import get_method


def loop_mask(q, k, bs, S, tau, mapping):
    """bool [Hq, Lq, Lk]: the (query, key) pairs the plan must compute, head by head."""
    _, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G, off = Hq // Hkv, Lk - Lq
    nQ, nK, nS, bps = math.ceil(Lq / bs), math.ceil(Lk / bs), Lk // S, S // bs
    nP = nS * bps
    out = torch.zeros(Hq, Lq, Lk, dtype=torch.bool)
    for h in range(Hq):
        qq, kk = q[0, h], k[0, h // G]
        # permutation: mean attention of the last bs queries over the complete segments (causal)
        P = min(bs, Lq)
        score = torch.zeros(nS * S, dtype=qq.dtype)
        for i in range(Lq - P, Lq):
            n = min(off + i + 1, nS * S)
            if n > 0:
                score[:n] += torch.softmax(kk[:n] @ qq[i] / math.sqrt(D), 0) / P
        order = [s * S + t for s in range(nS) for t in sorted(range(S), key=lambda t: (-score[s * S + t], t))]
        order += list(range(nS * S, Lk))
        members = [order[p * bs:(p + 1) * bs] for p in range(nK)]  # keys of every permuted block
        k_bar = torch.stack([kk[mb].mean(0) for mb in members])
        first_block = order.index(0) // bs
        for m in range(nQ):
            rows = range(m * bs, min((m + 1) * bs, Lq))
            first, last = off + rows[0], off + rows[-1]
            if last < 0:
                continue
            seg_lo, seg_hi = max(first, 0) // S, last // S
            q_bar = qq[rows[0]:rows[-1] + 1].mean(0)
            visible = [n for n in range(nK) if n * bs <= last]
            diag = [n for n in visible if seg_lo <= n // bps <= seg_hi]
            cand = [n for n in visible if n not in diag]
            sel = set()
            if cand:
                pr = torch.softmax(torch.stack([q_bar @ k_bar[n] for n in cand]) / math.sqrt(D), 0)
                kept = 0.0
                for p_, n in sorted(zip(pr.tolist(), cand), key=lambda t: (-t[0], t[1])):
                    if kept < tau * 1.0 or tau >= 1:
                        sel.add(n)
                        kept += p_
            if first_block in visible:
                sel.add(first_block)
            keys = set()  # keys computed for every row of the block (before the causal mask)
            for n in diag:
                keys |= set(range(n * bs, min((n + 1) * bs, Lk)))
            for n in sel:
                if mapping == "columns" or n >= nP:
                    keys |= set(members[n])
                else:
                    for j in members[n]:
                        keys |= set(range(j // bs * bs, min((j // bs + 1) * bs, Lk)))
            cols = torch.tensor(sorted(keys), dtype=torch.long)
            for i in rows:
                c = cols[cols <= off + i]
                out[h, i, c] = True
    return out


@pytest.mark.parametrize("mapping", ["blocks", "columns"])
@pytest.mark.parametrize("Lq,Lk,tau", [(300, 300, 0.6), (200, 330, 0.9), (290, 290, 0.3)])
def test_element_mask_matches_a_loop(mapping, Lq, Lk, tau):
    g = torch.Generator().manual_seed(Lq + Lk)
    q = torch.randn(1, 4, Lq, 16, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, Lk, 16, generator=g, dtype=torch.float64)
    plan = get_method("pbs", block_size=16, segment_size=64, threshold=tau, mapping=mapping).plan(q, k, k)
    plan.validate(causal=True)
    assert torch.equal(plan.to_dense_mask()[0], loop_mask(q, k, 16, 64, tau, mapping))


def scattered_qkv(L=2048, D=32, seed=0):
    """32 strong keys spread over segment 4 (keys 1024..1279, one every 8): in key order they
    touch all four 64-key blocks of the segment; permuted, they share one."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(D, generator=g)
    u = u / u.norm() * math.sqrt(D)
    q = u + 0.5 * torch.randn(1, 2, L, D, generator=g)
    k = 0.5 * torch.randn(1, 1, L, D, generator=g)
    needles = torch.arange(1024, 1280, 8)
    k[:, :, needles] = 2 * u
    return q, k, torch.randn(1, 1, L, D, generator=g), needles


def test_permutation_gathers_scattered_needles_into_one_block():
    q, k, v, needles = scattered_qkv()
    m = get_method("pbs", block_size=64, segment_size=256)
    perm = m.permutation(q, k)  # [B, Hq, nS, S]
    assert set((perm[0, 0, 4, :32] + 1024).tolist()) == set(needles.tolist())
    cols = m.replace(mapping="columns", threshold=0.5).plan(q, k, v)
    blocks = m.replace(threshold=0.5).plan(q, k, v)
    for plan in (cols, blocks):
        plan.validate(causal=True)
        assert plan.to_dense_mask()[0][:, 1344:][..., needles].all()  # every later query sees every needle
    # columns: exactly PBS's pairs, far fewer than the original blocks the permuted block touches
    assert cols.density() < 0.5 * blocks.density()


def test_dense_fallback_group_union_and_segment_equal_to_block():
    q, k, v, _ = scattered_qkv(L=1300)
    assert get_method("pbs", segment_size=2048).plan(q, k, v).density() == 1.0  # Lq <= segment_size
    opts = dict(block_size=64, segment_size=128, threshold=0.7)
    per_q = get_method("pbs", **opts).plan(q, k, v)
    union = get_method("pbs", gqa_policy="group_union", **opts).plan(q, k, v)
    assert union.heads == 1 and torch.equal(union.block_mask()[0, 0], per_q.block_mask()[0].any(0))
    # segment_size = block_size: a permuted block is an original block, so both mappings agree
    a = get_method("pbs", block_size=64, segment_size=64, threshold=0.7).plan(q, k, v)
    b = get_method("pbs", block_size=64, segment_size=64, threshold=0.7, mapping="columns").plan(q, k, v)
    assert torch.equal(a.to_dense_mask(), b.to_dense_mask())


def test_official_defaults():
    m = get_method("pbs")
    assert (m.block_size, m.segment_size, m.threshold, m.force_first_block) == (128, 256, 0.9, True)
    assert (m.mapping, m.gqa_policy) == ("blocks", "per_q_head")
