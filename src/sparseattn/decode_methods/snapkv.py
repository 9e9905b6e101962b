"""SnapKV: one-shot prompt compression from the attention of an observation window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..methods.base import check_choice, check_int, rank_mask
from ..methods.registry import register
from .eviction import GQA_AGGREGATIONS, EvictionMethod, check_prompt_queries, group_reduce, kept_attention

POOLINGS = ("avgpool", "maxpool")


@register
@dataclass(kw_only=True)
class SnapKV(EvictionMethod):
    """SnapKV (Li et al., NeurIPS 2024, arXiv 2404.14469; code FasterDecoding/SnapKV), spec 19.4.

    Algorithm (``SnapKVCluster.update_kv`` in ``snapkv/monkeypatch/snapkv_utils.py``), once, in
    :meth:`on_prefill` after the prompt's attention: when the prompt holds at least
    ``max_capacity_prompt`` tokens, the last ``window_size`` prompt queries (the observation
    window) attend causally to the whole prompt (float32 softmax); their probabilities on the
    prefix (everything before the window) are summed over the window, pooled along the
    positions (``kernel_size``, stride 1, zero padding ``kernel_size // 2``: ``avg_pool1d`` or
    ``max_pool1d``), and the top ``max_capacity_prompt - window_size`` prefix tokens per KV head
    are kept together with the window itself; the rest of the prompt is evicted. Decode then
    keeps everything appended after the prompt (no further eviction): after the prompt exactly
    ``min(max_capacity_prompt, prompt)`` tokens per (batch, KV head) are kept (a shorter prompt
    is kept whole), plus every generated token. Evicted tokens are never read again; the paged
    cache does not free their memory (see :mod:`.eviction`).

    Defaults: the class defaults of ``SnapKVCluster`` (``window_size=64``,
    ``max_capacity_prompt=256 + 64``, ``kernel_size=5``, ``pooling='avgpool'``). The paper /
    LongBench configurations use ``window_size=32``, ``kernel_size=7``, ``pooling='maxpool'`` and
    capacities 1024/2048/4096 (``experiments/LongBench/config/ablation_c*_w32_k7_maxpool.json``).
    ``kernel_size`` must be odd (an even kernel makes the official pooled row one longer than the
    prefix).

    GQA (``gqa_score_agg``): the official SnapKV is per query head (MHA / ``repeat_kv``). Here the
    window sums of the group's query heads are reduced to one score per KV head *before*
    pooling, as KVCache-Factory's kv-head path does (``_grouped_window_attn_cache``,
    ``gqa_score_agg='mean'`` default; ``"max"``/``"sum"`` too; kvpress averages as well).

    Ragged prompts: ``q`` rows are bottom-right aligned (row ``i`` at ``len_b - L + i``), each
    sequence's window is its own last ``window_size`` tokens and its compression condition is
    its own length. With fewer than ``window_size`` query rows (a short prompt chunk) the rows
    given are the observation queries; the kept window is still ``window_size`` tokens. A
    second :meth:`on_prefill` (chunked prefill, a second turn) compresses again over what is
    kept, the kept count playing the prompt length. A prompt whose layer is shorter than
    ``dense_below`` is kept whole.

    Without :meth:`on_prefill` (a cache filled without the prompt hook) the first ``select``
    compresses the cache before reading it, with that step's ``Lq`` queries as the observation
    window (the only queries available) and the last ``window_size`` cached tokens (the step's
    own included) kept as the window.
    """

    name: ClassVar[str] = "snapkv"

    window_size: int = 64
    max_capacity_prompt: int = 320
    kernel_size: int = 5
    pooling: str = "avgpool"
    gqa_score_agg: str = "mean"

    def __post_init__(self):
        super().__post_init__()
        check_int("window_size", self.window_size, minimum=1)
        check_int("max_capacity_prompt", self.max_capacity_prompt, minimum=self.window_size + 1)
        check_int("kernel_size", self.kernel_size, minimum=1)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (the pooled scores must line up with the prefix), "
                             f"got {self.kernel_size}")
        check_choice("pooling", self.pooling, POOLINGS)
        check_choice("gqa_score_agg", self.gqa_score_agg, GQA_AGGREGATIONS)

    # ------------------------------------------------------------------ budget
    def prefix_budget(self, n: torch.Tensor, cache, layer: int) -> torch.Tensor:
        """Prefix tokens to keep (besides the window) for kept counts ``n`` (int64, any shape),
        where compression applies (``n >= max_capacity_prompt``)."""
        return torch.full_like(n, self.max_capacity_prompt - self.window_size)

    def kept_bound(self) -> int:
        """Most tokens a compressed prompt keeps (the selection width)."""
        return self.max_capacity_prompt

    # ------------------------------------------------------------------ compression
    def pooled_scores(self, q, cache, layer, keep) -> torch.Tensor:
        """``[B, Hkv, N]``: window-summed, group-reduced, pooled scores (0-padded outside the prefix)."""
        N = cache.max_pages * cache.page_size
        L = q.shape[2]
        mass = kept_attention(q[:, :, max(0, L - self.window_size):], cache, layer, keep)  # [B, Hkv, G, N]
        s = group_reduce(mass, self.gqa_score_agg)
        B = s.shape[0]
        n = cache.layer_lengths(layer).long().view(B, 1, 1)
        prefix = torch.arange(N, device=s.device).view(1, 1, N) < n - self.window_size
        s = torch.where(prefix, s, torch.zeros((), dtype=s.dtype, device=s.device))
        pool = F.avg_pool1d if self.pooling == "avgpool" else F.max_pool1d
        return pool(s, kernel_size=self.kernel_size, stride=1, padding=self.kernel_size // 2)

    def _compress(self, q, cache, layer, st) -> None:
        N = cache.max_pages * cache.page_size
        keep = st["keep"][..., :N]
        B, H = keep.shape[:2]
        scores = self.pooled_scores(q, cache, layer, keep)
        n = cache.layer_lengths(layer).long().view(B, 1, 1)
        prefix = torch.arange(N, device=keep.device).view(1, 1, N) < n - self.window_size
        cand = keep & prefix
        window = keep & ~prefix
        n_kept = keep.sum(-1)  # [B, Hkv]: the "prompt length" of the compression
        budget = self.prefix_budget(n_kept, cache, layer).clamp(min=0)
        ranked = torch.where(cand, scores, torch.full((), float("-inf"), dtype=scores.dtype, device=keep.device))
        chosen = rank_mask(ranked, budget) & cand
        new = torch.where((n_kept >= self.max_capacity_prompt).unsqueeze(-1), chosen | window, keep)
        self._commit(st, new, [self.kept_bound()] * B)

    # ------------------------------------------------------------------ hooks
    def on_prefill(self, q, cache, layer):
        """Compress the prompt (see the class docstring); later steps keep every new token."""
        check_prompt_queries(q, cache, layer)
        if layer in self.dense_layers or q.shape[0] == 0:
            return
        st = self._prepare(cache, layer)
        if q.shape[2] > 0 and self._evicting(cache, layer):
            self._compress(q, cache, layer, st)
        st["compressed"] = True

    def _select(self, q, cache, layer):
        st = self._prepare(cache, layer)
        if not st.get("compressed", False):  # no prompt hook ran: compress with this step's queries
            self._compress(q, cache, layer, st)
            st["compressed"] = True
        return self._selection(st, cache)
