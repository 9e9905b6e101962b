"""PowerAttention: a static block pattern with links at power-of-two block distances."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..plan import BlockPlan
from .base import PrefillMethod, cdiv, check_int, forced_blocks, query_block_positions
from .registry import register


@register
@dataclass(kw_only=True)
class Power(PrefillMethod):
    """PowerAttention (Chen et al. 2025, arXiv 2503.03588): each query block keeps the sink
    blocks, its diagonal block(s), ``local_blocks`` blocks before them, and every key block at a
    distance ``2**i`` (``i = 0, 1, 2, ...``) blocks back from its last diagonal block. Over
    ``log2(L / block)`` layers every position reaches every earlier one.

    Block granularity (the pattern is defined on blocks), no estimation, the plan is shared by
    the batch and all heads (GQA policy: shared). Causal only.

    Defaults **[unverified]**: no official repository was readable (see
    /work/shared/specs/prefill-methods.md section 9); the values follow the spec's suggested
    starting point: ``block_size=128``, ``sink_blocks=1``, ``local_blocks=1``. ``max_power=None``
    keeps every power of two that fits; an int ``p`` keeps distances ``2**0 .. 2**p`` only.
    """

    name: ClassVar[str] = "power"
    static: ClassVar[bool] = True

    sink_blocks: int = 1
    local_blocks: int = 1
    max_power: int | None = None

    def __post_init__(self):
        super().__post_init__()
        check_int("sink_blocks", self.sink_blocks, minimum=0)
        check_int("local_blocks", self.local_blocks, minimum=0)
        if self.max_power is not None:
            check_int("max_power", self.max_power, minimum=0, maximum=62)

    def _plan(self, q, k, v, *, causal, layer_idx):
        self._require_causal(causal)
        Lq, Lk, bs, dev = q.shape[2], k.shape[2], self.block_size, q.device
        geo = dict(block_q=bs, block_k=bs, q_len=Lq, k_len=Lk)
        nQ, nK = cdiv(Lq, bs), cdiv(Lk, bs)
        mask = forced_blocks(**geo, sink_blocks=self.sink_blocks, local_blocks=self.local_blocks, diagonal=True,
                             device=dev)
        _, last = query_block_positions(nQ, bs, Lq, Lk, dev)
        diag = (last.clamp(min=0) // bs).view(-1, 1)
        dist = diag - torch.arange(nK, device=dev, dtype=torch.int64).view(1, -1)
        power = (dist > 0) & ((dist & (dist - 1)) == 0)
        if self.max_power is not None:
            power = power & (dist <= (1 << self.max_power))
        mask = (mask | power) & (last >= 0).view(-1, 1)
        return BlockPlan.from_block_mask(mask.view(1, 1, nQ, nK), **geo, causal=True)
