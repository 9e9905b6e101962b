"""DuoAttention: retrieval heads dense, streaming heads banded; the online default rule."""

import math

import pytest
import torch

from sparseattn.methods import get_method
from sparseattn.plan import NO_WINDOW


def two_kv_heads(L=600, D=32, j_star=200):
    """KV head 0 attends locally (the last 64 keys), KV head 1 to one far key j_star."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(D, generator=g)
    u = u / u.norm() * math.sqrt(D)
    q = u + 0.3 * torch.randn(1, 4, L, D, generator=g)
    k = 0.3 * torch.randn(1, 2, L, D, generator=g)
    k[0, 0, L - 64:] += 4 * u
    k[0, 1, j_star] = 8 * u
    v = torch.randn(1, 2, L, D, generator=g)
    return q, k, v


def test_online_rule_picks_the_head_that_looks_far():
    q, k, v = two_kv_heads()
    m = get_method("duo", block_size=64, sink=4, recent=64)
    outside = m.outside_mass(q, k)[0]
    assert outside[1] > 1.5 and outside[0] < 0.1  # summed over the 2 query heads of a group
    plan = m.plan(q, k, v)
    assert plan.heads == 2 and plan.batch == 1
    assert plan.band_window[0, 1].eq(NO_WINDOW).all() and plan.band_window[0, 0].eq(64).all()
    mask = plan.to_dense_mask()[0]
    assert mask[1, 200:, 200].all() and not mask[0, 300:, 200].any()


@pytest.mark.parametrize("sparsity,n_retrieval", [(0.0, 2), (0.5, 1), (0.7, 1), (1.0, 0)])
def test_sparsity_sets_the_number_of_retrieval_heads(sparsity, n_retrieval):
    q, k, v = two_kv_heads()
    plan = get_method("duo", block_size=64, sink=4, recent=64, sparsity=sparsity).plan(q, k, v)
    assert int(plan.band_window[0, :, 0].eq(NO_WINDOW).sum()) == n_retrieval


def test_given_assignment_per_layer():
    q, k, v = two_kv_heads()
    m = get_method("duo", block_size=64, sink=4, recent=64, retrieval_heads=[[True, False], [False, False]])
    assert m.plan(q, k, v, layer_idx=0).band_window[0, :, 0].tolist() == [NO_WINDOW, 64]
    assert m.plan(q, k, v, layer_idx=1).band_window[0, :, 0].tolist() == [64, 64]
    with pytest.raises(ValueError, match="Hkv=2"):
        get_method("duo", retrieval_heads=[True, False, True, False]).plan(q, k, v)
