"""Exact decode logits over a kept-token *list*, read through the page table.

What H2O and TOVA score with at each decode step (``decode_methods/eviction.py``,
``listed_attention``): the scaled ``q . k`` of the step's ``Lq`` queries over the tokens an
eviction method keeps, given as an ascending list of positions per (batch, KV head) plus a
count, instead of over all ``N`` cached positions. The work is O(list width), not O(N).

One program owns one (batch, KV head, tile of ``BLOCK_N`` list entries, row tile) and *all*
``G * Lq`` query rows of the GQA group (up to ``BLOCK_M``): it loads the tile's positions, their
physical pages (one table load per entry), then the keys (each a contiguous ``D``-vector of its
page, read once) and multiplies them by the whole group with fp32 accumulation; the products are
those of :mod:`.decode_logits_triton` (``_qk``, ``choose_product``). One tile per program: at
B = 8, Hkv = 8 and a 2K list that is ~2K programs, plenty to hide the three dependent loads.
Entries past the row's count are written as ``-inf`` without any load (they are stale garbage).

:func:`list_logits_torch` is the same function in PyTorch: the CPU path and the oracle.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .decode_logits_triton import _group_queries, _load_k, _qk, group_tiles
from .decode_logits_triton import _check as _check_paged
from .dispatch import triton_interpreting


@triton.jit
def _list_logits(
    Q, KP, Table, Tokens, Counts, Lengths, Out, SnapTokens, SnapCounts,
    scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kp, stride_kh, stride_ks, stride_kd,
    stride_tb, stride_tp,
    stride_lib, stride_lih, stride_cb, stride_ch, stride_lb,
    stride_sb, stride_sh, stride_scb, stride_sch,
    num_kv_heads, q_len, width, n_slots, head_dim,
    PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PAD_D: tl.constexpr, SUM: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr,
    SNAPSHOT: tl.constexpr,
):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    mt = tl.program_id(2)
    b64 = (bh // num_kv_heads).to(tl.int64)
    hk = bh % num_kv_heads
    seq_len = tl.load(Lengths + b64 * stride_lb).to(tl.int32)
    # Capped at the width: a replayed graph step past its slack never reads beyond the view.
    count = tl.minimum(tl.load(Counts + b64 * stride_cb + hk * stride_ch), width)
    n_rows = GROUP * q_len

    rows, row_ok, qpos, q, q_mid, q_lo = _group_queries(
        Q, b64, hk, mt, seq_len, q_len, head_dim, stride_qb, stride_qh, stride_qm, stride_qd,
        GROUP, BLOCK_M, BLOCK_D, PAD_D, SPLIT)
    offs_d = tl.arange(0, BLOCK_D)

    j = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    listed = j < count
    if SNAPSHOT:  # copy the list's first `width` lanes and the capped count (the row tile 0 programs)
        pos = tl.load(Tokens + b64 * stride_lib + hk * stride_lih + j, mask=j < width, other=0)
        if mt == 0:
            tl.store(SnapTokens + b64 * stride_sb + hk * stride_sh + j, pos, mask=j < width)
            if tile == 0:
                tl.store(SnapCounts + b64 * stride_scb + hk * stride_sch, count.to(SnapCounts.dtype.element_ty))
    else:
        pos = tl.load(Tokens + b64 * stride_lib + hk * stride_lih + j, mask=listed, other=0)
    # A listed position is always < seq_len; the bounds only keep a corrupt entry from reading wild.
    ok = listed & (pos >= 0) & (pos < seq_len) & (pos < n_slots)
    phys = tl.load(Table + b64 * stride_tb + (pos // PAGE_SIZE).to(tl.int64) * stride_tp, mask=ok, other=0)
    k = _load_k(KP + hk.to(tl.int64) * stride_kh, phys, pos % PAGE_SIZE, ok, offs_d, head_dim,
                stride_kp, stride_ks, stride_kd, PAD_D)
    qk = _qk(q, q_mid, q_lo, k, SUM, SPLIT, UPCAST)
    # pos <= qpos: causal among the new tokens (also excludes padding rows, whose qpos < 0).
    x = tl.where(ok[None, :] & (pos[None, :] <= qpos[:, None]), qk * scale, float("-inf"))
    grow64 = (b64 * num_kv_heads + hk) * n_rows + rows  # row of the flat [B * Hkv * G * Lq, width] output
    tl.store(Out + grow64[:, None] * width + j[None, :], x, mask=row_ok[:, None] & (j < width)[None, :])


# ----------------------------------------------------------------------------- checks and the PyTorch twin
def _check(q, k_pages, page_table, tokens, counts, lengths, page_size, scale, triton_dtypes: bool):
    """The paged-logits checks (:func:`decode_logits_triton._check`) plus the list's."""
    for name, t in (("tokens", tokens), ("counts", counts)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    B, Hq, Lq, D, Hkv = _check_paged(q, k_pages, page_table, lengths, page_size, scale,
                                      extra=(("tokens", tokens), ("counts", counts)), float64=not triton_dtypes)
    if tokens.dim() != 3 or tuple(tokens.shape[:2]) != (B, Hkv) or tokens.dtype != torch.int32 \
            or (tokens.shape[-1] > 1 and tokens.stride(-1) != 1):
        raise ValueError(f"tokens must be int32 [B={B}, Hkv={Hkv}, width] with unit last stride, got "
                         f"{tokens.dtype} {tuple(tokens.shape)}")
    if tuple(counts.shape) != (B, Hkv) or counts.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"counts must be int32/int64 [B={B}, Hkv={Hkv}], got {counts.dtype} {tuple(counts.shape)}")
    return B, Hq, Lq, D, Hkv


def list_logits_torch(q: torch.Tensor, k_pages: torch.Tensor, page_table: torch.Tensor, tokens: torch.Tensor,
                      counts: torch.Tensor, lengths: torch.Tensor, *, page_size: int, scale: float) -> torch.Tensor:
    """PyTorch twin of :func:`list_logits_triton` (the CPU path and the oracle); also takes float64,
    computed in float64 (float32 otherwise: 16-bit keys upcast, the same math as a 16-bit product
    with fp32 accumulation). Same arguments and result."""
    B, Hq, Lq, D, Hkv = _check(q, k_pages, page_table, tokens, counts, lengths, page_size, scale, False)
    G = Hq // Hkv
    W = tokens.shape[-1]
    dt = torch.float64 if torch.float64 in (q.dtype, k_pages.dtype) else torch.float32
    dev = q.device
    n_slots = page_table.shape[1] * page_size
    j = torch.arange(W, device=dev)
    pos = tokens.long()
    n = lengths.long().view(B, 1, 1)
    ok = (j < counts.long().clamp(max=W).unsqueeze(-1)) & (pos >= 0) & (pos < n) & (pos < n_slots)
    pos = torch.where(ok, pos, torch.zeros_like(pos))  # garbage entries read slot 0 of page 0 (masked below)
    phys = page_table.long().gather(1, (pos // page_size).view(B, Hkv * W)).view(B, Hkv, W)
    heads = torch.arange(Hkv, device=dev).view(1, Hkv, 1)
    k = k_pages[phys, heads, pos % page_size].to(dt)  # [B, Hkv, W, D]: only the listed keys
    qg = q.to(dt).reshape(B, Hkv, G * Lq, D)
    logits = torch.matmul(qg, k.transpose(-1, -2)).view(B, Hkv, G, Lq, W) * scale
    qpos = n.view(B, 1, 1, 1, 1) - Lq + torch.arange(Lq, device=dev).view(1, 1, 1, Lq, 1)
    visible = ok.view(B, Hkv, 1, 1, W) & (pos.view(B, Hkv, 1, 1, W) <= qpos)
    return logits.masked_fill(~visible, float("-inf"))


# ----------------------------------------------------------------------------- launch
def list_logits_triton(q: torch.Tensor, k_pages: torch.Tensor, page_table: torch.Tensor, tokens: torch.Tensor,
                       counts: torch.Tensor, lengths: torch.Tensor, *, page_size: int, scale: float,
                       use_dot: Optional[bool] = None, config: Optional[tuple] = None,
                       snapshot: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Exact scaled logits of ``q`` over each row's listed tokens, read through the page table.

    Args:
        q: ``[B, Hq, Lq, D]`` float16/bfloat16/float32 (any strides): the newest ``Lq`` tokens of
            each sequence, bottom-right aligned (row ``i`` sits at position ``len_b - Lq + i``).
        k_pages: ``[capacity, Hkv, page_size, D]`` key pool (``PagedKVCache.k_pages``), same device;
            ``Hq`` a multiple of ``Hkv``.
        page_table: int32 ``[B, max_pages]`` physical page of each logical page (any strides).
        tokens: int32 ``[B, Hkv, width]`` (unit last stride; a view of a wider list is fine): each
            row's positions, the first ``counts`` entries live, the rest ignored (never read).
        counts: int32/int64 ``[B, Hkv]`` live entries per row (capped at ``width``).
        lengths: int32/int64 ``[B]`` tokens per sequence.
        scale: multiplies the fp32 product.
        use_dot, config: override the product and ``(BLOCK_N, num_warps, num_stages)`` as in
            :func:`~sparseattn.kernels.decode_logits_triton.paged_logits_triton`.
        snapshot: optional ``(tokens_out, counts_out)``: int32 ``[B, Hkv, width]`` (unit last
            stride) and ``[B, Hkv]`` (counts' dtype) that the same launch fills with a copy of
            ``tokens`` and ``min(counts, width)``: what an eviction step's attention reads after
            the step has rewritten the list (H2O / TOVA), without two more launches.

    Returns float32 ``[B, Hkv, G, Lq, width]``: entry ``j`` of row ``(b, h, g, i)`` is
    ``scale * q[b, h * G + g, i] . k[b, h, tokens[b, h, j]]`` with fp32 accumulation, ``-inf`` past
    the count and where the token lies in the query's future (or past the length). No host sync:
    usable in CUDA graphs.
    """
    B, Hq, Lq, D, Hkv = _check(q, k_pages, page_table, tokens, counts, lengths, page_size, scale, True)
    G = Hq // Hkv
    W = tokens.shape[-1]
    if snapshot is not None:
        snap_tokens, snap_counts = snapshot
        if not (isinstance(snap_tokens, torch.Tensor) and snap_tokens.dtype == torch.int32
                and tuple(snap_tokens.shape) == (B, Hkv, W) and (W <= 1 or snap_tokens.stride(-1) == 1)
                and snap_tokens.device == q.device):
            raise ValueError(f"snapshot tokens must be int32 [B={B}, Hkv={Hkv}, width={W}] with unit last stride "
                             f"on {q.device}")
        if not (isinstance(snap_counts, torch.Tensor) and snap_counts.dtype == counts.dtype
                and tuple(snap_counts.shape) == (B, Hkv) and snap_counts.device == q.device):
            raise ValueError(f"snapshot counts must be {counts.dtype} [B={B}, Hkv={Hkv}] on {q.device}")
    out = torch.empty((B, Hkv, G, Lq, W), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        if snapshot is not None:  # nothing to launch over: copy with PyTorch
            snap_tokens.copy_(tokens)
            snap_counts.copy_(counts.clamp(max=W))
        return out
    rows = G * Lq
    product, block_m, row_tiles, block_d, (block_n, num_warps, num_stages) = group_tiles(
        q, k_pages, B, Hkv, rows, use_dot, config)
    if triton_interpreting() and config is None:
        block_n = 16  # small tiles: a short list still spans several programs
    snap_tokens, snap_counts = snapshot if snapshot is not None else (tokens, counts)
    _list_logits[(triton.cdiv(W, block_n), B * Hkv, row_tiles)](
        q, k_pages, page_table, tokens, counts, lengths, out, snap_tokens, snap_counts,
        float(scale),
        *q.stride(), *k_pages.stride(), *page_table.stride(),
        tokens.stride(0), tokens.stride(1), counts.stride(0), counts.stride(1), lengths.stride(0),
        snap_tokens.stride(0), snap_tokens.stride(1), snap_counts.stride(0), snap_counts.stride(1),
        Hkv, Lq, W, page_table.shape[1] * page_size, D,
        PAGE_SIZE=page_size, GROUP=G, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PAD_D=block_d != D,
        SUM=product == "sum", SPLIT=product == "dot_split",
        UPCAST=product == "dot_f32" or triton_interpreting(), SNAPSHOT=snapshot is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


__all__ = ["list_logits_torch", "list_logits_triton"]
