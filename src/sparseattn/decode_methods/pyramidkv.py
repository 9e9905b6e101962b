"""PyramidKV: SnapKV scoring with a prompt budget that shrinks linearly from the bottom layer up."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..methods.base import check_int
from ..methods.registry import register
from .snapkv import SnapKV


@register
@dataclass(kw_only=True)
class PyramidKV(SnapKV):
    """PyramidKV (Cai et al., arXiv 2406.02069; code Zefan-Cai/KVCache-Factory), spec 19.5.

    SnapKV's one-shot prompt compression (observation window, window-summed attention, pooling,
    top-k per KV head + the window; see :class:`SnapKV`) with a layer-dependent prefix budget
    (``PyramidKVCluster.update_kv`` in ``pyramidkv/pyramidkv_utils.py``). With ``C =
    max_capacity_prompt``, ``w = window_size``, ``n`` the prompt length (per sequence), ``L =
    cache.num_layers`` and integer division as in the official code::

        min_num = (C - w) // beta;  max_num = 2 (C - w) - min_num
        if max_num >= n - w:  max_num = n - w;  min_num = 2 (C - w) - max_num
        steps = (max_num - min_num) // (L - 1)
        prefix budget of layer l = max_num - l * steps

    applied as the official branches: ``n < C`` keeps the prompt whole; ``C <= n < 2 (C - w)``
    keeps ``C - w`` prefix tokens (as SnapKV) in every layer; ``n >= 2 (C - w)`` keeps the layer's
    pyramid budget; the window is always kept. Bottom layers keep more than top layers; the
    average over layers is about ``C - w``. Decode keeps every token appended after the prompt.
    Evicted tokens are never read again; the paged cache does not free their memory.

    Defaults: the class defaults of ``PyramidKVCluster`` (``window_size=64``,
    ``max_capacity_prompt=256 + 64``, ``kernel_size=5``, ``pooling='avgpool'``, ``beta=20``); the
    LongBench runs (``run_longbench.py``) use ``window_sizes 8``, ``kernel_sizes 7``,
    ``pooling maxpool``. GQA: ``gqa_score_agg='mean'`` (KVCache-Factory's kv-head path default),
    reduced before pooling. Deviation: with a single-layer cache (``L = 1``, a division by zero
    in the official code) ``steps = 0``, so the layer keeps ``max_num``. Prompt hook missing,
    ragged prompts, a second prefill chunk: as :class:`SnapKV`.
    """

    name: ClassVar[str] = "pyramidkv"

    beta: int = 20

    def __post_init__(self):
        super().__post_init__()
        check_int("beta", self.beta, minimum=1)

    def layer_budgets(self, n: int, num_layers: int) -> list:
        """Host helper: the prefix budget of every layer for a prompt of ``n`` tokens (``None``: kept whole)."""
        t = torch.tensor([n], dtype=torch.long)
        return [None if n < self.max_capacity_prompt else int(self._budget(t, num_layers, layer)[0])
                for layer in range(num_layers)]

    def _budget(self, n: torch.Tensor, num_layers: int, layer: int) -> torch.Tensor:
        base = self.max_capacity_prompt - self.window_size
        min0 = base // self.beta
        max0 = 2 * base - min0
        head = n - self.window_size
        adjust = head <= max0
        max_num = torch.where(adjust, head, torch.full_like(n, max0))
        min_num = torch.where(adjust, 2 * base - max_num, torch.full_like(n, min0))
        if num_layers > 1:
            steps = torch.div(max_num - min_num, num_layers - 1, rounding_mode="floor")
        else:
            steps = torch.zeros_like(n)
        pyramid = max_num - layer * steps
        return torch.where(n < 2 * base, torch.full_like(n, base), pyramid).clamp(min=0)

    def prefix_budget(self, n, cache, layer):
        return self._budget(n, cache.num_layers, layer)

    def kept_bound(self) -> int:
        base = self.max_capacity_prompt - self.window_size
        return max(self.max_capacity_prompt, 2 * base + self.window_size)
