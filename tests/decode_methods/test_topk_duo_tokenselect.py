"""Decode methods block_topk (Kinetics), duo (DuoAttention) and tokenselect (TokenSelect):
exact selections against brute-force recomputations in plain PyTorch loops, budgets, forced
tokens, planted needles, full budgets equal dense attention, ragged batches, Lq > 1, GQA groups
1 and 3, state over several steps, no host reads, bad configs."""

import math

import pytest
import torch

from sparseattn.cache import PagedKVCache
from sparseattn.decode_api import sparse_decode_attention
from sparseattn.decode_methods import BlockTopKDecode, DuoDecode, TokenSelect, get_decode_method, list_decode_methods
from sparseattn.decode_methods.duo import binarize_gates

from ..conftest import HAS_CUDA
from ..kernels.attn_checks import assert_tolerance
from ..kernels.test_decode import make_cache, make_q, oracle

DEVICE = "cuda" if HAS_CUDA else "cpu"
F64 = torch.float64
LENGTHS = [1, 16, 34, 37, 200, 333]  # 34 with Lq = 3: the new tokens straddle a page edge
GROUPS = [(2, 2), (6, 2)]  # (Hq, Hkv): G = 1 and G = 3


def lengths_for(Lq):
    return [max(n, Lq) for n in LENGTHS]


def cache_from_keys(k, v, lengths, page_size=16, layers=1):
    """A cache holding exactly ``k, v [B, Hkv, T, D]`` (first ``lengths[b]`` tokens of each row)."""
    B, Hkv, T, D = k.shape
    cache = PagedKVCache(layers, Hkv, D, page_size=page_size, dtype=k.dtype, device=DEVICE, max_batch=B,
                         initial_pages=2)
    for layer in range(layers):
        cache.append(layer, k.to(DEVICE), v.to(DEVICE), seq_lens=list(lengths))
    return cache


def append_step(cache, seed, T=1):
    g = torch.Generator().manual_seed(seed)
    B, Hkv, D = cache.batch, cache.num_kv_heads, cache.head_dim
    for layer in range(cache.num_layers):
        k = torch.randn(B, Hkv, T, D, generator=g, dtype=F64).to(DEVICE, cache.dtype)
        cache.append(layer, k, torch.randn(B, Hkv, T, D, generator=g, dtype=F64).to(DEVICE, cache.dtype))


def rows_of_mask(sel, cache, layer=0):
    """Per (b, h) the sorted selected positions (from the selection's token mask oracle)."""
    L = cache.max_length(layer)
    m = sel.token_mask(cache.layer_lengths(layer), L).cpu()
    return [[torch.nonzero(m[b, h]).flatten().tolist() for h in range(m.shape[1])] for b in range(m.shape[0])]


def no_host_reads(monkeypatch, fn):
    def forbid(*a, **k):
        raise AssertionError("host read while selecting")

    for attr in ("item", "tolist", "__bool__", "__int__", "__index__", "numpy"):
        monkeypatch.setattr(torch.Tensor, attr, forbid)
    try:
        return fn()
    finally:
        monkeypatch.undo()


def dense_close(method, q, cache, layer=0):
    sel = method.select(q, cache, layer)
    sel.validate(cache.layer_lengths(layer))
    out = sparse_decode_attention(q, cache, layer, sel, backend="reference")
    dense = sparse_decode_attention(q, cache, layer, None, backend="reference")
    torch.testing.assert_close(out, dense, rtol=1e-10, atol=1e-10)
    return sel


def test_registry_defaults_and_bad_configs():
    names = list_decode_methods()
    assert {"block_topk", "duo", "tokenselect"} <= set(names)
    bt = get_decode_method("block_topk")
    assert isinstance(bt, BlockTopKDecode)
    assert (bt.topk_pages, bt.sink, bt.local, bt.dense_layers) == (64, 4, 0, (0,))
    duo = get_decode_method("duo")
    assert isinstance(duo, DuoDecode)
    assert (duo.sink, duo.recent, duo.sparsity, duo.retrieval_heads, duo.gates) == (64, 256, 0.5, None, None)
    ts = get_decode_method("tokenselect")
    assert isinstance(ts, TokenSelect)
    assert (ts.n_init, ts.n_local, ts.top_k, ts.similarity_threshold, ts.selection_cache, ts.kernel_size,
            ts.logit_scale) == (128, 512, 2048, 0.9, False, -1, 1.0)
    bad = [("block_topk", dict(topk_pages=-1)), ("block_topk", dict(sink=-2)), ("block_topk", dict(local=1.5)),
           ("block_topk", dict(dense_layers=(-1,))),
           ("duo", dict(sink=-1)), ("duo", dict(recent=-1)), ("duo", dict(sparsity=1.5)), ("duo", dict(probe_q=0)),
           ("duo", dict(retrieval_heads=True)), ("duo", dict(retrieval_heads=[1, 2])),
           ("duo", dict(retrieval_heads=[[1, 0], [1]])), ("duo", dict(gates=0.7)), ("duo", dict(gates=["x"])),
           ("duo", dict(retrieval_heads=[1, 0], gates=[0.3, 0.9])), ("duo", dict(gate_sparsity=2.0)),
           ("duo", dict(gate_threshold=-0.1)),
           ("tokenselect", dict(n_init=-1)), ("tokenselect", dict(n_local=0)), ("tokenselect", dict(top_k=-5)),
           ("tokenselect", dict(similarity_threshold=1.5)), ("tokenselect", dict(selection_cache=1)),
           ("tokenselect", dict(kernel_size=0)), ("tokenselect", dict(kernel_size=-3)),
           ("tokenselect", dict(logit_scale=0.0)), ("tokenselect", dict(budget=3))]
    for name, kw in bad:
        with pytest.raises(ValueError):
            get_decode_method(name, **kw)


# ============================================================================= block top-k
def brute_block_topk(q, cache, layer, topk, sink, local):
    """Page lists per (b, kv head) from float64 mean keys recomputed from the dense keys, loops."""
    K, _ = cache.gather(layer)
    K, q = K.double().cpu(), q.double().cpu()
    B, Hq, Lq, D = q.shape
    Hkv, P = cache.num_kv_heads, cache.page_size
    G = Hq // Hkv
    out = []
    for b, n in enumerate(cache.host_lengths(layer)):
        n_pages = -(-n // P)
        forced = {p for p in range(n_pages) if p * P < sink or (p + 1) * P > max(n - Lq - local, 0)}
        rows = []
        for hk in range(Hkv):
            score = {}
            for p in range(n_pages):
                if p in forced:
                    continue
                kbar = K[b, hk, p * P:min((p + 1) * P, n)].mean(0)
                score[p] = sum(float(q[b, hk * G + g, i] @ kbar) for g in range(G) for i in range(Lq)) / (G * Lq)
            chosen = sorted(score, key=lambda p: (-score[p], p))[:topk]
            rows.append(sorted(forced | set(chosen)))
        out.append(rows)
    return out


def pages_of(sel):
    pages, counts = sel.pages.cpu(), sel.page_counts.cpu()
    return [[pages[b, h, :counts[b, h]].tolist() for h in range(pages.shape[1])] for b in range(pages.shape[0])]


@pytest.mark.parametrize("Hq,Hkv", GROUPS)
@pytest.mark.parametrize("Lq,topk,sink,local", [(1, 3, 4, 0), (3, 5, 4, 0), (2, 3, 20, 7),
                                                   (1, 4, 0, 40), (2, 1000, 4, 0)])
def test_block_topk_equals_brute_force(Hq, Hkv, Lq, topk, sink, local):
    lengths = lengths_for(Lq)
    cache = make_cache(len(lengths), Hkv, 16, lengths, dtype=F64, layers=2)
    q = make_q(len(lengths), Hq, Lq, 16, F64)
    method = get_decode_method("block_topk", topk_pages=topk, sink=sink, local=local)
    assert method.select(q, cache, 0) is None  # layer 0 is dense by default
    sel = method.select(q, cache, 1)
    sel.validate(cache.layer_lengths(1))
    assert sel.heads == Hkv and sel.tokens is None
    want = brute_block_topk(q, cache, 1, topk, sink, local)
    assert pages_of(sel) == want
    # Budgets: forced pages + min(topk, candidates), per row.
    P = 16
    for b, n in enumerate(lengths):
        n_pages = -(-n // P)
        n_forced = len({p for p in range(n_pages) if p * P < sink or (p + 1) * P > max(n - Lq - local, 0)})
        assert sel.page_counts[b].cpu().tolist() == [n_forced + min(topk, n_pages - n_forced)] * Hkv
    if topk == 1000:  # the budget covers every page: exactly dense
        dense_close(method, q, cache, 1)


def test_block_topk_finds_a_planted_page_per_kv_head():
    # KV head 0 has a page of keys aligned with its group's query at page 9, KV head 1 at page 4:
    # with one free page each head picks its own needle (group-mean scoring, one list per KV head).
    B, Hkv, G, D, P, n = 2, 2, 3, 32, 16, 16 * 20 + 3
    g = torch.Generator().manual_seed(3)
    k = torch.randn(B, Hkv, n, D, generator=g, dtype=F64) * 0.3
    v = torch.randn(B, Hkv, n, D, generator=g, dtype=F64)
    dirs = torch.randn(Hkv, D, generator=g, dtype=F64)
    q = dirs.repeat_interleave(G, 0).view(1, Hkv * G, 1, D).expand(B, -1, -1, -1).contiguous()
    q = q + 0.05 * torch.randn(q.shape, generator=g, dtype=F64)
    for hk, page in ((0, 9), (1, 4)):
        k[:, hk, page * P:(page + 1) * P] += 2 * dirs[hk]
    cache = cache_from_keys(k, v, [n, n - 40])
    sel = get_decode_method("block_topk", topk_pages=1, sink=4, dense_layers=()).select(q.to(DEVICE), cache, 0)
    sel.validate(cache.layer_lengths(0))
    got = pages_of(sel)
    last = [(n - 1) // P, (n - 41) // P]
    for b in range(B):
        assert got[b][0] == [0, 9, last[b]] and got[b][1] == [0, 4, last[b]]


def test_block_topk_attention_through_reference_and_no_host_reads(monkeypatch):
    cache = make_cache(3, 2, 64, [300, 45, 129], layers=2)
    q = make_q(3, 6, 1, 64, torch.bfloat16)
    method = get_decode_method("block_topk", topk_pages=4)
    sel = no_host_reads(monkeypatch, lambda: method.select(q, cache, 1))
    sel.validate(cache.layer_lengths(1))
    ref, ref_lse, pt = oracle(q, cache, 1, sel)
    out, lse = sparse_decode_attention(q, cache, 1, sel, backend="reference", return_lse=True)
    assert_tolerance(out, lse, ref, ref_lse, pt)


def test_block_topk_needs_mean_metadata():
    cache = PagedKVCache(1, 1, 16, dtype=torch.float32, device=DEVICE, metadata=("min", "max"))
    x = torch.randn(1, 1, 40, 16, device=DEVICE)
    cache.append(0, x, x)
    with pytest.raises(ValueError, match="'mean'"):
        get_decode_method("block_topk", dense_layers=()).select(torch.randn(1, 2, 1, 16, device=DEVICE), cache, 0)


# ============================================================================= duo
def streaming_positions(n, Lq, sink, recent):
    return [j for j in range(n) if j < sink or j >= n - Lq - recent]


@pytest.mark.parametrize("Hq,Hkv", GROUPS)
@pytest.mark.parametrize("Lq,sink,recent", [(1, 4, 20), (3, 7, 33), (1, 0, 0), (2, 64, 256)])
def test_duo_static_table_selects_exact_tokens(Hq, Hkv, Lq, sink, recent):
    lengths = lengths_for(Lq)
    cache = make_cache(len(lengths), Hkv, 16, lengths, dtype=torch.float32, layers=3)
    q = make_q(len(lengths), Hq, Lq, 16, torch.float32)
    table = [[1, 0], [0, 1], [0, 0]]
    method = get_decode_method("duo", sink=sink, recent=recent, retrieval_heads=table)
    for layer in range(3):
        sel = method.select(q, cache, layer)
        sel.validate(cache.layer_lengths(layer))
        assert sel.heads == Hkv
        got = rows_of_mask(sel, cache, layer)
        for b, n in enumerate(lengths):
            for h in range(Hkv):
                want = list(range(n)) if table[layer][h] else streaming_positions(n, Lq, sink, recent)
                assert got[b][h] == want, (layer, b, h)
                # Budget: a streaming head reads sink + recent + the step's Lq tokens (when they fit).
                assert len(got[b][h]) == (n if table[layer][h] else min(n, sink + recent + Lq))


def test_duo_full_and_all_streaming_match_dense_and_streaming():
    lengths = [300, 45, 129]
    cache = make_cache(3, 2, 32, lengths, dtype=F64)
    q = make_q(3, 6, 2, 32, F64)
    dense_close(get_decode_method("duo", retrieval_heads=[1, 1]), q, cache)
    duo = get_decode_method("duo", retrieval_heads=[0, 0], sink=5, recent=30)
    stream = get_decode_method("streaming", sink=5, window=31)
    a = sparse_decode_attention(q, cache, 0, duo.select(q, cache, 0), backend="reference")
    b = sparse_decode_attention(q, cache, 0, stream.select(q, cache, 0), backend="reference")
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # Mixed heads: each group reads what its head type says (oracle through the token mask).
    qb, cb = make_q(3, 6, 1, 32, torch.bfloat16), make_cache(3, 2, 32, lengths)
    sel = get_decode_method("duo", retrieval_heads=[0, 1], sink=5, recent=30).select(qb, cb, 0)
    ref, ref_lse, pt = oracle(qb, cb, 0, sel)
    out, lse = sparse_decode_attention(qb, cb, 0, sel, backend="reference", return_lse=True)
    assert_tolerance(out, lse, ref, ref_lse, pt)


def test_duo_gates_binarised_like_the_official_code():
    gates = [[0.9, 0.2, 0.5], [0.51, 0.0, 1.3], [0.3, 0.7, -0.2]]  # clipped to [0, 1] first
    assert binarize_gates(tuple(tuple(min(1, max(0, x)) for x in r) for r in gates)) == (
        (True, False, False), (True, False, True), (False, True, False))
    m = get_decode_method("duo", gates=gates)
    assert m.static_retrieval(1, q_heads=3, kv_heads=3, device="cpu").tolist() == [True, False, True]
    # sparsity quantile (sparsify_attention_heads): 2/3 of the 9 heads streaming -> the top 3 gates.
    m = get_decode_method("duo", gates=gates, gate_sparsity=2 / 3)
    table = [m.static_retrieval(i, q_heads=3, kv_heads=3, device="cpu").tolist() for i in range(3)]
    assert table == [[True, False, False], [False, False, True], [False, True, False]]
    assert not any(get_decode_method("duo", gates=gates, gate_sparsity=1.0)._assignment[0])
    assert all(all(r) for r in get_decode_method("duo", gates=gates, gate_sparsity=0.0)._assignment)
    flat = get_decode_method("duo", gates=[0.2, 0.8])
    assert flat.static_retrieval(7, q_heads=4, kv_heads=2, device="cpu").tolist() == [False, True]


def test_duo_assignment_shape_errors():
    cache = make_cache(1, 2, 16, [50], dtype=torch.float32, layers=2)
    q = make_q(1, 4, 1, 16, torch.float32)
    with pytest.raises(ValueError, match="per-query-head"):
        get_decode_method("duo", retrieval_heads=[1, 0, 0, 1]).select(q, cache, 0)
    with pytest.raises(ValueError, match="layers"):
        get_decode_method("duo", retrieval_heads=[[1, 0]]).select(q, cache, 1)


def brute_outside_mass(q, cache, layer, sink, recent, probe):
    K, _ = cache.gather(layer)
    K, q = K.double().cpu(), q.double().cpu()
    B, Hq, Lq, D = q.shape
    Hkv = cache.num_kv_heads
    G = Hq // Hkv
    P = min(probe, Lq)
    out = torch.zeros(B, Hkv, dtype=F64)
    for b, n in enumerate(cache.host_lengths(layer)):
        for hk in range(Hkv):
            for g in range(G):
                for i in range(Lq - P, Lq):
                    pos = n - Lq + i
                    if pos < 0:
                        continue
                    s = torch.tensor([float(q[b, hk * G + g, i] @ K[b, hk, j]) / math.sqrt(D) for j in range(pos + 1)],
                                     dtype=F64)
                    p = torch.softmax(s, 0)
                    out[b, hk] += sum(float(p[j]) for j in range(pos + 1) if j >= sink and pos - j > recent) / P
    return out


def test_duo_default_rule_brute_force_and_needle():
    # Sequence 0: KV head 1's keys hold a far needle its query matches -> much mass outside the
    # streaming pattern -> retrieval; sequence 1: the needle is in KV head 2.
    B, Hkv, G, D, n = 2, 4, 3, 16, 150
    g = torch.Generator().manual_seed(7)
    k = torch.randn(B, Hkv, n, D, generator=g, dtype=F64) * 0.2
    v = torch.randn(B, Hkv, n, D, generator=g, dtype=F64)
    q = torch.randn(B, Hkv * G, 2, D, generator=g, dtype=F64)
    for b, hk in ((0, 1), (1, 2)):
        k[b, hk, 60] = 3 * q[b, hk * G:(hk + 1) * G].mean((0, 1))
    cache = cache_from_keys(k, v, [n, n - 9])
    method = get_decode_method("duo", sink=4, recent=32, sparsity=0.75, probe_q=2)
    mass = method.outside_mass(q.to(DEVICE), cache, 0).cpu()
    torch.testing.assert_close(mass, brute_outside_mass(q, cache, 0, 4, 32, 2), rtol=1e-9, atol=1e-12)
    sel = method.select(q.to(DEVICE), cache, 0)
    sel.validate(cache.layer_lengths(0))
    counts = sel.page_counts.cpu()
    retr = method.state(cache, 0)["retrieval"].cpu()
    assert retr.tolist() == [[False, True, False, False], [False, False, True, False]]
    assert counts[0, 1] == 10 and counts[1, 2] == 9  # retrieval heads: every page
    assert sel.token_counts.cpu()[0, 1] == 0 and sel.token_counts.cpu()[0, 0] > 0


def test_duo_default_rule_from_prefill_is_frozen_over_steps(monkeypatch):
    B, Hkv, G, D, n = 2, 2, 1, 16, 120
    g = torch.Generator().manual_seed(9)
    k = torch.randn(B, Hkv, n, D, generator=g, dtype=F64) * 0.2
    v = torch.randn(B, Hkv, n, D, generator=g, dtype=F64)
    q_prompt = torch.randn(B, Hkv * G, n, D, generator=g, dtype=F64)
    q_later = torch.randn(B, Hkv * G, 8, D, generator=g, dtype=F64)
    k[:, 0, 10] = 4 * q_prompt[:, 0, -8:].mean(1)  # head 0: the prompt's last queries look far back
    k[:, 1, 20] = 4 * q_later[:, 1].mean(1)  # head 1: a later chunk's queries would
    cache = cache_from_keys(k, v, [n, n])
    method = get_decode_method("duo", sink=2, recent=16, probe_q=8)
    method.on_prefill(q_prompt.to(DEVICE), cache, 0)
    first = method.state(cache, 0)["retrieval"].clone()
    assert first.cpu().tolist() == [[True, False], [True, False]]
    assert method.online_retrieval(q_later.to(DEVICE), cache, 0).cpu().tolist() == [[False, True], [False, True]]
    method.on_prefill(q_later.to(DEVICE), cache, 0)  # a later prompt chunk: the assignment stays
    assert torch.equal(method.state(cache, 0)["retrieval"], first)
    for step in range(3):  # later steps (queries pointing elsewhere) keep the frozen assignment
        append_step(cache, 100 + step)
        q = make_q(B, Hkv * G, 1, D, F64, seed=step)
        sel = no_host_reads(monkeypatch, lambda: method.select(q, cache, 0))
        sel.validate(cache.layer_lengths(0))
        assert torch.equal(method.state(cache, 0)["retrieval"], first)
        assert sel.page_counts.cpu()[:, 0].tolist() == [-(-(n + step + 1) // 16)] * B
    cache.reset()
    assert method.state(cache, 0) == {}


# ============================================================================= tokenselect
def brute_tokenselect(q, cache, layer, n_init, n_local, top_k, scale, kernel_size=-1):
    """Token lists per sequence from float64 loops: mean query per head, softmax over the
    candidates per head, sum over heads, optional maxpool over the candidates, top-k."""
    K, _ = cache.gather(layer)
    K, q = K.double().cpu(), q.double().cpu()
    B, Hq, Lq, D = q.shape
    G = Hq // cache.num_kv_heads
    scale = D ** -0.5 if scale is None else scale
    qbar = q.mean(2)
    out = []
    for b, n in enumerate(cache.host_lengths(layer)):
        local_start = max(0, n - Lq + 1 - n_local)
        cands = [j for j in range(n_init, local_start)]
        S = [0.0] * len(cands)
        for h in range(Hq):
            if not cands:
                break
            s = torch.tensor([float(qbar[b, h] @ K[b, h // G, j]) * scale for j in cands], dtype=F64)
            p = torch.softmax(s, 0)
            S = [S[i] + float(p[i]) for i in range(len(cands))]
        if kernel_size > 1:
            left = (kernel_size - 1) // 2
            S = [max(S[max(0, i - left):i - left + kernel_size]) for i in range(len(cands))]
        order = sorted(range(len(cands)), key=lambda i: (-S[i], i))[:top_k]
        chosen = {cands[i] for i in order}
        forced = {j for j in range(n) if j < n_init or j >= local_start}
        out.append(sorted(forced | chosen))
    return out


@pytest.mark.parametrize("Hq,Hkv", GROUPS)
@pytest.mark.parametrize("Lq,n_init,n_local,top_k,scale,ks", [(1, 4, 16, 20, 1.0, -1), (3, 8, 5, 7, None, -1),
                                                               (1, 0, 1, 33, 1.0, 5), (2, 3, 9, 12, 1.0, 6)])
def test_tokenselect_equals_brute_force(Hq, Hkv, Lq, n_init, n_local, top_k, scale, ks):
    lengths = lengths_for(Lq)
    cache = make_cache(len(lengths), Hkv, 16, lengths, dtype=F64)
    q = make_q(len(lengths), Hq, Lq, 16, F64)
    method = get_decode_method("tokenselect", n_init=n_init, n_local=n_local, top_k=top_k, logit_scale=scale,
                               kernel_size=ks)
    sel = method.select(q, cache, 0)
    sel.validate(cache.layer_lengths(0))
    assert sel.heads == 1 and sel.pages is None
    got = [r[0] for r in rows_of_mask(sel, cache)]
    assert got == brute_tokenselect(q, cache, 0, n_init, n_local, top_k, scale, ks)
    for b, n in enumerate(lengths):  # budget: init + local + min(top_k, candidates), exactly
        local_start = max(0, n - Lq + 1 - n_local)
        n_forced = min(n, n_init) + n - max(local_start, min(n, n_init))
        assert len(got[b]) == n_forced + min(top_k, max(0, local_start - n_init))


def test_tokenselect_full_budget_equals_dense_and_attention_oracle():
    lengths = [200, 37, 64]
    cache = make_cache(3, 2, 32, lengths, dtype=F64)
    q = make_q(3, 6, 2, 32, F64)
    dense_close(get_decode_method("tokenselect", n_init=4, n_local=8, top_k=500), q, cache)
    qb, cb = make_q(3, 6, 1, 32, torch.bfloat16), make_cache(3, 2, 32, lengths)
    sel = get_decode_method("tokenselect", n_init=4, n_local=16, top_k=24).select(qb, cb, 0)
    ref, ref_lse, pt = oracle(qb, cb, 0, sel)
    out, lse = sparse_decode_attention(qb, cb, 0, sel, backend="reference", return_lse=True)
    assert_tolerance(out, lse, ref, ref_lse, pt)


def planted(B=2, Hkv=2, G=3, D=16, n=300, needle=100, seed=11):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, Hkv, n, D, generator=g, dtype=F64) * 0.3
    v = torch.randn(B, Hkv, n, D, generator=g, dtype=F64)
    q = torch.randn(B, Hkv * G, 1, D, generator=g, dtype=F64)
    for hk in range(Hkv):
        k[:, hk, needle] = 3 * q[:, hk * G:(hk + 1) * G, 0].mean(1)
    return q, cache_from_keys(k, v, [n] * B)


def test_tokenselect_finds_a_planted_needle():
    q, cache = planted()
    method = get_decode_method("tokenselect", n_init=4, n_local=16, top_k=1)
    got = [r[0] for r in rows_of_mask(method.select(q.to(DEVICE), cache, 0), cache)]
    assert all(row == list(range(4)) + [100] + list(range(284, 300)) for row in got)


def test_tokenselect_selection_cache_over_steps(monkeypatch):
    q, cache = planted(needle=100)
    q = q.to(DEVICE)
    method = get_decode_method("tokenselect", n_init=4, n_local=16, top_k=3, selection_cache=True)
    plain = get_decode_method("tokenselect", n_init=4, n_local=16, top_k=3)

    def chosen(m, qq):
        sel = no_host_reads(monkeypatch, lambda: m.select(qq, cache, 0))
        sel.validate(cache.layer_lengths(0))
        n = cache.max_length(0)
        return [[j for j in r[0] if 4 <= j < n - 16] for r in rows_of_mask(sel, cache)]

    first = chosen(method, q)
    assert method.state(cache, 0)["reused"].tolist() == [False, False]
    assert all(100 in r for r in first) and first == chosen(plain, q)
    # Move the needle: a fresh selection finds it at 200, the cache (same query, cos = 1) keeps 100.
    append_step(cache, 1)
    K = cache.k_pages(0)
    for b in range(2):
        page, slot = int(cache.page_table[b, 200 // 16]), 200 % 16
        K[page, :, slot] = K[int(cache.page_table[b, 100 // 16]), :, 100 % 16]
    fresh = chosen(plain, q)
    assert all(200 in r for r in fresh)
    assert chosen(method, q) == first and method.state(cache, 0)["reused"].tolist() == [True, True]
    # Sequence 1 gets a dissimilar query (cos < 0.9): it refreshes, sequence 0 still reuses.
    q2 = q.clone()
    q2[1] = -q2[1]
    got = chosen(method, q2)
    assert method.state(cache, 0)["reused"].tolist() == [True, False]
    assert got[0] == first[0] and got[1] == chosen(plain, q2)[1]
    # The refreshed row's fingerprint is the new query's: reusing it next step.
    append_step(cache, 2)
    assert chosen(method, q2)[1] == got[1] and method.state(cache, 0)["reused"].tolist() == [True, True]
    # A drifting query is compared with the fingerprint of the last refresh, not of the last step:
    # each step is within the threshold of the previous one, the third is not of the first.
    assert method.state(cache, 0) != {}
    cache.reset()
    assert method.state(cache, 0) == {}
    q, cache = planted(B=1, seed=12)  # ``chosen`` reads the rebound name
    D = q.shape[-1]
    a, b = torch.zeros(D, dtype=F64), torch.zeros(D, dtype=F64)
    a[0], b[1] = 1.0, 1.0
    drift = [math.cos(t) * a + math.sin(t) * b for t in (0.0, 0.4, 0.8)]  # cos 0.92 per step, 0.70 overall
    reused = []
    for step, d in enumerate(drift):
        qd = d.view(1, 1, 1, D).expand(1, q.shape[1], 1, D).contiguous().to(DEVICE)
        chosen(method, qd)
        reused.append(method.state(cache, 0)["reused"].tolist()[0])
        append_step(cache, 20 + step)
    assert reused == [False, True, False]


def test_tokenselect_ragged_batch_with_short_sequences_and_gqa3():
    lengths = [5, 70, 333, 1]
    cache = make_cache(4, 2, 16, lengths, dtype=F64)
    q = make_q(4, 6, 1, 16, F64)
    method = get_decode_method("tokenselect", n_init=3, n_local=10, top_k=6, selection_cache=True)
    sel = method.select(q, cache, 0)
    sel.validate(cache.layer_lengths(0))
    got = [r[0] for r in rows_of_mask(sel, cache)]
    assert got == brute_tokenselect(q, cache, 0, 3, 10, 6, 1.0)
    assert [len(r) for r in got] == [5, 19, 19, 1]
