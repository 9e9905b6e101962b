"""H2O (Heavy-Hitter Oracle): keep the tokens with the most accumulated attention + a recent window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Tuple

import torch

from ..methods.base import check_choice, check_float, check_int, rank_mask, use_triton_estimator
from ..methods.registry import register
from .eviction import (GQA_AGGREGATIONS, StepEvictionMethod, group_reduce, kept_attention, listed_attention,
                       listed_lanes, scatter_listed, to_device_ints)


@register
@dataclass(kw_only=True)
class H2O(StepEvictionMethod):
    """H2O (Zhang et al., NeurIPS 2023, arXiv 2306.14048; code FMInference/H2O), spec section 19.2.

    Algorithm: every cached token carries a score, the attention probability mass it has
    received from all queries so far (summed over the query dimension; ``_update_hh_score`` in
    ``h2o_hf/utils_real_drop/modify_llama.py``). After each attention, when more than
    ``hh + recent`` tokens are kept, the cache keeps the last ``recent`` tokens plus the ``hh``
    earlier kept tokens with the highest scores (heavy hitters) and evicts the rest, with their
    scores. :meth:`on_prefill` initialises the scores from the prompt's causal attention
    (computed in chunks of queries, memory ``O(chunk x L)``) and evicts; each decode step reads
    the kept tokens plus the new ones, adds the step's probabilities over them (summed over the
    ``Lq`` new queries) and evicts down to ``hh + recent``. A decode step touches only those
    tokens (the kept-token list, see :mod:`.eviction`): the logits of the listed keys, the
    softmax over them, the score update at their positions and a ranking over the list, O(kept)
    work and key reads instead of O(N); the prompt is scored over the whole mask. After every
    step exactly ``min(hh + recent, length)`` tokens per (batch, KV head) stay kept; the step itself reads
    ``min(hh + recent, length - Lq) + Lq`` (the official cache also attends over
    ``cache_size + 1`` before evicting). Evicted tokens are never read again, but the paged
    cache does not free their memory (see :mod:`.eviction`).

    Budget, two ways (both official):

    * ratios (default, the run scripts: ``--heavy_ratio 0.1 --recent_ratio 0.1`` in
      ``h2o_hf/run_text_generation.py``, i.e. a 20 % cache): ``hh = int(heavy_ratio * n)``,
      ``recent = int(recent_ratio * n)`` with ``n`` the sequence's length when the method first
      sees the layer (the prompt length after :meth:`on_prefill`), fixed from then on, as
      ``LlamaAttention_heavy_hitter`` in ``h2o_hf/utils_hh/modify_llama.py`` sets them at the
      first forward. Per sequence for a ragged batch.
    * absolute sizes: give ``hh_size`` and ``recent_size`` (both; they override the ratios).
      The class defaults of ``H2OKVCache_LayerWise`` are ``hh_size=4``, ``recent_size=512``:
      ``get_decode_method("h2o", hh_size=4, recent_size=512)``.

    GQA (``gqa_score_agg``): the official code scores per query head (MHA models). Here one
    keep-set per KV head serves its group, so per-query-head probabilities are reduced over the
    group before they are accumulated: ``"mean"`` (default; kvpress's group mean and
    KVCache-Factory's ``gqa_score_agg='mean'``), ``"max"`` or ``"sum"`` (``sum`` ranks like
    ``mean``). The reduction applies to each observation's probabilities summed over its query
    rows (the prompt's rows, then each step's ``Lq`` rows), as KVCache-Factory reduces the
    query-summed prompt scores. Deviations: scores accumulate in float32 (float64 for float64 inputs), not in
    the model dtype; ties between equal scores go to the lower position (``torch.topk`` leaves
    them unspecified); the batch is not summed over (the official ``attn.sum(0)`` assumes
    batch 1).

    Without :meth:`on_prefill` (a cache filled without the prompt hook) the first ``select``
    starts with every cached token kept and zero scores; that step's probabilities then decide
    the first eviction (ratio budgets from the length at that step).
    """

    name: ClassVar[str] = "h2o"
    _row_state: ClassVar[Tuple[str, ...]] = ("keep", "scores")

    heavy_ratio: float = 0.1
    recent_ratio: float = 0.1
    hh_size: Optional[int] = None
    recent_size: Optional[int] = None
    gqa_score_agg: str = "mean"

    # False: the decode step's tail after the list logits runs as PyTorch ops even where the fused
    # Triton tail could (the tests set it on an instance to compare the two).
    _fused_tail: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        check_float("heavy_ratio", self.heavy_ratio, minimum=0.0, maximum=1.0)
        check_float("recent_ratio", self.recent_ratio, minimum=0.0, maximum=1.0)
        if (self.hh_size is None) != (self.recent_size is None):
            raise ValueError(f"give both hh_size and recent_size (absolute budget) or neither (budget from "
                             f"heavy_ratio/recent_ratio), got hh_size={self.hh_size!r}, "
                             f"recent_size={self.recent_size!r}")
        if self.hh_size is not None:
            check_int("hh_size", self.hh_size, minimum=0)
            check_int("recent_size", self.recent_size, minimum=0)
        check_choice("gqa_score_agg", self.gqa_score_agg, GQA_AGGREGATIONS)

    def budgets(self, length: int) -> Tuple[int, int]:
        """``(hh, recent)`` for a sequence first seen with ``length`` tokens."""
        if self.hh_size is not None:
            return self.hh_size, self.recent_size
        return int(self.heavy_ratio * length), int(self.recent_ratio * length)

    # ------------------------------------------------------------------ state
    def _init_state(self, st, cache, layer):
        pairs = [self.budgets(n) for n in cache.host_lengths(layer)]
        st["hh"] = to_device_ints([h for h, _ in pairs], cache.device)
        st["recent"] = to_device_ints([r for _, r in pairs], cache.device)
        st["budget_host"] = [h + r for h, r in pairs]
        dt = torch.float64 if cache.dtype == torch.float64 else torch.float32
        st["scores"] = torch.zeros(st["keep"].shape, dtype=dt, device=cache.device)

    def _observe(self, q, cache, layer, st, evict):
        N = cache.max_pages * cache.page_size
        keep = st["keep"][..., :N]
        mass = group_reduce(kept_attention(q, cache, layer, keep), self.gqa_score_agg)  # [B, Hkv, N]
        st["scores"][..., :N] += mass.to(st["scores"].dtype)
        if evict:
            self._evict(st, cache, layer, N)

    def _evict(self, st, cache, layer, N):
        keep = st["keep"][..., :N]
        scores = st["scores"][..., :N]
        B, H = keep.shape[:2]
        n = cache.layer_lengths(layer).long().view(B, 1, 1)
        pos = torch.arange(N, device=keep.device).view(1, 1, N)
        recent = keep & (pos >= n - st["recent"].view(B, 1, 1))  # kept tokens are < n
        cand = keep & ~recent
        ranked = torch.where(cand, scores, torch.full((), float("-inf"), dtype=scores.dtype, device=keep.device))
        heavy = rank_mask(ranked, st["hh"].view(B, 1).expand(B, H)) & cand
        new = recent | heavy
        st["scores"][..., :N] = torch.where(new, scores, torch.zeros((), dtype=scores.dtype, device=keep.device))
        self._commit(st, new, st["budget_host"])

    # ------------------------------------------------------------------ hooks
    def _observe_listed(self, q, cache, layer, st, width, snapshot):
        # The decode step over the list (O(width)): the same scores and evictions as _observe + _evict.
        tokens, counts = st["tokens"][..., :width], st["count"]
        B, H = counts.shape
        scores = st["scores"]
        if self._fused_tail and scores.dtype == torch.float32 and use_triton_estimator(q):
            from ..kernels.evict_listed_triton import evict_listed_h2o, fused_tail_supported

            if fused_tail_supported(q.dtype, cache.dtype, width):
                # The same step in two launches: the list logits, then the whole tail (softmax, group
                # reduction, ranking, score / keep updates, list compaction) in one program per row.
                from ..kernels.list_logits_triton import list_logits_triton

                lengths = cache.layer_lengths(layer)
                logits = list_logits_triton(q, cache.k_pages(layer), cache.page_table, tokens, counts, lengths,
                                            page_size=cache.page_size, scale=q.shape[-1] ** -0.5,
                                            snapshot=snapshot.buffers())  # the list before the tail's eviction
                evict_listed_h2o(logits, tokens, counts, scores, st["keep"], lengths, st["hh"], st["recent"],
                                 how=self.gqa_score_agg)
                st["bound"] = [min(b, c) for b, c in zip(st["bound"], st["budget_host"])]
                return logits
        snapshot.copy()
        lanes = listed_lanes(tokens, counts, scores.shape[-1])
        pos, _, live, _ = lanes
        mass, logits = listed_attention(q, cache, layer, tokens, counts, return_logits=True)
        mass = group_reduce(mass, self.gqa_score_agg)  # [B, H, W]
        new = scores.gather(-1, pos) + mass.to(scores.dtype)  # 0 is added past the count
        n = cache.layer_lengths(layer).long().view(B, 1, 1)
        recent = live & (pos >= n - st["recent"].view(B, 1, 1))
        cand = live & ~recent
        # Ties go to the lower list index, which is the lower position (the list ascends).
        ranked = torch.where(cand, new, torch.full((), float("-inf"), dtype=new.dtype, device=new.device))
        survive = recent | (rank_mask(ranked, st["hh"].view(B, 1).expand(B, H)) & cand)
        # Evicted tokens lose their score; kept ones get the sum (the scores' lanes are redirected
        # like the keep bits: race-free).
        scatter_listed(scores, *lanes[:2], lanes[3], torch.where(survive, new, torch.zeros_like(new)))
        self._commit_listed(st, width, survive, st["budget_host"], lanes)
        return logits if logits.dtype == torch.float32 else None
