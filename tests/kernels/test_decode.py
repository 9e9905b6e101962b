"""sparse_decode_attention: both backends against a float64 dense oracle (tolerance rule).

The oracle is built from ``cache.gather`` (dense padded K/V) and the selection's element mask
(``DecodeSelection.token_mask``) plus the length and causal masks, as plain masked softmax
attention in float64 (``ref``) and in the input dtype (``pt``). The Triton kernel is a split-K
kernel with a log-sum-exp merge, so it gets the 3x factor of CONVENTIONS.md; the reference 2x.
On a CPU machine the Triton kernel runs in the interpreter; on a GPU the same tests run compiled.
"""

import math

import pytest
import torch

from sparseattn.cache import PagedKVCache
from sparseattn.decode_api import DecodeSelection, sparse_decode_attention

from ..conftest import HAS_CUDA, requires_cuda, triton_importable
from .attn_checks import assert_tolerance

DEVICE = "cuda" if HAS_CUDA else "cpu"
needs_triton = pytest.mark.skipif(not triton_importable(), reason="triton is not installed (pip install triton)")
BACKENDS = ["reference", pytest.param("triton", marks=needs_triton)]
FACTOR = {"reference": 2.0, "triton": 3.0}  # triton: split-K + lse merge path


# ----------------------------------------------------------------------------- builders
def make_cache(B, Hkv, D, lengths, *, dtype=torch.bfloat16, page_size=16, steps=2, seed=0, layers=1):
    """A cache whose sequences reach ``lengths`` through a ragged prefill then ``steps`` ragged decode appends."""
    g = torch.Generator().manual_seed(seed)
    cache = PagedKVCache(layers, Hkv, D, page_size=page_size, dtype=dtype, device=DEVICE, max_batch=B,
                         initial_pages=2)
    pre = [max(n - steps, 0) for n in lengths]
    chunks = [(max(pre), pre)] + [(1, [1 if pre[b] + s < n else 0 for b, n in enumerate(lengths)])
                                  for s in range(steps)]
    for T, counts in chunks:
        if T == 0:
            continue
        for layer in range(layers):
            k = torch.randn(B, Hkv, T, D, generator=g).to(DEVICE, dtype)
            v = torch.randn(B, Hkv, T, D, generator=g).to(DEVICE, dtype)
            cache.append(layer, k, v, seq_lens=counts)
    assert cache.host_lengths(0) == list(lengths)
    return cache


def make_q(B, Hq, Lq, D, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, Hq, Lq, D, generator=g).to(DEVICE, dtype)


def random_selection(cache, H, *, kind="pages", density=0.5, seed=0, batch=None, n_tokens=5):
    """Random ascending pages (and/or tokens) per (batch, head) within each sequence's length."""
    g = torch.Generator().manual_seed(seed)
    lens = cache.host_lengths(0)
    B = len(lens) if batch is None else batch
    P = cache.page_size
    n_pages = [-(-n // P) for n in lens]
    maxp = max(n_pages)
    bound = [n_pages[b] if B == len(lens) else min(n_pages) for b in range(B)]
    tbound = [lens[b] if B == len(lens) else min(lens) for b in range(B)]
    if kind == "empty":
        mask = torch.zeros(B, H, maxp, dtype=torch.bool)
    elif kind == "all":
        mask = torch.arange(maxp).view(1, 1, -1) < torch.tensor(bound).view(-1, 1, 1)
        mask = mask.expand(B, H, maxp)
    elif kind == "one":
        mask = torch.zeros(B, H, maxp, dtype=torch.bool)
        for b in range(B):
            for h in range(H):
                mask[b, h, torch.randint(bound[b], (1,), generator=g)] = True
    else:
        mask = torch.rand(B, H, maxp, generator=g) < density
        mask &= torch.arange(maxp).view(1, 1, -1) < torch.tensor(bound).view(-1, 1, 1)
    sel = DecodeSelection.from_page_mask(mask.to(DEVICE), page_size=P)
    if kind in ("pages_tokens", "tokens"):
        toks = torch.zeros(B, H, n_tokens, dtype=torch.int32)
        counts = torch.zeros(B, H, dtype=torch.int32)
        for b in range(B):
            for h in range(H):
                free = [t for t in range(tbound[b]) if kind == "tokens" or not mask[b, h, t // P]]
                pick = sorted(free[i] for i in torch.randperm(len(free), generator=g)[:n_tokens].tolist())
                counts[b, h] = len(pick)
                toks[b, h, :len(pick)] = torch.tensor(pick, dtype=torch.int32)
        if kind == "tokens":
            return DecodeSelection.from_tokens(toks.to(DEVICE), counts.to(DEVICE), page_size=P)
        sel = sel.with_tokens(toks.to(DEVICE), counts.to(DEVICE))
    return sel


# ----------------------------------------------------------------------------- oracle
def masked_attention(q, k, v, mask, dtype, scale):
    """Dense masked attention in ``dtype``: q [B, Hq, Lq, D], k, v [B, Hq, L, D], mask [B, Hq, Lq, L]."""
    s = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s.double(), -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.matmul(p, v.to(dtype)), lse


def oracle(q, cache, layer, sel, scale=None):
    """(ref float64, ref lse, pt in q's dtype) on the CPU."""
    B, Hq, Lq, D = q.shape
    Hkv = cache.num_kv_heads
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    K, V = cache.gather(layer)
    K, V = K.cpu(), V.cpu()
    L = K.shape[2]
    lens = torch.tensor(cache.host_lengths(layer)).view(B, 1, 1, 1)
    pos = torch.arange(L).view(1, 1, 1, L)
    qpos = lens - Lq + torch.arange(Lq).view(1, 1, Lq, 1)
    mask = (pos < lens) & (pos <= qpos)  # [B, 1, Lq, L]
    if sel is not None:
        tm = sel.token_mask(cache.layer_lengths(layer), L).cpu()  # [B|1, H, L]
        tm = tm.expand(B, Hkv, L).repeat_interleave(Hq // Hkv, 1)
        mask = mask & tm.unsqueeze(2)
    mask = mask.expand(B, Hq, Lq, L)
    G = Hq // Hkv
    Kq, Vq = K.repeat_interleave(G, 1), V.repeat_interleave(G, 1)
    ref, ref_lse = masked_attention(q.cpu(), Kq, Vq, mask, torch.float64, scale)
    pt, _ = masked_attention(q.cpu(), Kq, Vq, mask, q.dtype, scale)
    return ref, ref_lse, pt


def run_case(backend, B, Hq, Hkv, D, lengths, *, Lq=1, dtype=torch.bfloat16, kind="pages", sel_heads=None,
             sel_batch=None, page_size=16, seed=0, scale=None):
    cache = make_cache(B, Hkv, D, lengths, dtype=dtype, page_size=page_size, seed=seed)
    sel = None if kind == "dense" else random_selection(cache, sel_heads or Hkv, kind=kind, seed=seed, batch=sel_batch)
    q = make_q(B, Hq, Lq, D, dtype, seed=seed + 1)
    out, lse = sparse_decode_attention(q, cache, 0, sel, backend=backend, return_lse=True, scale=scale)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (B, Hq, Lq) and lse.dtype == torch.float32
    ref, ref_lse, pt = oracle(q, cache, 0, sel, scale)
    assert_tolerance(out, lse, ref, ref_lse, pt, factor=FACTOR.get(backend, 3.0))
    return cache, sel, q, out, lse


# ----------------------------------------------------------------------------- matrix
RAGGED = [37, 16, 1, 50]  # partial last pages, an exact page, a single token


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group", [1, 3, 4, 8])
def test_gqa_ratios(backend, group):
    Hkv = 2 if group < 8 else 1
    run_case(backend, 4, Hkv * group, Hkv, 64, RAGGED, kind="pages")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_head_dims_and_dtypes(backend, D, dtype):
    run_case(backend, 2, 4, 2, D, [45, 70], dtype=dtype, kind="pages_tokens")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["dense", "all", "pages", "one", "empty", "tokens", "pages_tokens"])
def test_selection_kinds_on_a_ragged_batch(backend, kind):
    run_case(backend, 4, 4, 2, 32, RAGGED, kind=kind)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Lq", [2, 5])
@pytest.mark.parametrize("kind", ["dense", "pages_tokens"])
def test_speculative_queries_are_causal_among_themselves(backend, Lq, kind):
    run_case(backend, 2, 8, 2, 32, [41, 19], Lq=Lq, kind=kind)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page_size", [4, 24, 64])
def test_page_sizes(backend, page_size):
    # 4 and 24: tiles span several (or fractional) pages; 64: one page spans several tiles.
    run_case(backend, 2, 4, 2, 32, [150, 67], page_size=page_size, kind="pages_tokens")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads,batch", [(1, None), (2, 1), (1, 1)])
def test_selection_shared_across_heads_or_batch(backend, heads, batch):
    run_case(backend, 3, 4, 2, 32, [60, 33, 47], kind="pages_tokens", sel_heads=heads, sel_batch=batch)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_scale(backend):
    run_case(backend, 2, 2, 1, 32, [40, 9], kind="pages", scale=0.2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_pages_equals_dense(backend):
    cache = make_cache(3, 2, 32, [60, 33, 1])
    q = make_q(3, 4, 1, 32, torch.bfloat16)
    dense = sparse_decode_attention(q, cache, 0, None, backend=backend)
    allp = sparse_decode_attention(q, cache, 0, random_selection(cache, 2, kind="all"), backend=backend)
    ref, _, pt = oracle(q, cache, 0, None)
    for out in (dense, allp):
        assert_tolerance(out, None, ref, None, pt, factor=FACTOR[backend])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_selection_gives_zeros_and_neg_inf(backend):
    cache = make_cache(2, 2, 32, [40, 3])
    q = make_q(2, 4, 3, 32, torch.bfloat16)
    out, lse = sparse_decode_attention(q, cache, 0, random_selection(cache, 2, kind="empty"), backend=backend,
                                       return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    # Zero-width selections too (maxP = 0).
    empty = DecodeSelection.from_pages(torch.zeros(2, 2, 0, dtype=torch.int32, device=DEVICE), page_size=16)
    out, lse = sparse_decode_attention(q, cache, 0, empty, backend=backend, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_queries_and_empty_batch(backend):
    cache = make_cache(2, 2, 32, [5, 3])
    out, lse = sparse_decode_attention(make_q(2, 4, 0, 32, torch.bfloat16), cache, 0, None, backend=backend,
                                       return_lse=True)
    assert out.shape == (2, 4, 0, 32) and lse.shape == (2, 4, 0)
    fresh = PagedKVCache(1, 2, 32, dtype=torch.bfloat16, device=DEVICE)  # nothing appended: B = 0
    out = sparse_decode_attention(make_q(0, 4, 1, 32, torch.bfloat16), fresh, 0, backend=backend)
    assert out.shape == (0, 4, 1, 32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_key_with_very_negative_logit_gets_weight_one(backend):
    cache = make_cache(1, 1, 32, [40], dtype=torch.float32)
    K, V = cache.gather(0)
    q = (-30.0 * K[0, 0, 5] / K[0, 0, 5].norm() * 10).view(1, 1, 1, 32).contiguous()
    sel = DecodeSelection.from_tokens(torch.tensor([[[5]]], dtype=torch.int32, device=DEVICE), page_size=16)
    out = sparse_decode_attention(q, cache, 0, sel, backend=backend)
    assert torch.equal(out[0, 0, 0], V[0, 0, 5])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_value_stays_in_rows_that_attend_it(backend):
    # Lq = 3: the newest token's value is NaN; only the last query row sees it (causal).
    cache = make_cache(1, 1, 32, [40], dtype=torch.float32)
    pool = cache.v_pages(0)
    phys = int(cache.page_table[0, 39 // 16])
    pool[phys, 0, 39 % 16, 4] = float("nan")
    q = make_q(1, 2, 3, 32, torch.float32)
    out = sparse_decode_attention(q, cache, 0, None, backend=backend)
    bad = ~torch.isfinite(out).all(-1)
    assert bad[0, :, 2].all() and not bad[0, :, :2].any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_value_in_a_selected_page_poisons_only_its_group(backend, bad):
    # Lq = 1 (the kernel checks its accumulators at the end, not each tile): a non-finite value in a
    # selected page of (sequence 1, KV head 0) makes exactly that group's rows NaN; the same value in
    # a page nobody selected changes nothing.
    cache = make_cache(2, 2, 32, [70, 50], dtype=torch.bfloat16)
    pool = cache.v_pages(0)
    pool[int(cache.page_table[1, 1]), 0, 3, 7] = bad  # token 19 of sequence 1, head 0: selected
    pool[int(cache.page_table[0, 4]), 1, 2, 0] = bad  # token 66 of sequence 0, head 1: not selected
    pages = torch.tensor([[[0, 1, 2], [0, 1, 3]], [[1, 2, 3], [0, 2, 3]]], dtype=torch.int32, device=DEVICE)
    sel = DecodeSelection.from_pages(pages, page_size=16)
    q = make_q(2, 6, 1, 32, torch.bfloat16)
    out = sparse_decode_attention(q, cache, 0, sel, backend=backend)
    bad_rows = ~torch.isfinite(out).all(-1)[..., 0]  # [B, Hq]
    expected = torch.zeros(2, 6, dtype=torch.bool, device=out.device)
    expected[1, :3] = True
    assert torch.equal(bad_rows, expected)
    assert torch.isnan(out[1, :3]).all()  # NaN, never +-inf, whatever the value was


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    cache = make_cache(2, 2, 32, [90, 33])
    sel = random_selection(cache, 2, kind="pages_tokens")
    q = make_q(2, 6, 2, 32, torch.bfloat16)
    a = sparse_decode_attention(q, cache, 0, sel, backend=backend, return_lse=True)
    b = sparse_decode_attention(q, cache, 0, sel, backend=backend, return_lse=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_q(backend):
    cache = make_cache(2, 2, 32, [50, 20])
    packed = make_q(2, 2, 4 + 2 * 2, 32, torch.bfloat16)  # [B, Lq, heads, D] of a packed qkv projection
    q = packed[:, :, :4].transpose(1, 2)  # [B, Hq, Lq=2, D], a strided view
    assert not q.is_contiguous()
    sel = random_selection(cache, 2)
    assert torch.equal(sparse_decode_attention(q, cache, 0, sel, backend=backend),
                       sparse_decode_attention(q.contiguous(), cache, 0, sel, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_reference_and_triton_refuses_it(backend):
    cache = make_cache(1, 1, 32, [30], dtype=torch.float64)
    q = make_q(1, 2, 1, 32, torch.float64)
    if backend == "reference":
        ref, _, _ = oracle(q, cache, 0, None)
        torch.testing.assert_close(sparse_decode_attention(q, cache, 0, backend="reference").cpu(), ref,
                                   rtol=1e-12, atol=1e-12)
    else:
        with pytest.raises(NotImplementedError, match="float16, bfloat16 and float32"):
            sparse_decode_attention(q, cache, 0, backend="triton")


# ----------------------------------------------------------------------------- kernel-level
@needs_triton
@pytest.mark.parametrize("num_splits", [1, 2, 3, 7])
def test_forced_split_counts_agree(num_splits):
    from sparseattn.kernels.decode_triton import decode_attention_triton

    cache = make_cache(2, 2, 32, [150, 77])
    sel = random_selection(cache, 2, kind="pages_tokens", density=0.7, n_tokens=9)
    q = make_q(2, 8, 2, 32, torch.bfloat16)
    poisoned = torch.full_like(q, float("nan"))
    out, lse = decode_attention_triton(q, cache.k_pages(0), cache.v_pages(0), cache.page_table_storage,
                                       cache.layer_lengths(0), page_size=16, pages=sel.pages,
                                       page_counts=sel.page_counts, tokens=sel.tokens, token_counts=sel.token_counts,
                                       return_lse=True, num_splits=num_splits, out=poisoned)
    ref, ref_lse, pt = oracle(q, cache, 0, sel)
    assert_tolerance(out, lse, ref, ref_lse, pt, factor=3.0)


@needs_triton
@pytest.mark.parametrize("prefetch", [0, 1, 2])
@pytest.mark.parametrize("num_splits,block_n", [(1, 16), (3, 16), (3, 32)])
def test_prefetch_variants_agree(prefetch, num_splits, block_n):
    # The software-pipelined walks (next tile's addresses, or addresses and K/V, issued before this
    # tile is attended): pages and tokens, splits whose ranges end mid-tile, empty and one-tile walks.
    from sparseattn.kernels.decode_triton import decode_attention_triton

    cache = make_cache(3, 2, 32, [150, 77, 9])
    sel = random_selection(cache, 2, kind="pages_tokens", density=0.7, n_tokens=40)
    q = make_q(3, 4, 1, 32, torch.bfloat16)
    out, lse = decode_attention_triton(q, cache.k_pages(0), cache.v_pages(0), cache.page_table_storage,
                                       cache.layer_lengths(0), page_size=16, pages=sel.pages,
                                       page_counts=sel.page_counts, tokens=sel.tokens, token_counts=sel.token_counts,
                                       return_lse=True, num_splits=num_splits, config=(block_n, 4, 1, prefetch),
                                       out=torch.full_like(q, float("nan")))
    ref, ref_lse, pt = oracle(q, cache, 0, sel)
    assert_tolerance(out, lse, ref, ref_lse, pt, factor=3.0)


def _list_logits(q, cache, sel, scale):
    from sparseattn.kernels.list_logits_triton import list_logits_torch

    return list_logits_torch(q, cache.k_pages(0), cache.page_table, sel.tokens, sel.token_counts,
                             cache.layer_lengths(0), page_size=cache.page_size, scale=scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,Lq,group,scale", [("tokens", 1, 4, None), ("pages_tokens", 1, 3, None),
                                                 ("tokens", 3, 2, None), ("pages_tokens", 2, 1, 0.3)])
def test_given_token_logits_replace_the_key_products(backend, kind, Lq, group, scale):
    # H2O / TOVA hand the attention the logits they scored the list with: the kernels read the
    # token part's values only. With the true logits the result is the attention itself (the
    # oracle); logits made with another scale are rescaled to the attention's.
    from dataclasses import replace

    B, Hkv, D = 3, 2, 32
    cache = make_cache(B, Hkv, D, [150, 77, 9])
    sel = random_selection(cache, Hkv, kind=kind, density=0.4, n_tokens=40)
    q = make_q(B, Hkv * group, Lq, D, torch.bfloat16)
    logits = _list_logits(q, cache, sel, 0.5)
    given = replace(sel, token_logits=logits, logits_scale=0.5)
    out, lse = sparse_decode_attention(q, cache, 0, given, backend=backend, return_lse=True, scale=scale)
    ref, ref_lse, pt = oracle(q, cache, 0, sel, scale)
    assert_tolerance(out, lse, ref, ref_lse, pt, factor=FACTOR[backend])


@pytest.mark.parametrize("backend", BACKENDS)
def test_given_token_logits_are_what_the_kernels_use(backend):
    # Logits of other queries (a token-only selection): the output is those queries' attention.
    # And a view of the last query's rows (TOVA scores with the last query only).
    from dataclasses import replace

    cache = make_cache(2, 2, 32, [150, 77])
    sel = random_selection(cache, 2, kind="tokens", n_tokens=40)
    q, other = make_q(2, 8, 1, 32, torch.bfloat16, seed=3), make_q(2, 8, 1, 32, torch.bfloat16, seed=4)
    out, lse = sparse_decode_attention(q, cache, 0, replace(sel, token_logits=_list_logits(other, cache, sel, 32 ** -0.5)),
                                       backend=backend, return_lse=True)
    ref, ref_lse, pt = oracle(other, cache, 0, sel)
    assert_tolerance(out, lse, ref, ref_lse, pt, factor=FACTOR[backend])
    q3 = make_q(2, 8, 3, 32, torch.bfloat16, seed=5)
    last = _list_logits(q3, cache, sel, 32 ** -0.5)[:, :, :, -1:]  # [B, Hkv, G, 1, W], rows 3 W apart
    out, lse = sparse_decode_attention(q3[:, :, -1:], cache, 0, replace(sel, token_logits=last), backend=backend,
                                       return_lse=True)
    ref, ref_lse, pt = oracle(q3[:, :, -1:], cache, 0, sel)
    assert_tolerance(out, lse, ref, ref_lse, pt, factor=FACTOR[backend])


def test_given_token_logits_validation():
    from dataclasses import replace

    cache = make_cache(2, 2, 32, [40, 20])
    sel = random_selection(cache, 2, kind="tokens", n_tokens=6)
    q = make_q(2, 4, 1, 32, torch.bfloat16)
    logits = _list_logits(q, cache, sel, 0.2)
    pages = random_selection(cache, 2, kind="pages")
    with pytest.raises(ValueError, match="need tokens"):
        replace(pages, token_logits=logits)
    with pytest.raises(ValueError, match="float32"):
        replace(sel, token_logits=logits.double())
    with pytest.raises(ValueError, match="width"):
        replace(sel, token_logits=logits[..., :-1])
    with pytest.raises(ValueError, match="logits_scale"):
        replace(sel, token_logits=logits, logits_scale=-1.0)
    with pytest.raises(ValueError, match=r"\[B, Hkv, G, Lq, maxT\]"):
        sparse_decode_attention(make_q(2, 4, 2, 32, torch.bfloat16), cache, 0, replace(sel, token_logits=logits))
    assert sel.with_tokens(sel.tokens, sel.token_counts).token_logits is None
    assert replace(sel, token_logits=logits).to(DEVICE).token_logits is not None


@needs_triton
def test_many_query_rows_use_several_row_tiles():
    # G * Lq = 8 * 9 = 72 rows > 64 rows per program.
    run_case("triton", 1, 8, 1, 32, [60], Lq=9, kind="pages_tokens")


def test_auto_uses_reference_on_cpu(monkeypatch):
    from sparseattn.decode_api import choose_decode_backend

    cache = make_cache(1, 1, 32, [5], dtype=torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert choose_decode_backend("auto", torch.randn(1, 1, 1, 32), cache) == "reference"


@needs_triton
def test_forced_triton_says_why(monkeypatch):
    cache = PagedKVCache(1, 1, 32, dtype=torch.float32)
    cache.append(0, torch.randn(1, 1, 4, 32), torch.randn(1, 1, 4, 32))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        sparse_decode_attention(torch.randn(1, 1, 1, 32), cache, 0, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    c48 = PagedKVCache(1, 1, 48, dtype=torch.float32, device=DEVICE)
    c48.append(0, torch.randn(1, 1, 4, 48, device=DEVICE), torch.randn(1, 1, 4, 48, device=DEVICE))
    with pytest.raises(NotImplementedError, match="head_dim in"):
        sparse_decode_attention(torch.randn(1, 1, 1, 48, device=DEVICE), c48, 0, backend="triton")
    out = sparse_decode_attention(torch.randn(1, 1, 1, 48, device=DEVICE), c48, 0)  # auto: reference fallback
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------- bad inputs
def _small():
    cache = make_cache(2, 2, 32, [40, 20], dtype=torch.float32)
    return cache, make_q(2, 4, 1, 32, torch.float32)


def test_selection_beyond_a_sequence_raises():
    cache, q = _small()
    P = 16
    # Sequence 1 holds 20 tokens = 2 pages: page 2 does not exist for it.
    pages = torch.tensor([[[0, 2], [1, 2]], [[0, 2], [0, 1]]], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"pages\[1, 0, 1\] = 2 lies beyond sequence 1's 20 tokens"):
        sparse_decode_attention(q, cache, 0, DecodeSelection.from_pages(pages, page_size=P), validate=True)
    toks = torch.tensor([[[3, 39]], [[5, 20]]], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="beyond sequence 1"):
        sparse_decode_attention(q, cache, 0, DecodeSelection.from_tokens(toks, page_size=P), validate=True)
    # Shared across the batch: must fit the shortest sequence.
    with pytest.raises(ValueError, match="beyond"):
        sparse_decode_attention(q, cache, 0, DecodeSelection.from_tokens(toks[:1], page_size=P), validate=True)
    with pytest.raises(ValueError, match="strictly ascending"):
        sparse_decode_attention(q, cache, 0, DecodeSelection.from_pages(pages.flip(-1).clamp(max=1), page_size=P),
                                validate=True)
    with pytest.raises(ValueError, match="negative"):
        sparse_decode_attention(q, cache, 0, DecodeSelection.from_pages(pages - 1, page_size=P), validate=True)
    with pytest.raises(ValueError, match=r"page_counts must lie in \[0, 2\]"):
        sparse_decode_attention(q, cache, 0, DecodeSelection.from_pages(
            pages, torch.full((2, 2), 3, dtype=torch.int32, device=DEVICE), page_size=P), validate=True)
    inside = DecodeSelection.from_pages(pages[:, :, :1], page_size=P).with_tokens(
        torch.tensor([[[3], [35]], [[17], [18]]], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="inside a selected page"):
        sparse_decode_attention(q, cache, 0, inside, validate=True)
    # validate=False skips the (syncing) checks; the kernels still read nothing out of bounds.
    out = sparse_decode_attention(q, cache, 0, DecodeSelection.from_pages(pages, page_size=P), validate=False)
    assert torch.isfinite(out).all()


def test_sorting_and_mask_constructors():
    pages = torch.tensor([[[5, 1, 3, 9]]], dtype=torch.int32)
    sel = DecodeSelection.from_pages(pages, torch.tensor([[3]], dtype=torch.int32), page_size=16, sort=True)
    assert sel.pages.tolist() == [[[1, 3, 5, 0]]]
    mask = torch.tensor([[[False, True, False, True, True]]])
    sel = DecodeSelection.from_page_mask(mask, page_size=16)
    assert sel.page_counts.tolist() == [[3]] and sel.pages[0, 0, :3].tolist() == [1, 3, 4]
    tm = sel.token_mask(torch.tensor([70]), 80)
    assert tm.shape == (1, 1, 80) and tm.sum() == 16 + 16 + 6 and tm[0, 0, 16] and not tm[0, 0, 70]


def test_validation_messages():
    cache, q = _small()
    with pytest.raises(ValueError, match="cache dtype"):
        sparse_decode_attention(q.half(), cache, 0)
    with pytest.raises(ValueError, match="cache device"):
        sparse_decode_attention(q.to("meta"), cache, 0)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        sparse_decode_attention(q[:, :3], cache, 0)
    with pytest.raises(ValueError, match="head_dim mismatch"):
        sparse_decode_attention(q[..., :16], cache, 0)
    with pytest.raises(ValueError, match="holds 2 sequences"):
        sparse_decode_attention(q[:1], cache, 0)
    with pytest.raises(ValueError, match="append k, v before attending"):
        sparse_decode_attention(make_q(2, 4, 21, 32, torch.float32), cache, 0)
    with pytest.raises(ValueError, match="layer must be"):
        sparse_decode_attention(q, cache, 1)
    with pytest.raises(ValueError, match="4-D"):
        sparse_decode_attention(q[0], cache, 0)
    with pytest.raises(ValueError, match="backend must be one of"):
        sparse_decode_attention(q, cache, 0, backend="cuda")
    with pytest.raises(ValueError, match="scale must be"):
        sparse_decode_attention(q, cache, 0, scale=0.0)
    with pytest.raises(TypeError, match="DecodeSelection"):
        sparse_decode_attention(q, cache, 0, "dense")
    sel = random_selection(cache, 2)
    with pytest.raises(ValueError, match="page_size=8"):
        sparse_decode_attention(q, cache, 0, DecodeSelection.from_pages(sel.pages, sel.page_counts, page_size=8))
    with pytest.raises(ValueError, match="heads must be 1 or Hkv=2"):
        sparse_decode_attention(q, cache, 0, random_selection(cache, 4))
    with pytest.raises(ValueError, match="batch must be 1 or 2"):
        sparse_decode_attention(q, cache, 0, DecodeSelection.from_pages(sel.pages.repeat(2, 1, 1), page_size=16))
    with pytest.raises(ValueError, match="int32"):
        DecodeSelection(sel.page_counts.long(), sel.pages, 16)
    with pytest.raises(ValueError, match="selection=None"):
        DecodeSelection(None, None, 16)


# ----------------------------------------------------------------------------- GPU-only, larger
@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["dense", "pages_tokens"])
def test_gpu_medium_shapes(D, dtype, kind):
    run_case("auto", 4, 32, 8, D, [4096 + 7, 1500, 16, 3000], Lq=1, dtype=dtype, kind=kind)
    run_case("auto", 2, 12, 4, D, [2048 + 9, 999], Lq=4, dtype=dtype, kind=kind)


@requires_cuda
@pytest.mark.gpu
def test_gpu_long_sequence_splits_and_sparse_matches_oracle():
    # One sequence of 128K: split-K must fill the GPU; compare on a sparse selection and dense.
    L, Hkv, Hq, D = 131072 + 77, 2, 16, 128
    cache = make_cache(1, Hkv, D, [L], steps=1)
    q = make_q(1, Hq, 1, D, torch.bfloat16)
    for kind in ("dense", "pages"):
        sel = None if kind == "dense" else random_selection(cache, Hkv, density=0.1)
        out, lse = sparse_decode_attention(q, cache, 0, sel, return_lse=True)
        ref, ref_lse, pt = oracle(q, cache, 0, sel)
        assert_tolerance(out, lse, ref, ref_lse, pt, factor=3.0)


@requires_cuda
@pytest.mark.gpu
def test_gpu_page_offsets_beyond_int32():
    # Sequence 1's pages sit after sequence 0's 2**21 tokens: physical offsets past 2**31 elements.
    Hkv, D, P = 8, 128, 16
    big = 2**21 + 64
    cache = PagedKVCache(1, Hkv, D, page_size=P, dtype=torch.bfloat16, device="cuda", max_batch=2)
    cache.reserve(big + 64)
    chunk = torch.randn(2, Hkv, 65536, D, device="cuda", dtype=torch.bfloat16)
    for start in range(0, big, 65536):
        n = min(65536, big - start)
        cache.append(0, chunk[:, :, :n], chunk[:, :, :n], seq_lens=[n, 0])
    g = torch.Generator().manual_seed(0)
    k1 = torch.randn(1, Hkv, 300, D, generator=g).to("cuda", torch.bfloat16)
    v1 = torch.randn(1, Hkv, 300, D, generator=g).to("cuda", torch.bfloat16)
    pad = torch.zeros(1, Hkv, 300, D, device="cuda", dtype=torch.bfloat16)
    cache.append(0, torch.cat([pad, k1]), torch.cat([pad, v1]), seq_lens=[1, 300])
    assert int(cache.page_table[1, 0]) * Hkv * P * D > 2**31
    q = make_q(2, 32, 1, D, torch.bfloat16)
    out = sparse_decode_attention(q, cache, 0, None)
    kk, vv = k1.repeat_interleave(4, 1).double(), v1.repeat_interleave(4, 1).double()
    p = torch.softmax(q[1:].double() @ kk.transpose(-1, -2) / math.sqrt(D), -1)
    ref = p @ vv
    got = out[1:].double()
    pt = torch.softmax((q[1:] @ k1.repeat_interleave(4, 1).transpose(-1, -2)).float() / math.sqrt(D), -1)
    base = ((pt.to(torch.bfloat16) @ v1.repeat_interleave(4, 1)).double() - ref).abs().max().item()
    assert torch.isfinite(got).all() and (got - ref).abs().max().item() <= 3 * base + 1e-5


@requires_cuda
@pytest.mark.gpu
def test_gpu_decode_step_has_no_host_sync():
    cache = make_cache(4, 8, 128, [3000, 1000, 17, 2048])
    sel = random_selection(cache, 8)
    q = make_q(4, 32, 1, 128, torch.bfloat16)
    sparse_decode_attention(q, cache, 0, sel, validate=False)  # compile outside the guard
    sparse_decode_attention(q, cache, 0, None)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sparse_decode_attention(q, cache, 0, sel, validate=False)
        sparse_decode_attention(q, cache, 0, None)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_dependent_launch_only_for_compiled_kernels_on_hopper(monkeypatch):
    from sparseattn.kernels import dispatch

    assert dispatch.dependent_launch(torch.device("cpu")) is False
    assert dispatch.pdl_kwargs(False) == {} and dispatch.pdl_kwargs(True) == {"launch_pdl": True}
    monkeypatch.setattr(dispatch, "device_capability", lambda index: (9, 0))
    monkeypatch.setattr(dispatch, "triton_interpreting", lambda: False)
    monkeypatch.delenv("SPARSEATTN_PDL", raising=False)
    assert dispatch.dependent_launch(torch.device("cuda", 0)) is True
    monkeypatch.setenv("SPARSEATTN_PDL", "0")
    assert dispatch.dependent_launch(torch.device("cuda", 0)) is False
    monkeypatch.setenv("SPARSEATTN_PDL", "1")
    monkeypatch.setattr(dispatch, "device_capability", lambda index: (8, 0))
    assert dispatch.dependent_launch(torch.device("cuda", 0)) is False
    monkeypatch.setattr(dispatch, "triton_interpreting", lambda: True)
    monkeypatch.setattr(dispatch, "device_capability", lambda index: (9, 0))
    assert dispatch.dependent_launch(torch.device("cuda", 0)) is False


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["pages_tokens", "dense"])
def test_gpu_dependent_launch_in_a_graph_equals_plain_launches(kind, monkeypatch):
    # The streaming selection kernel -> decode kernel -> merge chain, replayed from a CUDA graph with
    # programmatic dependent launch, gives bit-identical results to plain launches (on pre-Hopper GPUs
    # both runs are plain launches). The selection is rebuilt inside the graph, so a decode kernel
    # that read it before the selection kernel's writes landed would differ.
    from sparseattn.kernels.streaming_select_triton import streaming_select_triton

    cache = make_cache(4, 8, 128, [3000, 1000, 17, 2048])
    q = make_q(4, 32, 1, 128, torch.bfloat16)
    lengths = cache.layer_lengths(0)

    def step():
        if kind == "dense":
            return sparse_decode_attention(q, cache, 0, None, validate=False)
        pc, pages, tc, tokens = streaming_select_triton(lengths, q_len=1, sink=4, window=700, page_size=16,
                                                        width_pages=48)
        sel = DecodeSelection(pages=pages, page_counts=pc, tokens=tokens, token_counts=tc, page_size=16)
        return sparse_decode_attention(q, cache, 0, sel, validate=False)

    results = []
    for flag in ("0", "1"):
        monkeypatch.setenv("SPARSEATTN_PDL", flag)
        step()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        graph.replay()
        torch.cuda.synchronize()
        results.append(out.clone())
        eager = step()
        assert torch.equal(out, eager)
    assert torch.equal(results[0], results[1])


def test_long_selections_take_the_long_walk_config(monkeypatch):
    # DuoAttention's retrieval heads list every page: such walks must not take the short-selection
    # tiles and split rule (that made duo's 128K step 1.8x slower on the H100), nor (D=128) the
    # dense walk's tiles (1.25x slower at B=8 since session 9), but the long-selection ones.
    from sparseattn.kernels import decode_triton as dt

    monkeypatch.setattr(dt, "triton_interpreting", lambda: False)
    monkeypatch.setattr(dt, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    assert dt.short_selection(False, 2048) and dt.short_selection(False, dt.SHORT_SELECTION_TOKENS)
    assert not dt.short_selection(False, dt.SHORT_SELECTION_TOKENS + 1) and not dt.short_selection(True, 2048)
    for D in (64, 128):
        long_config = dt.default_config(D, torch.bfloat16, sparse=dt.short_selection(False, 131072),
                                        long_selection=True)
        assert long_config == dt._LONG_SELECTION_CONFIGS_16BIT.get(D, dt._CONFIGS_16BIT[D])
        assert long_config != dt._SPARSE_CONFIGS_16BIT[D]
        assert dt.default_config(D, torch.bfloat16, sparse=dt.short_selection(False, 2048)) == \
            dt._SPARSE_CONFIGS_16BIT[D]
    # Split rule: the dense one (4 programs per SM, >= 64 tokens per split) for long walks.
    assert dt.choose_num_splits(24, 131072, cuda, sparse=False, head_dim=64) == 22
    assert dt.choose_num_splits(24, 2048, cuda, sparse=True, head_dim=64) == 44
    # Wide dense walks (D=128, at least a quarter as many (sequence, KV head) pairs as SMs): 256-key
    # tiles at 2 programs per SM; B=1 of 8 KV heads stays on the dense rule; selections never go wide.
    bf16 = torch.bfloat16
    assert dt.wide_walk(True, 64, 128, bf16, cuda) and not dt.wide_walk(True, 8, 128, bf16, cuda)
    assert not dt.wide_walk(False, 64, 128, bf16, cuda) and not dt.wide_walk(True, 64, 64, bf16, cuda)
    assert not dt.wide_walk(True, 64, 128, torch.float32, cuda)
    assert not dt.wide_walk(True, 64, 128, bf16, torch.device("cpu"))
    assert dt.default_config(128, bf16, wide=True) == dt._WIDE_CONFIGS_16BIT[128] != dt.default_config(128, bf16)
    assert dt.choose_num_splits(64, 131072, cuda, head_dim=128, wide=True) == 4
    assert dt.choose_num_splits(8, 131072, cuda, head_dim=128) == 66


@needs_triton
def test_launch_picks_the_config_by_selection_width(monkeypatch):
    # The launch asks for the short-selection config by the selection's width (a shape: no sync),
    # and a wide selection with few pages in use still gives the right output.
    from sparseattn.kernels import decode_triton as dt

    asked = []
    real = dt.default_config
    monkeypatch.setattr(dt, "default_config",
                        lambda D, dtype, sparse=False, wide=False, long_selection=False:
                        asked.append((sparse, long_selection)) or real(D, dtype))
    cache = make_cache(2, 2, 32, [150, 77])
    q = make_q(2, 4, 1, 32, torch.bfloat16)
    for width, short in ((10, True), (dt.SHORT_SELECTION_TOKENS // 16 + 1, False)):
        pages = torch.zeros(2, 2, width, dtype=torch.int32, device=DEVICE)
        pages[..., 1] = 3
        counts = torch.full((2, 2), 2, dtype=torch.int32, device=DEVICE)
        sel = DecodeSelection(pages=pages, page_counts=counts, page_size=16)
        out, lse = dt.decode_attention_triton(q, cache.k_pages(0), cache.v_pages(0), cache.page_table_storage,
                                              cache.layer_lengths(0), page_size=16, pages=pages, page_counts=counts,
                                              return_lse=True)
        assert asked[-1] == (short, not short)
        ref, ref_lse, pt = oracle(q, cache, 0, sel)
        assert_tolerance(out, lse, ref, ref_lse, pt, factor=3.0)
