"""FlexPrefill: dense fallback, budgets, and the query-aware global selection against a loop."""

import math

import pytest
import torch

from sparseattn.methods import get_method


def qkv(L=640, Hq=2, Hkv=1, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, Hq, L, D, generator=g), torch.randn(1, Hkv, L, D, generator=g),
            torch.randn(1, Hkv, L, D, generator=g))


@pytest.mark.parametrize("L,min_budget", [(256, None), (300, 512)])
def test_short_inputs_fall_back_to_dense(L, min_budget):
    q, k, v = qkv(L=L)
    plan = get_method("flexprefill", block_size=128, gamma=0.0, min_budget=min_budget).plan(q, k, v)
    assert plan.density() == 1.0


def test_vertical_slash_budget_rounding():
    q, k, v = qkv(L=1000)
    base = dict(block_size=64, tau=0.0, gamma=0.3)
    new = get_method("flexprefill", **base).plan(q, k, v)
    old = get_method("flexprefill", legacy_budget=True, **base).plan(q, k, v)
    # legacy: tokens // 128 + 1 blocks; new: ceil(tokens / 64) blocks -> about twice as many on 64-blocks
    assert new.kv_counts.sum() > old.kv_counts.sum()
    capped = get_method("flexprefill", max_budget=128, **base).plan(q, k, v)
    # at most 2 vertical + 2 slash blocks (+ the forced diagonal) per row
    assert int(capped.kv_counts.max()) <= 5


def test_query_aware_heads_add_the_global_cumulative_block_map():
    L, bs, gamma = 640, 64, 0.6
    q, k, v = qkv(L=L, Hq=1)
    plan = get_method("flexprefill", block_size=bs, gamma=gamma, tau=1.0).plan(q, k, v)  # tau=1: all query-aware
    got = plan.block_mask()[0, 0]
    nb = L // bs
    qb = q[0, 0].view(nb, bs, -1).mean(1)
    kb = k[0, 0].view(nb, bs, -1).mean(1)
    probs = []
    for i in range(nb):
        logits = torch.tensor([float(qb[i] @ kb[j]) / math.sqrt(16) for j in range(i + 1)])
        p = torch.softmax(logits, 0)
        probs += [(float(p[j]), i, j) for j in range(i + 1)]
    want = torch.zeros(nb, nb, dtype=torch.bool)
    total = 0.0
    for p, i, j in sorted(probs, key=lambda t: -t[0]):  # global, across all rows of the head
        total += p
        if total > gamma * nb:
            break
        want[i, j] = True
    for i in range(nb):  # min budget 1: vertical block 0 and the diagonal
        want[i, 0] = want[i, i] = True
    assert torch.equal(got, want)
