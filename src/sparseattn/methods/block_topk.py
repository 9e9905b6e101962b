"""Block top-k (MInference "block-sparse" pattern): mean-pooled q/k block scores."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import (PerHead, ScoreBasedMethod, check_choice, check_float, check_int, check_per_head, pool_blocks,
                   visible_blocks)
from .registry import register


@register
@dataclass(kw_only=True)
class BlockTopK(ScoreBasedMethod):
    """Mean-pool queries and keys over blocks, score block pairs by ``softmax(q̄ · k̄ / sqrt(D))``
    over the visible key blocks of each row, then keep per query block either the ``topk`` best
    key blocks (``selection="topk"``, MInference's block-sparse pattern) or the fewest blocks
    whose estimated mass reaches ``threshold`` (``selection="threshold"``, PBS-Attn's
    ``select_blocks`` on mean-pooled blocks).

    ``topk`` counts every kept block of a row, forced ones included; ``topk`` and ``threshold``
    may be per head (Hq or Hkv values) or per-(layer, head) tables. GQA policy: per query head
    (MInference repeats K/V to every query head); ``gqa_policy`` changes it.

    Defaults (source: microsoft/MInference ``minference/modules/minference_forward.py``,
    block-sparse branch): ``block_size=64``, ``topk=100``, ``selection="topk"``. ``threshold=0.9``
    (source: xinghaow99/pbs-attn ``pbs_attn/patch/huggingface.py``, mean pooling). MInference
    does not force blocks; this library keeps ``sink_blocks=1`` and the diagonal by default
    (every query then sees itself) - set ``sink_blocks=0, keep_diagonal=False`` for the original.
    Estimation cost: ``(L / block)**2 * D`` per head.
    """

    name: ClassVar[str] = "block_topk"

    block_size: int = 64
    selection: str = "topk"
    topk: PerHead = 100
    threshold: PerHead = 0.9

    def __post_init__(self):
        super().__post_init__()
        check_choice("selection", self.selection, ("topk", "threshold"))
        self.topk = check_per_head("topk", self.topk, lambda n, x: check_int(n, x, minimum=0))
        self.threshold = check_per_head("threshold", self.threshold,
                                        lambda n, x: check_float(n, x, minimum=0.0, maximum=1.0))

    def budget(self):
        return (self.selection, self.topk if self.selection == "topk" else self.threshold)

    def score(self, q, k, *, causal):
        B, Hq, Lq, D = q.shape
        Hkv, Lk = k.shape[1], k.shape[2]
        bs = self.block_size
        qb = pool_blocks(q, bs)  # [B, Hq, nQ, D]
        kb = pool_blocks(k, bs)  # [B, Hkv, nK, D]
        nQ, nK = qb.shape[2], kb.shape[2]
        logits = torch.matmul(qb.view(B, Hkv, -1, D), kb.transpose(-1, -2)) / math.sqrt(D)
        logits = logits.view(B, Hq, nQ, nK)
        vis = visible_blocks(block_q=bs, block_k=bs, q_len=Lq, k_len=Lk, causal=causal, device=q.device)
        probs = torch.softmax(logits.masked_fill(~vis, float("-inf")), dim=-1)
        return torch.nan_to_num(probs, nan=0.0)  # rows with no visible block
