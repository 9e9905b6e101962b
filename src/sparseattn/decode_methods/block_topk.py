"""Kinetics block top-k at decode time: pages ranked by ``q . mean key``, one list per KV head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..decode_api import DecodeSelection
from ..methods.base import check_int, rank_mask, use_triton_estimator
from ..methods.registry import register
from .base import DecodeMethod, page_dot, score_dtype


@register
@dataclass(kw_only=True)
class BlockTopKDecode(DecodeMethod):
    """Block top-k (Kinetics, Sadhukhan et al. 2025, arXiv 2506.05333; code Infini-AI-Lab/Kinetics).

    Per layer (except ``dense_layers``), per KV head, each step:

    1. Every page ``p`` has a compressed key ``kbar_p``, the mean of its keys (``PagedKVCache``
       metadata ``"mean"``, kept exact on append).
    2. ``score_p = mean over the group's query heads (and the step's Lq new queries) of q . kbar_p``
       (``benchmark/benchmark_blocktopk.py``: ``einsum("b g d, b n d -> b g n", q,
       compressed_key_cache).mean(dim=1)``). The mean is linear, so it is computed as the mean
       query of the group times ``kbar_p``: the same number, ``G * Lq`` times fewer products.
    3. Forced pages: the pages holding the first ``sink`` tokens, and the pages holding the step's
       new tokens plus the ``local`` tokens before them (the benchmark always appends the current
       last page). The ``topk_pages`` best of the *other* pages are added (ties: lower page index),
       so a step reads ``forced + min(topk_pages, candidates)`` pages. A sequence with fewer
       candidate pages than ``topk_pages`` reads everything (dense).

    GQA policy: ``group_mean`` (the official one): scores are averaged over the G query heads of a
    KV group, giving one page list per KV head (selection ``H = Hkv``). The benchmark assumes one
    KV head per tensor-parallel rank; nothing here depends on that.

    Defaults (Infini-AI-Lab/Kinetics): page size 16 (the cache's ``page_size``; ``--page_size 16``
    in ``benchmark/README.md``), ``topk_pages=64`` (``--topk_page 64``, "KV cache budget = 1024",
    ``benchmark/README.md``), ``sink=4`` tokens (``sink=4`` default of ``blockwise_topk_sparsity``
    in ``LiteSys/litesys/attention/sparsity_utils.py``), ``dense_layers=(0,)``
    (``attn_layer_skip`` default ``[0]`` in ``preprocess_sparse_args``, same file). ``local=0``:
    the accuracy code takes ``attn_local`` as a required argument with no default, and the kernel
    benchmark keeps only the current page, which is what ``local=0`` gives.

    Deviations: the accuracy studies (``blockwise_topk_sparsity``) rank blocks by *exact* logits
    averaged over the block (an oracle); this method is the deployable mean-key estimate of the
    kernel benchmark, as the spec's summary asks. Sinks are forced as whole pages (the sink tokens'
    page), not as single tokens.
    """

    name: ClassVar[str] = "block_topk"

    topk_pages: int = 64
    sink: int = 4
    local: int = 0
    dense_layers: tuple = (0,)

    def __post_init__(self):
        super().__post_init__()
        check_int("topk_pages", self.topk_pages, minimum=0)
        check_int("sink", self.sink, minimum=0)
        check_int("local", self.local, minimum=0)

    def page_scores(self, q: torch.Tensor, cache, layer: int) -> torch.Tensor:
        """float ``[B, Hkv, max_pages]``: ``q . kbar_p`` averaged over each group's query heads and
        the new queries (pages past a sequence's end hold garbage; :meth:`_select` masks them)."""
        if "mean" not in cache.metadata_names:
            raise ValueError(f"block_topk needs page metadata 'mean'; this cache keeps {list(cache.metadata_names)} "
                             "(build it with the default metadata)")
        B, Hq, Lq, D = q.shape
        Hkv = cache.num_kv_heads
        dt = score_dtype(q)
        qbar = q.to(dt).reshape(B, Hkv, (Hq // Hkv) * Lq, D).mean(2, keepdim=True)  # [B, Hkv, 1, D]
        return page_dot(qbar, cache, layer, "mean", dt).squeeze(2)  # . mean key of each page

    def _select(self, q, cache, layer):
        P, Lq = cache.page_size, q.shape[2]
        if q.dtype != torch.float64 and use_triton_estimator(q):
            from ..kernels.page_score_triton import block_topk_select_triton  # fused scores, top-k, no sort

            return block_topk_select_triton(q, cache, layer, topk_pages=self.topk_pages, sink=self.sink,
                                            local=self.local)
        maxP = cache.max_pages
        dev = q.device
        N = cache.layer_lengths(layer).long()
        n_pages = torch.div(N + P - 1, P, rounding_mode="floor").view(-1, 1)
        sink_pages = -(-self.sink // P)
        first_recent = torch.div((N - Lq - self.local).clamp(min=0), P, rounding_mode="floor").view(-1, 1)
        idx = torch.arange(maxP, device=dev).view(1, -1)
        exists = idx < n_pages
        forced = exists & ((idx < sink_pages) | (idx >= first_recent))  # [B, maxP]
        candidate = exists & ~forced
        score = self.page_scores(q, cache, layer)  # [B, Hkv, maxP]
        score = torch.where(candidate.unsqueeze(1), score, score.new_full((), float("-inf")))
        k = torch.full(score.shape[:2], self.topk_pages, dtype=torch.long, device=dev)
        keep = (rank_mask(score, k) & candidate.unsqueeze(1)) | forced.unsqueeze(1)
        width = min(maxP, sink_pages + self.topk_pages + -(-(Lq + self.local) // P) + 1)
        return DecodeSelection.from_page_mask(keep, page_size=P, max_pages=max(width, 1))
