"""HiP: the tree search against a recursive loop; a planted needle block; the dense prefix."""

import math

import pytest
import torch

from sparseattn.methods import get_method


def loop_tree(q, k, bs, K, s, sampling):
    """Per (head, query block): descend the s-ary tree over key blocks keeping the K best children
    (score desc, then lower node id), scoring a child by its representative key."""
    _, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G, nQ, nK = Hq // Hkv, math.ceil(Lq / bs), math.ceil(Lk / bs)
    levels = 0
    while s ** levels < nK:
        levels += 1
    out = torch.zeros(1, Hq, nQ, nK, dtype=torch.bool)
    for h in range(Hq):
        kk = k[0, h // G]
        for m in range(nQ):
            rows = range(m * bs, min((m + 1) * bs, Lq))
            end = min(Lk - Lq + rows[-1] + 1, Lk)
            if end <= 0:
                continue
            nodes = [0]
            for level in range(levels - 1, -1, -1):
                width = s ** level * bs
                scored = []
                for c in sorted(c * s + t for c in nodes for t in range(s)):
                    a, b = c * width, min((c + 1) * width, end)
                    if a >= b:
                        continue
                    if sampling == "mean":
                        rep, rep_pos = kk[a:min((c + 1) * width, Lk)].mean(0), a
                    else:
                        rep_pos = a if sampling == "first" else (a + b - 1) // 2
                        rep = kk[rep_pos]
                    seen = [float(q[0, h, i] @ rep) / math.sqrt(D) for i in rows if Lk - Lq + i >= rep_pos]
                    scored.append((-(max(seen) if seen else -1e30), c))
                nodes = sorted(c for _, c in sorted(scored)[:K])
            for c in nodes:
                out[0, h, m, c] = True
    return out


@pytest.mark.parametrize("sampling", ["first", "center", "mean"])
@pytest.mark.parametrize("Lq,Lk,s,K", [(300, 300, 2, 2), (200, 420, 3, 3), (130, 300, 2, 1)])
def test_tree_search_matches_a_recursive_loop(sampling, Lq, Lk, s, K):
    g = torch.Generator().manual_seed(Lq * s + K)
    q = torch.randn(1, 4, Lq, 16, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, Lk, 16, generator=g, dtype=torch.float64)
    m = get_method("hip", block_size=32, mask_k=32 * K, scale_up=s, sampling=sampling)
    assert torch.equal(m.tree_search(q, k, causal=True), loop_tree(q, k, 32, K, s, sampling))


def strong_keys_qkv(L=2560, D=32, n0=1024, n1=1536, Hq=4, Hkv=2, seed=0):
    """Keys n0 .. n1-1 point along u, which every query follows."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(D, generator=g)
    u = u / u.norm()
    q = 3 * u + 0.5 * torch.randn(1, Hq, L, D, generator=g)
    k = 0.5 * torch.randn(1, Hkv, L, D, generator=g)
    k[:, :, n0:n1] += 3 * u
    return q, k, torch.randn(1, Hkv, L, D, generator=g)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_strong_region_is_found_with_the_default_sampling(seed):
    # HiP's locality assumption: a strong run of keys (8 blocks, one node of the tree). One sampled
    # token per node then lands in it. Official defaults otherwise (mask_k=512: 8 blocks).
    q, k, v = strong_keys_qkv(seed=seed)
    plan = get_method("hip", dense_queries=0).plan(q, k, v)
    plan.validate(causal=True)
    bm = plan.block_mask()[0]
    assert bm[:, 1536 // 64 + 3:, 1024 // 64:1536 // 64].all()
    assert plan.density() < 0.5


@pytest.mark.parametrize("n0", [640, 1000, 1900])
def test_planted_needle_block_is_found_with_mean_representatives(n0):
    # An isolated strong block anywhere (not aligned to the tree): a single sampled token of a
    # coarse node rarely hits it, the node mean always sees it.
    q, k, v = strong_keys_qkv(n0=n0, n1=n0 + 64)
    plan = get_method("hip", mask_k=256, sampling="mean", dense_queries=0).plan(q, k, v)
    plan.validate(causal=True)
    mask = plan.to_dense_mask()[0]
    assert mask[:, n0 + 64 + 200:, n0:n0 + 64].all()
    assert int(plan.kv_counts.max()) <= 256 // 64 + 1 + 3  # tree budget + sink + window + diagonal
    assert plan.density() < 0.4


def test_dense_prefix_heuristic_budget_limits_and_determinism():
    m = get_method("hip")
    assert m.num_dense_queries(131072, 131072) == int((math.log2(131072 / 512 / 2) * 512 + 512) * 3)
    assert m.num_dense_queries(20, 4000) == 0  # not a prompt (<= 32 queries)
    q, k, v = strong_keys_qkv(L=1280, n0=640, n1=704)
    plan = get_method("hip", mask_k=128, dense_queries=300).plan(q, k, v)
    counts = plan.kv_counts[0, 0]
    assert torch.equal(counts[:5], torch.arange(1, 6, dtype=torch.int32))  # rows < 300: dense
    assert int(counts[5:].max()) <= 2 + 1 + 2 + 1
    assert get_method("hip", mask_k=10 ** 6).plan(q, k, v).density() == 1.0
    a, b = (get_method("hip", dense_queries=0).plan(q, k, v) for _ in range(2))
    assert torch.equal(a.kv_indices, b.kv_indices) and torch.equal(a.kv_counts, b.kv_counts)


def test_official_defaults():
    m = get_method("hip")
    assert (m.mask_k, m.scale_up, m.sampling, m.sliding_window, m.dense_queries) == (512, 2, "random", 128, None)
    assert (m.block_size, m.sink_blocks, m.gqa_policy) == (64, 1, "per_q_head")
