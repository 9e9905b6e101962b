"""XAttention: the antidiagonal estimate against a loop, per-head / per-layer thresholds, GQA."""

import math

import pytest
import torch

import sparseattn.methods.xattention as xmod
from sparseattn.methods import get_method
from sparseattn.methods.base import visible_blocks
from sparseattn.methods.xattention import antidiagonal_block_scores


def loop_scores(q, k, block, S, causal):
    """Token-level definition: grouped antidiagonal logits, softmax per grouped row, block sums."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    nQ, nK = -(-Lq // block), -(-Lk // block)
    qp = torch.zeros(B, Hq, nQ * block, D, dtype=torch.float64)
    kp = torch.zeros(B, Hkv, nK * block, D, dtype=torch.float64)
    qp[:, :, :Lq], kp[:, :, :Lk] = q, k
    out = torch.zeros(B, Hq, nQ, nK, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            kh = h // (Hq // Hkv)
            for r in range(nQ * block // S):
                if r * S >= Lq:
                    continue
                logits = {}
                for c in range(nK * block // S):
                    if c * S >= Lk or (causal and c * S > Lk - Lq + r * S + S - 1):
                        continue
                    dot = sum(float(qp[b, h, r * S + S - 1 - t] @ kp[b, kh, c * S + t]) for t in range(S))
                    logits[c] = dot / (math.sqrt(D) * S)
                if not logits:
                    continue
                m = max(logits.values())
                z = sum(math.exp(x - m) for x in logits.values())
                for c, x in logits.items():
                    out[b, h, r * S // block, c * S // block] += math.exp(x - m) / z
    return out


@pytest.mark.parametrize("lq,lk,causal", [(45, 45, True), (20, 45, True), (45, 45, False)])
def test_antidiagonal_scores_match_the_loop(lq, lk, causal):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, lq, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, lk, 8, generator=g, dtype=torch.float64)
    got = antidiagonal_block_scores(q, k, block=16, stride=4, causal=causal)
    assert torch.allclose(got, loop_scores(q, k, 16, 4, causal))


def test_chunked_estimate_equals_one_chunk(monkeypatch):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 3, 300, 16, generator=g)
    k = torch.randn(1, 1, 300, 16, generator=g)
    whole = antidiagonal_block_scores(q, k, block=32, stride=8, causal=True)
    monkeypatch.setattr(xmod, "ESTIMATE_CHUNK_ELEMENTS", 1)  # one query block per chunk
    assert torch.equal(antidiagonal_block_scores(q, k, block=32, stride=8, causal=True), whole)


def qkv(Hq=4, Hkv=2, L=500, seed=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, Hq, L, 16, generator=g), torch.randn(1, Hkv, L, 16, generator=g),
            torch.randn(1, Hkv, L, 16, generator=g))


def forced_and_visible(L, bs):
    vis = visible_blocks(block_q=bs, block_k=bs, q_len=L, k_len=L, causal=True, device="cpu")
    n = torch.arange(vis.shape[1])
    forced = (n.view(1, -1) == 0) | (n.view(1, -1) == torch.arange(vis.shape[0]).view(-1, 1))
    return forced & vis, vis


def test_per_head_thresholds():
    q, k, v = qkv()
    forced, vis = forced_and_visible(500, 64)
    bm = get_method("xattention", block_size=64, threshold=[0.0, 1.0, 0.0, 1.0]).plan(q, k, v).block_mask()[0]
    assert torch.equal(bm[0], forced) and torch.equal(bm[2], forced)
    assert torch.equal(bm[1], vis) and torch.equal(bm[3], vis)
    bm = get_method("xattention", block_size=64, threshold=[0.0, 1.0]).plan(q, k, v).block_mask()[0]  # per KV head
    assert torch.equal(bm[1], forced) and torch.equal(bm[2], vis)


def test_per_layer_threshold_table():
    q, k, v = qkv()
    forced, vis = forced_and_visible(500, 64)
    m = get_method("xattention", block_size=64, threshold=[[0.0] * 4, [1.0] * 4])
    assert torch.equal(m.plan(q, k, v, layer_idx=0).block_mask()[0, 3], forced)
    assert torch.equal(m.plan(q, k, v, layer_idx=1).block_mask()[0, 3], vis)
    with pytest.raises(ValueError, match="layer_idx"):
        m.plan(q, k, v)
    with pytest.raises(ValueError, match="per-head values"):
        get_method("xattention", block_size=64, threshold=[0.5, 0.5, 0.5]).plan(q, k, v)


def test_gqa_policies():
    q, k, v = qkv(Hq=6, Hkv=2)
    per_q = get_method("xattention", block_size=64, threshold=0.7).plan(q, k, v).block_mask()[0]
    union = get_method("xattention", block_size=64, threshold=0.7, gqa_policy="group_union").plan(q, k, v)
    summed = get_method("xattention", block_size=64, threshold=0.7, gqa_policy="group_sum").plan(q, k, v)
    assert union.heads == 2 and summed.heads == 2
    summed.validate(causal=True)
    assert torch.equal(union.block_mask()[0], per_q.view(2, 3, *per_q.shape[1:]).any(1))
    with pytest.raises(ValueError, match="per-query-head value cannot drive"):
        get_method("xattention", block_size=64, threshold=[0.5] * 6, gqa_policy="group_sum").plan(q, k, v)


def test_higher_threshold_never_keeps_fewer_blocks():
    q, k, v = qkv(seed=3)
    prev = None
    for tau in (0.0, 0.3, 0.6, 0.9, 1.0):
        bm = get_method("xattention", block_size=64, threshold=tau).plan(q, k, v).block_mask()
        if prev is not None:
            assert not (prev & ~bm).any()
        prev = bm
