"""DELTA: full layers, Δ layers that pick pages from exact attention, sparse layers that reuse them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..decode_api import DecodeSelection
from ..methods.base import check_int, rank_mask, use_triton_estimator
from ..methods.registry import register
from .base import DecodeMethod, check_layers, exact_probs
from .tidaldecode import reuse_stored, step_key


@register
@dataclass(kw_only=True)
class Delta(DecodeMethod):
    """DELTA (arXiv 2510.09883, ACL 2026 Findings; code hoenza/DELTA), spec section 8.

    Layers fall in three groups, visited in ascending order within a decode step:

    1. **Full (warm-up) layers** ``dense_layers``: dense attention.
    2. **Δ layers** ``delta_layers``: dense attention (``select`` returns ``None``) *and* a page
       selection from the exact attention of the step's queries (:func:`exact_probs` over every
       cached token; this reads **all keys** of the layer, a second pass beside the dense
       attention, which the official engine avoids by dumping fp32 logits + LSE from its dense
       kernel). Token score ``s_t = max_h softmax(q_h . K)[t]`` over **all** query heads (and
       the ``Lq`` new queries), page score ``S_u = sum_{t in u} s_t``; the last
       ``recent_pages`` (L) pages are always kept, plus the best other pages up to
       ``page_budget`` (K) pages in all (ties: lower page index, as the official
       ``-1e-7 * page_idx`` position bias). One ascending page list **shared by all heads**
       (``DecodeSelection`` with one head row), stored in the cache's shared method state.
    3. **Sparse layers** (all others): return exactly the page set stored by the most recent Δ
       layer of the same step (``2 K P d`` reads). A layer that finds none (before the first Δ
       layer, or a step whose Δ layer ran dense through ``dense_below``) reads everything.

    A sequence with at most K pages selects all its pages (the official selector's
    ``valid_counts = min(pages, K)``), which is dense attention; this is the official
    sparse-mode threshold ``compression_ratio x subset_cache_size`` with the scripts'
    ``compression_ratio 1`` (use ``dense_below`` for a larger ratio). The pages holding the
    step's new tokens are kept too (they are among the last L pages whenever ``L >= 1`` and
    ``Lq <= (L - 1) * P + 1``; our addition for ``L = 0`` or long ``Lq``), counting toward K.

    GQA: the selection is shared by every head (max over all query heads), so the group size
    does not matter (spec 8.4).

    Defaults (``run_reason_accuracy_8gpu.sh``, DeepSeek-R1-Distill-Qwen-7B, 28 layers):
    ``page_budget=64`` (``SUBSET_CACHE_SIZE=64`` pages = 1K tokens at page size 16; the
    ``tests/reason.py`` CLI default is 1024), ``recent_pages=8`` (``L=8``),
    ``FULL_CACHE_LAYERS=0 1 2 14 22``: the official engine (``DELTA/Engine/DELTA/model.py``,
    ``setup_caches``) makes a full-cache layer whose next layer is not full the planner
    (``target_decode_plan``), so 0, 1 are the full layers (``dense_layers=(0, 1)``) and 2, 14,
    22 the Δ layers (``delta_layers=(2, 14, 22)``). The Δ layers are calibrated per model
    (adjacent-layer attention shift; the paper uses [2, 6, 42] for DS-Qwen-14B), so for another
    model pass ``delta_layers``; Δ layers at or past the model's depth are never visited. Page
    scoring and selection follow ``DELTA/Engine/DELTA/page_score.py`` (softmax, max over heads,
    sum in page) and ``page_selector_v2.py`` (last L forced with +inf, one top-K, sorted).
    """

    name: ClassVar[str] = "delta"

    page_budget: int = 64
    recent_pages: int = 8
    dense_layers: tuple = (0, 1)
    delta_layers: tuple = (2, 14, 22)

    def __post_init__(self):
        super().__post_init__()
        check_int("page_budget", self.page_budget, minimum=1)
        check_int("recent_pages", self.recent_pages, minimum=0, maximum=self.page_budget)
        self.delta_layers = check_layers("delta_layers", self.delta_layers)
        if not self.delta_layers:
            raise ValueError("delta_layers must hold at least one layer (the layers that select pages)")
        both = sorted(set(self.delta_layers) & set(self.dense_layers))
        if both:
            raise ValueError(f"layers {both} are both delta_layers and dense_layers; a dense layer never selects")

    def _select(self, q, cache, layer):
        st = self.state(cache, None)
        if layer in self.delta_layers:
            st.update(selection=self.choose(q, cache, layer), key=step_key(cache, layer), layer=layer)
            return None  # a Δ layer attends densely
        return reuse_stored(st, cache, layer)

    def choose(self, q: torch.Tensor, cache, layer: int) -> DecodeSelection:
        """The Δ-layer page selection from exact attention at ``layer`` (reads all keys)."""
        P, Lq = cache.page_size, q.shape[2]
        probs = exact_probs(q, cache, layer)  # [B, Hkv, G, Lq, N], N = max_pages * P
        B, N = probs.shape[0], probs.shape[-1]
        maxP = N // P
        page = probs.amax(dim=(1, 2, 3)).view(B, maxP, P).sum(-1)  # [B, maxP]
        lengths = cache.layer_lengths(layer).long()
        n_pages = torch.div(lengths + P - 1, P, rounding_mode="floor").view(B, 1)
        first_new = torch.div(lengths - Lq, P, rounding_mode="floor").view(B, 1)
        forced_from = torch.minimum((n_pages - self.recent_pages).clamp(min=0), first_new)
        idx = torch.arange(maxP, device=q.device).view(1, -1)
        forced = (idx >= forced_from) & (idx < n_pages)
        candidate = idx < forced_from
        free = (self.page_budget - (n_pages - forced_from)).clamp(min=0).view(B)
        neg = page.new_full((), float("-inf"))
        score = torch.where(candidate, page, neg)
        width = min(maxP, max(self.page_budget, Lq // P + 2))
        if use_triton_estimator(q):
            from ..kernels.page_score_triton import top_pages_selection  # top-k + sorted assembly, no full sort

            # Its forced tail starts at page max(len - recent, 0) // P: with recent = max((L - 1) P + 1, Lq)
            # that is min(max(n_pages - L, 0), (len - Lq) // P) = forced_from (len >= Lq >= 1).
            recent = max((self.recent_pages - 1) * P + 1, Lq)
            return top_pages_selection(score.view(B, 1, maxP), lengths, page_size=P, budget=self.page_budget,
                                       recent=recent, width=width, forced_in_budget=True)
        keep = rank_mask(score, free) & candidate
        return DecodeSelection.from_page_mask((keep | forced).view(B, 1, maxP), page_size=P, max_pages=width)
