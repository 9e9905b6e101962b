"""Input validation for the attention entry points, separate from compute.

Messages say what was expected, what came, and a hint.
"""

from __future__ import annotations

from typing import Optional

import torch

from .plan import BlockPlan

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple:
    """Check the canonical layout ``q [B, Hq, Lq, D]``, ``k, v [B, Hkv, Lk, D]``.

    Returns ``(B, Hq, Hkv, Lq, Lk, D)``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, L, D] (canonical layout), got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be one of float16/bfloat16/float32/float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}; cast them first")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    B, Hq, Lq, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if Bk != B:
        raise ValueError(f"batch mismatch: q has B={B}, k/v have B={Bk}")
    if Dk != D:
        raise ValueError(f"head_dim mismatch: q has D={D}, k/v have D={Dk}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads must be a multiple of KV heads (GQA), got Hq={Hq}, Hkv={Hkv}")
    return B, Hq, Hkv, Lq, Lk, D


def check_qk_pair(q, k, dtypes) -> None:
    """The q/k checks of an estimator kernel's wrapper: ``q [B, Hq, Lq, D]``, ``k [B, Hkv, Lk, D]``,
    one dtype of ``dtypes``, one device, ``Hq`` a multiple of ``Hkv``."""
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or q.dim() != 4 or k.dim() != 4:
        raise ValueError("q and k must be 4-d tensors [B, H, L, D], got "
                         f"{getattr(q, 'shape', type(q))} and {getattr(k, 'shape', type(k))}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[3] == 0:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch and a non-zero head_dim")
    Hq, Hkv = q.shape[1], k.shape[1]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key heads ({Hkv})")
    if q.dtype not in dtypes or k.dtype != q.dtype:
        raise ValueError(f"q and k must share one dtype of {list(dtypes)}, got {q.dtype} and {k.dtype}")
    if q.device != k.device:
        raise ValueError(f"q and k must be on one device, got {q.device} and {k.device}")


def is_pow2(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0 and (x & (x - 1)) == 0


def check_plan(plan: Optional[BlockPlan], *, B: int, Hq: int, Hkv: int, Lq: int, Lk: int,
               device: torch.device) -> None:
    if plan is None:
        return
    if not isinstance(plan, BlockPlan):
        raise TypeError(f"plan must be a sparseattn.BlockPlan or None (dense), got {type(plan).__name__}")
    plan.check_compatible(batch=B, q_heads=Hq, kv_heads=Hkv, q_len=Lq, k_len=Lk, device=device)
