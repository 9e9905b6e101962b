"""MoA (Mixture of Attention spans): per-head elastic sink + sliding-window bands."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..plan import NO_WINDOW
from .base import PerHead, PrefillMethod, band_plan, check_choice, check_float, check_int, check_per_head, head_values
from .registry import register


@register
@dataclass(kw_only=True)
class MoA(PrefillMethod):
    """MoA (Fu et al. 2024, arXiv 2406.14909): head ``h`` keeps a causal band of
    ``span_h(N) = alphas[h] + betas[h] * N`` tokens (``N`` = key length, the query itself
    included) plus ``sink`` global tokens, with exact token edges (plan band fields).

    ``alphas`` / ``betas`` take a scalar (all heads), one value per head (Hq or Hkv) or a
    per-(layer, head) table as in MoA's ``moa_alpha_beta.json`` (``{"alphas": [[...], ...],
    "betas": [[...], ...]}``; pass ``layer_idx=`` to ``plan()``). The span is clamped to
    ``[1, N]``. No estimation.

    GQA policy (``gqa_policy``): ``"per_q_head"`` (default; MoA's plans are per query head and
    its repo converts GQA models to MHA, ``scripts/helper/gqa_to_mha.py``) or ``"group_max"``
    (one band per KV head: the widest span of its group, so no head loses keys). Causal only.

    Defaults (source: thu-nics/MoA): ``block_size=64`` (profiling block,
    ``MoA/universal/elastic_block_sparse.py``), ``sink=64`` (one global block,
    ``num_global_block = 1``, same file), ``alphas=0.0, betas=0.5``: the uniform plan shipped next
    to every MoA plan (``examples/*/streamingllm_alpha_beta.json``, 50 % span for every head).
    Real MoA plans come from MoA's offline profiler; load them into ``alphas``/``betas``.
    """

    name: ClassVar[str] = "moa"
    static: ClassVar[bool] = True

    block_size: int = 64
    sink: int = 64
    alphas: PerHead = 0.0
    betas: PerHead = 0.5
    gqa_policy: str = "per_q_head"

    def __post_init__(self):
        super().__post_init__()
        check_int("sink", self.sink, minimum=0)
        self.alphas = check_per_head("alphas", self.alphas, lambda n, x: check_float(n, x))
        self.betas = check_per_head("betas", self.betas, lambda n, x: check_float(n, x, minimum=0.0))
        check_choice("gqa_policy", self.gqa_policy, ("per_q_head", "group_max"))

    def _plan(self, q, k, v, *, causal, layer_idx):
        self._require_causal(causal)
        Hq, Lq, Hkv, Lk, dev = q.shape[1], q.shape[2], k.shape[1], k.shape[2], q.device
        common = dict(heads=Hq, q_heads=Hq, kv_heads=Hkv, layer_idx=layer_idx, device=dev, dtype=torch.float64)
        span = head_values(self.alphas, name="alphas", **common) + head_values(self.betas, name="betas", **common) * Lk
        if self.gqa_policy == "group_max":  # widest span of each KV group, so no head loses keys
            span = span.view(Hkv, Hq // Hkv).amax(-1)
        heads = span.shape[0]
        window = torch.round(span).clamp(min=1, max=min(max(Lk, 1), NO_WINDOW)).long().view(1, heads)
        sink = torch.full((1, heads), self.sink, dtype=torch.int64, device=dev)
        return band_plan(sink, window, block_size=self.block_size, q_len=Lq, k_len=Lk)
