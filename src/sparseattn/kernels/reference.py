"""Plain PyTorch block-sparse attention: the CPU path and the test oracle.

It expands the plan to its exact element mask (``BlockPlan.to_dense_mask``) and runs masked
softmax attention, a chunk of query rows at a time so that long sequences fit in memory.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..plan import BlockPlan

# Rows per chunk are chosen so one chunk's score tensor stays near this many elements.
_CHUNK_ELEMENTS = 1 << 26


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Optional[BlockPlan], *,
                        causal: bool = True, scale: Optional[float] = None, return_lse: bool = False,
                        compute_dtype: Optional[torch.dtype] = None):
    """Masked attention over the plan's element mask. Inputs are already validated.

    ``q [B, Hq, Lq, D]``, ``k, v [B, Hkv, Lk, D]``. Accumulates in float32 (float64 for float64
    inputs) unless ``compute_dtype`` says otherwise (tests use the input dtype to measure the
    error an honest implementation has). Fully masked rows give 0 and lse ``-inf``. A non-finite
    value in ``v`` makes exactly the rows that attend to it NaN (0 * NaN must not leak into rows
    that mask it out).
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if compute_dtype is None:
        compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if plan is None:
        plan = BlockPlan.dense(block_q=128, block_k=128, q_len=Lq, k_len=Lk, causal=causal, device=q.device)
    plan_h = plan.heads

    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, Lq, dtype=torch.float32, device=q.device)
    if B == 0 or Lq == 0:
        return (out, lse) if return_lse else out

    kc = k.to(compute_dtype).unsqueeze(2)  # [B, Hkv, 1, Lk, D]: GQA by broadcast, no repeat
    v_finite = torch.isfinite(v).all(-1)  # [B, Hkv, Lk]
    vc = torch.where(v_finite.unsqueeze(-1), v, torch.zeros((), dtype=v.dtype, device=v.device))
    vc = vc.to(compute_dtype).unsqueeze(2)
    v_bad = (~v_finite).to(compute_dtype).unsqueeze(2).unsqueeze(-1)  # [B, Hkv, 1, Lk, 1]

    rows = max(1, _CHUNK_ELEMENTS // max(1, B * Hq * max(Lk, 1)))
    for r0 in range(0, Lq, rows):
        r1 = min(Lq, r0 + rows)
        mask = plan.to_dense_mask(causal, q_start=r0, q_end=r1)  # [Bp, Hp, R, Lk]
        if plan_h != Hq:
            mask = mask.repeat_interleave(Hq // plan_h, dim=1)
        mask = mask.expand(B, Hq, r1 - r0, Lk).reshape(B, Hkv, G, r1 - r0, Lk)
        qc = q[:, :, r0:r1].to(compute_dtype).reshape(B, Hkv, G, r1 - r0, D)
        s = torch.matmul(qc, kc.transpose(-1, -2)) * scale
        s = s.masked_fill(~mask, float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1, keepdim=True)  # -inf on fully masked rows
        p = torch.exp(s - row_lse)
        p = torch.where(torch.isneginf(row_lse), torch.zeros_like(p), p)  # exp(-inf + inf) is NaN
        o = torch.matmul(p, vc)
        poisoned = torch.matmul(p, v_bad) > 0
        o = torch.where(poisoned, torch.full_like(o, float("nan")), o)
        out[:, :, r0:r1] = o.reshape(B, Hq, r1 - r0, D).to(q.dtype)
        lse[:, :, r0:r1] = row_lse.reshape(B, Hq, r1 - r0).float()
    return (out, lse) if return_lse else out
