"""A transformers ``Cache`` backed by :class:`~sparseattn.cache.PagedKVCache` (sparse decoding).

:func:`sparseattn.patch` puts a :class:`PagedCache` into ``model.generate`` (or the caller passes
``past_key_values=ctx.new_cache()``). The model calls ``cache.update(k, v, layer)`` before each
attention; this cache does not concatenate anything: it hands the new ``k, v`` on and the patched
attention function (:class:`~sparseattn.integrations.hf.SparsePatch`) stores them in the pages
(dropping left padding) and runs

* prefill (the prompt): the layer's prefill method on the prompt's ``q, k, v``, then the decode
  method's ``on_prefill`` hook;
* decode steps (``q_len <= decode_max_q``): the decode method's ``select`` and
  :func:`sparseattn.sparse_decode_attention` over the pages;
* a later chunk with more queries (chunked prefill, a second turn): the prefill method over the
  chunk's queries and the whole cached context.

Bookkeeping for transformers (``get_seq_length``, the mask sizes, ``cache_position``) counts the
positions the model has seen, padding included, as ``DynamicCache`` does; the pages hold only real
tokens. The cache works only inside the ``with patch(...)`` block that made it: used elsewhere
(the model's own attention would need full K/V it does not return) it raises.
"""

from __future__ import annotations

from typing import Optional

import torch

try:  # transformers is an optional dependency of sparseattn
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError as exc:  # pragma: no cover - the integration needs transformers
    raise ImportError("sparseattn.integrations.hf_cache needs transformers (pip install transformers)") from exc

from ..cache import PagedKVCache


class _PagedLayer(CacheLayerMixin):
    """Per-layer view for transformers' bookkeeping: lengths only (the data lives in the pages)."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, owner: "PagedCache", layer: int):
        super().__init__()
        self.owner = owner
        self.layer = layer
        self.seen = 0  # positions transformers has given this layer (padding included)

    def lazy_initialization(self, key_states, value_states) -> None:  # the pages are made by the owner
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        return self.owner.update(key_states, value_states, self.layer)

    def get_mask_sizes(self, query_length, *args, **kwargs):
        if isinstance(query_length, torch.Tensor):  # older transformers pass cache_position
            query_length = query_length.shape[0]
        return self.seen + int(query_length), 0

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.seen = 0

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("sparseattn's PagedCache does not support beam search (reorder_cache); use greedy "
                                  "or sampling decoding")


class PagedCache(Cache):
    """A ``transformers.Cache`` whose K/V live in a :class:`~sparseattn.cache.PagedKVCache`.

    Args:
        patch: the :class:`~sparseattn.integrations.hf.SparsePatch` that runs the attention.
        num_layers: the model's decoder layers.
        page_size: tokens per page (default 16).

    ``paged`` is the underlying :class:`PagedKVCache` (``None`` until the first update, which
    fixes batch, heads, head_dim, dtype and device).
    """

    is_compileable = False

    def __init__(self, patch, num_layers: int, *, page_size: int = 16):
        super().__init__(layers=[_PagedLayer(self, i) for i in range(num_layers)])
        self.patch = patch
        self.num_layers = num_layers
        self.page_size = page_size
        self.paged: Optional[PagedKVCache] = None

    def _make_paged(self, key_states: torch.Tensor) -> PagedKVCache:
        B, Hkv, T, D = key_states.shape
        paged = PagedKVCache(self.num_layers, Hkv, D, page_size=self.page_size, dtype=key_states.dtype,
                             device=key_states.device, max_batch=B)
        paged.reserve(T + 256)
        return paged

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if not self.patch.active:
            raise RuntimeError("this PagedCache belongs to a sparseattn.patch(...) block that has ended (or not begun); "
                               "its attention runs only inside that block. Make a new cache with ctx.new_cache() "
                               "inside the block, or use the model's default cache outside it")
        if self.paged is None:
            self.paged = self._make_paged(key_states)
        layer = self.layers[layer_idx]
        first = layer.seen == 0
        layer.seen += key_states.shape[2]
        # The attention function recognises the hand-over by the identity of the key tensor.
        self.patch._pending = (self, layer_idx, key_states, value_states, first)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0, *args, **kwargs) -> int:
        return self.layers[layer_idx].seen if layer_idx < len(self.layers) else 0

    def get_mask_sizes(self, query_length, layer_idx: int = 0, *args, **kwargs):
        return self.layers[layer_idx].get_mask_sizes(query_length)

    def get_max_length(self, *args, **kwargs) -> int:
        return -1

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        if self.paged is not None:
            self.paged.reset()

    def reorder_cache(self, beam_idx) -> None:
        self.layers[0].reorder_cache(beam_idx)

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("sparseattn's PagedCache cannot be cropped (assisted/speculative generation through "
                                  "generate() is not supported with sparse decoding)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("sparseattn's PagedCache cannot be expanded after the prompt (num_return_sequences "
                                  "> 1 or beam search); repeat the prompt in the batch instead")

    def batch_select_indices(self, indices) -> None:
        raise NotImplementedError("sparseattn's PagedCache cannot select batch rows after the prompt")

    @property
    def is_initialized(self) -> bool:
        return self.paged is not None

    def __repr__(self) -> str:
        return f"PagedCache(layers={self.num_layers}, page_size={self.page_size}, paged={self.paged!r})"


__all__ = ["PagedCache"]
