"""Public entry points of the engine."""

from __future__ import annotations

from typing import Optional

import torch

from .checks import check_plan, check_qkv
from .kernels.dispatch import choose_backend
from .kernels.reference import attention_reference
from .plan import BlockPlan


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Optional[BlockPlan] = None, *,
                           causal: bool = True, scale: Optional[float] = None, backend: str = "auto",
                           return_lse: bool = False):
    """Attention restricted to the key blocks (and token extras) of ``plan``.

    Args:
        q: ``[B, Hq, Lq, D]`` queries.
        k, v: ``[B, Hkv, Lk, D]`` keys and values, ``Hq % Hkv == 0`` (GQA: query head ``h`` reads
            KV head ``h // (Hq // Hkv)``; K/V are never repeated in memory).
        plan: a :class:`BlockPlan` built for ``(Lq, Lk)``, with batch 1 or B and heads 1, Hkv or
            Hq; ``None`` means dense (all causal-visible keys; the same kernel).
        causal: bottom-right alignment, query ``i`` sees keys ``j <= Lk - Lq + i``.
        scale: softmax scale, default ``1 / sqrt(D)``.
        backend: ``"auto"`` (Triton on CUDA when it can run, else the reference), ``"reference"``
            (plain PyTorch, fp32 accumulation, CPU or GPU) or ``"triton"`` (raises with the reason
            when it cannot run).
        return_lse: also return the float32 log-sum-exp ``[B, Hq, Lq]`` (natural log).

    Returns:
        ``out [B, Hq, Lq, D]`` in q's dtype (and ``lse``). Rows with no visible key give 0 and
        lse ``-inf``, never NaN.
    """
    B, Hq, Hkv, Lq, Lk, D = check_qkv(q, k, v)
    check_plan(plan, B=B, Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, device=q.device)
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    chosen = choose_backend(backend, q, plan)
    if chosen == "triton":
        from .kernels.prefill_triton import attention_triton

        return attention_triton(q, k, v, plan, causal=causal, scale=scale, return_lse=return_lse)
    return attention_reference(q, k, v, plan, causal=causal, scale=scale, return_lse=return_lse)
