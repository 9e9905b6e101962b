"""TOVA (Token Omission Via Attention): keep the tokens the current query attends to most."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..methods.base import check_int, rank_mask, use_triton_estimator
from ..methods.registry import register
from .eviction import StepEvictionMethod, kept_attention, listed_attention


@register
@dataclass(kw_only=True)
class TOVA(StepEvictionMethod):
    """TOVA (Oren et al., "Transformers are Multi-State RNNs", arXiv 2401.06104; code
    schwartz-lab-NLP/TOVA), spec section 19.3.

    Algorithm (``TOVACache.reduce`` in ``src/tova_cache.py``): after each attention, when the
    layer holds more than ``cache_size`` tokens, take the attention probabilities of the
    **last** query (``attn_weights[:, :, -1, :]``), average them over all query heads, and keep
    the ``cache_size`` tokens with the highest average; the rest is evicted. The decision is
    one per layer and sequence, shared by every KV head. The prompt is reduced the same way,
    with its last query (:meth:`on_prefill`); each decode step reads the kept tokens plus the
    new ones, then evicts down to ``cache_size`` with the last new query's probabilities over
    what it read; that scoring reads only the listed kept tokens (the last query's logits over
    their keys, the softmax and the ranking over the list, see :mod:`.eviction`): O(kept), not
    O(N). After every step exactly ``min(cache_size, length)`` tokens stay kept. Evicted
    tokens are never read again; the paged cache does not free their memory (see
    :mod:`.eviction`).

    GQA: the mean runs over all ``Hq`` query heads (the official code averages the
    ``repeat_kv``-ed attention over ``dim=1``), so every KV head gets the same keep-set.

    Default ``cache_size=512``: the spec's value for the README example ``multi_state_size``
    (the README revision read for this port writes ``TOVACache(multi_state_size)`` without a
    number; 512 is the size the spec records and third-party harnesses use). Deviations: the
    mean is taken in float32 (float64 for float64 inputs); ties go to the lower position.

    Without :meth:`on_prefill` the first ``select`` reads every cached token and then evicts
    with that step's last query, as if the prompt had been kept whole.
    """

    name: ClassVar[str] = "tova"

    cache_size: int = 512

    # False: the decode step's tail after the list logits runs as PyTorch ops even where the fused
    # Triton tail could (the tests set it on an instance to compare the two).
    _fused_tail: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        check_int("cache_size", self.cache_size, minimum=1)

    def _observe(self, q, cache, layer, st, evict):
        if not evict:
            return
        N = cache.max_pages * cache.page_size
        keep = st["keep"][..., :N]
        B, H = keep.shape[:2]
        mass = kept_attention(q[:, :, -1:], cache, layer, keep)  # [B, Hkv, G, N]: the last query's probs
        score = mass.mean(2).mean(1)  # mean over all query heads (groups have equal size)
        cand = keep[:, 0]  # one keep-set per layer: identical over the KV heads
        ranked = torch.where(cand, score, torch.full((), float("-inf"), dtype=score.dtype, device=score.device))
        top = rank_mask(ranked, torch.full((B,), self.cache_size, dtype=torch.long, device=score.device)) & cand
        self._commit(st, top.unsqueeze(1).expand(B, H, N), [self.cache_size] * B)

    def _observe_listed(self, q, cache, layer, st, width, snapshot):
        # The decode step over the list (O(width)): the lists of all KV heads are identical (one
        # keep-set per sequence), so lane j names one token in every head and the head mean runs
        # lane-wise, as _observe's runs position-wise.
        tokens, counts = st["tokens"][..., :width], st["count"]
        B, H = counts.shape
        if self._fused_tail and use_triton_estimator(q):
            from ..kernels.evict_listed_triton import evict_listed_tova, fused_tail_supported

            if fused_tail_supported(q.dtype, cache.dtype, width):
                # Three launches: the last query's list logits, each KV head's softmax mass over its group
                # (B x Hkv programs), then the head mean, ranking, keep updates and list compaction (every
                # program ranks the same sums and writes its own head).
                from ..kernels.list_logits_triton import list_logits_triton

                logits = list_logits_triton(q[:, :, -1:], cache.k_pages(layer), cache.page_table, tokens, counts,
                                            cache.layer_lengths(layer), page_size=cache.page_size,
                                            scale=q.shape[-1] ** -0.5,
                                            snapshot=snapshot.buffers())  # the list before the eviction
                evict_listed_tova(logits, tokens, counts, st["keep"], self.cache_size)
                st["bound"] = [min(b, self.cache_size) for b in st["bound"]]
                return logits if q.shape[2] == 1 else None  # the last query's only
        snapshot.copy()
        # [B, Hkv, G, W] and the last query's logits [B, Hkv, G, 1, W]
        mass, logits = listed_attention(q[:, :, -1:], cache, layer, tokens, counts, return_logits=True)
        score = mass.mean(2).mean(1)  # [B, W]
        live = torch.arange(width, device=score.device).view(1, width) < counts[:, :1].clamp(max=width)
        ranked = torch.where(live, score, torch.full((), float("-inf"), dtype=score.dtype, device=score.device))
        top = rank_mask(ranked, torch.full((B,), self.cache_size, dtype=torch.long, device=score.device)) & live
        self._commit_listed(st, width, top.unsqueeze(1).expand(B, H, width), [self.cache_size] * B)
        return logits if q.shape[2] == 1 and logits.dtype == torch.float32 else None  # the last query's only
