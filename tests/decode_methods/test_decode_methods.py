"""Decode selection methods (dense, streaming, quest): exact selections against brute-force
recomputations, budgets and forced pages, defaults, and attention through the decode kernels."""

import pytest
import torch

from sparseattn.decode_api import sparse_decode_attention
from sparseattn.decode_methods import get_decode_method, list_decode_methods

from ..conftest import HAS_CUDA
from ..kernels.attn_checks import assert_tolerance
from ..kernels.test_decode import BACKENDS, make_cache, make_q, oracle

DEVICE = "cuda" if HAS_CUDA else "cpu"
LENGTHS = [1, 16, 37, 200, 333]


def test_registry_and_defaults():
    # every decode method of the issue, in its table's order
    assert list_decode_methods() == ["dense", "streaming", "quest", "block_topk", "tokenselect", "tidaldecode",
                                     "double_sparsity", "recycled", "delta", "duo", "h2o", "snapkv", "tova",
                                     "pyramidkv"]
    quest = get_decode_method("quest")
    assert (quest.token_budget, quest.min_pages, quest.dense_layers, quest.gqa_policy) == (512, 3, (0, 1), "group_max")
    assert quest.page_budget(16) == 32 and get_decode_method("quest", token_budget=16).page_budget(16) == 3
    streaming = get_decode_method("streaming")
    assert (streaming.sink, streaming.window) == (4, 2000)
    with pytest.raises(ValueError, match="unknown option"):
        get_decode_method("quest", budget=3)
    with pytest.raises(ValueError, match="unknown decode method"):
        get_decode_method("h2o_typo")
    for bad in (dict(token_budget=-1), dict(min_pages=0), dict(gqa_policy="mean"), dict(dense_layers=(-1,))):
        with pytest.raises(ValueError):
            get_decode_method("quest", **bad)
    with pytest.raises(ValueError, match="window"):
        get_decode_method("streaming", window=0)


def test_dense_and_dense_layers_return_none():
    cache = make_cache(2, 2, 32, [40, 9], layers=3)
    q = make_q(2, 4, 1, 32, torch.bfloat16)
    assert get_decode_method("dense").select(q, cache, 2) is None
    quest = get_decode_method("quest", token_budget=16)
    assert quest.select(q, cache, 0) is None and quest.select(q, cache, 1) is None
    assert quest.select(q, cache, 2) is not None


# ----------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("sink,window,Lq", [(4, 20, 1), (0, 5, 1), (7, 33, 3), (4, 2000, 1), (20, 1, 2)])
def test_streaming_selects_exactly_sink_and_window(sink, window, Lq):
    lengths = [max(n, Lq) for n in LENGTHS]
    cache = make_cache(len(lengths), 2, 16, lengths, dtype=torch.float32)
    q = make_q(len(lengths), 2, Lq, 16, torch.float32)
    sel = get_decode_method("streaming", sink=sink, window=window).select(q, cache, 0)
    sel.validate(cache.layer_lengths(0))  # ascending, in range, tokens outside the pages
    L = max(lengths)
    got = sel.token_mask(cache.layer_lengths(0), L)[:, 0].cpu()
    for b, n in enumerate(lengths):
        j = torch.arange(L)
        want = (j < n) & ((j < sink) | (j >= n - Lq - window + 1))
        assert torch.equal(got[b], want), (b, n)


def test_streaming_attention_matches_oracle():
    lengths = [200, 37, 64]
    cache = make_cache(3, 2, 32, lengths)
    q = make_q(3, 8, 2, 32, torch.bfloat16)
    sel = get_decode_method("streaming", sink=3, window=40).select(q, cache, 0)
    out, lse = sparse_decode_attention(q, cache, 0, sel, return_lse=True)
    ref, ref_lse, pt = oracle(q, cache, 0, sel)
    assert_tolerance(out, lse, ref, ref_lse, pt)


# ----------------------------------------------------------------------------- quest
def _brute_force_quest(q, cache, layer, budget, policy):
    """Page sets from float64 min/max recomputed from the dense keys, plain loops."""
    K, _ = cache.gather(layer)
    K = K.double().cpu()
    q = q.double().cpu()
    B, Hq, Lq, D = q.shape
    Hkv, P = cache.num_kv_heads, cache.page_size
    G = Hq // Hkv
    out = []
    for b, n in enumerate(cache.host_lengths(layer)):
        n_pages = -(-n // P)
        forced = set(range((n - Lq) // P, n_pages))
        rows = []
        for hk in range(Hkv):
            U = torch.empty(G, n_pages)
            for p in range(n_pages):
                page = K[b, hk, p * P:min((p + 1) * P, n)]
                mn, mx = page.amin(0), page.amax(0)
                for g in range(G):
                    qq = q[b, hk * G + g]  # [Lq, D]
                    U[g, p] = torch.maximum(qq * mx, qq * mn).sum(-1).max()
            cands = [p for p in range(n_pages) if p not in forced]
            free = max(0, budget - len(forced))
            if policy == "per_q_head":
                chosen = set()
                for g in range(G):
                    chosen |= set(sorted(cands, key=lambda p: (-U[g, p].item(), p))[:free])
            else:
                s = U.amax(0) if policy == "group_max" else U.sum(0)
                chosen = set(sorted(cands, key=lambda p: (-s[p].item(), p))[:free])
            rows.append(sorted(chosen | forced))
        out.append(rows)
    return out


def _pages_of(sel):
    pages, counts = sel.pages.cpu(), sel.page_counts.cpu()
    return [[pages[b, h, :counts[b, h]].tolist() for h in range(pages.shape[1])] for b in range(pages.shape[0])]


@pytest.mark.parametrize("policy", ["group_max", "group_sum", "per_q_head"])
@pytest.mark.parametrize("Lq,budget", [(1, 64), (3, 48), (1, 1000)])
def test_quest_selection_equals_brute_force(policy, Lq, budget):
    lengths = [max(n, Lq) for n in LENGTHS]
    cache = make_cache(len(lengths), 2, 16, lengths, dtype=torch.float32, layers=3)
    q = make_q(len(lengths), 6, Lq, 16, torch.float32)
    quest = get_decode_method("quest", token_budget=budget, gqa_policy=policy)
    sel = quest.select(q, cache, 2)
    sel.validate(cache.layer_lengths(2))
    want = _brute_force_quest(q, cache, 2, quest.page_budget(16), policy)
    assert _pages_of(sel) == want
    if policy != "per_q_head":
        assert int(sel.page_counts.max()) <= max(quest.page_budget(16), Lq // 16 + 2)
    if budget == 1000:  # the budget covers every page: the selection is dense
        n_pages = [-(-n // 16) for n in lengths]
        assert sel.page_counts.cpu().tolist() == [[p, p] for p in n_pages]


def test_quest_finds_a_planted_page_and_matches_dense_closely():
    # One page holds keys aligned with the query: Quest must pick it; with the page and the last
    # page selected, the output is near dense attention.
    D, P, n = 64, 16, 40 * 16 + 5
    cache = make_cache(1, 1, D, [n], dtype=torch.float32, layers=3)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 1, 1, D, generator=g).to(DEVICE).repeat(1, 4, 1, 1)  # one direction for the group
    target = 17
    K = cache.k_pages(2)
    phys = int(cache.page_table[0, target])
    K[phys, 0] = q[0, 0, 0] * 3 + 0.1 * torch.randn(P, D, generator=g).to(DEVICE)
    # Refresh the metadata as an append would (the test edited the pool in place).
    cache.page_meta_pool(2, "min")[phys] = K[phys].amin(1)
    cache.page_meta_pool(2, "max")[phys] = K[phys].amax(1)
    sel = get_decode_method("quest", token_budget=3 * P).select(q, cache, 2)
    pages = _pages_of(sel)[0][0]
    assert target in pages and (n - 1) // P in pages and len(pages) == 3
    out = sparse_decode_attention(q, cache, 2, sel)
    dense = sparse_decode_attention(q, cache, 2, None)
    assert (out - dense).abs().max() < 0.05 * dense.abs().max() + 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_quest_attention_through_both_backends(backend):
    cache = make_cache(3, 2, 64, [300, 45, 129], layers=3)
    q = make_q(3, 8, 1, 64, torch.bfloat16)
    sel = get_decode_method("quest", token_budget=64).select(q, cache, 2)
    ref, ref_lse, pt = oracle(q, cache, 2, sel)
    out, lse = sparse_decode_attention(q, cache, 2, sel, backend=backend, return_lse=True)
    assert_tolerance(out, lse, ref, ref_lse, pt, factor=3.0)


def test_quest_without_min_max_metadata_raises():
    from sparseattn.cache import PagedKVCache

    cache = PagedKVCache(3, 1, 16, dtype=torch.float32, device=DEVICE, metadata=("mean",))
    x = torch.randn(1, 1, 40, 16, device=DEVICE)
    cache.append(2, x, x)
    with pytest.raises(ValueError, match="'min' and 'max'"):
        get_decode_method("quest").select(torch.randn(1, 2, 1, 16, device=DEVICE), cache, 2)


@pytest.mark.parametrize("name", ["streaming", "quest"])
def test_selection_reads_nothing_back(name, monkeypatch):
    cache = make_cache(3, 2, 16, [70, 33, 5], dtype=torch.float32, layers=3)
    q = make_q(3, 4, 1, 16, torch.float32)
    method = get_decode_method(name, **({"token_budget": 32} if name == "quest" else {"window": 20}))

    def forbid(*a, **k):
        raise AssertionError("host read while selecting")

    for attr in ("item", "tolist", "__bool__", "__int__", "__index__", "numpy"):
        monkeypatch.setattr(torch.Tensor, attr, forbid)
    sel = method.select(q, cache, 2)
    monkeypatch.undo()
    sel.validate(cache.layer_lengths(2))
    assert int(sel.page_counts.min()) >= 1
