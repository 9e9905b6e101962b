"""paged_logits_triton / paged_probs_triton against the PyTorch exact_logits, exact_probs and kept_attention.

On this CPU machine the kernels run in the Triton interpreter; the ``requires_cuda`` twin runs the
same comparison compiled on a GPU in bf16 at a realistic size. The oracle is the PyTorch path of
the same function (the CPU path), for float32 caches in float32 and for 16-bit caches with the
queries in float32 (the keys upcast: the same math as a 16-bit product with fp32 accumulation).
"""

import pytest
import torch

import sparseattn.decode_methods.base as dm_base
import sparseattn.decode_methods.eviction as dm_eviction
from sparseattn.cache import PagedKVCache
from sparseattn.decode_methods.base import exact_logits, exact_probs
from sparseattn.decode_methods.eviction import kept_attention

from ..conftest import HAS_CUDA, requires_cuda, triton_importable

pytestmark = pytest.mark.skipif(not triton_importable(), reason="triton is not installed (pip install triton)")

if triton_importable():
    from sparseattn.kernels.decode_logits_triton import choose_product, paged_logits_triton, paged_probs_triton

DEVICE = "cuda" if HAS_CUDA else "cpu"


def make_cache(lengths, Hkv, D, P, dtype=torch.float32, *, permute=False, seed=0, device=DEVICE):
    """A cache reaching ``lengths`` through a ragged prefill and two ragged one-token appends; with
    ``permute`` its physical pages are shuffled (pool and table together), so logical order != physical."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    cache = PagedKVCache(1, Hkv, D, page_size=P, dtype=dtype, device=device, max_batch=B, initial_pages=2)
    pre = [max(n - 2, 0) for n in lengths]
    chunks = [(max(pre), pre)] + [(1, [int(pre[b] + s < n) for b, n in enumerate(lengths)]) for s in range(2)]
    for T, counts in chunks:
        if T:
            k = torch.randn(B, Hkv, T, D, generator=g).to(device, dtype)
            cache.append(0, k, torch.zeros_like(k), seq_lens=counts)
    assert cache.host_lengths(0) == list(lengths)
    if permute:
        used = cache.pages_in_use
        perm = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(used, generator=g)]).to(device)
        pool = cache.k_pages(0)
        moved = torch.empty_like(pool[: used + 1])
        moved[perm] = pool[: used + 1]
        pool[: used + 1] = moved
        table = cache.page_table_storage
        table.copy_(perm[table.long()].to(torch.int32))
    return cache


def make_q(B, Hq, Lq, D, dtype=torch.float32, seed=1, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, Hq, Lq, D, generator=g).to(device, dtype)


def kernel_logits(q, cache, probs=False, **kw):
    fn = paged_probs_triton if probs else paged_logits_triton
    return fn(q, cache.k_pages(0), cache.page_table, cache.layer_lengths(0), page_size=cache.page_size,
              scale=kw.pop("scale", q.shape[-1] ** -0.5), **kw)


def assert_logits_equal(got, want, atol=1e-5, rtol=1e-5):
    assert got.dtype == torch.float32 and got.shape == want.shape
    masked = torch.isinf(want)
    assert torch.equal(torch.isinf(got), masked), "the -inf pattern (length / causal mask) differs"
    assert (got[masked] < 0).all()
    torch.testing.assert_close(got[~masked], want[~masked].float(), atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------- logits
# Lengths per page size: one ends mid-page, one is exactly one page; > 2 runs of the interpreter.
LENGTHS = {4: [71, 4], 16: [93, 16]}


@pytest.mark.parametrize("P", [4, 16])
@pytest.mark.parametrize("D", [32, 64])
@pytest.mark.parametrize("G", [1, 3, 4])
@pytest.mark.parametrize("Lq", [1, 3])
def test_logits_equal_exact_logits(P, D, G, Lq):
    Hkv = 2
    cache = make_cache(LENGTHS[P], Hkv, D, P, permute=True, seed=P + D + G)
    q = make_q(2, Hkv * G, Lq, D, seed=Lq)
    want = exact_logits(q, cache, 0)
    for use_dot in ([None, True, False] if G * Lq <= 8 else [None]):
        assert_logits_equal(kernel_logits(q, cache, use_dot=use_dot), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Lq,G", [(1, 4), (3, 3)])
def test_logits_16bit(dtype, Lq, G):
    cache = make_cache([45, 16, 9], 2, 64, 16, dtype=dtype, permute=True)
    q = make_q(3, 2 * G, Lq, 64, dtype=dtype)
    got = kernel_logits(q, cache)
    # Same math as the keys upcast to fp32 (a 16-bit product is exact in fp32): tight tolerance.
    assert_logits_equal(got, exact_logits(q.float(), cache, 0), atol=1e-5, rtol=1e-5)
    # The PyTorch 16-bit path rounds each logit to the input dtype once.
    assert_logits_equal(got, exact_logits(q, cache, 0), atol=2e-2, rtol=1e-2)
    if G * Lq <= 8:
        assert_logits_equal(kernel_logits(q, cache, use_dot=False), exact_logits(q.float(), cache, 0))
    # Mixed dtypes (fp32 queries, 16-bit keys: TokenSelect's mean query): bf16 keys take three exact
    # bf16 products of the split query, fp16 keys are upcast in registers; both are the fp32 product.
    assert choose_product(torch.float32, dtype, G * Lq) == ("dot_split" if dtype == torch.bfloat16 else
                                                            "sum" if G * Lq <= 8 else "dot_f32")
    assert_logits_equal(kernel_logits(q.float(), cache), exact_logits(q.float(), cache, 0))


@pytest.mark.parametrize("lengths,P,Lq", [([3], 4, 3), ([4], 4, 1), ([16, 1], 16, 1), ([6, 13], 6, 2)])
def test_logits_edge_cases(lengths, P, Lq):
    """One page (partly filled or full), Lq == length (all tokens new), a page size that is not a power of two."""
    cache = make_cache(lengths, 1, 32, P)
    q = make_q(len(lengths), 3, Lq, 32)
    assert_logits_equal(kernel_logits(q, cache), exact_logits(q, cache, 0))


def test_logits_odd_head_dim_scale_and_strided_q():
    cache = make_cache([30, 11], 2, 24, 4, permute=True)
    q = make_q(2, 4, 5, 24).transpose(1, 2).contiguous().transpose(1, 2)  # [B, Hq, Lq, D] with odd strides
    for scale in (None, 0.37):
        assert_logits_equal(kernel_logits(q, cache, **({} if scale is None else {"scale": scale})),
                            exact_logits(q, cache, 0, scale=scale))


def test_logits_many_rows_take_several_row_tiles():
    cache = make_cache([45, 23], 2, 32, 16, permute=True)
    q = make_q(2, 8, 20, 32)  # G * Lq = 80 rows > 64 per program
    assert_logits_equal(kernel_logits(q, cache), exact_logits(q, cache, 0))


def test_logits_explicit_config_and_empty():
    cache = make_cache([50, 21], 2, 32, 4)
    q = make_q(2, 6, 2, 32)
    want = exact_logits(q, cache, 0)
    for config in [(16, 4, 1), (64, 4, 1)]:
        assert_logits_equal(kernel_logits(q, cache, config=config), want)
    assert kernel_logits(q[:, :, :0], cache).shape == (2, 2, 3, 0, cache.max_pages * 4)


def test_logits_rejects_bad_inputs():
    cache = make_cache([9], 2, 32, 4)
    q = make_q(1, 4, 1, 32)
    kp, table, lens = cache.k_pages(0), cache.page_table, cache.layer_lengths(0)
    bad = [
        dict(q=q.double()),
        dict(q=q[0]),
        dict(q=make_q(1, 3, 1, 32)),  # Hq not a multiple of Hkv
        dict(q=make_q(1, 4, 1, 16)),  # head dim mismatch
        dict(table=table.long()),
        dict(table=table.expand(2, -1)),
        dict(lens=lens.float()),
        dict(page_size=16),
        dict(scale=float("nan")),
    ]
    for case in bad:
        with pytest.raises(ValueError):
            paged_logits_triton(case.get("q", q), kp, case.get("table", table), case.get("lens", lens),
                                page_size=case.get("page_size", 4), scale=case.get("scale", 0.1))


# ----------------------------------------------------------------------------- through the helpers
@pytest.mark.parametrize("G,Lq", [(1, 1), (3, 3), (4, 1)])
def test_exact_logits_and_probs_dispatch(G, Lq, monkeypatch):
    cache = make_cache([37, 16], 2, 32, 4, permute=True)
    q = make_q(2, 2 * G, Lq, 32)
    want_logits, want_probs = exact_logits(q, cache, 0), exact_probs(q, cache, 0)
    monkeypatch.setattr(dm_base, "use_triton_estimator", lambda x: True)
    assert_logits_equal(exact_logits(q, cache, 0), want_logits)
    got = exact_probs(q, cache, 0)
    torch.testing.assert_close(got, want_probs, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.sum(-1), torch.ones_like(got[..., 0]))
    # float64 inputs keep the PyTorch path (exact tests).
    assert exact_logits(q.double(), cache, 0).dtype == torch.float64


def test_probs_row_that_sees_nothing_is_zero():
    cache = make_cache([20, 5], 1, 32, 4)
    q = make_q(2, 2, 1, 32)
    k, t = cache.k_pages(0), cache.page_table
    got = paged_probs_triton(q, k, t, torch.tensor([20, 0], dtype=torch.int32, device=DEVICE), page_size=4, scale=0.2)
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    torch.testing.assert_close(got[0].sum(-1), torch.ones_like(got[0, ..., 0]))


@pytest.mark.parametrize("G,L,chunk", [(1, 1, None), (3, 5, 2), (4, 6, 4)])
def test_kept_attention_dispatch(G, L, chunk, monkeypatch):
    """Ragged rows (sequence 2 is shorter than L: its leading rows are padding), chunked rows, a keep mask."""
    Hkv = 2
    cache = make_cache([41, 4], Hkv, 32, 4, permute=True)
    q = make_q(2, Hkv * G, L, 32)
    g = torch.Generator().manual_seed(3)
    keep = torch.rand(2, Hkv, cache.max_pages * 4 + 5, generator=g).to(DEVICE) < 0.6
    want = kept_attention(q, cache, 0, keep, chunk_rows=chunk)
    monkeypatch.setattr(dm_eviction, "use_triton_estimator", lambda x: True)
    got = kept_attention(q, cache, 0, keep, chunk_rows=chunk)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- GPU twin
@requires_cuda
def test_cuda_bf16_8k_matches_pytorch(monkeypatch):
    """B=2, 32 query / 8 KV heads, D=128, ~8K tokens in bf16, compiled: logits, probs, kept_attention."""
    torch.manual_seed(0)
    lengths = [8192, 8192 - 77]
    cache = make_cache(lengths, 8, 128, 16, dtype=torch.bfloat16, permute=True, device="cuda")
    keep = torch.rand(2, 8, cache.max_pages * 16, device="cuda") < 0.7
    for Lq in (1, 3):
        q = make_q(2, 32, Lq, 128, dtype=torch.bfloat16, device="cuda")
        fused_logits, fused_probs = exact_logits(q, cache, 0), exact_probs(q, cache, 0)  # Triton on CUDA
        fused_kept = kept_attention(q, cache, 0, keep)
        for use_dot in (True, False):
            if not use_dot and 4 * Lq > 8:
                continue
            monkeypatch.setenv("SPARSEATTN_ESTIMATORS", "torch")
            want = exact_logits(q.float(), cache, 0)
            assert_logits_equal(kernel_logits(q, cache, use_dot=use_dot), want, atol=2e-3, rtol=2e-3)
            assert_logits_equal(kernel_logits(q.float(), cache, use_dot=use_dot), want, atol=2e-3, rtol=2e-3)
            monkeypatch.delenv("SPARSEATTN_ESTIMATORS")
        monkeypatch.setenv("SPARSEATTN_ESTIMATORS", "torch")
        assert_logits_equal(fused_logits, exact_logits(q.float(), cache, 0), atol=2e-3, rtol=2e-3)
        assert_logits_equal(fused_logits, exact_logits(q, cache, 0), atol=5e-2, rtol=2e-2)
        torch.testing.assert_close(fused_probs, exact_probs(q.float(), cache, 0), atol=1e-4, rtol=1e-2)
        torch.testing.assert_close(fused_kept, kept_attention(q, cache, 0, keep), atol=1e-4, rtol=1e-2)
        monkeypatch.delenv("SPARSEATTN_ESTIMATORS")
