"""Dense attention as a plan: every causally visible key block (the baseline and the fallback)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..plan import BlockPlan
from .base import PrefillMethod
from .registry import register


@register
@dataclass(kw_only=True)
class Dense(PrefillMethod):
    """All key blocks each query block can see (all blocks when ``causal=False``).

    Plan shared by the whole batch and all heads (``B = H = 1``); no estimation. Its output
    equals dense (causal) attention exactly. GQA policy: shared by every head.

    Defaults: ``block_size=128`` (the engine's default tile; it does not change the result).
    """

    name: ClassVar[str] = "dense"
    static: ClassVar[bool] = True

    def _plan(self, q, k, v, *, causal, layer_idx):
        return BlockPlan.dense(1, 1, block_q=self.block_size, block_k=self.block_size, q_len=q.shape[2],
                               k_len=k.shape[2], causal=causal, device=q.device)
