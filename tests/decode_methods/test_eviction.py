"""KV-eviction baselines (h2o, tova, snapkv, pyramidkv): keep-sets against brute-force recomputations
in plain PyTorch (loops over sequences, heads and queries), exact budgets over several steps, planted
needles, full budget = dense, ragged batches, Lq > 1, GQA groups 1 and 3, configs."""

from collections import defaultdict

import pytest
import torch

from sparseattn.cache import PagedKVCache
from sparseattn.decode_api import sparse_decode_attention
from sparseattn.decode_methods import get_decode_method, list_decode_methods
from sparseattn.decode_methods.eviction import kept_attention

from ..conftest import HAS_CUDA, requires_cuda
from ..kernels.attn_checks import assert_tolerance
from ..kernels.test_decode import make_cache, make_q, oracle

DEVICE = "cuda" if HAS_CUDA else "cpu"
F64 = torch.float64


# ----------------------------------------------------------------------------- harness
def as_sets(mask):
    """bool [B, H, N] -> [[set of positions] per head] per sequence."""
    m = mask.cpu()
    return [[set(torch.nonzero(m[b, h]).flatten().tolist()) for h in range(m.shape[1])] for b in range(m.shape[0])]


def simulate(method, prompts, *, Hq, Hkv, steps, Lq=1, D=8, P=4, layers=1, prefill=True, seed=0, plant=None):
    """Ragged prompt (real tokens first in the pages; q rows bottom-right aligned), optional
    ``on_prefill``, then ``steps`` decode steps of ``Lq`` tokens. Records, per layer and event,
    the queries, the lengths, what the step read (its selection) and the keep-set afterwards."""
    g = torch.Generator().manual_seed(seed)
    B, T = len(prompts), max(prompts)
    cache = PagedKVCache(layers, Hkv, D, page_size=P, dtype=F64, device=DEVICE, max_batch=B, initial_pages=2)
    events = [[] for _ in range(layers)]

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=F64)

    for layer in range(layers):
        k, v, q = rand(B, Hkv, T, D), rand(B, Hkv, T, D), rand(B, Hq, T, D)
        if plant is not None:
            k, q = plant(k, q, prompts, T)
        cache.append(layer, k.to(DEVICE), v.to(DEVICE), seq_lens=list(prompts))
        if prefill:
            method.on_prefill(q.to(DEVICE), cache, layer)
        events[layer].append(dict(kind="prefill", q=q, lengths=list(prompts), read=None,
                                  kept=as_sets(method.kept(cache, layer))))
    for _ in range(steps):
        for layer in range(layers):
            k, v, q = rand(B, Hkv, Lq, D), rand(B, Hkv, Lq, D), rand(B, Hq, Lq, D)
            if plant is not None:
                k, q = plant(k, q, None, Lq)
            cache.append(layer, k.to(DEVICE), v.to(DEVICE))
            sel = method.select(q.to(DEVICE), cache, layer)
            lengths = cache.layer_lengths(layer)
            sel.validate(lengths)
            events[layer].append(dict(kind="step", q=q, lengths=cache.host_lengths(layer),
                                      read=as_sets(sel.token_mask(lengths, max(cache.host_lengths(layer)))),
                                      kept=as_sets(method.kept(cache, layer)), sel=sel))
    K = [cache.gather(layer)[0].cpu() for layer in range(layers)]
    return cache, events, K


def softmax_over(K, b, hk, qv, idx):
    """Probabilities of query vector ``qv`` over the keys ``idx`` of (b, hk) (float64, plain)."""
    keys = K[b, hk, sorted(idx)]
    return torch.softmax(keys @ qv / K.shape[-1] ** 0.5, dim=0)


def agg(rows, how):
    stacked = torch.stack(rows)
    return {"mean": stacked.mean(0), "max": stacked.amax(0), "sum": stacked.sum(0)}[how]


def top(scores, candidates, n):
    """The ``n`` best candidates by score, ties to the lower position."""
    return set(sorted(candidates, key=lambda j: (-float(scores[j]), j))[:max(n, 0)])


# ----------------------------------------------------------------------------- brute forces
def brute_h2o(K, events, Hq, budgets, how="mean"):
    """H2O from the paper's description: accumulated probability mass, heavy hitters + recent."""
    B, Hkv = K.shape[:2]
    G = Hq // Hkv
    kept = scores = bud = prev = None
    out = []
    for ev in events:
        q, lens = ev["q"], ev["lengths"]
        L = q.shape[2]
        if kept is None:
            kept = [[set(range(lens[b])) for _ in range(Hkv)] for b in range(B)]
            scores = [[defaultdict(float) for _ in range(Hkv)] for b in range(B)]
            bud = [budgets(n) for n in lens]
        else:
            for b in range(B):
                for h in range(Hkv):
                    kept[b][h] |= set(range(prev[b], lens[b]))
        read = [[set(s) for s in row] for row in kept]
        for b in range(B):
            for h in range(Hkv):
                # per query head, the event's probabilities summed over its rows; then the group reduction
                per_head = [defaultdict(float) for _ in range(G)]
                for i in range(L):
                    p = lens[b] - L + i
                    if p < 0:
                        continue
                    idx = sorted(j for j in kept[b][h] if j <= p)
                    for g in range(G):
                        for j, m in zip(idx, softmax_over(K, b, h, q[b, h * G + g, i], idx)):
                            per_head[g][j] += float(m)
                for j in kept[b][h]:
                    scores[b][h][j] += float(agg([torch.tensor(per_head[g][j]) for g in range(G)], how))
                hh, rec = bud[b]
                recent = {j for j in kept[b][h] if j >= lens[b] - rec}
                kept[b][h] = recent | top(scores[b][h], kept[b][h] - recent, hh)
                scores[b][h] = defaultdict(float, {j: s for j, s in scores[b][h].items() if j in kept[b][h]})
        prev = list(lens)
        out.append((read, [[set(s) for s in row] for row in kept]))
    return out


def brute_tova(K, events, Hq, cache_size):
    """TOVA: the last query's probabilities averaged over all query heads, one keep-set per sequence."""
    B, Hkv = K.shape[:2]
    G = Hq // Hkv
    kept = prev = None
    out = []
    for ev in events:
        q, lens = ev["q"], ev["lengths"]
        if kept is None:
            kept = [set(range(n)) for n in lens]
        else:
            for b in range(B):
                kept[b] |= set(range(prev[b], lens[b]))
        read = [[set(kept[b]) for _ in range(Hkv)] for b in range(B)]
        for b in range(B):
            idx = sorted(kept[b])
            probs = [softmax_over(K, b, h // G, q[b, h, -1], idx) for h in range(Hq)]
            mean = torch.stack(probs).mean(0)
            kept[b] = top(dict(zip(idx, mean.tolist())), idx, cache_size)
        prev = list(lens)
        out.append((read, [[set(kept[b]) for _ in range(Hkv)] for b in range(B)]))
    return out


def official_pyramid_budget(n, C, w, beta, num_layers, layer):
    """PyramidKVCluster.update_kv's arithmetic, transcribed (None: the prompt is kept whole)."""
    min_num = (C - w) // beta
    max_num = (C - w) * 2 - min_num
    if max_num >= n - w:
        max_num = n - w
        min_num = (C - w) * 2 - max_num
    steps = (max_num - min_num) // (num_layers - 1) if num_layers > 1 else 0
    if n < C:
        return None
    if n < (C - w) * 2:
        return C - w
    return max_num - layer * steps


def brute_snapkv(K, events, Hq, *, C, w, kernel, pooling, how="mean", budget=None, prefill=True):
    """SnapKV: window-summed probabilities on the prefix, group-reduced, pooled, top-k + window."""
    B, Hkv = K.shape[:2]
    G = Hq // Hkv
    budget = budget or (lambda n: None if n < C else C - w)
    kept = prev = None
    out = []
    for e, ev in enumerate(events):
        q, lens = ev["q"], ev["lengths"]
        L = q.shape[2]
        if kept is None:
            kept = [[set(range(lens[b])) for _ in range(Hkv)] for b in range(B)]
        else:
            for b in range(B):
                for h in range(Hkv):
                    kept[b][h] |= set(range(prev[b], lens[b]))
        compress = (e == 0) if prefill else (e == 1)
        if compress:
            for b in range(B):
                n = lens[b]
                cap = budget(n)
                if cap is None:
                    continue
                for h in range(Hkv):
                    idx = sorted(kept[b][h])
                    per_head = []
                    for g in range(G):
                        s = torch.zeros(n - w, dtype=F64)
                        for i in range(max(0, L - w), L):
                            p = n - L + i
                            vis = [j for j in idx if j <= p]
                            pr = softmax_over(K, b, h, q[b, h * G + g, i], vis)
                            for j, m in zip(vis, pr):
                                if j < n - w:
                                    s[j] += m
                        per_head.append(s)
                    s = agg(per_head, how)
                    r = kernel // 2
                    pooled = {}
                    for j in range(n - w):
                        win = [float(s[t]) if 0 <= t < n - w else 0.0 for t in range(j - r, j + r + 1)]
                        pooled[j] = sum(win) / kernel if pooling == "avgpool" else max(win)
                    kept[b][h] = top(pooled, range(n - w), cap) | set(range(n - w, n))
        read = None if ev["kind"] == "prefill" else [[set(s) for s in row] for row in kept]
        prev = list(lens)
        out.append((read, [[set(s) for s in row] for row in kept]))
    return out


def check_against(events, brute):
    assert len(events) == len(brute)
    for t, (ev, (read, kept)) in enumerate(zip(events, brute)):
        assert ev["kept"] == kept, f"event {t}: keep-set differs"
        if ev["read"] is not None and read is not None:
            assert ev["read"] == read, f"event {t}: the step read other tokens than the brute force"


GQA = [(2, 2), (6, 2)]


# ----------------------------------------------------------------------------- brute-force equality
@pytest.mark.parametrize("Hq,Hkv", GQA)
@pytest.mark.parametrize("Lq", [1, 3])
@pytest.mark.parametrize("how", ["mean", "max"])
def test_h2o_equals_brute_force(Hq, Hkv, Lq, how):
    method = get_decode_method("h2o", hh_size=5, recent_size=4, gqa_score_agg=how)
    _, events, K = simulate(method, [30, 19, 7], Hq=Hq, Hkv=Hkv, steps=5, Lq=Lq)
    check_against(events[0], brute_h2o(K[0], events[0], Hq, lambda n: (5, 4), how))


def test_h2o_ratio_budgets_equal_brute_force():
    method = get_decode_method("h2o")  # heavy_ratio = recent_ratio = 0.1 (run scripts)
    prompts = [64, 41]
    _, events, K = simulate(method, prompts, Hq=4, Hkv=2, steps=4)
    assert [method.budgets(n) for n in prompts] == [(6, 6), (4, 4)]
    check_against(events[0], brute_h2o(K[0], events[0], 4, lambda n: (int(0.1 * n), int(0.1 * n))))


@pytest.mark.parametrize("Hq,Hkv", GQA)
@pytest.mark.parametrize("Lq", [1, 3])
def test_tova_equals_brute_force(Hq, Hkv, Lq):
    method = get_decode_method("tova", cache_size=9)
    _, events, K = simulate(method, [30, 19, 6], Hq=Hq, Hkv=Hkv, steps=5, Lq=Lq)
    check_against(events[0], brute_tova(K[0], events[0], Hq, 9))
    for ev in events[0]:  # one decision per layer: every KV head keeps the same tokens
        assert all(row[0] == row[1] for row in ev["kept"])


@pytest.mark.parametrize("Hq,Hkv", GQA)
@pytest.mark.parametrize("kernel,pooling,how", [(5, "avgpool", "mean"), (3, "maxpool", "max"), (1, "avgpool", "sum")])
def test_snapkv_equals_brute_force(Hq, Hkv, kernel, pooling, how):
    cfg = dict(window_size=4, max_capacity_prompt=14, kernel_size=kernel, pooling=pooling, gqa_score_agg=how)
    method = get_decode_method("snapkv", **cfg)
    _, events, K = simulate(method, [40, 23, 14, 9], Hq=Hq, Hkv=Hkv, steps=3, Lq=2)
    check_against(events[0], brute_snapkv(K[0], events[0], Hq, C=14, w=4, kernel=kernel, pooling=pooling, how=how))


def test_snapkv_prompt_chunk_shorter_than_window():
    # Only 3 query rows for a window of 5: the rows given are the observation queries.
    method = get_decode_method("snapkv", window_size=5, max_capacity_prompt=12, kernel_size=3)
    g = torch.Generator().manual_seed(3)
    cache = PagedKVCache(1, 2, 8, page_size=4, dtype=F64, device=DEVICE, max_batch=2)
    cache.append(0, torch.randn(2, 2, 30, 8, generator=g, dtype=F64).to(DEVICE),
                 torch.randn(2, 2, 30, 8, generator=g, dtype=F64).to(DEVICE), seq_lens=[30, 20])
    q = torch.randn(2, 4, 3, 8, generator=g, dtype=F64)
    method.on_prefill(q.to(DEVICE), cache, 0)
    K = cache.gather(0)[0].cpu()
    brute = brute_snapkv(K, [dict(kind="prefill", q=q, lengths=[30, 20])], 4, C=12, w=5, kernel=3,
                         pooling="avgpool")
    assert as_sets(method.kept(cache, 0)) == brute[0][1]


def test_pyramidkv_budgets_follow_the_official_arithmetic():
    m = get_decode_method("pyramidkv", window_size=4, max_capacity_prompt=20, beta=8)
    assert m.layer_budgets(19, 4) == [None] * 4  # shorter than the capacity: kept whole
    assert m.layer_budgets(27, 4) == [16] * 4  # C <= n < 2 (C - w): SnapKV's C - w everywhere
    assert m.layer_budgets(34, 4) == [30, 21, 12, 3]  # max_num clipped to n - w = 30, min_num 2
    assert m.layer_budgets(50, 4) == [30, 21, 12, 3]
    assert m.layer_budgets(40, 1) == [30]  # one layer: steps = 0 (the official divides by zero)
    d = get_decode_method("pyramidkv")  # class defaults C = 320, w = 64, beta = 20, 32 layers
    assert d.layer_budgets(1000, 32)[0] == 500 and d.layer_budgets(1000, 32)[-1] == 500 - 31 * 15
    for n in (19, 20, 27, 31, 32, 33, 34, 35, 50, 200):
        for layers in (2, 3, 4, 7):
            want = [official_pyramid_budget(n, 20, 4, 8, layers, l) for l in range(layers)]
            assert m.layer_budgets(n, layers) == want, (n, layers)


@pytest.mark.parametrize("Hq,Hkv", GQA)
def test_pyramidkv_equals_brute_force_per_layer(Hq, Hkv):
    cfg = dict(window_size=4, max_capacity_prompt=20, kernel_size=3, pooling="maxpool", beta=8)
    method = get_decode_method("pyramidkv", **cfg)
    prompts = [50, 34, 27, 12]
    cache, events, K = simulate(method, prompts, Hq=Hq, Hkv=Hkv, steps=2, layers=4)
    for layer in range(4):
        budget = lambda n, layer=layer: official_pyramid_budget(n, 20, 4, 8, 4, layer)  # noqa: E731
        brute = brute_snapkv(K[layer], events[layer], Hq, C=20, w=4, kernel=3, pooling="maxpool", budget=budget)
        check_against(events[layer], brute)
    counts = [[len(events[layer][0]["kept"][b][0]) for b in range(4)] for layer in range(4)]
    assert counts == [[34, 34, 20, 12], [25, 25, 20, 12], [16, 16, 20, 12], [7, 7, 20, 12]]


# ----------------------------------------------------------------------------- budgets and state
BUDGETED = [("h2o", dict(hh_size=3, recent_size=5), 8), ("h2o", dict(hh_size=0, recent_size=6), 6),
            ("h2o", dict(hh_size=7, recent_size=0), 7), ("tova", dict(cache_size=8), 8),
            ("tova", dict(cache_size=1), 1)]


@pytest.mark.parametrize("name,cfg,budget", BUDGETED)
@pytest.mark.parametrize("Lq", [1, 2])
def test_budget_kept_exactly_every_step(name, cfg, budget, Lq):
    method = get_decode_method(name, **cfg)
    prompts = [25, 6, 1]
    _, events, _ = simulate(method, prompts, Hq=6, Hkv=2, steps=6, Lq=Lq)
    prev = None
    for ev in events[0]:
        for b, n in enumerate(ev["lengths"]):
            for h in range(2):
                kept = ev["kept"][b][h]
                assert len(kept) == min(budget, n) and all(j < n for j in kept)
                if ev["read"] is not None:
                    read = ev["read"][b][h]
                    assert len(read) == min(budget, n - Lq) + Lq
                    assert set(range(n - Lq, n)) <= read  # the step's own tokens are read
                    assert read <= prev[b][h] | set(range(n - Lq, n))  # evicted tokens never come back
                    assert kept <= read
        prev = ev["kept"]


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv"])
def test_prompt_methods_keep_capacity_then_everything_new(name):
    method = get_decode_method(name, window_size=4, max_capacity_prompt=12, kernel_size=3)
    prompts = [40, 12, 11]
    _, events, _ = simulate(method, prompts, Hq=4, Hkv=2, steps=4, Lq=2, layers=1)
    first = events[0][0]["kept"]
    for ev in events[0]:
        for b, n in enumerate(ev["lengths"]):
            for h in range(2):
                want = (12 if prompts[b] >= 12 else prompts[b]) + n - prompts[b]
                if name == "pyramidkv" and prompts[b] >= 2 * (12 - 4):  # one layer: max_num = 2 (C - w) - min
                    want = 2 * (12 - 4) - (12 - 4) // 20 + 4 + n - prompts[b]
                assert len(ev["kept"][b][h]) == want
                assert ev["kept"][b][h] >= first[b][h]  # nothing evicted after the prompt
                assert set(range(max(0, prompts[b] - 4), n)) <= ev["kept"][b][h]  # window + generated


def test_kept_attention_chunks_equal_one_pass():
    cache = make_cache(3, 2, 16, [40, 17, 64], dtype=F64)
    keep = torch.rand(3, 2, cache.max_pages * 16, generator=torch.Generator().manual_seed(0)).to(DEVICE) > 0.3
    q = make_q(3, 6, 9, 16, F64)
    full = kept_attention(q, cache, 0, keep)
    for rows in (1, 2, 4):
        torch.testing.assert_close(kept_attention(q, cache, 0, keep, chunk_rows=rows), full)
    assert full.shape == (3, 2, 3, cache.max_pages * 16)
    # only kept, visible tokens receive mass; every (sequence, head, row) distributes exactly 1
    assert torch.all(full[~keep.unsqueeze(2).expand_as(full)] == 0)
    torch.testing.assert_close(full.sum(-1), torch.full((3, 2, 3), 9.0, dtype=F64, device=DEVICE))


def test_without_prefill_hook():
    # H2O / TOVA: the first step reads everything, then evicts; SnapKV compresses with the step's queries.
    lengths = [30, 9]
    for name, cfg in (("h2o", dict(hh_size=3, recent_size=3)), ("tova", dict(cache_size=6))):
        cache = make_cache(2, 2, 16, lengths, dtype=F64)
        m = get_decode_method(name, **cfg)
        sel = m.select(make_q(2, 4, 1, 16, F64), cache, 0)
        assert sel.token_counts.cpu().tolist() == [[30, 30], [9, 9]]
        assert m.kept(cache, 0).sum(-1).cpu().tolist() == [[6, 6], [6, 6]]
    method = get_decode_method("snapkv", window_size=4, max_capacity_prompt=10, kernel_size=3)
    _, events, K = simulate(method, [30, 16, 8], Hq=4, Hkv=2, steps=3, prefill=False)
    check_against(events[0], brute_snapkv(K[0], events[0], 4, C=10, w=4, kernel=3, pooling="avgpool",
                                          prefill=False))
    assert [len(events[0][1]["read"][b][0]) for b in range(3)] == [10, 10, 9]


def test_dense_below_defers_eviction_and_dense_layers_keep_no_state():
    m = get_decode_method("h2o", hh_size=2, recent_size=2, dense_below=20, dense_layers=(1,))
    cache = PagedKVCache(2, 2, 8, page_size=4, dtype=F64, device=DEVICE)
    g = torch.Generator().manual_seed(0)
    for layer in range(2):
        cache.append(layer, torch.randn(1, 2, 16, 8, generator=g, dtype=F64).to(DEVICE),
                     torch.randn(1, 2, 16, 8, generator=g, dtype=F64).to(DEVICE))
        m.on_prefill(torch.randn(1, 2, 16, 8, generator=g, dtype=F64).to(DEVICE), cache, layer)
    assert m.kept(cache, 0).sum().item() == 2 * 16  # shorter than dense_below: nothing evicted
    scores_after_prompt = m.state(cache, 0)["scores"][..., :16].clone()
    for step in range(6):
        for layer in range(2):
            cache.append(layer, torch.randn(1, 2, 1, 8, generator=g, dtype=F64).to(DEVICE),
                         torch.randn(1, 2, 1, 8, generator=g, dtype=F64).to(DEVICE))
            sel = m.select(torch.randn(1, 2, 1, 8, generator=g, dtype=F64).to(DEVICE), cache, layer)
            n = 17 + step
            if layer == 1 or n < 20:
                assert sel is None
            else:
                assert sel.token_counts.cpu().tolist() == [[n if n == 20 else 5] * 2]
        if 17 + step < 20:
            assert m.kept(cache, 0).sum().item() == 2 * (17 + step)
    assert m.kept(cache, 0).sum(-1).cpu().tolist() == [[4, 4]]
    assert (m.state(cache, 0)["scores"].sum() > 0) and scores_after_prompt.sum() > 0  # dense steps accumulated
    assert "keep" not in m.state(cache, 1)


# ----------------------------------------------------------------------------- needle, dense, oracle
def planter(pos=7, D=16):
    u = torch.randn(D, generator=torch.Generator().manual_seed(11), dtype=F64)
    u = u / u.norm()

    def plant(k, q, prompts, T):
        q = q * 0.3 + 2.0 * u  # every query looks towards u
        if prompts is not None:  # the prompt: the key at `pos` of every sequence points along u
            for b, n in enumerate(prompts):
                k[b, :, pos] = 6.0 * u
        return k, q
    return plant


@pytest.mark.parametrize("name,cfg", [("h2o", dict(hh_size=2, recent_size=4)), ("tova", dict(cache_size=6)),
                                      ("snapkv", dict(window_size=4, max_capacity_prompt=8, kernel_size=3)),
                                      ("pyramidkv", dict(window_size=4, max_capacity_prompt=8, kernel_size=1, beta=2))])
@pytest.mark.parametrize("Hq,Hkv", GQA)
def test_planted_needle_is_kept(name, cfg, Hq, Hkv):
    method = get_decode_method(name, **cfg)
    _, events, _ = simulate(method, [60, 45], Hq=Hq, Hkv=Hkv, steps=5, D=16, plant=planter(7, 16), layers=2)
    for layer in range(2):
        for ev in events[layer]:
            for b in range(2):
                for h in range(Hkv):
                    assert 7 in ev["kept"][b][h]
                    if ev["read"] is not None:
                        assert 7 in ev["read"][b][h]
        assert len(events[layer][-1]["kept"][0][0]) < 20  # a real eviction happened


@pytest.mark.parametrize("name,cfg", [("h2o", dict(hh_size=500, recent_size=500)), ("h2o", dict(heavy_ratio=1.0)),
                                      ("tova", dict(cache_size=1000)),
                                      ("snapkv", dict(max_capacity_prompt=1000)),
                                      ("pyramidkv", dict(max_capacity_prompt=1000))])
@pytest.mark.parametrize("Hq,Hkv", GQA)
def test_full_budget_equals_dense(name, cfg, Hq, Hkv):
    method = get_decode_method(name, **cfg)
    lengths = [200, 37, 64]
    cache = make_cache(3, Hkv, 16, lengths, dtype=F64, layers=1)
    q_prompt = make_q(3, Hq, 200, 16, F64, seed=4)
    method.on_prefill(q_prompt, cache, 0)
    for step in range(3):
        cache.append(0, make_q(3, Hkv, 1, 16, F64, seed=10 + step), make_q(3, Hkv, 1, 16, F64, seed=20 + step))
        q = make_q(3, Hq, 1, 16, F64, seed=30 + step)
        sel = method.select(q, cache, 0)
        n = cache.host_lengths(0)
        assert sel.token_counts.cpu().tolist() == [[x] * Hkv for x in n]
        out = sparse_decode_attention(q, cache, 0, sel, backend="reference")
        dense = sparse_decode_attention(q, cache, 0, None, backend="reference")
        torch.testing.assert_close(out, dense, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,cfg", [("h2o", dict(hh_size=8, recent_size=16)), ("tova", dict(cache_size=20)),
                                      ("snapkv", dict(window_size=8, max_capacity_prompt=24)),
                                      ("pyramidkv", dict(window_size=8, max_capacity_prompt=24))])
@pytest.mark.parametrize("Lq", [1, 3])
def test_attention_over_the_keep_set_matches_oracle(name, cfg, Lq):
    lengths = [200, 37, 64]
    cache = make_cache(3, 2, 32, lengths, layers=2)  # bfloat16, no prompt hook
    method = get_decode_method(name, **cfg)
    for layer in range(2):
        q = make_q(3, 6, Lq, 32, torch.bfloat16, seed=layer)
        sel = method.select(q, cache, layer)
        sel.validate(cache.layer_lengths(layer))
        out, lse = sparse_decode_attention(q, cache, layer, sel, return_lse=True)
        ref, ref_lse, pt = oracle(q, cache, layer, sel)
        assert_tolerance(out, lse, ref, ref_lse, pt)


# ----------------------------------------------------------------------------- registry and configs
def test_registry_and_defaults():
    names = list_decode_methods()
    for name in ("h2o", "tova", "snapkv", "pyramidkv"):
        assert name in names
    h2o = get_decode_method("h2o")
    assert (h2o.heavy_ratio, h2o.recent_ratio, h2o.hh_size, h2o.recent_size, h2o.gqa_score_agg) == \
        (0.1, 0.1, None, None, "mean")
    assert get_decode_method("h2o", hh_size=4, recent_size=512).budgets(10_000) == (4, 512)
    assert get_decode_method("tova").cache_size == 512
    snap = get_decode_method("snapkv")
    assert (snap.window_size, snap.max_capacity_prompt, snap.kernel_size, snap.pooling, snap.gqa_score_agg) == \
        (64, 320, 5, "avgpool", "mean")
    pyr = get_decode_method("pyramidkv")
    assert (pyr.window_size, pyr.max_capacity_prompt, pyr.kernel_size, pyr.pooling, pyr.beta) == \
        (64, 320, 5, "avgpool", 20)


@pytest.mark.parametrize("name,bad", [
    ("h2o", dict(heavy_ratio=-0.1)), ("h2o", dict(recent_ratio=1.5)), ("h2o", dict(hh_size=4)),
    ("h2o", dict(recent_size=4)), ("h2o", dict(hh_size=-1, recent_size=3)), ("h2o", dict(gqa_score_agg="median")),
    ("h2o", dict(heavy_ratio=float("nan"))), ("tova", dict(cache_size=0)), ("tova", dict(cache_size=2.5)),
    ("snapkv", dict(window_size=0)), ("snapkv", dict(max_capacity_prompt=64)), ("snapkv", dict(kernel_size=4)),
    ("snapkv", dict(kernel_size=0)), ("snapkv", dict(pooling="minpool")), ("snapkv", dict(gqa_score_agg="avg")),
    ("pyramidkv", dict(beta=0)), ("pyramidkv", dict(window_size=320)), ("pyramidkv", dict(budget=3)),
    ("tova", dict(dense_below=-1)),
])
def test_bad_configs_raise(name, bad):
    with pytest.raises(ValueError):
        get_decode_method(name, **bad)


def test_prefill_checks_inputs():
    cache = make_cache(2, 2, 16, [20, 9], dtype=F64)
    for name in ("h2o", "tova", "snapkv", "pyramidkv"):
        with pytest.raises(ValueError):
            get_decode_method(name).on_prefill(make_q(2, 3, 20, 16, F64), cache, 0)  # 3 heads, Hkv = 2
        with pytest.raises(ValueError):
            get_decode_method(name).on_prefill(make_q(2, 2, 20, 16, torch.float32), cache, 0)  # dtype


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("name,cfg", [("h2o", dict(hh_size=16, recent_size=32)), ("h2o", {}),
                                      ("tova", dict(cache_size=48)),
                                      ("snapkv", dict(window_size=16, max_capacity_prompt=64)),
                                      ("pyramidkv", dict(window_size=16, max_capacity_prompt=64))])
def test_gpu_prefill_and_steps_have_no_host_sync(name, cfg):
    # CPU twins: the brute-force tests above run the same code paths.
    method = get_decode_method(name, **cfg)
    B, Hkv, Hq, D, prompts = 3, 2, 6, 64, [700, 300, 129]
    cache = PagedKVCache(2, Hkv, D, page_size=16, dtype=torch.bfloat16, device="cuda", max_batch=B)
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to("cuda", torch.bfloat16)

    for layer in range(2):
        cache.append(layer, rand(B, Hkv, 700, D), rand(B, Hkv, 700, D), seq_lens=prompts)
    qp = [rand(B, Hq, 700, D) for _ in range(2)]
    steps = [(rand(B, Hkv, 1, D), rand(B, Hkv, 1, D), rand(B, Hq, 1, D)) for _ in range(3)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for layer in range(2):
            method.on_prefill(qp[layer], cache, layer)
        for k, v, q in steps:
            for layer in range(2):
                cache.append(layer, k, v)
                sel = method.select(q, cache, layer)  # (the kernel's own no-sync test is in tests/kernels)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    lengths = cache.layer_lengths(1)
    sel.validate(lengths)
    assert int(sel.token_counts.max()) <= sel.max_tokens
