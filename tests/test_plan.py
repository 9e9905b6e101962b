"""BlockPlan: construction, exact element masks, density, validation."""

import itertools
from dataclasses import replace

import pytest
import torch

from sparseattn import BlockPlan

from .conftest import HAS_CUDA, triton_importable
from .kernels.plans import random_plan, with_extra_columns

DEVICE = "cuda" if HAS_CUDA else "cpu"


def naive_element_mask(plan, causal):
    """Element mask from first principles, one element at a time."""
    B, H = plan.batch, plan.heads
    out = torch.zeros(B, H, plan.q_len, plan.k_len, dtype=torch.bool)
    counts, idx = plan.kv_counts.cpu(), plan.kv_indices.cpu()
    for b, h, i in itertools.product(range(B), range(H), range(plan.q_len)):
        m = i // plan.block_q
        blocks = set(idx[b, h, m, : counts[b, h, m]].tolist())
        extra = set()
        if plan.has_extra:
            extra = set(plan.extra_indices[b, h, m, : plan.extra_counts[b, h, m]].tolist())
        p = plan.k_len - plan.q_len + i
        for j in range(plan.k_len):
            keep = (j // plan.block_k) in blocks
            if keep and plan.has_band:
                keep = j < int(plan.band_sink[b, h, m]) or p - j < int(plan.band_window[b, h, m])
            keep = keep or j in extra
            if causal and j > p:
                keep = False
            out[b, h, i, j] = keep
    return out


@pytest.mark.parametrize("Lq,Lk,bq,bk", [(37, 37, 16, 16), (20, 50, 16, 32), (50, 20, 32, 16), (1, 33, 16, 16)])
@pytest.mark.parametrize("causal", [True, False])
def test_to_dense_mask_matches_first_principles(Lq, Lk, bq, bk, causal):
    plan = random_plan(2, 2, Lq, Lk, bq, bk, causal=causal)
    assert torch.equal(plan.to_dense_mask(causal), naive_element_mask(plan, causal))
    band = BlockPlan.from_band(1, 2, sink=3, window=9, block_q=bq, block_k=bk, q_len=Lq, k_len=Lk)
    assert torch.equal(band.to_dense_mask(causal), naive_element_mask(band, causal))
    extra = with_extra_columns(random_plan(1, 1, Lq, Lk, bq, bk, density=0.3), n_cols=3)
    assert torch.equal(extra.to_dense_mask(causal), naive_element_mask(extra, causal))
    # Row chunks agree with the whole.
    whole = plan.to_dense_mask(causal)
    parts = torch.cat([plan.to_dense_mask(causal, q_start=r, q_end=min(Lq, r + 7)) for r in range(0, Lq, 7)], 2)
    assert torch.equal(whole, parts)


def test_from_block_mask_sorted_counts_and_padding():
    g = torch.Generator().manual_seed(1)
    bm = torch.rand(2, 3, 5, 9, generator=g) < 0.5
    plan = BlockPlan.from_block_mask(bm, block_q=16, block_k=16, q_len=80, k_len=144)
    assert plan.kv_counts.dtype == torch.int32 and plan.kv_indices.dtype == torch.int32
    for b, h, m in itertools.product(range(2), range(3), range(5)):
        want = torch.nonzero(bm[b, h, m]).flatten().tolist()
        c = int(plan.kv_counts[b, h, m])
        assert plan.kv_indices[b, h, m, :c].tolist() == want
        assert (plan.kv_indices[b, h, m, c:] == 0).all()
    assert torch.equal(plan.block_mask(), bm)
    plan.validate()


def test_from_block_mask_causal_drops_future_blocks():
    bm = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    plan = BlockPlan.from_block_mask(bm, block_q=16, block_k=16, q_len=64, k_len=64, causal=True)
    assert plan.kv_counts.flatten().tolist() == [1, 2, 3, 4]
    plan.validate(causal=True)
    with pytest.raises(ValueError, match="beyond the causal limit"):
        BlockPlan.from_block_mask(bm, block_q=16, block_k=16, q_len=64, k_len=64).validate(causal=True)


@pytest.mark.skipif(not triton_importable(), reason="triton is not installed (pip install triton)")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nK,width", [(7, 7), (300, 300), (9, 12)])
def test_triton_compaction_equals_torch_path(causal, nK, width):
    from sparseattn.kernels.plan_triton import compact_block_mask

    g = torch.Generator().manual_seed(nK)
    bm = torch.rand(2, 3, 6, nK, generator=g) < 0.4
    kw = dict(block_q=64, block_k=64, q_len=6 * 64 - 5, k_len=nK * 64 - 3)
    limits = BlockPlan.causal_block_limits(**kw, device=DEVICE) if causal else None
    counts, indices = compact_block_mask(bm.to(DEVICE), limits, width)  # Triton (interpreter on CPU)
    ref = BlockPlan.from_block_mask(bm, causal=causal, max_blocks=width, **kw)  # CPU: the torch path
    assert torch.equal(counts.cpu(), ref.kv_counts) and torch.equal(indices.cpu(), ref.kv_indices)


@pytest.mark.parametrize("Lq,Lk", [(100, 100), (64, 200), (200, 64), (1, 77)])
@pytest.mark.parametrize("causal", [True, False])
def test_density_is_exact(Lq, Lk, causal):
    plans = [random_plan(2, 3, Lq, Lk, 32, 16, causal=causal),
             BlockPlan.dense(block_q=32, block_k=32, q_len=Lq, k_len=Lk, causal=causal),
             BlockPlan.from_band(sink=4, window=20, block_q=16, block_k=16, q_len=Lq, k_len=Lk),
             with_extra_columns(random_plan(1, 2, Lq, Lk, 32, 32, density=0.3))]
    visible = BlockPlan.dense(block_q=16, block_k=16, q_len=Lq, k_len=Lk, causal=causal).to_dense_mask(causal)
    for plan in plans:
        mask = plan.to_dense_mask(causal)
        want = mask.sum().item() / (visible.sum().item() * plan.batch * plan.heads)
        assert plan.density(causal) == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert BlockPlan.dense(block_q=32, block_k=32, q_len=Lq, k_len=Lk, causal=causal).density(causal) == 1.0


def test_dense_plan_is_a_broadcast_view():
    plan = BlockPlan.dense(4, 8, q_len=4096, k_len=4096)
    assert plan.kv_indices.stride()[:3] == (0, 0, 0)  # no per-block memory
    assert plan.kv_counts[0, 0].tolist() == list(range(1, 33))
    plan.validate(causal=True)


def test_band_plan_blocks_cover_band_exactly():
    # Every element the band keeps lies in a selected block, and no selected block is useless.
    plan = BlockPlan.from_band(sink=10, window=40, block_q=16, block_k=16, q_len=150, k_len=150)
    no_band = replace(plan, band_sink=None, band_window=None)
    kept = plan.to_dense_mask(True)
    p = torch.arange(150).view(-1, 1)
    j = torch.arange(150).view(1, -1)
    want = ((j < 10) | (p - j < 40)) & (j <= p)
    assert torch.equal(kept[0, 0], want)
    bm = no_band.block_mask()[0, 0]
    for m, n in zip(*torch.nonzero(bm, as_tuple=True)):
        assert kept[0, 0, m * 16:(m + 1) * 16, n * 16:(n + 1) * 16].any()


@pytest.mark.parametrize("mutate,message", [
    (lambda c, i: i.__setitem__((0, 0, 1, 0), -1), "out of range"),
    (lambda c, i: i.__setitem__((0, 0, 1, 0), 99), "out of range"),
    (lambda c, i: i.__setitem__((0, 0, 2, 1), 0), "strictly ascending"),  # duplicate 0, 0
    (lambda c, i: (i.__setitem__((0, 0, 3, 0), 2), i.__setitem__((0, 0, 3, 1), 1)), "strictly ascending"),
    (lambda c, i: c.__setitem__((0, 0, 0), 9), "kv_counts"),
    (lambda c, i: c.__setitem__((0, 0, 0), -1), "kv_counts"),
])
def test_validate_rejects_bad_indices(mutate, message):
    plan = BlockPlan.from_block_mask(torch.ones(1, 1, 4, 4, dtype=torch.bool), block_q=16, block_k=16, q_len=64,
                                     k_len=64, causal=True)
    counts, idx = plan.kv_counts.clone(), plan.kv_indices.clone()
    mutate(counts, idx)
    with pytest.raises(ValueError, match=message):
        replace(plan, kv_counts=counts, kv_indices=idx).validate()


def test_validate_rejects_bad_extras():
    plan = random_plan(1, 1, 64, 64, 16, 16, density=0.5)
    bm = plan.block_mask()[0, 0, 0]
    inside = int(torch.nonzero(bm)[0]) * 16
    ec = torch.ones(1, 1, 4, dtype=torch.int32)
    ei = torch.full((1, 1, 4, 1), inside, dtype=torch.int32)
    ei[0, 0, 1:] = 0
    ec[0, 0, 1:] = 0
    with pytest.raises(ValueError, match="inside a selected key block"):
        replace(plan, extra_counts=ec, extra_indices=ei).validate()
    with pytest.raises(ValueError, match="out of range"):
        replace(plan, extra_counts=ec, extra_indices=torch.full_like(ei, 64)).validate()


def test_structural_errors_are_clear():
    c = torch.zeros(1, 1, 4, dtype=torch.int32)
    i = torch.zeros(1, 1, 4, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="int32"):
        BlockPlan(c.long(), i, 16, 16, 64, 64)
    with pytest.raises(ValueError, match="needs 5"):
        BlockPlan(c, i, 16, 16, 65, 64)
    with pytest.raises(ValueError, match="positive int"):
        BlockPlan(c, i, 0, 16, 64, 64)
    with pytest.raises(ValueError, match="together"):
        BlockPlan(c, i, 16, 16, 64, 64, band_sink=c)
    with pytest.raises(ValueError, match="nQ, nK"):
        BlockPlan.from_block_mask(torch.ones(1, 1, 3, 4, dtype=torch.bool), block_q=16, block_k=16, q_len=64,
                                  k_len=64)


def test_expand_heads_and_to():
    plan = random_plan(1, 2, 40, 40, 16, 16)
    ex = plan.expand_heads(6)
    assert ex.heads == 6 and torch.equal(ex.kv_counts[:, 3], plan.kv_counts[:, 1])
    assert plan.to("cpu").device.type == "cpu"
