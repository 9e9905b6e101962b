"""Tri-shape (SCBench / MInference): A-shape plus dense attention for the last query rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import PrefillMethod, band_plan, cdiv, check_int
from .registry import register


@register
@dataclass(kw_only=True)
class TriShape(PrefillMethod):
    """A-shape (``sink`` + ``window``, exact token edges) for all query rows except the last
    ``last_q``, which attend densely (all causal keys).

    The dense tail is **rounded up to whole query blocks**: every query block holding one of the
    last ``last_q`` rows is dense (MInference computes exactly ``last_q`` rows with a separate
    dense pass; the block engine has no such merge, so up to ``block_size - 1`` extra rows are
    dense too). ``last_q=0`` gives plain A-shape. No estimation; shared by the batch and all heads
    (GQA policy: shared). Causal only.

    Defaults (source: microsoft/MInference ``minference/models_patch.py``, Tri-shape):
    ``sink=128``, ``window=3968``, ``last_q=100``. TriangleMix (same file, ``tri_mix``) uses
    ``sink=8, window=512, last_q=128``.
    """

    name: ClassVar[str] = "tri_shape"
    static: ClassVar[bool] = True

    sink: int = 128
    window: int = 3968
    last_q: int = 100

    def __post_init__(self):
        super().__post_init__()
        check_int("sink", self.sink, minimum=0)
        check_int("window", self.window, minimum=1)
        check_int("last_q", self.last_q, minimum=0)

    def _plan(self, q, k, v, *, causal, layer_idx):
        self._require_causal(causal)
        Lq, Lk, bs, dev = q.shape[2], k.shape[2], self.block_size, q.device
        nQ = cdiv(Lq, bs)
        m = torch.arange(nQ, device=dev)
        dense_rows = (torch.clamp((m + 1) * bs, max=Lq) > Lq - self.last_q).view(1, 1, nQ)
        sink = torch.full((1, 1), self.sink, dtype=torch.int64, device=dev)
        window = torch.full((1, 1), self.window, dtype=torch.int64, device=dev)
        return band_plan(sink, window, block_size=bs, q_len=Lq, k_len=Lk, dense_rows=dense_rows)
