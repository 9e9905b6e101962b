"""How faithful a sparse plan is to dense attention, measured on real q/k/v.

* ``density``: the share of the causal-visible area the plan computes (``plan.density``);
* ``mass_recall``: the share of the dense softmax probability mass that falls inside the plan's
  element mask, averaged over the query rows that see at least one key, over heads and batch;
* ``out_rel_err``: ``||out_sparse - out_dense|| / ||out_dense||`` (Frobenius norms over the whole
  output), both outputs from :func:`sparseattn.block_sparse_attention`.

Also two plan builders used as yardsticks: :func:`oracle_plan` (the fewest key blocks holding a
given share of the exact attention mass, per head and query block) and :func:`topk_plan` (key
blocks ranked by mean-pooled q/k scores).

Everything is computed in float32 (float64 for float64 inputs) a chunk of query rows at a time,
so an 8K x 8K x 9-head problem stays within a few hundred MB.
"""

from __future__ import annotations

import math
from typing import Dict, Iterator, Mapping, Optional, Tuple

import torch

from dataclasses import replace

from ..api import block_sparse_attention
from ..checks import check_qkv
from ..kernels.dispatch import choose_backend
from ..plan import BlockPlan

# Default chunk: about this many score elements (B * Hq * rows * Lk) at a time. Small chunks
# are faster on CPUs (they stay in cache); GPUs prefer fewer, larger launches.
_CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _default_chunk(B: int, Hq: int, Lk: int, device: torch.device, multiple: int = 1) -> int:
    budget = _CHUNK_ELEMENTS.get(device.type, _CHUNK_ELEMENTS["cpu"])
    rows = max(1, budget // max(1, B * Hq * max(Lk, 1)))
    return max(multiple, rows // multiple * multiple)


def _dense_prob_chunks(q: torch.Tensor, k: torch.Tensor, *, causal: bool, scale: float,
                       q_chunk: int) -> Iterator[Tuple[int, int, torch.Tensor, torch.Tensor]]:
    """Yield ``(r0, r1, p [B, Hq, R, W], row_ok [R])``: exact softmax rows in the compute dtype.

    ``W`` is the number of leading keys the chunk can see (``Lk`` when not causal); keys past it
    have probability 0 for these rows. ``row_ok`` is False for query rows that see no key (their
    ``p`` row is all zeros).
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    dt = _compute_dtype(q)
    kc = k.to(dt).unsqueeze(2)  # [B, Hkv, 1, Lk, D]
    keys = torch.arange(Lk, device=q.device)
    for r0 in range(0, Lq, q_chunk):
        r1 = min(Lq, r0 + q_chunk)
        R = r1 - r0
        W = min(Lk, max(0, Lk - Lq + r1)) if causal else Lk
        qc = q[:, :, r0:r1].to(dt).reshape(B, Hkv, G, R, D)
        s = torch.matmul(qc, kc[..., :W, :].transpose(-1, -2)) * scale  # [B, Hkv, G, R, W]
        if causal:
            pos = (Lk - Lq + torch.arange(r0, r1, device=q.device)).view(-1, 1)
            vis = keys[:W].view(1, -1) <= pos  # [R, W]
            s = s.masked_fill(~vis, float("-inf"))
            row_ok = vis.any(-1)
        else:
            row_ok = torch.full((R,), Lk > 0, dtype=torch.bool, device=q.device)
        p = torch.softmax(s, dim=-1)
        p = torch.where(row_ok.view(-1, 1), p, torch.zeros((), dtype=dt, device=q.device))  # NaN rows -> 0
        yield r0, r1, p.reshape(B, Hq, R, W), row_ok


def _plan_mask_chunk(plan: BlockPlan, B: int, Hq: int, r0: int, r1: int, causal: bool) -> torch.Tensor:
    """bool ``[B, Hq, R, Lk]``: the plan's element mask for rows ``[r0, r1)``, per query head."""
    mask = plan.to_dense_mask(causal, q_start=r0, q_end=r1)
    if plan.heads != Hq:
        mask = mask.repeat_interleave(Hq // plan.heads, dim=1)
    return mask.expand(B, Hq, r1 - r0, mask.shape[-1])


def _slice_plan(plan: BlockPlan, r0: int, r1: int, k_end: int) -> BlockPlan:
    """The plan restricted to query rows ``[r0, r1)`` and keys ``[0, k_end)``.

    ``r0`` is a multiple of ``block_q``, so query blocks map one to one; key blocks keep their
    indices. Under causal bottom-right alignment with ``k_end = Lk - Lq + r1``, row ``i`` of the
    slice sits at the same absolute position ``r0 + i + Lk - Lq`` as in the full problem, so the
    band (absolute positions) and the extra columns keep their meaning.
    """
    R = r1 - r0
    m0, m1 = r0 // plan.block_q, -(-r1 // plan.block_q)
    nK = -(-k_end // plan.block_k)
    bm = plan.block_mask()[:, :, m0:m1, :nK]
    sub = BlockPlan.from_block_mask(bm, block_q=plan.block_q, block_k=plan.block_k, q_len=R, k_len=k_end,
                                    causal=True)
    extra = {}
    for name in ("band_sink", "band_window", "extra_counts", "extra_indices"):
        t = getattr(plan, name)
        extra[name] = None if t is None else t[:, :, m0:m1].contiguous()
    return replace(sub, **extra)


def _engine_attention(q, k, v, plan: Optional[BlockPlan], *, causal: bool, scale: float, backend: str,
                      q_chunk: int) -> torch.Tensor:
    """``block_sparse_attention`` over the whole problem, a chunk of query rows at a time on the reference.

    With the reference backend and causal attention each chunk of rows only multiplies against
    the keys it can see (half the work of one big call, and bounded memory). Other backends
    (Triton) run in one call.
    """
    Lq, Lk = q.shape[2], k.shape[2]
    if not causal or choose_backend(backend, q, plan) != "reference":
        return block_sparse_attention(q, k, v, plan, causal=causal, scale=scale, backend=backend)
    block = plan.block_q if plan is not None else 128
    step = max(block, q_chunk // block * block)
    if step >= Lq:
        return block_sparse_attention(q, k, v, plan, causal=causal, scale=scale, backend=backend)
    out = torch.zeros_like(q)
    for r0 in range(0, Lq, step):
        r1 = min(Lq, r0 + step)
        k_end = Lk - Lq + r1  # keys the chunk's last row can see
        if k_end <= 0:
            continue  # rows that see no key give 0
        sub = None if plan is None else _slice_plan(plan, r0, r1, k_end)  # None: dense, same alignment
        out[:, :, r0:r1] = block_sparse_attention(q[:, :, r0:r1], k[:, :, :k_end], v[:, :, :k_end], sub,
                                                  causal=True, scale=scale, backend=backend)
    return out


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    den = float(torch.linalg.vector_norm(ref))
    num = float(torch.linalg.vector_norm(out - ref))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def _check_plan_for(plan: Optional[BlockPlan], B: int, Hq: int, Hkv: int, Lq: int, Lk: int, device) -> None:
    if plan is None:
        return
    if not isinstance(plan, BlockPlan):
        raise TypeError(f"plans must be BlockPlan or None (dense), got {type(plan).__name__}")
    plan.check_compatible(batch=B, q_heads=Hq, kv_heads=Hkv, q_len=Lq, k_len=Lk, device=device)


def compare_plans(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plans: Mapping[str, Optional[BlockPlan]], *,
                  causal: bool = True, q_chunk: Optional[int] = None, scale: Optional[float] = None,
                  backend: str = "auto") -> Dict[str, dict]:
    """:func:`attention_fidelity` for several plans at once, sharing the dense pass.

    Returns ``{name: {"density", "mass_recall", "mass_recall_heads", "out_rel_err"}}``
    (``None`` as a plan means dense).
    """
    B, Hq, Hkv, Lq, Lk, D = check_qkv(q, k, v)
    for plan in plans.values():
        _check_plan_for(plan, B, Hq, Hkv, Lq, Lk, q.device)
    if q_chunk is None:
        q_chunk = _default_chunk(B, Hq, Lk, q.device)
    if not isinstance(q_chunk, int) or q_chunk <= 0:
        raise ValueError(f"q_chunk must be a positive int, got {q_chunk!r}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dt = _compute_dtype(q)
    qf, kf, vf = q.to(dt), k.to(dt), v.to(dt)

    out_dense = _engine_attention(qf, kf, vf, None, causal=causal, scale=scale, backend=backend, q_chunk=q_chunk)
    results: Dict[str, dict] = {}
    for name, plan in plans.items():
        if plan is None:
            err, density = 0.0, 1.0
        else:
            out = _engine_attention(qf, kf, vf, plan, causal=causal, scale=scale, backend=backend, q_chunk=q_chunk)
            err, density = _rel_err(out.to(dt), out_dense.to(dt)), plan.density(causal)
            del out
        results[name] = {"density": float(density), "out_rel_err": float(err)}

    # Mass recall: sum over rows of the dense mass inside each plan's mask.
    kept = {name: torch.zeros(Hq, dtype=torch.float64, device=q.device) for name in plans}
    rows_ok = 0
    for r0, r1, p, row_ok in _dense_prob_chunks(qf, kf, causal=causal, scale=scale, q_chunk=q_chunk):
        n_ok = int(row_ok.sum())
        if n_ok == 0:
            continue
        rows_ok += n_ok
        for name, plan in plans.items():
            if plan is None:
                share = p.sum(-1)  # [B, Hq, R]: 1 on rows that see a key, 0 elsewhere
            else:
                mask = _plan_mask_chunk(plan, B, Hq, r0, r1, causal)[..., :p.shape[-1]]
                share = (p * mask).sum(-1)
            share = torch.where(row_ok.view(1, 1, -1), share, torch.zeros((), dtype=share.dtype, device=share.device))
            kept[name] += share.sum(dim=(0, 2)).double()
        del p
    for name in plans:
        if rows_ok == 0:
            heads = torch.full((Hq,), float("nan"), dtype=torch.float64)
        else:
            heads = (kept[name] / (rows_ok * B)).cpu()
        results[name]["mass_recall_heads"] = [float(x) for x in heads]
        results[name]["mass_recall"] = float(heads.mean())
    return results


def attention_fidelity(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Optional[BlockPlan], *,
                       causal: bool = True, q_chunk: Optional[int] = None, scale: Optional[float] = None,
                       backend: str = "auto") -> dict:
    """Density, attention-mass recall and output error of ``plan`` against dense attention.

    Args:
        q, k, v: canonical layout ``q [B, Hq, Lq, D]``, ``k, v [B, Hkv, Lk, D]`` (GQA allowed).
        plan: a :class:`BlockPlan` for ``(Lq, Lk)``; ``None`` is dense (density 1, recall 1,
            error 0).
        causal: bottom-right causal alignment, as in ``block_sparse_attention``.
        q_chunk: query rows per chunk (default: ~4M score elements a chunk on CPU, ~64M on GPU).
        scale: softmax scale, default ``1 / sqrt(D)``.
        backend: passed to ``block_sparse_attention`` for the two outputs.

    Returns:
        ``{"density", "mass_recall", "mass_recall_heads" (per query head), "out_rel_err"}``.
    """
    return compare_plans(q, k, v, {"plan": plan}, causal=causal, q_chunk=q_chunk, scale=scale,
                         backend=backend)["plan"]


def block_attention_mass(q: torch.Tensor, k: torch.Tensor, *, block_q: int = 128, block_k: int = 128,
                         causal: bool = True, scale: Optional[float] = None,
                         q_chunk: Optional[int] = None) -> torch.Tensor:
    """float ``[B, Hq, nQ, nK]``: exact softmax mass per key block, averaged over each query block.

    Entry ``[b, h, m, n]`` is the mean, over the query rows of block ``m`` that see at least one
    key, of the probability mass those rows put on key block ``n`` (each row of the result sums
    to 1, or to 0 for a query block whose rows see no key).
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if k.shape[0] != B or Hkv == 0 or Hq % Hkv or k.shape[-1] != D:
        raise ValueError(f"q [B, Hq, Lq, D] and k [B, Hkv, Lk, D] do not match: {tuple(q.shape)}, {tuple(k.shape)}")
    for name, size in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"{name} must be a positive int, got {size!r}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    nQ, nK = -(-Lq // block_q), -(-Lk // block_k)
    if q_chunk is None:
        q_chunk = _default_chunk(B, Hq, Lk, q.device, multiple=block_q)
    else:
        q_chunk = max(block_q, q_chunk // block_q * block_q)  # chunks must hold whole query blocks
    dt = _compute_dtype(q)
    sums = torch.zeros(B, Hq, nQ, nK, dtype=dt, device=q.device)
    counts = torch.zeros(nQ, dtype=dt, device=q.device)
    for r0, r1, p, row_ok in _dense_prob_chunks(q, k, causal=causal, scale=scale, q_chunk=q_chunk):
        R = r1 - r0
        p = torch.nn.functional.pad(p, (0, nK * block_k - p.shape[-1]))
        pooled = p.view(B, Hq, R, nK, block_k).sum(-1)  # [B, Hq, R, nK]
        m0 = r0 // block_q
        nb = -(-R // block_q)
        pooled = torch.nn.functional.pad(pooled, (0, 0, 0, nb * block_q - R))
        sums[:, :, m0:m0 + nb] += pooled.view(B, Hq, nb, block_q, nK).sum(3)
        ok = torch.nn.functional.pad(row_ok.to(dt), (0, nb * block_q - R))
        counts[m0:m0 + nb] += ok.view(nb, block_q).sum(-1)
    return sums / counts.clamp(min=1).view(1, 1, -1, 1)


def _diagonal_blocks(*, block_q: int, block_k: int, q_len: int, k_len: int, device) -> torch.Tensor:
    """int64 ``[nQ]``: the key block holding each query block's last position (-1 if none)."""
    limits = BlockPlan.causal_block_limits(block_q=block_q, block_k=block_k, q_len=q_len, k_len=k_len,
                                           causal=True, device=device)
    return limits.long() - 1


def _visible_blocks(*, block_q: int, block_k: int, q_len: int, k_len: int, causal: bool, device) -> torch.Tensor:
    """bool ``[nQ, nK]``: key blocks some query of the block can see."""
    limits = BlockPlan.causal_block_limits(block_q=block_q, block_k=block_k, q_len=q_len, k_len=k_len,
                                           causal=causal, device=device)
    nK = -(-k_len // block_k)
    return torch.arange(nK, device=device).view(1, -1) < limits.view(-1, 1).long()


def oracle_plan(q: torch.Tensor, k: torch.Tensor, *, block_q: int = 128, block_k: int = 128, mass: float = 0.9,
                causal: bool = True, scale: Optional[float] = None, q_chunk: Optional[int] = None) -> BlockPlan:
    """Per (batch, query head, query block): the fewest key blocks holding ``mass`` of the attention.

    The block masses come from exact attention (:func:`block_attention_mass`, averaged over the
    block's queries); blocks are taken in descending mass until their sum reaches ``mass`` of the
    block's total. The diagonal block (the one holding the block's last query position) is always
    kept. The result has one plan row per query head; by construction every query block's mean
    recall is at least ``mass``, hence so is the plan's ``mass_recall``.
    """
    if not 0.0 <= float(mass) <= 1.0:
        raise ValueError(f"mass must lie in [0, 1], got {mass!r}")
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    bm = block_attention_mass(q, k, block_q=block_q, block_k=block_k, causal=causal, scale=scale, q_chunk=q_chunk)
    nQ, nK = bm.shape[-2:]
    visible = _visible_blocks(block_q=block_q, block_k=block_k, q_len=Lq, k_len=Lk, causal=causal, device=q.device)
    if float(mass) >= 1.0:
        keep = visible.view(1, 1, nQ, nK).expand(B, Hq, nQ, nK).clone()
    else:
        vals, order = torch.sort(bm, dim=-1, descending=True)
        before = torch.cumsum(vals, dim=-1) - vals  # mass of the blocks ranked above each one
        target = float(mass) * bm.sum(-1, keepdim=True)
        take_sorted = before < target  # the shortest prefix whose sum reaches the target
        keep = torch.zeros_like(take_sorted).scatter_(-1, order, take_sorted)
    diag = _diagonal_blocks(block_q=block_q, block_k=block_k, q_len=Lq, k_len=Lk, device=q.device)
    has_diag = diag >= 0
    diag_mask = torch.zeros(nQ, nK, dtype=torch.bool, device=q.device)
    diag_mask[has_diag.nonzero().view(-1), diag[has_diag]] = True
    keep = keep | diag_mask.view(1, 1, nQ, nK)
    return BlockPlan.from_block_mask(keep, block_q=block_q, block_k=block_k, q_len=Lq, k_len=Lk, causal=causal)


def _mean_pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """``[B, H, L, D] -> [B, H, ceil(L / block), D]``: mean over each block (partial last block too)."""
    B, H, L, D = x.shape
    n = -(-L // block)
    xp = torch.nn.functional.pad(x, (0, 0, 0, n * block - L))
    sums = xp.view(B, H, n, block, D).sum(3)
    sizes = torch.clamp(L - torch.arange(n, device=x.device) * block, max=block).to(x.dtype)
    return sums / sizes.view(1, 1, -1, 1)


def topk_plan(q: torch.Tensor, k: torch.Tensor, *, density: float, block: int = 128, causal: bool = True) -> BlockPlan:
    """Key blocks ranked by mean-pooled scores: ``ceil(density * visible)`` per query block.

    Queries and keys are mean-pooled over blocks of ``block`` tokens; the pooled scores rank the
    key blocks each query block can see, and the top ``ceil(density * visible)`` of them are
    kept, plus the first block (attention sink) and the diagonal block. One plan row per query
    head. The element density of the result is near ``density`` (forced blocks and partial
    diagonal blocks move it a little).
    """
    if not 0.0 <= float(density) <= 1.0:
        raise ValueError(f"density must lie in [0, 1], got {density!r}")
    if not isinstance(block, int) or block <= 0:
        raise ValueError(f"block must be a positive int, got {block!r}")
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    dt = _compute_dtype(q)
    qp = _mean_pool(q.to(dt), block)  # [B, Hq, nQ, D]
    kp = _mean_pool(k.to(dt), block)  # [B, Hkv, nK, D]
    nQ, nK = qp.shape[2], kp.shape[2]
    G = Hq // Hkv
    scores = torch.matmul(qp.view(B, Hkv, G, nQ, D), kp.unsqueeze(2).transpose(-1, -2)).view(B, Hq, nQ, nK)
    visible = _visible_blocks(block_q=block, block_k=block, q_len=Lq, k_len=Lk, causal=causal, device=q.device)
    scores = scores.masked_fill(~visible.view(1, 1, nQ, nK), float("-inf"))
    n_vis = visible.sum(-1)  # [nQ]
    n_keep = torch.ceil(n_vis.to(torch.float64) * float(density)).long().clamp(max=nK)
    order = torch.argsort(scores, dim=-1, descending=True)
    rank_ok = torch.arange(nK, device=q.device).view(1, -1) < n_keep.view(-1, 1)  # [nQ, nK] in rank order
    keep = torch.zeros(B, Hq, nQ, nK, dtype=torch.bool, device=q.device)
    keep.scatter_(-1, order, rank_ok.view(1, 1, nQ, nK).expand(B, Hq, nQ, nK))
    forced = torch.zeros(nQ, nK, dtype=torch.bool, device=q.device)
    forced[:, 0] = n_vis > 0
    diag = _diagonal_blocks(block_q=block, block_k=block, q_len=Lq, k_len=Lk, device=q.device)
    has_diag = diag >= 0
    forced[has_diag.nonzero().view(-1), diag[has_diag]] = True
    keep = (keep | forced.view(1, 1, nQ, nK)) & visible.view(1, 1, nQ, nK)
    return BlockPlan.from_block_mask(keep, block_q=block, block_k=block, q_len=Lq, k_len=Lk, causal=causal)


__all__ = ["attention_fidelity", "compare_plans", "oracle_plan", "topk_plan", "block_attention_mass"]
