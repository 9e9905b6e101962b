"""H2O / TOVA decode steps scored over the kept-token list (O(kept)) against the O(N) mask path.

The kernel: ``list_logits_triton`` (the Triton interpreter here) against ``list_logits_torch`` and
against the O(N) ``exact_logits`` read at the listed positions: ragged lengths, Lq 1 and 3, GQA
groups 1 and 4, batch 2, empty list rows, stale garbage past the counts, a list that is a view
of a wider one. The methods: one object scores each decode step from its list (the default),
a twin with ``_score_from_list = False`` scores it over the whole mask (``_observe``, what every
step did before; the prompt still does); both run on one cache over 30+ steps after
``on_prefill`` (ragged batch, budgets below the prompt lengths), and after every step the keep
masks, the lists and (H2O) the scores must agree. The CUDA twin does the same in bf16 at
32/8/128 with 8K tokens and a budget of 512.
"""

import pytest
import torch

import sparseattn.decode_methods.eviction as dm_eviction
from sparseattn.cache import PagedKVCache
from sparseattn.decode_api import DecodeSelection
from sparseattn.decode_methods.base import exact_logits
from sparseattn.decode_methods.eviction import kept_attention, listed_attention, listed_lanes, scatter_listed
from sparseattn.methods.registry import get_method

from ..conftest import HAS_CUDA, requires_cuda, triton_importable
from .test_decode_logits_triton import make_cache, make_q

pytestmark = pytest.mark.skipif(not triton_importable(), reason="triton is not installed (pip install triton)")

if triton_importable():
    from sparseattn.kernels.list_logits_triton import list_logits_torch, list_logits_triton

DEVICE = "cuda" if HAS_CUDA else "cpu"
F64 = torch.float64


# ----------------------------------------------------------------------------- random lists
def assert_logits_equal(got, want, atol=1e-5, rtol=1e-5):
    """The same -inf pattern (count / length / causal masks), close values (dtypes of ``got``)."""
    assert got.shape == want.shape
    masked = torch.isinf(want)
    assert torch.equal(torch.isinf(got), masked), "the -inf pattern differs"
    assert (got[masked] < 0).all()
    torch.testing.assert_close(got[~masked], want[~masked].to(got.dtype), atol=atol, rtol=rtol)


def random_list(cache, H, density, seed, *, empty_rows=(), slack=5):
    """A keep mask over each sequence's tokens and its list ``[B, H, W]`` (a view of a wider tensor),
    with garbage past the counts: positions of live tokens, repeated entries, out-of-range values."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(cache.host_lengths(0))
    B, N = lengths.shape[0], cache.max_pages * cache.page_size
    keep = (torch.rand(B, H, N, generator=g) < density) & (torch.arange(N) < lengths.view(B, 1, 1))
    for b, h in empty_rows:
        keep[b, h] = False
    W = int(keep.sum(-1).max()) + slack
    sel = DecodeSelection.from_token_mask(keep, page_size=1, max_tokens=W)
    wide = torch.randint(0, N, (B, H, W + 7), generator=g, dtype=torch.int32)
    wide[..., W - 2] = -3
    wide[..., W - 1] = 10 ** 6
    counts = sel.token_counts.clone()
    j = torch.arange(W)
    wide[..., :W] = torch.where(j < counts.unsqueeze(-1), sel.tokens, wide[..., :W])
    return keep.to(DEVICE), wide.to(DEVICE)[..., :W], counts.to(DEVICE)


def logits_args(cache, q, tokens, counts):
    return (q, cache.k_pages(0), cache.page_table, tokens, counts, cache.layer_lengths(0))


def check_against_full_logits(got, full, tokens, counts):
    """Live lanes equal the O(N) logits at their positions; lanes past the count are -inf."""
    B, H, G, Lq, W = got.shape
    live = torch.arange(W, device=got.device) < counts.unsqueeze(-1)
    pos = torch.where(live, tokens.long(), torch.zeros_like(tokens.long()))
    want = full.gather(-1, pos.view(B, H, 1, 1, W).expand(B, H, G, Lq, W))
    want = want.masked_fill(~live.view(B, H, 1, 1, W), float("-inf"))
    assert_logits_equal(got, want)


# ----------------------------------------------------------------------------- the kernel
@pytest.mark.parametrize("P,lengths", [(4, [71, 4]), (16, [93, 16])])
@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("Lq", [1, 3])
def test_list_logits_kernel_equals_torch(P, lengths, G, Lq):
    Hkv, D = 2, 32
    cache = make_cache(lengths, Hkv, D, P, permute=True, seed=P + G)
    q = make_q(2, Hkv * G, Lq, D, seed=Lq)
    keep, tokens, counts = random_list(cache, Hkv, 0.5, seed=G + Lq, empty_rows=[(1, 0)])
    want = list_logits_torch(*logits_args(cache, q, tokens, counts), page_size=P, scale=D ** -0.5)
    assert want.shape == (2, Hkv, G, Lq, tokens.shape[-1]) and want.dtype == torch.float32
    assert torch.isinf(want[1, 0]).all()  # the empty row
    check_against_full_logits(want, exact_logits(q, cache, 0), tokens, counts)
    for use_dot in ([None, True, False] if G * Lq <= 8 else [None]):
        got = list_logits_triton(*logits_args(cache, q, tokens, counts), page_size=P, scale=D ** -0.5,
                                 use_dot=use_dot)
        assert_logits_equal(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_list_logits_16bit_and_odd_shapes(dtype):
    # 16-bit: the same math as the keys upcast to fp32. D = 24 (padded), a non-power-of-2 page, a
    # config with one big tile, counts as int64, a strided q.
    cache = make_cache([45, 13], 2, 24, 6, dtype=dtype, permute=True)
    q = make_q(2, 8, 3, 24, dtype=dtype).transpose(1, 2).contiguous().transpose(1, 2)
    _, tokens, counts = random_list(cache, 2, 0.7, seed=3)
    want = list_logits_torch(*logits_args(cache, q.float(), tokens, counts), page_size=6, scale=0.3)
    for config in (None, (64, 4, 1)):
        got = list_logits_triton(*logits_args(cache, q, tokens, counts.long()), page_size=6, scale=0.3,
                                 config=config)
        assert_logits_equal(got, want)
    check_against_full_logits(want, exact_logits(q.float(), cache, 0, scale=0.3), tokens, counts)


def test_list_logits_float64_torch_path_and_empty_width():
    cache = make_cache([30, 11], 2, 16, 4, dtype=F64)
    q = make_q(2, 2, 1, 16, dtype=F64)
    _, tokens, counts = random_list(cache, 2, 0.5, seed=1)
    got = list_logits_torch(*logits_args(cache, q, tokens, counts), page_size=4, scale=0.25)
    assert got.dtype == F64
    check_against_full_logits(got, exact_logits(q, cache, 0, scale=0.25), tokens, counts)
    cache = make_cache([30, 11], 2, 16, 4)
    empty = list_logits_triton(*logits_args(cache, q.float(), tokens[..., :0], counts), page_size=4, scale=0.1)
    assert empty.shape == (2, 2, 1, 1, 0)


@pytest.mark.parametrize("G,Lq", [(1, 1), (4, 3)])
def test_list_logits_snapshot_is_the_list_and_capped_counts(G, Lq):
    """``snapshot=`` fills a copy of the list's lanes (stale ones included) and the counts capped at
    the width in the same launch (what an H2O / TOVA step reads after its eviction rewrote the
    list), with the logits unchanged; several tiles and row tiles; a narrower view of a wider list
    whose counts exceed it."""
    Hkv, D, P = 2, 32, 4
    cache = make_cache([71, 37], Hkv, D, P, permute=True, seed=G)
    q = make_q(2, Hkv * G, Lq, D, seed=Lq)
    _, tokens, counts = random_list(cache, Hkv, 0.6, seed=G + Lq, empty_rows=[(1, 0)])
    for view, cnt in ((tokens, counts), (tokens[..., :13], counts.long())):
        W = view.shape[-1]
        snap = (torch.full(view.shape, -7, dtype=torch.int32, device=DEVICE), torch.full_like(cnt, -7))
        got = list_logits_triton(*logits_args(cache, q, view, cnt), page_size=P, scale=D ** -0.5, snapshot=snap)
        want = list_logits_triton(*logits_args(cache, q, view, cnt), page_size=P, scale=D ** -0.5)
        assert torch.equal(got, want)
        assert torch.equal(snap[0], view) and torch.equal(snap[1], cnt.clamp(max=W))
        assert int(cnt.max()) > 13 or W != 13  # the narrow view really caps a count
    bad_tokens = (torch.zeros(2, Hkv, 5, dtype=torch.int32, device=DEVICE), torch.zeros_like(counts))
    with pytest.raises(ValueError, match="snapshot tokens"):
        list_logits_triton(*logits_args(cache, q, tokens, counts), page_size=P, scale=0.1, snapshot=bad_tokens)
    bad_counts = (torch.zeros_like(tokens), torch.zeros_like(counts).long())
    with pytest.raises(ValueError, match="snapshot counts"):
        list_logits_triton(*logits_args(cache, q, tokens, counts), page_size=P, scale=0.1, snapshot=bad_counts)


def test_list_logits_rejects_bad_inputs():
    cache = make_cache([9], 2, 32, 4)
    q = make_q(1, 4, 1, 32)
    tokens = torch.zeros(1, 2, 5, dtype=torch.int32, device=DEVICE)
    counts = torch.ones(1, 2, dtype=torch.int32, device=DEVICE)
    good = dict(q=q, kp=cache.k_pages(0), table=cache.page_table, tokens=tokens, counts=counts,
                lens=cache.layer_lengths(0), page_size=4, scale=0.1)
    bad = [dict(q=q.double()), dict(q=q[0]), dict(q=make_q(1, 3, 1, 32)), dict(table=cache.page_table.long()),
           dict(tokens=tokens.long()), dict(tokens=tokens[:, :1]), dict(tokens=tokens.transpose(1, 2)),
           dict(counts=counts[:, :1]), dict(counts=counts.float()), dict(lens=cache.layer_lengths(0).float()),
           dict(page_size=8), dict(scale=float("inf"))]
    for case in bad:
        a = dict(good, **case)
        with pytest.raises(ValueError):
            list_logits_triton(a["q"], a["kp"], a["table"], a["tokens"], a["counts"], a["lens"],
                               page_size=a["page_size"], scale=a["scale"])


# ----------------------------------------------------------------------------- the helpers
@pytest.mark.parametrize("triton_path", [False, True])
def test_listed_attention_equals_kept_attention(triton_path, monkeypatch):
    cache = make_cache([41, 7], 2, 32, 4, permute=True)
    q = make_q(2, 8, 3, 32)
    keep, tokens, counts = random_list(cache, 2, 0.6, seed=5, empty_rows=[(0, 1)])
    want = kept_attention(q, cache, 0, keep)  # [B, Hkv, G, N]
    if triton_path:
        monkeypatch.setattr(dm_eviction, "use_triton_estimator", lambda x: True)
    got = listed_attention(q, cache, 0, tokens, counts)
    B, H, G, W = got.shape
    live = torch.arange(W, device=got.device) < counts.unsqueeze(-1)
    pos = torch.where(live, tokens.long(), torch.zeros_like(tokens.long()))
    at = want.gather(-1, pos.unsqueeze(2).expand(B, H, G, W)) * live.unsqueeze(2)
    torch.testing.assert_close(got, at, atol=1e-6, rtol=1e-5)
    assert torch.equal(got[0, 1], torch.zeros_like(got[0, 1]))  # an empty list receives nothing


def test_scatter_listed_writes_live_lanes_only_and_race_free():
    # Row 0: live [3, 5, 9], stale entries naming live tokens; row 1 empty (stale garbage only).
    tokens = torch.tensor([[[3, 5, 9, 5, 3, 9]], [[4, 4, 1, 0, 2, 3]]], dtype=torch.int32)
    counts = torch.tensor([[3], [0]], dtype=torch.int32)
    dst = torch.arange(24, dtype=torch.float64).view(2, 1, 12) + 100
    values = torch.tensor([[[1.0, 2.0, 3.0, -7.0, -8.0, -9.0]], [[-1.0] * 6]], dtype=torch.float64)
    pos, lane, live, nonempty = listed_lanes(tokens, counts, 12)
    assert live.tolist() == [[[True] * 3 + [False] * 3], [[False] * 6]]
    # every (row, position) receives one value only
    vals = torch.where(nonempty, values.gather(-1, lane), dst.gather(-1, pos))
    for b in range(2):
        written = {}
        for p, v in zip(pos[b, 0].tolist(), vals[b, 0].tolist()):
            assert written.setdefault(p, v) == v
    want = dst.clone()
    want[0, 0, [3, 5, 9]] = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    scatter_listed(dst, pos, lane, nonempty, values)
    assert torch.equal(dst, want)


# ----------------------------------------------------------------------------- the methods, step by step
def pair(name, cfg):
    """(the method scoring decode steps over its list, its twin scoring them over the mask)."""
    fast, slow = get_method(name, kind="decode", **cfg), get_method(name, kind="decode", **cfg)
    slow._score_from_list = False
    return fast, slow


def assert_same_state(fast, slow, cache, layer, scores_tol):
    assert torch.equal(fast.kept(cache, layer), slow.kept(cache, layer))
    sf, ss = fast.state(cache, layer), slow.state(cache, layer)
    assert ("tokens" in sf) == ("tokens" in ss)
    if "tokens" in sf:
        assert torch.equal(sf["count"], ss["count"])
        cf, tf, ts = sf["count"].cpu(), sf["tokens"].cpu(), ss["tokens"].cpu()
        for b in range(cf.shape[0]):
            for h in range(cf.shape[1]):
                n = int(cf[b, h])
                assert torch.equal(tf[b, h, :n], ts[b, h, :n]), (b, h)
    if "scores" in sf:
        N = cache.max_pages * cache.page_size
        torch.testing.assert_close(sf["scores"][..., :N], ss["scores"][..., :N], **scores_tol)


def run_pair(name, cfg, *, Hq, Hkv, Lq, dtype=F64, steps=32, prompts=(37, 20, 9), D=16, P=4, prefill=True,
             seed=0, scores_tol=None):
    fast, slow = pair(name, cfg)
    tol = scores_tol or dict(rtol=1e-12, atol=1e-12)
    g = torch.Generator().manual_seed(seed)
    B, T = len(prompts), max(prompts)
    cache = PagedKVCache(1, Hkv, D, page_size=P, dtype=dtype, device=DEVICE, max_batch=B, initial_pages=2)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=F64).to(DEVICE, dtype)

    cache.append(0, rand(B, Hkv, T, D), rand(B, Hkv, T, D), seq_lens=list(prompts))
    if prefill:
        q = rand(B, Hq, T, D)
        fast.on_prefill(q, cache, 0)
        slow.on_prefill(q, cache, 0)
        assert_same_state(fast, slow, cache, 0, tol)
    evicted = 0
    for _ in range(steps):
        cache.append(0, rand(B, Hkv, Lq, D), rand(B, Hkv, Lq, D))
        q = rand(B, Hq, Lq, D)
        a, b = fast.select(q, cache, 0), slow.select(q, cache, 0)
        lengths, n = cache.layer_lengths(0), cache.max_length(0)
        if b is None:  # a dense step (dense_below)
            assert a is None
        else:
            assert torch.equal(a.token_mask(lengths, n), b.token_mask(lengths, n))  # what the step read
        assert_same_state(fast, slow, cache, 0, tol)
        evicted += int((fast.kept(cache, 0).sum(-1) < lengths.view(-1, 1)).sum())
    assert evicted > 0  # the budgets bit
    return fast, cache


H2O_CFGS = [dict(hh_size=5, recent_size=4), dict(heavy_ratio=0.2, recent_ratio=0.1, gqa_score_agg="max")]


@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (8, 2)])
@pytest.mark.parametrize("Lq", [1, 3])
@pytest.mark.parametrize("name,cfg", [("h2o", H2O_CFGS[0]), ("h2o", H2O_CFGS[1]), ("tova", dict(cache_size=7))])
def test_list_steps_equal_mask_steps(name, cfg, Hq, Hkv, Lq):
    run_pair(name, cfg, Hq=Hq, Hkv=Hkv, Lq=Lq)


@pytest.mark.parametrize("name,cfg", [("h2o", dict(hh_size=3, recent_size=3, gqa_score_agg="sum")),
                                      ("tova", dict(cache_size=6))])
def test_list_steps_without_prefill_and_after_dense_steps(name, cfg):
    run_pair(name, cfg, Hq=4, Hkv=2, Lq=1, prefill=False, steps=30)
    run_pair(name, dict(cfg, dense_below=45), Hq=4, Hkv=2, Lq=2, steps=30, seed=1)


@pytest.mark.parametrize("name,cfg", [("h2o", dict(hh_size=6, recent_size=5)), ("tova", dict(cache_size=9))])
def test_list_steps_through_the_kernels(name, cfg, monkeypatch):
    # float32, every estimator on its Triton kernel (the interpreter): the list logits, the O(N)
    # logits of the mask twin, the list updates.
    monkeypatch.setattr(dm_eviction, "use_triton_estimator", lambda x: True)
    run_pair(name, cfg, Hq=8, Hkv=2, Lq=2, dtype=torch.float32, steps=30, prompts=(29, 17), D=32,
             scores_tol=dict(rtol=1e-5, atol=1e-6))


# ----------------------------------------------------------------------------- CUDA twin
@requires_cuda
@pytest.mark.gpu
def test_gpu_list_logits_bf16_equal_torch():
    B, Hkv, Hq, D, P = 2, 8, 32, 128, 16
    cache = make_cache([8192, 8192 - 77], Hkv, D, P, dtype=torch.bfloat16, permute=True, device="cuda")
    _, tokens, counts = random_list(cache, Hkv, 0.07, seed=0, empty_rows=[(1, 3)])
    for Lq in (1, 3):
        q = make_q(B, Hq, Lq, D, dtype=torch.bfloat16, device="cuda")
        want = list_logits_torch(*logits_args(cache, q.float(), tokens, counts), page_size=P, scale=D ** -0.5)
        got = list_logits_triton(*logits_args(cache, q, tokens, counts), page_size=P, scale=D ** -0.5)
        assert_logits_equal(got, want, atol=2e-3, rtol=2e-3)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("name,cfg", [("h2o", dict(hh_size=256, recent_size=256)), ("tova", dict(cache_size=512))])
def test_gpu_list_steps_equal_mask_steps_bf16(name, cfg):
    # bf16, 32/8/128, ~8K tokens, budget 512, 32 steps. The two paths' fp32 probabilities differ in
    # their last bits (softmax over ~2K vs 8K entries), which can swap two tokens whose scores tie
    # to ~1e-6: such a step must be a near-tie swap, and the list twin then continues from the mask
    # twin's state (teacher forcing), so one swap does not snowball.
    fast, slow = pair(name, cfg)
    assert bf16_twin_steps(fast, slow, state_tol=dict(rtol=1e-4, atol=1e-6), check_tied_scores=True) <= 3


def bf16_twin_steps(fast, slow, *, state_tol, check_tied_scores=False, steps=32):
    """Run two twins of one eviction method side by side on the GPU (bf16, 32/8/128, prompts of
    8192 and 7001 tokens, ``steps`` decode steps) and return how many steps swapped a near-tie.

    Every step both select the same tokens and keep as many; a step where the kept sets differ
    may swap at most two pairs per (batch, KV head) in at most ``Hkv`` rows (TOVA: one sequence's
    decision, shared by its heads), with ``check_tied_scores`` the swapped tokens' H2O scores tie,
    and ``fast`` then continues from ``slow``'s state (teacher forcing: one swap must not snowball).
    Other steps: the states agree within ``state_tol``."""
    B, Hkv, Hq, D, P, prompts = 2, 8, 32, 128, 16, [8192, 7001]
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to("cuda", torch.bfloat16)

    cache = PagedKVCache(1, Hkv, D, page_size=P, dtype=torch.bfloat16, device="cuda", max_batch=B)
    cache.append(0, rand(B, Hkv, 8192, D), rand(B, Hkv, 8192, D), seq_lens=prompts)
    q = rand(B, Hq, 8192, D)
    fast.on_prefill(q, cache, 0)
    slow.on_prefill(q, cache, 0)
    swaps = 0
    for step in range(steps):
        cache.append(0, rand(B, Hkv, 1, D), rand(B, Hkv, 1, D))
        q = rand(B, Hq, 1, D)
        a, b = fast.select(q, cache, 0), slow.select(q, cache, 0)
        lengths, n = cache.layer_lengths(0), cache.max_length(0)
        assert torch.equal(a.token_mask(lengths, n), b.token_mask(lengths, n)), step
        kf, ks = fast.kept(cache, 0), slow.kept(cache, 0)
        assert torch.equal(kf.sum(-1), ks.sum(-1)), step
        differ = (kf != ks).sum(-1)  # per (batch, KV head): 2 per swapped pair
        sf, ss = fast.state(cache, 0), slow.state(cache, 0)
        if bool(differ.any()):
            swaps += 1
            assert int(differ.max()) <= 4 and int((differ > 0).sum()) <= Hkv, step
            if check_tied_scores and "scores" in sf:  # H2O: the swapped tokens' scores tie
                for bb, hh in (differ > 0).nonzero().tolist():
                    only_f = sf["scores"][bb, hh, :n][(kf & ~ks)[bb, hh, :n]].sort().values
                    only_s = ss["scores"][bb, hh, :n][(ks & ~kf)[bb, hh, :n]].sort().values
                    torch.testing.assert_close(only_f, only_s, rtol=1e-5, atol=1e-7)
            for key in ("keep", "scores", "tokens", "count"):
                if key in ss:
                    sf[key].copy_(ss[key])
        else:
            assert_same_state(fast, slow, cache, 0, state_tol)
    return swaps
