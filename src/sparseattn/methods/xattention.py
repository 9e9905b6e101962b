"""XAttention: strided antidiagonal block scoring, cumulative-mass block selection."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .base import (ESTIMATE_CHUNK_ELEMENTS, PerHead, ScoreBasedMethod, cdiv, check_float, check_int, check_per_head,
                   use_triton_estimator)
from .registry import register


def antidiagonal_block_scores(q: torch.Tensor, k: torch.Tensor, *, block: int, stride: int, causal: bool,
                              norm: float = 1.0) -> torch.Tensor:
    """float ``[B, Hq, nQ, nK]``: XAttention's block masses from strided antidiagonals.

    Keys are grouped in runs of ``stride`` tokens and concatenated along the feature axis, queries
    the same way in reversed order, so one dot product of group ``r`` and group ``c`` is the sum of
    the antidiagonal of the ``stride x stride`` tile ``(r, c)``. Logits ``/ (sqrt(D) * stride *
    norm)``, causal mask on the grouped grid (key group ``c`` visible from query group ``r`` when
    its first key is not after the group's last query position), softmax per grouped row, then
    summed over each ``block x block`` tile. Each real grouped row sums to 1, so a query block's row
    of masses sums to its number of grouped rows. GQA by broadcasting K over the group (no repeat).
    Memory: query rows are processed in chunks of whole blocks, each chunk's grouped score
    tensor near ``ESTIMATE_CHUNK_ELEMENTS`` elements.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G, S = Hq // Hkv, stride
    nQ, nK = cdiv(Lq, block), cdiv(Lk, block)
    rb = block // S  # grouped rows (and columns) per block
    # The grouped GEMM runs in the input dtype on CUDA half types (as the official estimate does),
    # in float32/float64 otherwise; softmax and block sums are float32 (float64 for float64).
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    mm_dt = q.dtype if (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)) else dt
    kp = F.pad(k, (0, 0, 0, nK * block - Lk)).to(mm_dt)
    kr = kp.reshape(B, Hkv, nK * rb, S * D)  # group c = [k_cS, ..., k_cS+S-1]
    qp = F.pad(q, (0, 0, 0, nQ * block - Lq)).to(mm_dt)
    qr = qp.reshape(B, Hq, nQ * rb, S, D).flip(3).reshape(B, Hq, nQ * rb, S * D)  # reversed inside a group
    scale = 1.0 / (math.sqrt(D) * S * norm)
    cols = torch.arange(nK * rb, device=q.device)
    col_ok = (cols * S < Lk).view(1, -1)  # a group with at least one real key
    offset = Lk - Lq
    per_block = B * Hq * rb * nK * rb
    chunk = max(1, ESTIMATE_CHUNK_ELEMENTS // max(1, per_block))
    out = []
    for m0 in range(0, nQ, chunk):  # a handful of chunks, for memory only
        m1 = min(nQ, m0 + chunk)
        r = torch.arange(m0 * rb, m1 * rb, device=q.device)
        row_ok = (r * S < Lq).view(-1, 1)  # a group with at least one real query
        allowed = col_ok & row_ok
        if causal:
            allowed = allowed & (cols.view(1, -1) * S <= (offset + r * S + S - 1).view(-1, 1))
        qc = qr[:, :, m0 * rb:m1 * rb].reshape(B, Hkv, G * (m1 - m0) * rb, S * D)
        logits = torch.matmul(qc, kr.transpose(-1, -2)).view(B, Hq, (m1 - m0) * rb, nK * rb).to(dt)
        logits.mul_(scale).masked_fill_(~allowed, float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num_(nan=0.0)  # rows with nothing allowed -> 0
        del logits
        out.append(probs.view(B, Hq, m1 - m0, rb, nK, rb).sum(dim=(3, 5)))
    return torch.cat(out, dim=2)


@register
@dataclass(kw_only=True)
class XAttention(ScoreBasedMethod):
    """XAttention (Xu et al. 2025, arXiv 2503.16428): score blocks by strided antidiagonal sums
    (:func:`antidiagonal_block_scores`), always keep the sink block and the diagonal block, then
    keep per query block the fewest other blocks (by descending mass) whose mass together with the
    forced blocks' reaches ``threshold`` times the row's mass (ties: lower block index).

    ``threshold`` may be per head (Hq or Hkv values) or a per-(layer, head) table, as in
    XAttention's LongBench setting (``xattn/threshold/llama_threshold.py``); ``threshold=1``
    keeps every visible block. GQA policy: per query head (the official code expects repeated
    K/V and builds one mask per query head); ``gqa_policy`` changes it.

    Defaults (source: microsoft/MInference ``minference/modules/xattention.py``
    ``xattention_forward``, the port of mit-han-lab/x-attention ``xattn/src/Xattention.py``):
    ``stride=8``, ``threshold=0.9``, ``block_size=128``, ``norm=1``; sink block 0 and the diagonal
    are always kept (``find_blocks_chunked``). The official RULER scripts also run ``stride=16``
    (``scripts/run_ruler.sh``). ``block_size`` must be a multiple of ``stride``.
    Estimation cost: ``L**2 * D / stride`` multiply-adds per head.

    Against the official code: the block scores are the same, and so are the plans except in the
    official first chunk of queries (``chunk_size``, 8192 at 32K), where ``find_blocks_chunked``
    (``xattn/src/utils.py``; MInference's copy too) keeps usually one block more (up to two) per query block
    than the rule above (its diagonal ``eye`` overwrites the forced sink column, and the
    cumulative sum then lags one block); ``tests/bench/test_official.py`` pins that down. We keep
    the stated rule.
    """

    name: ClassVar[str] = "xattention"

    block_size: int = 128
    stride: int = 8
    threshold: PerHead = 0.9
    norm: float = 1.0
    sink_blocks: int = 1
    keep_diagonal: bool = True

    def __post_init__(self):
        super().__post_init__()
        check_int("stride", self.stride, minimum=1)
        if self.block_size % self.stride:
            raise ValueError(f"block_size must be a multiple of stride, got block_size={self.block_size}, "
                             f"stride={self.stride}")
        self.threshold = check_per_head("threshold", self.threshold,
                                        lambda n, x: check_float(n, x, minimum=0.0, maximum=1.0))
        check_float("norm", self.norm, minimum=0.0, open_min=True)

    def budget(self):
        return ("threshold", self.threshold)

    def score(self, q, k, *, causal):
        if use_triton_estimator(q) and q.dtype in (torch.float16, torch.bfloat16, torch.float32):
            from ..kernels.xattention_triton import antidiagonal_block_scores_triton

            return antidiagonal_block_scores_triton(q, k, block=self.block_size, stride=self.stride, causal=causal,
                                                    norm=self.norm)
        return antidiagonal_block_scores(q, k, block=self.block_size, stride=self.stride, causal=causal,
                                         norm=self.norm)
