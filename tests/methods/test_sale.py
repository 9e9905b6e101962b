"""SALE: the two-pass relative-score selection against a per-row loop; a planted needle block."""

import math

import pytest
import torch

from sparseattn.methods import get_method
from sparseattn.methods.sale import quantize_per_token


def loop_plan(q, k, bs, tau, local_window, bits=4):
    """Per (head, row): exact anchor stats over the sink block + local blocks + diagonal, then the
    low-bit relative score of every visible key; a block is kept if any of its pairs passes."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G, nQ, nK = Hq // Hkv, math.ceil(Lq / bs), math.ceil(Lk / bs)
    lb = math.ceil(local_window / bs)
    out = torch.zeros(B, Hq, nQ, nK, dtype=torch.bool)
    for b in range(B):
        for h in range(Hq):
            qq, kk = q[b, h].double(), k[b, h // G].double()
            qm, ks = qq.mean(0), kk - kk.mean(0)
            qi, sq = quantize_per_token(qq - qm, bits)
            ki, sk = quantize_per_token(ks, bits)
            est = ((qi @ ki.T) * sq * sk.T + qm @ ks.T) / math.sqrt(D)
            exact = (qq @ ks.T) / math.sqrt(D)
            for i in range(Lq):
                p, m = Lk - Lq + i, i // bs
                first, last = Lk - Lq + m * bs, Lk - Lq + min((m + 1) * bs, Lq) - 1
                if last < 0:
                    continue
                d_lo, d_hi = max(first, 0) // bs, last // bs
                anchor = [j for j in range(min(p + 1, Lk)) if j // bs < 1 or d_lo - lb <= j // bs <= d_hi]
                if not anchor:
                    continue
                mi = exact[i, anchor].max()
                li = torch.exp(exact[i, anchor] - mi).sum()
                t = float(tau[h]) if isinstance(tau, (list, tuple)) else tau
                n = min(p + 1, Lk)
                passed = (torch.exp(est[i, :n] - mi) / li >= t).nonzero().view(-1).tolist()
                for j in passed + anchor:
                    out[b, h, m, j // bs] = True
    return out


@pytest.mark.parametrize("Lq,Lk", [(200, 200), (70, 150), (150, 90)])
@pytest.mark.parametrize("tau", [0.05, [0.3, 0.02, 0.1, 0.0]])
def test_plan_matches_a_per_row_loop(Lq, Lk, tau):
    g = torch.Generator().manual_seed(Lq + Lk)
    q = torch.randn(1, 4, Lq, 16, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, Lk, 16, generator=g, dtype=torch.float64)
    plan = get_method("sale", block_size=32, threshold=tau, local_window=40, dense_len=0).plan(q, k, k)
    plan.validate(causal=True)
    assert torch.equal(plan.block_mask(), loop_plan(q, k, 32, tau, 40))


def test_quantization_error_is_half_a_step():
    x = torch.randn(3, 50, 64, dtype=torch.float64)
    for bits in (4, 8):
        xi, s = quantize_per_token(x, bits)
        assert xi.abs().max() <= 2 ** (bits - 1) - 1 and torch.equal(xi, xi.round())
        assert ((x - xi * s).abs() <= s / 2 + 1e-12).all()


def needle_block_qkv(L=1280, D=32, n0=640, seed=0):
    """Keys n0 .. n0+63 point along u, which every query follows: a strong block far from the
    anchor of the later query blocks."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(D, generator=g)
    u = u / u.norm()
    q = 3 * u + 0.5 * torch.randn(1, 2, L, D, generator=g)
    k = 0.5 * torch.randn(1, 1, L, D, generator=g)
    k[:, :, n0:n0 + 64] += 3 * u
    return q, k, torch.randn(1, 1, L, D, generator=g)


@pytest.mark.parametrize("bits", [4, 8])
def test_planted_needle_block_is_kept(bits):
    q, k, v = needle_block_qkv()
    plan = get_method("sale", bits=bits, threshold=0.05).plan(q, k, v)  # official defaults otherwise
    plan.validate(causal=True)
    bm = plan.block_mask()[0]
    assert bm[:, 640 // 64 + 3:, 640 // 64].all()  # found by every later query block, beyond the anchor
    assert plan.density() < 0.6


def test_official_dense_fallback_and_threshold_zero():
    q, k, v = needle_block_qkv(L=1024)
    assert get_method("sale").plan(q, k, v).density() == 1.0  # Lq <= 1024: dense, as the official code
    assert get_method("sale", threshold=0.0, dense_len=0).plan(q, k, v).density() == 1.0
    mixed = get_method("sale", threshold=[1e-6, 0.5], dense_len=0).plan(q, k, v)  # < 1e-5: head not sparsified
    assert bool(mixed.block_mask()[0, 0][torch.tril(torch.ones(16, 16, dtype=torch.bool))].all())
    assert int(mixed.kv_counts[0, 1].sum()) < int(mixed.kv_counts[0, 0].sum())
    union = get_method("sale", dense_len=0, threshold=0.05, gqa_policy="group_union").plan(q, k, v)
    per_q = get_method("sale", dense_len=0, threshold=0.05).plan(q, k, v)
    assert union.heads == 1 and torch.equal(union.block_mask()[0, 0], per_q.block_mask()[0].any(0))


def test_official_defaults():
    m = get_method("sale")
    assert (m.block_size, m.threshold, m.bits, m.local_window, m.sink_blocks, m.dense_len) == (64, 0.004, 4, 128, 1,
                                                                                               1024)
    assert get_method("sale", threshold=[0.001, 0.004]).threshold == (0.001, 0.004)
