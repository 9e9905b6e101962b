"""Quest: query-aware page selection by an upper bound from per-page elementwise key min/max."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..decode_api import DecodeSelection
from ..methods.base import check_choice, check_int, rank_mask, use_triton_estimator
from ..methods.registry import register
from .base import DecodeMethod, page_dot

GQA_POLICIES = ("group_max", "group_sum", "per_q_head")


@register
@dataclass(kw_only=True)
class Quest(DecodeMethod):
    """Quest (Tang et al., ICML 2024, arXiv 2406.10774; code mit-han-lab/Quest).

    Per layer (except ``dense_layers``), per KV head, each step:

    1. For every page ``p`` the cache keeps ``m_p = min_t K[t]`` and ``M_p = max_t K[t]``
       elementwise (``PagedKVCache`` metadata ``"min"`` / ``"max"``, updated on append).
    2. ``U_p = sum_c max(q_c * M_p[c], q_c * m_p[c])``, an upper bound on ``q . k`` for every key
       of the page (computed as ``relu(q) . M_p + min(q, 0) . m_p``).
    3. Keep the top ``Kp = max(min_pages, token_budget // page_size)`` pages by ``U_p``; the
       pages holding the step's new tokens (the current, partial last page for decode) are
       always kept and count toward ``Kp``. Ties go to the lower page index.

    GQA (``gqa_policy``): Quest's kernel is MHA-only and its HF path selects per query head after
    ``repeat_kv``. ``"group_max"`` (default) takes the max of ``U_p`` over the group's query heads
    (and over the ``Lq`` new queries), which keeps the upper-bound meaning (spec 1.4);
    ``"group_sum"`` sums it over heads; ``"per_q_head"`` selects per query head and reads the
    union per KV head (the reference behaviour; up to ``G * Kp`` pages).

    Defaults (mit-han-lab/Quest): page size 16 (``--chunk_size 16`` in ``scripts/passkey.sh``,
    ``scripts/longbench.sh``; it is the cache's ``page_size``), ``token_budget=512``
    (``quest/models/llama.py``; the scripts sweep 512-4096), ``dense_layers=(0, 1)``
    (``layer_id < 2`` in ``evaluation/quest_attention.py``, ``_quest_skip_layer = 2`` in
    ``quest/models/llama.py``), ``min_pages=3`` (``max(3, token_budget // chunk_size)`` in
    ``evaluation/quest_attention.py``).
    """

    name: ClassVar[str] = "quest"

    token_budget: int = 512
    min_pages: int = 3
    dense_layers: tuple = (0, 1)
    gqa_policy: str = "group_max"

    def __post_init__(self):
        super().__post_init__()
        check_int("token_budget", self.token_budget, minimum=0)
        check_int("min_pages", self.min_pages, minimum=1)
        check_choice("gqa_policy", self.gqa_policy, GQA_POLICIES)

    def page_budget(self, page_size: int) -> int:
        return max(self.min_pages, self.token_budget // page_size)

    def page_scores(self, q: torch.Tensor, cache, layer: int) -> torch.Tensor:
        """float ``[B, Hkv, G, Lq, max_pages]``: ``U_p`` per query head and new query (pages past a
        sequence's end hold garbage; :meth:`select` masks them)."""
        for name in ("min", "max"):
            if name not in cache.metadata_names:
                raise ValueError(f"Quest needs page metadata 'min' and 'max'; this cache keeps "
                                 f"{list(cache.metadata_names)} (build it with the default metadata)")
        B, Hq, Lq, D = q.shape
        Hkv = cache.num_kv_heads
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        # Half-precision caches: multiply the min/max pages in their own dtype (fp32 accumulation,
        # one rounding of each bound) - converting every page's min/max to float32 first cost
        # several times the bytes the selection has to read.
        mt = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else dt
        qg = q.reshape(B, Hkv, (Hq // Hkv) * Lq, D)
        u = page_dot(qg.clamp(min=0), cache, layer, "max", mt).to(dt) + page_dot(qg.clamp(max=0), cache, layer, "min",
                                                                                 mt).to(dt)
        return u.view(B, Hkv, Hq // Hkv, Lq, -1)

    def _select(self, q, cache, layer):
        P, Lq = cache.page_size, q.shape[2]
        maxP = cache.max_pages
        dev = q.device
        G = q.shape[1] // cache.num_kv_heads
        budget = self.page_budget(P)
        if self.gqa_policy != "per_q_head" and q.dtype != torch.float64 and use_triton_estimator(q):
            from ..kernels.page_score_triton import quest_select_triton  # fused scores, top-k, no sort

            return quest_select_triton(q, cache, layer, page_budget=budget, gqa_policy=self.gqa_policy)
        N = cache.layer_lengths(layer).long()
        n_pages = torch.div(N + P - 1, P, rounding_mode="floor").view(-1, 1, 1)
        first_forced = torch.div((N - Lq).clamp(min=0), P, rounding_mode="floor").view(-1, 1, 1)
        idx = torch.arange(maxP, device=dev).view(1, 1, -1)
        forced = (idx >= first_forced) & (idx < n_pages)  # [B, 1, maxP]: pages of the new tokens
        candidate = idx < first_forced
        free = (budget - (n_pages - first_forced)).clamp(min=0)  # [B, 1, 1]
        u = self.page_scores(q, cache, layer).amax(3)  # [B, Hkv, G, maxP]: max over the new queries
        neg = u.new_full((), float("-inf"))
        if self.gqa_policy == "per_q_head":
            score = torch.where(candidate.unsqueeze(2), u, neg)
            keep = (rank_mask(score, free.view(-1, 1, 1).expand(score.shape[:3])) & candidate.unsqueeze(2)).any(2)
            width = min(maxP, G * budget + Lq // P + 2)
        else:
            score = u.amax(2) if self.gqa_policy == "group_max" else u.sum(2)
            score = torch.where(candidate, score, neg)
            keep = rank_mask(score, free.view(-1, 1).expand(score.shape[:2])) & candidate
            width = min(maxP, budget + Lq // P + 2)
        return DecodeSelection.from_page_mask(keep | forced, page_size=P, max_pages=width)
