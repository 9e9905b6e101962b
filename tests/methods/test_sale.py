"""SALE: the two-pass relative-score selection against a per-row loop; a planted needle block."""

import math

import pytest
import torch

from sparseattn import BlockPlan
from sparseattn.methods import get_method
from sparseattn.methods.sale import quantize_per_token


def official_local_tiles(n_max, sink, local_tiles, seg_tiles):
    """How many of the last visible tiles the official kernel computes exactly (a literal port of
    ``flash_fwd_int4_sparse_kernel_v2.h``'s counting, generalised from its one sink tile)."""
    n_wo = n_max - sink
    n_segs = -(-n_wo // seg_tiles)
    remain = n_wo - n_segs * seg_tiles
    if remain >= local_tiles:
        return remain
    n_supplement = -(-(local_tiles - remain) // seg_tiles)
    return seg_tiles * n_supplement + remain


def loop_plan(q, k, bq, bk, tau, local_window, block_seg, bits=4, sink=1):
    """Per (head, row): exact anchor stats over the sink tiles + the official local tiles (and the
    tiles of the block's own queries), then the low-bit relative score of every visible key; a
    tile is kept if any of its pairs passes."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G, nQ, nK = Hq // Hkv, math.ceil(Lq / bq), math.ceil(Lk / bk)
    nl, bps = math.ceil(local_window / bk), block_seg // bk
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
                p, m = Lk - Lq + i, i // bq
                first, last = Lk - Lq + m * bq, Lk - Lq + min((m + 1) * bq, Lq) - 1
                if last < 0:
                    continue
                n_max = min(-(-(last + 1) // bk), nK)
                start = max(n_max - official_local_tiles(n_max, sink, nl, bps), 0)
                start = min(start, max(first, 0) // bk)  # the block's own tiles
                anchor = [j for j in range(min(p + 1, Lk)) if j // bk < sink or j // bk >= start]
                if not anchor:
                    continue
                mi = exact[i, anchor].max()
                li = torch.exp(exact[i, anchor] - mi).sum()
                t = float(tau[h]) if isinstance(tau, (list, tuple)) else tau
                n = min(p + 1, Lk)
                passed = (torch.exp(est[i, :n] - mi) / li >= t).nonzero().view(-1).tolist()
                for j in passed + anchor:
                    out[b, h, m, j // bk] = True
    return out


@pytest.mark.parametrize("Lq,Lk", [(200, 200), (70, 150), (150, 90), (333, 333)])
@pytest.mark.parametrize("tau", [0.05, [0.3, 0.02, 0.1, 0.0]])
@pytest.mark.parametrize("bq,bk,window,seg", [(32, 16, 40, 32), (32, 16, 64, 64), (16, 32, 32, 64)])
def test_plan_matches_a_per_row_loop(Lq, Lk, tau, bq, bk, window, seg):
    g = torch.Generator().manual_seed(Lq + Lk)
    q = torch.randn(1, 4, Lq, 16, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, Lk, 16, generator=g, dtype=torch.float64)
    plan = get_method("sale", block_size=bq, block_k=bk, threshold=tau, local_window=window, block_seg=seg,
                      dense_len=0).plan(q, k, k)
    plan.validate(causal=True)
    assert (plan.block_q, plan.block_k) == (bq, bk)
    assert torch.equal(plan.block_mask(), loop_plan(q, k, bq, bk, tau, window, seg))


def test_official_local_part_grows_to_whole_segments():
    """64-row blocks, 32-key tiles, 128-key segments and window: the official kernel computes the
    last 4-7 tiles of each query block exactly, so that the estimated tiles form whole segments."""
    from sparseattn.methods.sale import sale_local_start

    start = sale_local_start(12, block_q=64, block_k=32, q_len=768, k_len=768, sink_blocks=1, local_blocks=4,
                             seg_blocks=4, causal=True, device="cpu")
    n_max = 2 * torch.arange(1, 13)
    first_local = start.clamp(min=1)  # tiles before the one sink tile are anchored either way
    assert first_local.tolist() == [1, 1, 1, 1, 5, 5, 9, 9, 13, 13, 17, 17]
    assert (n_max - first_local)[4:].tolist() == [5, 7] * 4  # 4-7 local tiles, whole 4-tile segments before
    for n, s in zip(n_max.tolist(), first_local.tolist()):
        assert max(n - official_local_tiles(n, 1, 4, 4), 1) == s


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
    assert (plan.block_q, plan.block_k) == (64, 32)
    # Found by every query block whose anchor does not reach the needle (from block 14 on: its local
    # part starts at tile 25; block 13's holds half the needle, which then weighs less than 0.05 per key).
    assert bm[:, 640 // 64 + 4:, 640 // 32:704 // 32].all()
    assert plan.density() < 0.6


def test_official_dense_fallback_and_threshold_zero():
    q, k, v = needle_block_qkv(L=1024)
    assert get_method("sale").plan(q, k, v).density() == 1.0  # Lq <= 1024: dense, as the official code
    assert get_method("sale", threshold=0.0, dense_len=0).plan(q, k, v).density() == 1.0
    mixed = get_method("sale", threshold=[1e-6, 0.5], dense_len=0).plan(q, k, v)  # < 1e-5: head not sparsified
    visible = BlockPlan.dense(block_q=64, block_k=32, q_len=1024, k_len=1024, causal=True).block_mask()[0, 0]
    assert torch.equal(mixed.block_mask()[0, 0], visible)
    assert int(mixed.kv_counts[0, 1].sum()) < int(mixed.kv_counts[0, 0].sum())
    union = get_method("sale", dense_len=0, threshold=0.05, gqa_policy="group_union").plan(q, k, v)
    per_q = get_method("sale", dense_len=0, threshold=0.05).plan(q, k, v)
    assert union.heads == 1 and torch.equal(union.block_mask()[0, 0], per_q.block_mask()[0].any(0))


def test_official_defaults():
    m = get_method("sale")
    assert (m.block_size, m.block_k, m.threshold, m.bits, m.local_window, m.block_seg, m.sink_blocks,
            m.dense_len) == (64, 32, 0.004, 4, 128, 128, 1, 1024)
    with pytest.raises(ValueError, match="block_seg"):
        get_method("sale", block_k=48)  # 128-key segments of 48-key tiles
    assert get_method("sale", threshold=[0.001, 0.004]).threshold == (0.001, 0.004)
