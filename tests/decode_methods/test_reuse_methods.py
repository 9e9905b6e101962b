"""Decode methods that reuse an exact-attention selection across layers (TidalDecode, DELTA) or
steps (Recycled Attention): selections against brute-force recomputations in plain PyTorch,
budgets, forced tokens/pages, planted needles, full budget == dense, and the reuse state
(stored selection read as is, re-selection, counter wrap, per-cache state, reset)."""

import math

import pytest
import torch

from sparseattn.decode_api import sparse_decode_attention
from sparseattn.decode_methods import get_decode_method, list_decode_methods

from ..conftest import HAS_CUDA
from ..kernels.attn_checks import assert_tolerance
from ..kernels.test_decode import make_cache, make_q, oracle

DEVICE = "cuda" if HAS_CUDA else "cpu"
F64 = torch.float64
LENGTHS = [1 + 3, 16, 37, 130, 75]  # partial pages, an exact page, ragged
FORBIDDEN = ("item", "tolist", "__bool__", "__int__", "__index__", "numpy")


# ----------------------------------------------------------------------------- brute-force helpers
def bf_probs(q, cache, layer):
    """Per sequence: float64 softmax probabilities [Hq, Lq, n] of each new query over the tokens it
    sees (0 in its future), recomputed from the dense keys with plain loops."""
    K, _ = cache.gather(layer)
    K, q = K.double().cpu(), q.double().cpu()
    B, Hq, Lq, D = q.shape
    G = Hq // cache.num_kv_heads
    out = []
    for b, n in enumerate(cache.host_lengths(layer)):
        p = torch.zeros(Hq, Lq, n, dtype=F64)
        for h in range(Hq):
            for i in range(Lq):
                pos = n - Lq + i
                s = K[b, h // G, :pos + 1] @ q[b, h, i] / math.sqrt(D)
                p[h, i, :pos + 1] = torch.softmax(s, 0)
        out.append(p)
    return out


def rnd(*shape, dtype=F64):
    return torch.randn(*shape, dtype=dtype).to(DEVICE)


def top(cands, score, k):
    return set(sorted(cands, key=lambda j: (-float(score[j]), j))[:k])


def group_score(p, policy):
    """p [G, Lq, n] -> [n]."""
    if policy == "group_max":
        return p.amax(dim=(0, 1))
    if policy == "group_sum":
        return p.sum(dim=(0, 1))
    return p[0].amax(0)  # first_head


def bf_tidal(q, cache, layer, budget, policy):
    Hkv = cache.num_kv_heads
    Lq = q.shape[2]
    G = q.shape[1] // Hkv
    out = []
    for b, p in enumerate(bf_probs(q, cache, layer)):
        n = p.shape[-1]
        cands, free = range(n - Lq), max(0, budget - Lq)
        rows = []
        for hk in range(Hkv):
            pg = p[hk * G:(hk + 1) * G]
            if policy == "per_q_head":
                chosen = set()
                for g in range(G):
                    chosen |= top(cands, pg[g].amax(0), free)
            else:
                chosen = top(cands, group_score(pg, policy), free)
            rows.append(sorted(chosen | set(range(n - Lq, n))))
        out.append(rows)
    return out


def bf_recycled(q, cache, layer, k, policy):
    """(recycled sets per [b][hk], base per b) of a full step with queries q."""
    Hkv = cache.num_kv_heads
    Lq = q.shape[2]
    G = q.shape[1] // Hkv
    sets, bases = [], []
    for b, p in enumerate(bf_probs(q, cache, layer)):
        base = p.shape[-1] - Lq
        sets.append([top(range(base), group_score(p[hk * G:(hk + 1) * G], policy), k) for hk in range(Hkv)])
        bases.append(base)
    return sets, bases


def bf_delta(q, cache, layer, budget, recent):
    P, Lq = cache.page_size, q.shape[2]
    out = []
    for p in bf_probs(q, cache, layer):
        n = p.shape[-1]
        tok = p.amax(dim=(0, 1))  # max over every query head and new query
        n_pages = -(-n // P)
        page = [float(tok[u * P:(u + 1) * P].sum()) for u in range(n_pages)]
        forced = set(range(max(0, n_pages - recent), n_pages)) | set(range((n - Lq) // P, n_pages))
        cands = [u for u in range(n_pages) if u not in forced]
        out.append(sorted(top(cands, page, max(0, budget - len(forced))) | forced))
    return out


def tokens_of(sel):
    t, c = sel.tokens.cpu(), sel.token_counts.cpu()
    return [[t[b, h, :c[b, h]].tolist() for h in range(t.shape[1])] for b in range(t.shape[0])]


def pages_of(sel):
    p, c = sel.pages.cpu(), sel.page_counts.cpu()
    return [[p[b, h, :c[b, h]].tolist() for h in range(p.shape[1])] for b in range(p.shape[0])]


def append_token(cache, layer, seed, lengths_step=None):
    """One new token per sequence at ``layer`` (``lengths_step``: per-sequence 0/1, default all)."""
    g = torch.Generator().manual_seed(seed)
    B, H, D = cache.batch, cache.num_kv_heads, cache.head_dim
    k = torch.randn(B, H, 1, D, generator=g).to(DEVICE, cache.dtype)
    v = torch.randn(B, H, 1, D, generator=g).to(DEVICE, cache.dtype)
    cache.append(layer, k, v, seq_lens=lengths_step)


def decode_step(method, cache, Hq, seed):
    """A model step: for each layer in ascending order append the token, then select. Returns
    (queries, selections) per layer."""
    qs, sels = [], []
    for layer in range(cache.num_layers):
        append_token(cache, layer, seed * 100 + layer)
        q = make_q(cache.batch, Hq, 1, cache.head_dim, cache.dtype, seed=seed * 100 + layer + 50)
        qs.append(q)
        sels.append(method.select(q, cache, layer))
    return qs, sels


def plant(cache, layer, b, hk, t, key):
    """Overwrite the key of token t of sequence b, KV head hk (TidalDecode/DELTA/Recycled read no metadata)."""
    P = cache.page_size
    phys = int(cache.page_table[b, t // P])
    cache.k_pages(layer)[phys, hk, t % P] = key.to(cache.dtype)


def same_output(q, cache, layer, sel):
    out = sparse_decode_attention(q, cache, layer, sel, backend="reference")
    dense = sparse_decode_attention(q, cache, layer, None, backend="reference")
    torch.testing.assert_close(out, dense, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- registry / config
def test_registry_defaults_and_bad_config():
    names = list_decode_methods()
    assert {"tidaldecode", "recycled", "delta"} <= set(names)
    tidal = get_decode_method("tidaldecode")
    assert (tidal.token_budget, tidal.dense_layers, tidal.selection_layers, tidal.gqa_policy) == \
        (256, (0, 1), None, "group_max")
    assert tidal.selection_layers_for(32) == (2, 13)
    assert tidal.selection_layers_for(28) == (2, 11) and tidal.selection_layers_for(16) == (2, 7)
    assert tidal.selection_layers_for(80) == (2, 33) and tidal.selection_layers_for(4) == (2,)
    assert tidal.selection_layers_for(2) == ()
    assert get_decode_method("tidaldecode", selection_layers=[9, 2]).selection_layers_for(8) == (2,)
    rec = get_decode_method("recycled")
    assert (rec.top_k, rec.stride, rec.gqa_policy, rec.dense_layers) == (4096, 50, "group_max", ())
    delta = get_decode_method("delta")
    assert (delta.page_budget, delta.recent_pages, delta.dense_layers, delta.delta_layers) == (64, 8, (0, 1),
                                                                                              (2, 14, 22))
    bad = [("tidaldecode", dict(token_budget=0)), ("tidaldecode", dict(gqa_policy="mean")),
           ("tidaldecode", dict(selection_layers=())), ("tidaldecode", dict(selection_layers=(1, 5))),
           ("tidaldecode", dict(selection_layers=(-2,))), ("tidaldecode", dict(token_budget=2.5)),
           ("recycled", dict(top_k=0)), ("recycled", dict(stride=0)), ("recycled", dict(gqa_policy="per_q_head")),
           ("delta", dict(page_budget=0)), ("delta", dict(recent_pages=65)), ("delta", dict(recent_pages=-1)),
           ("delta", dict(delta_layers=())), ("delta", dict(delta_layers=(1, 3))),
           ("delta", dict(budget=3))]
    for name, kw in bad:
        with pytest.raises(ValueError):
            get_decode_method(name, **kw)


# ----------------------------------------------------------------------------- TidalDecode
@pytest.mark.parametrize("policy", ["group_max", "group_sum", "per_q_head"])
@pytest.mark.parametrize("Hq,Lq,budget", [(2, 1, 12), (6, 1, 20), (6, 3, 9), (2, 2, 1), (6, 1, 10_000)])
def test_tidal_selection_equals_brute_force(policy, Hq, Lq, budget):
    cache = make_cache(5, 2, 16, LENGTHS, dtype=F64, layers=3)
    q = make_q(5, Hq, Lq, 16, F64)
    method = get_decode_method("tidaldecode", token_budget=budget, gqa_policy=policy, selection_layers=(2,))
    sel = method.choose(q, cache, 2)
    sel.validate(cache.layer_lengths(2))
    got, want = tokens_of(sel), bf_tidal(q, cache, 2, budget, policy)
    assert got == want
    G = Hq // 2
    for b, n in enumerate(LENGTHS):
        for row in got[b]:
            assert set(range(n - Lq, n)) <= set(row)  # the step's own tokens
            if policy != "per_q_head" or G == 1:
                assert len(row) == min(n, max(budget, Lq))  # the budget, forced tokens counted
            else:
                assert min(n, max(budget, Lq)) <= len(row) <= min(n, Lq + G * max(0, budget - Lq))
    if budget >= max(LENGTHS):  # the budget covers everything: same output as dense
        same_output(q, cache, 2, sel)


def test_tidal_layers_reuse_the_stored_selection_and_reselect():
    Hq, L = 6, 7
    cache = make_cache(3, 2, 16, [70, 33, 150], dtype=F64, layers=L)
    method = get_decode_method("tidaldecode", token_budget=10, selection_layers=(2, 5))
    for step in range(3):
        qs, sels = decode_step(method, cache, Hq, seed=step + 1)
        assert sels[0] is None and sels[1] is None  # dense layers
        assert sels[2] is None and sels[5] is None  # selection layers attend densely
        st = method.state(cache)
        assert st["layer"] == 5
        # layers 3, 4 read exactly layer 2's selection; 6 reads layer 5's (the re-selection)
        want2 = bf_tidal(qs[2], cache, 2, 10, "group_max")
        want5 = bf_tidal(qs[5], cache, 5, 10, "group_max")
        assert sels[3] is sels[4] and tokens_of(sels[3]) == want2
        assert tokens_of(sels[6]) == want5 and sels[6] is st["selection"]
        assert want2 != want5
        for layer in (3, 4, 6):
            sels[layer].validate(cache.layer_lengths(layer))
            out, lse = sparse_decode_attention(qs[layer], cache, layer, sels[layer], return_lse=True)
            ref, ref_lse, pt = oracle(qs[layer], cache, layer, sels[layer])
            assert_tolerance(out, lse, ref, ref_lse, pt)
        assert tokens_of(sels[3])[0][0][-1] == cache.host_lengths(3)[0] - 1  # the new token is read
    # A new step whose selection layer has not run yet: no stale reuse (dense).
    for layer in range(L):
        append_token(cache, layer, 999 + layer)
    q = make_q(3, Hq, 1, 16, F64)
    assert method.select(q, cache, 6) is None  # layer 5's selection is from the previous step
    assert method.select(q, cache, 3) is None


def test_tidal_state_is_per_cache_and_reset_drops_it():
    method = get_decode_method("tidaldecode", token_budget=6, selection_layers=(2,))
    a = make_cache(2, 2, 16, [40, 50], dtype=F64, layers=4, seed=1)
    b = make_cache(2, 2, 16, [40, 50], dtype=F64, layers=4, seed=2)  # same lengths, other keys
    qa, qb = make_q(2, 4, 1, 16, F64, seed=3), make_q(2, 4, 1, 16, F64, seed=4)
    assert method.select(qa, a, 2) is None and method.select(qb, b, 2) is None
    sa, sb = method.select(qa, a, 3), method.select(qb, b, 3)
    assert sa is method.state(a)["selection"] and sb is method.state(b)["selection"] and sa is not sb
    assert tokens_of(sa) == bf_tidal(qa, a, 2, 6, "group_max") and tokens_of(sb) == bf_tidal(qb, b, 2, 6, "group_max")
    a.reset()
    assert a.method_state == {} and method.state(b)["selection"] is sb
    for layer in range(4):
        a.append(layer, rnd(2, 2, 45, 16), rnd(2, 2, 45, 16))
    assert method.select(make_q(2, 4, 1, 16, F64), a, 3) is None  # nothing stored after the reset


def test_tidal_finds_a_planted_needle():
    D, n = 16, 300
    cache = make_cache(2, 2, D, [n, 200], dtype=torch.float32, layers=3)
    q = make_q(2, 6, 1, D, torch.float32, seed=7)
    targets = [[123, 17], [45, 190]]
    for b in range(2):
        for hk in range(2):
            plant(cache, 2, b, hk, targets[b][hk], 3 * q[b, hk * 3 + 1, 0])  # one head of the group
    for policy in ("group_max", "group_sum", "per_q_head"):
        sel = get_decode_method("tidaldecode", token_budget=4, gqa_policy=policy, selection_layers=(2,)).choose(
            q, cache, 2)
        got = tokens_of(sel)
        for b in range(2):
            for hk in range(2):
                assert targets[b][hk] in got[b][hk], (policy, b, hk)


# ----------------------------------------------------------------------------- Recycled Attention
@pytest.mark.parametrize("policy", ["group_max", "group_sum", "first_head"])
@pytest.mark.parametrize("Hq", [2, 6])
def test_recycled_steps_equal_brute_force_and_counter_wraps(policy, Hq):
    S, K = 3, 7
    lengths = [40, 9, 66]
    cache = make_cache(3, 2, 16, lengths, dtype=F64, layers=1)
    method = get_decode_method("recycled", top_k=K, stride=S, gqa_policy=policy)
    expected = None
    ragged = [[1, 1, 1], [1, 0, 1], [0, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1]]
    for step, counts in enumerate(ragged):
        append_token(cache, 0, 10 + step, counts)
        q = make_q(3, Hq, 1, 16, F64, seed=20 + step)
        sel = method.select(q, cache, 0)
        if step % S == 0:  # full step: dense, recycled set refreshed from this step's attention
            assert sel is None
            expected = bf_recycled(q, cache, 0, K, policy)
        else:
            sets, bases = expected
            sel.validate(cache.layer_lengths(0))
            want = [[sorted(sets[b][hk]) + list(range(bases[b], n)) for hk in range(2)]
                    for b, n in enumerate(cache.host_lengths(0))]
            assert tokens_of(sel) == want
            for b, n in enumerate(cache.host_lengths(0)):
                assert int(sel.token_counts[b, 0]) == min(K, bases[b]) + n - bases[b]  # budget + generated since
                assert tokens_of(sel)[b][0][-1] == n - 1  # the newest token is read
            out, lse = sparse_decode_attention(q, cache, 0, sel, return_lse=True)
            ref, ref_lse, pt = oracle(q, cache, 0, sel)
            assert_tolerance(out, lse, ref, ref_lse, pt)
        assert method.state(cache, 0)["step"] == (step + 1) % S  # host int counter, wraps every S steps
        assert isinstance(method.state(cache, 0)["step"], int)


def test_recycled_prefill_initialises_and_lq_gt_1():
    S, K, Hq = 4, 5, 6
    cache = make_cache(2, 2, 16, [50, 31], dtype=F64, layers=2, steps=0)
    method = get_decode_method("recycled", top_k=K, stride=S)
    prompt_q = make_q(2, Hq, 50, 16, F64, seed=3)
    method.on_prefill(prompt_q, cache, 1)  # the last column is each sequence's last prompt token
    st = method.state(cache, 1)
    assert st["step"] == 1
    sets, bases = bf_recycled(prompt_q[:, :, -1:], cache, 1, K, "group_max")
    assert bases == [49, 30]
    for layer in range(2):
        cache.append(layer, rnd(2, 2, 2, 16), rnd(2, 2, 2, 16))
    q = make_q(2, Hq, 2, 16, F64, seed=4)
    sel = method.select(q, cache, 1)  # a recycle step right after the prompt
    want = [[sorted(sets[b][hk]) + list(range(bases[b], n)) for hk in range(2)]
            for b, n in enumerate(cache.host_lengths(1))]
    assert tokens_of(sel) == want
    ref, ref_lse, pt = oracle(q, cache, 1, sel)
    out, lse = sparse_decode_attention(q, cache, 1, sel, return_lse=True)
    assert_tolerance(out, lse, ref, ref_lse, pt)
    # Layer 0 got no prefill hook: its first step is a full step (Lq = 2: the two new tokens are
    # "generated since", the recycled set is picked among the older ones).
    assert method.select(q, cache, 0) is None
    s0, b0 = bf_recycled(q, cache, 0, K, "group_max")
    assert b0 == [50, 31]
    for layer in range(2):
        append_token(cache, layer, 77 + layer)
    q1 = make_q(2, Hq, 1, 16, F64, seed=5)
    sel0 = method.select(q1, cache, 0)
    assert tokens_of(sel0) == [[sorted(s0[b][hk]) + list(range(b0[b], n)) for hk in range(2)]
                               for b, n in enumerate(cache.host_lengths(0))]


def test_recycled_needle_full_budget_state_per_cache_and_reset():
    D, K = 16, 4
    method = get_decode_method("recycled", top_k=K, stride=5)
    a = make_cache(2, 2, D, [120, 90], dtype=F64, seed=1)
    b = make_cache(2, 2, D, [120, 90], dtype=F64, seed=2)
    q = make_q(2, 6, 1, D, F64, seed=9)
    for bb, t in enumerate((33, 71)):
        for hk in range(2):
            plant(a, 0, bb, hk, t + hk, 3 * q[bb, hk * 3, 0])
    assert method.select(q, a, 0) is None
    recycled = tokens_of(method.recycled_selection(a, 0))
    for bb, t in enumerate((33, 71)):
        for hk in range(2):
            assert t + hk in recycled[bb][hk]
    # Cache b has its own counter and set: its first step is a full step too.
    assert method.select(make_q(2, 6, 1, D, F64, seed=10), b, 0) is None
    assert method.state(a, 0)["step"] == 1 and method.state(b, 0)["step"] == 1
    assert not torch.equal(method.state(a, 0)["tokens"], method.state(b, 0)["tokens"])
    append_token(a, 0, 5)
    q2 = make_q(2, 6, 1, D, F64, seed=11)
    assert method.select(q2, a, 0) is not None and method.state(a, 0)["step"] == 2
    assert method.state(b, 0)["step"] == 1
    a.reset()
    assert a.method_state == {}
    a.append(0, rnd(2, 2, 30, D), rnd(2, 2, 30, D))
    assert method.select(make_q(2, 6, 1, D, F64), a, 0) is None  # a fresh start: a full step
    # Full budget: a recycle step reads everything, same output as dense.
    big = get_decode_method("recycled", top_k=10_000, stride=3)
    assert big.select(q, b, 0) is None
    append_token(b, 0, 6)
    sel = big.select(q2, b, 0)
    assert [len(r[0]) for r in tokens_of(sel)] == b.host_lengths(0)
    same_output(q2, b, 0, sel)


def test_recycled_dense_steps_drop_the_state():
    method = get_decode_method("recycled", top_k=4, stride=10, dense_below=60, dense_layers=(1,))
    cache = make_cache(1, 2, 16, [50], dtype=F64, layers=2)
    method.on_prefill(make_q(1, 2, 50, 16, F64), cache, 0)
    method.on_prefill(make_q(1, 2, 50, 16, F64), cache, 1)  # a dense layer: no state
    assert method.state(cache, 0)["step"] == 1 and method.state(cache, 1) == {}
    assert method.select(make_q(1, 2, 1, 16, F64), cache, 0) is None  # below dense_below
    assert method.state(cache, 0) == {}
    for layer in range(2):
        cache.append(layer, rnd(1, 2, 20, 16), rnd(1, 2, 20, 16))
    assert method.select(make_q(1, 2, 1, 16, F64), cache, 0) is None  # long enough: a full step first
    assert method.state(cache, 0)["step"] == 1
    assert method.select(make_q(1, 2, 1, 16, F64), cache, 1) is None  # dense layer


# ----------------------------------------------------------------------------- DELTA
@pytest.mark.parametrize("Hq,Lq,budget,recent", [(2, 1, 3, 1), (6, 1, 4, 2), (6, 3, 5, 0), (2, 2, 2, 2),
                                                 (6, 20, 3, 1), (6, 1, 64, 8)])
def test_delta_selection_equals_brute_force(Hq, Lq, budget, recent):
    lengths = [max(n, Lq) for n in LENGTHS]
    cache = make_cache(5, 2, 16, lengths, dtype=F64, layers=3)
    q = make_q(5, Hq, Lq, 16, F64)
    method = get_decode_method("delta", page_budget=budget, recent_pages=recent, delta_layers=(2,))
    sel = method.choose(q, cache, 2)
    sel.validate(cache.layer_lengths(2))
    assert sel.heads == 1  # one page list shared by all heads
    want = bf_delta(q, cache, 2, budget, recent)
    assert [rows[0] for rows in pages_of(sel)] == want
    for b, n in enumerate(lengths):
        n_pages = -(-n // 16)
        if Lq <= max(0, recent - 1) * 16 + 1:
            assert len(want[b]) == min(n_pages, budget)  # exactly K pages (or all of them)
        assert set(range(max(0, n_pages - recent), n_pages)) <= set(want[b])  # recency
        assert set(range((n - Lq) // 16, n_pages)) <= set(want[b])  # the step's own tokens
    if budget >= -(-max(lengths) // 16):
        same_output(q, cache, 2, sel)


def test_delta_sparse_layers_reuse_the_last_delta_layer():
    Hq, L = 6, 7
    cache = make_cache(3, 2, 16, [300, 129, 200], dtype=F64, layers=L)
    method = get_decode_method("delta", page_budget=5, recent_pages=2, delta_layers=(2, 4))
    for step in range(3):
        qs, sels = decode_step(method, cache, Hq, seed=step + 3)
        assert sels[0] is None and sels[1] is None and sels[2] is None and sels[4] is None
        want2 = bf_delta(qs[2], cache, 2, 5, 2)
        want4 = bf_delta(qs[4], cache, 4, 5, 2)
        assert sels[3] is not None and [r[0] for r in pages_of(sels[3])] == want2
        assert sels[5] is sels[6] is method.state(cache)["selection"]
        assert [r[0] for r in pages_of(sels[5])] == want4 and want2 != want4
        for layer in (3, 5):
            sels[layer].validate(cache.layer_lengths(layer))
            out, lse = sparse_decode_attention(qs[layer], cache, layer, sels[layer], return_lse=True)
            ref, ref_lse, pt = oracle(qs[layer], cache, layer, sels[layer])
            assert_tolerance(out, lse, ref, ref_lse, pt)
    # Two caches: the stored pages do not mix; reset drops them.
    other = make_cache(3, 2, 16, cache.host_lengths(0), dtype=F64, layers=L, seed=5)
    q = make_q(3, Hq, 1, 16, F64, seed=8)
    assert method.select(q, other, 2) is None
    assert [r[0] for r in pages_of(method.select(q, other, 3))] == bf_delta(q, other, 2, 5, 2)
    assert method.state(cache)["selection"] is sels[6]
    cache.reset()
    assert cache.method_state == {}
    for layer in range(L):
        cache.append(layer, rnd(3, 2, 40, 16), rnd(3, 2, 40, 16))
    assert method.select(q, cache, 3) is None


def test_delta_finds_a_planted_page():
    D, P = 16, 16
    cache = make_cache(2, 2, D, [40 * P + 5, 25 * P], dtype=torch.float32, layers=3)
    q = make_q(2, 6, 1, D, torch.float32, seed=5)
    targets = (17, 3)
    for b, t in enumerate(targets):
        plant(cache, 2, b, 1, t * P + 4, 3 * q[b, 4, 0])  # one key, one query head of KV head 1
    sel = get_decode_method("delta", page_budget=3, recent_pages=1, delta_layers=(2,)).choose(q, cache, 2)
    got = [r[0] for r in pages_of(sel)]
    for b, t in enumerate(targets):
        n_pages = -(-cache.host_lengths(2)[b] // P)
        assert t in got[b] and n_pages - 1 in got[b] and len(got[b]) == 3


# ----------------------------------------------------------------------------- no host reads
@pytest.mark.parametrize("name,kw", [("tidaldecode", dict(token_budget=8, selection_layers=(1,))),
                                     ("delta", dict(page_budget=2, recent_pages=1, delta_layers=(1,))),
                                     ("recycled", dict(top_k=5, stride=2))])
def test_selection_reads_nothing_back(name, kw, monkeypatch):
    cache = make_cache(3, 2, 16, [70, 33, 5], dtype=torch.float32, layers=3)
    method = get_decode_method(name, dense_layers=(), **kw)
    q = make_q(3, 4, 1, 16, torch.float32)

    def forbid(*a, **k):
        raise AssertionError("host read while selecting")

    def select_all():
        for attr in FORBIDDEN:
            monkeypatch.setattr(torch.Tensor, attr, forbid)
        try:
            return [method.select(q, cache, layer) for layer in range(3)]
        finally:
            monkeypatch.undo()

    first = select_all()
    for layer in range(3):
        cache.append(layer, rnd(3, 2, 1, 16, dtype=torch.float32), rnd(3, 2, 1, 16, dtype=torch.float32))
    second = select_all()
    assert first[2] is not None if name != "recycled" else first == [None, None, None]
    assert all(s is not None for s in second[2 if name != "recycled" else 0:])
    for s in first + second:
        if s is not None:
            s.validate(cache.layer_lengths(2))
