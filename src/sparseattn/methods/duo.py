"""DuoAttention (prefill side): retrieval KV heads dense, streaming KV heads sink + window."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from ..plan import NO_WINDOW
from .base import PerHead, PrefillMethod, band_plan, check_float, check_int, check_per_head, head_values
from .registry import register


def _check_flag(name, x):
    if isinstance(x, bool) or (isinstance(x, int) and x in (0, 1)):
        return bool(x)
    raise ValueError(f"{name} must be a bool (True = retrieval head), got {x!r}")


@register
@dataclass(kw_only=True)
class Duo(PrefillMethod):
    """DuoAttention (Xiao et al. 2024, arXiv 2410.10819), prefill side: each (layer, KV head) is a
    **retrieval** head (dense causal attention) or a **streaming** head (``sink`` + ``recent``
    tokens, exact token edges through the plan's band fields).

    ``retrieval_heads`` gives the assignment: one bool per KV head, or a per-(layer, KV head)
    table (DuoAttention's ``full_attention_heads.tsv`` binarised; pass ``layer_idx=`` to
    ``plan()``). GQA policy: per KV head (the gates are per KV head, so the G query heads of a
    group share the type); the plan has ``H = Hkv``.

    **Default rule when ``retrieval_heads`` is None** (a library addition, not DuoAttention's
    trained gates): an online proxy per (batch, KV head): the softmax attention of the last
    ``probe_q`` queries of every query head of the group, and the mass it puts *outside* the
    streaming pattern; the ``ceil((1 - sparsity) * Hkv)`` KV heads with the most outside mass
    (ties: lower head index) are retrieval heads. The plan then has ``B`` = batch.

    Defaults (source: mit-han-lab/duo-attention ``README.md`` deployment example):
    ``sink=64``, ``recent=256``, ``sparsity=0.5`` (the paper's 50 % retrieval heads for GQA
    models); training used ``sink=128, recent=256``
    (``attn_patterns/Meta-Llama-3.1-8B-Instruct/.../config.json``). ``probe_q=64`` is this
    library's choice (MInference's ``last_q``). Causal only.
    """

    name: ClassVar[str] = "duo"
    static: ClassVar[bool] = False

    sink: int = 64
    recent: int = 256
    retrieval_heads: Optional[PerHead] = None
    sparsity: float = 0.5
    probe_q: int = 64

    def __post_init__(self):
        super().__post_init__()
        check_int("sink", self.sink, minimum=0)
        check_int("recent", self.recent, minimum=1)
        if self.retrieval_heads is not None:
            self.retrieval_heads = check_per_head("retrieval_heads", self.retrieval_heads, _check_flag)
            if isinstance(self.retrieval_heads, bool):
                raise ValueError("retrieval_heads must give one bool per KV head (or a per-layer table of them); "
                                 "for all-dense use the 'dense' method, for all-streaming the 'streaming' method")
        check_float("sparsity", self.sparsity, minimum=0.0, maximum=1.0)
        check_int("probe_q", self.probe_q, minimum=1)

    def outside_mass(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """float ``[B, Hkv]``: attention mass of the last ``probe_q`` queries outside the
        streaming pattern, averaged over those rows and summed over each KV group."""
        B, Hq, Lq, D = q.shape
        Hkv, Lk = k.shape[1], k.shape[2]
        G = Hq // Hkv
        P = min(self.probe_q, Lq)
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        qp = q[:, :, Lq - P:].to(dt).reshape(B, Hkv, G * P, D)
        logits = torch.matmul(qp, k.to(dt).transpose(-1, -2)) / math.sqrt(D)  # [B, Hkv, G*P, Lk]
        pos = (Lk - P + torch.arange(P, device=q.device)).view(-1, 1)  # absolute positions of probe rows
        j = torch.arange(Lk, device=q.device).view(1, -1)
        causal = j <= pos
        stream = causal & ((j < self.sink) | (pos - j < self.recent))
        logits = logits.view(B, Hkv, G, P, Lk).masked_fill(~causal, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        probs = torch.nan_to_num(probs, nan=0.0)  # rows with no visible key (Lq > Lk)
        outside = (probs * (causal & ~stream)).sum(-1)  # [B, Hkv, G, P]
        return outside.mean(-1).sum(-1)

    def _plan(self, q, k, v, *, causal, layer_idx):
        self._require_causal(causal)
        B, Hq, Lq, _ = q.shape
        Hkv, Lk, dev = k.shape[1], k.shape[2], q.device
        if self.retrieval_heads is not None:
            retrieval = head_values(self.retrieval_heads, name="retrieval_heads", heads=Hkv, q_heads=Hq,
                                    kv_heads=Hkv, layer_idx=layer_idx, device=dev, dtype=torch.bool).view(1, Hkv)
        else:
            n_ret = math.ceil((1.0 - self.sparsity) * Hkv - 1e-9)
            order = torch.sort(self.outside_mass(q, k), dim=-1, descending=True, stable=True).indices
            rank = torch.empty_like(order).scatter_(-1, order, torch.arange(Hkv, device=dev).expand_as(order))
            retrieval = rank < n_ret  # [B, Hkv]
        sink = torch.where(retrieval, 0, self.sink).long()
        window = torch.where(retrieval, NO_WINDOW, self.recent).long()
        return band_plan(sink, window, block_size=self.block_size, q_len=Lq, k_len=Lk)
