"""The shared estimator building blocks of methods/base.py, against plain loops."""

import math

import pytest
import torch

from sparseattn.methods.base import (diagonal_sums, forced_blocks, head_values, pool_blocks, rank_mask,
                                     select_threshold, select_topk)


def row(values):
    return torch.tensor(values, dtype=torch.float32).view(1, 1, 1, -1)


def kept(mask):
    return mask.view(-1).nonzero().view(-1).tolist()


ALL = torch.ones(1, 1, 1, 5, dtype=torch.bool)
NONE = torch.zeros(1, 1, 1, 5, dtype=torch.bool)


def test_topk_breaks_ties_by_lower_index():
    assert kept(select_topk(row([1, 3, 3, 0, 3]), ALL, NONE, torch.tensor([2]))) == [1, 2]
    assert kept(select_topk(row([2, 2, 2, 2, 2]), ALL, NONE, torch.tensor([3]))) == [0, 1, 2]


def test_topk_counts_forced_blocks_and_always_keeps_them():
    forced = torch.tensor([False, False, False, True, False]).view(1, 1, 1, -1)
    assert kept(select_topk(row([1, 3, 2, 0, 5]), ALL, forced, torch.tensor([2]))) == [3, 4]
    both = torch.tensor([True, False, False, True, False]).view(1, 1, 1, -1)
    assert kept(select_topk(row([1, 3, 2, 0, 5]), ALL, both, torch.tensor([1]))) == [0, 3]
    assert kept(select_topk(row([1, 3, 2, 0, 5]), ALL, NONE, torch.tensor([0]))) == []


def test_topk_never_selects_invisible_blocks():
    visible = torch.tensor([True, True, True, False, False]).view(1, 1, 1, -1)
    assert kept(select_topk(row([1, 2, 3, 9, 9]), visible, NONE, torch.tensor([5]))) == [0, 1, 2]
    # forcing a block nobody can see does not make it visible
    assert kept(select_topk(row([1, 2, 3, 9, 9]), visible, ~visible, torch.tensor([0]))) == []


def test_threshold_keeps_the_shortest_prefix_reaching_the_mass():
    masses = row([0.1, 0.5, 0.3, 0.1, 0.0])
    assert kept(select_threshold(masses, ALL, NONE, torch.tensor([0.5]))) == [1]
    assert kept(select_threshold(masses, ALL, NONE, torch.tensor([0.6]))) == [1, 2]
    assert kept(select_threshold(masses, ALL, NONE, torch.tensor([0.95]))) == [0, 1, 2, 3]
    assert kept(select_threshold(masses, ALL, NONE, torch.tensor([0.0]))) == []
    assert kept(select_threshold(masses, ALL, NONE, torch.tensor([1.0]))) == [0, 1, 2, 3, 4]  # zero mass too


def test_threshold_counts_forced_mass_and_ignores_invisible_mass():
    forced = torch.tensor([True, False, False, False, False]).view(1, 1, 1, -1)
    masses = row([0.3, 0.4, 0.2, 0.1, 0.0])
    # forced 0.3, then 0.4 -> 0.7 >= 0.6: stop
    assert kept(select_threshold(masses, ALL, forced, torch.tensor([0.6]))) == [0, 1]
    visible = torch.tensor([True, True, True, False, False]).view(1, 1, 1, -1)
    big = row([0.1, 0.2, 0.1, 100.0, 100.0])  # invisible mass must not enter the total
    assert kept(select_threshold(big, visible, NONE, torch.tensor([0.5]))) == [1]


def test_selectors_use_per_head_budgets_and_survive_nan():
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.1, 0.5, 0.4]]).view(1, 2, 1, 3)
    vis = torch.ones(1, 1, 1, 3, dtype=torch.bool)
    none = torch.zeros_like(vis)
    out = select_threshold(scores, vis, none, torch.tensor([0.0, 1.0]))
    assert out[0, 0].sum() == 0 and out[0, 1].all()
    out = select_topk(scores, vis, none, torch.tensor([1, 2]))
    assert kept(out[0, 0]) == [1] and kept(out[0, 1]) == [1, 2]
    nan = torch.tensor([float("nan"), 1.0, 0.5]).view(1, 1, 1, 3)
    assert kept(select_topk(nan, vis, none, torch.tensor([1]))) == [1]
    assert select_threshold(nan, vis, none, torch.tensor([0.5])).dtype == torch.bool


def test_rank_mask_per_row_counts():
    scores = torch.tensor([[3.0, 1.0, 2.0, 2.0], [0.0, 0.0, 1.0, 0.0]])
    out = rank_mask(scores, torch.tensor([2, 3]))
    assert out.tolist() == [[True, False, True, False], [True, True, True, False]]


def test_diagonal_sums_match_a_loop():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 5, 11, generator=g, dtype=torch.float64)
    P, Lk = 5, 11
    want = torch.zeros(2, 3, Lk, dtype=torch.float64)
    for i in range(P):  # row i sits at position Lk - P + i
        for j in range(Lk):
            t = j + (P - 1 - i)  # the key this diagonal reaches on the last row
            if t < Lk:
                want[..., t] += a[..., i, j]
    assert torch.allclose(diagonal_sums(a), want)


@pytest.mark.parametrize("mode", ["mean", "max", "min"])
def test_pool_blocks_handles_a_partial_last_block(mode):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 10, 3, generator=g)
    out = pool_blocks(x, 4, mode)
    for n, (a, b) in enumerate([(0, 4), (4, 8), (8, 10)]):
        chunk = x[:, :, a:b]
        want = {"mean": chunk.mean(2), "max": chunk.amax(2), "min": chunk.amin(2)}[mode]
        assert torch.allclose(out[:, :, n], want)


def test_forced_blocks_cover_both_diagonal_blocks_of_a_straddling_query_block():
    # Lq=100, Lk=130: query block 0 holds positions 30..93, i.e. key blocks 0 and 1.
    f = forced_blocks(block_q=64, block_k=64, q_len=100, k_len=130, sink_blocks=0, local_blocks=0,
                      diagonal=True, device="cpu")
    assert f.tolist() == [[True, True, False], [False, True, True]]
    f = forced_blocks(block_q=64, block_k=64, q_len=100, k_len=130, sink_blocks=1, local_blocks=1,
                      diagonal=False, device="cpu")
    assert f.tolist() == [[True, False, False], [True, False, False]]


def test_head_values_resolves_scalars_sequences_and_tables():
    kw = dict(q_heads=4, kv_heads=2, device="cpu")
    assert head_values(0.5, name="t", heads=4, layer_idx=None, **kw).tolist() == [0.5] * 4
    assert head_values((1.0, 2.0), name="t", heads=4, layer_idx=None, **kw).tolist() == [1, 1, 2, 2]
    table = ((1.0, 2.0), (3.0, 4.0))
    assert head_values(table, name="t", heads=2, layer_idx=1, **kw).tolist() == [3, 4]
    with pytest.raises(ValueError, match="layer_idx"):
        head_values(table, name="t", heads=2, layer_idx=None, **kw)
    with pytest.raises(ValueError, match="2 layers"):
        head_values(table, name="t", heads=2, layer_idx=2, **kw)
    with pytest.raises(ValueError, match="per-head values"):
        head_values((1.0, 2.0, 3.0, 4.0), name="t", heads=2, layer_idx=None, **kw)
    with pytest.raises(ValueError, match="per-head values"):
        head_values((1.0, 2.0, 3.0), name="t", heads=4, layer_idx=None, **kw)
    assert math.isclose(float(head_values(0.25, name="t", heads=1, layer_idx=None, **kw)), 0.25)
