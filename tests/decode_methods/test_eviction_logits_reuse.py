"""H2O / TOVA hand their step's list logits to the attention (``DecodeSelection.token_logits``).

A method that reuses its logits and a twin that does not (``_reuse_logits = False``) run side by
side over decode steps: they keep the same tokens (the reuse changes nothing upstream), the reusing
one's selection carries logits over exactly its token lanes (H2O: all ``Lq`` queries; TOVA: only
at ``Lq = 1``, since it scores with the last query), and the two attentions agree to the kernels'
tolerance on the reference backend and on the Triton kernel (the interpreter on a CPU machine).
"""

import pytest
import torch

from sparseattn.cache import PagedKVCache
from sparseattn.decode_api import sparse_decode_attention
from sparseattn.methods.registry import get_method

from ..conftest import HAS_CUDA, triton_importable

DEVICE = "cuda" if HAS_CUDA else "cpu"
BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.skipif(
    not triton_importable(), reason="triton is not installed (pip install triton)"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,cfg,Lq", [("h2o", dict(hh_size=6, recent_size=5), 1),
                                         ("h2o", dict(hh_size=6, recent_size=5), 2),
                                         ("tova", dict(cache_size=9), 1), ("tova", dict(cache_size=9), 2)])
def test_reused_logits_give_the_same_attention(backend, name, cfg, Lq):
    Hq, Hkv, D, P, prompts, steps = 8, 2, 32, 4, (29, 17), 12
    reuse, twin = get_method(name, kind="decode", **cfg), get_method(name, kind="decode", **cfg)
    twin._reuse_logits = False
    g = torch.Generator().manual_seed(0)
    B, T = len(prompts), max(prompts)
    cache = PagedKVCache(1, Hkv, D, page_size=P, dtype=torch.float32, device=DEVICE, max_batch=B, initial_pages=2)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE)

    cache.append(0, rand(B, Hkv, T, D), rand(B, Hkv, T, D), seq_lens=list(prompts))
    q = rand(B, Hq, T, D)
    reuse.on_prefill(q, cache, 0)
    twin.on_prefill(q, cache, 0)
    for _ in range(steps):
        cache.append(0, rand(B, Hkv, Lq, D), rand(B, Hkv, Lq, D))
        q = rand(B, Hq, Lq, D)
        a, b = reuse.select(q, cache, 0), twin.select(q, cache, 0)
        assert b.token_logits is None
        if name == "tova" and Lq > 1:
            assert a.token_logits is None
        else:
            assert a.token_logits is not None
            assert tuple(a.token_logits.shape) == (B, Hkv, Hq // Hkv, Lq, a.tokens.shape[-1])
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.token_counts, b.token_counts)
        assert torch.equal(reuse.kept(cache, 0), twin.kept(cache, 0))
        got, got_lse = sparse_decode_attention(q, cache, 0, a, backend=backend, return_lse=True)
        want, want_lse = sparse_decode_attention(q, cache, 0, b, backend=backend, return_lse=True)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got_lse, want_lse, rtol=1e-5, atol=1e-5)
