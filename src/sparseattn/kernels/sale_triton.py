"""Triton kernels of SALE's estimate (methods/sale.py, CUDA path): the low-bit block mask.

``SALE._plan``'s PyTorch code (the CPU path and the oracle) materialises the low-bit logits of
every (query, key) pair in chunks: 310 ms on an H100 at 32K (B=1, Hq=9, Hkv=3, D=64, bf16) for
an attention kernel of ~2 ms. Here the same decisions take four Triton kernels and five PyTorch
ops (two fp32 casts and means, the ``qmk`` product, the mask's memset), no host sync, and never
hold more than a ``[B, Hq, nQ, nK]`` byte mask besides q/k-sized buffers:

* the sequence means of q and k: PyTorch's own ``x.to(float32).mean(2)``, the op the PyTorch
  path runs, so the smoothing is bit for bit the same (a mean summed in another order would move
  a few tokens' rounding to the next integer, far above float32 noise);
* :func:`smooth_quantize_triton` (once for q, once for k): per token ``x - mean``, the absolute
  max, ``scale = amax / qmax`` and ``round_half_even(x / scale)`` clamped, with the PyTorch path's
  exact float steps (correctly rounded division; on CUDA PyTorch divides by a Python scalar as a
  product with its float32 reciprocal, which is what runs there). The integers are stored as
  fp16 (or int8) ready for ``tl.dot``; for k also the smoothed fp32 keys ``ks``;
* ``qmk = mean(q) . ks^T``: ``torch.matmul`` on the same tensors as the PyTorch path (same bits);
* :func:`anchor_thresholds_triton`, pass 1, one program per (query block, row tile, batch x head):
  the exact logits ``q . ks / sqrt(D)`` over the anchor (the sink tiles and the local tiles of
  ``methods.sale.sale_local_start``, causal, as the PyTorch code defines it) with fp32 accumulation
  (3xTF32 on the GPU by default), an online max / sum, and the row threshold
  ``thr_i = m_i + log(tau_h) + log(l_i)`` (``+inf`` for rows that see nothing or lie past Lq);
* :func:`estimate_block_mask_triton`, pass 2, one program per (key split, query tile,
  batch x head): the integer products ``q_int k_int^T`` on the tensor cores (fp16 operands with
  fp32 accumulation: the sums are integers below 2**24, so exact; int8 -> int32 optionally), then
  per pair ``est = dots * sk_j * sq_i + qmk_j`` in the PyTorch path's order (fp contraction off,
  so no fused multiply-add changes a rounding), a row max per key block and
  ``fl(rowmax * scale) >= thr_i`` (the same test as PyTorch's per pair, since rounding is
  monotone). A block some pair passes gets a 1 in a zeroed byte mask (several programs may
  write the same 1: no atomics needed).

Pass 2 computes only the tiles the decision needs: the visible tiles outside the anchor, i.e.
key tiles ``[sink_blocks, start(I))`` of query block ``I`` (``start``: the first local tile,
never after the tile of the block's first query). Those are entirely visible to every query of
``I``, so no causal mask is needed per pair; whatever a tile computes for tiles that are
anchored or invisible to some of its query blocks is overridden by the caller's
``(mask | anchor | dense) & visible``.
Heads whose threshold is below ``1e-5`` (dense) are skipped by both passes.

Blocks of any size (query blocks and key tiles apart, the official 64 x 32 by default): a block of
``bs`` tokens sits in ``next_pow2(bs)`` slots (the extra slots masked), so tiles hold whole blocks
or whole fractions of one. Lengths need not be multiples of the blocks; bottom-right causal
alignment for ``Lq != Lk``.

Exactness. The quantized tensors, ``qmk`` and ``est`` are the PyTorch path's bits. Pass 1 sums
its dot products and softmax terms in another order (and rescales online), so ``thr`` differs by
a few float32 ulps: a plan can differ only where some pair's ``est * scale`` sits within that of
its row threshold.

Cost (SmolLM2-like heads at 32K, 64-row blocks, causal, default tiles; estimates, not yet measured):
pass 2 is ``~0.3 T`` integer multiply-adds over the causal area (0.6 TFLOP of fp16 tensor-core
work; ~4.8 GB of 64 x 64 fp16 K tiles streamed from L2 with 128-row query tiles, half that
with 256-row tiles) plus four float32 ops per pair (two products, a sum, a max; two more to
convert int32 sums with ``int8_dot``); pass 1 is ~5 G fp32 multiply-adds (x3 with 3xTF32); the
quantization reads q and k once; the means read an fp32 copy of q and k (as the PyTorch path).
Memory besides the byte mask: q_int / k_int (fp16, or int8), ks (fp32, k-sized), scales,
``qmk`` ``[B, Hq, Lk]`` and ``thr`` ``[B, Hq, Lq]`` (float32), and the transient fp32 copies for
the means.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..checks import check_qk_pair, is_pow2
from .dispatch import triton_interpreting

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ANCHOR_PRECISIONS = ("ieee", "tf32", "tf32x3")


def _pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, triton.next_power_of_2(max(int(n), 1)))


def padded_block(block_size: int) -> int:
    """Slots per block in the kernels' tiles: the next power of two, at least 16 (tl.dot)."""
    return _pow2(block_size, 16)


@triton.jit
def _round_half_even(x):
    """``torch.round`` (half to even) without libdevice: exact for ``|x| < 2**22``."""
    f = tl.floor(x)
    d = x - f  # exact
    r = tl.where(d > 0.5, f + 1.0, f)
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where((d == 0.5) & odd, f + 1.0, r)


# ----------------------------------------------------------------------------- quantization
@triton.jit
def _smooth_quantize(X, Mean, XInt, Scale, XS, stride_xb, stride_xh, stride_xl, stride_xd, H, L, qmax, inv_qmax,
                     HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, ROWS: tl.constexpr, RECIP: tl.constexpr,
                     KEEP_SMOOTHED: tl.constexpr):
    tile = tl.program_id(0)
    pair = tl.program_id(1)  # batch x head
    b = (pair // H).to(tl.int64)
    h = (pair % H).to(tl.int64)
    r = tile * ROWS + tl.arange(0, ROWS)
    d = tl.arange(0, D_PAD)
    ok = (r < L)[:, None] & (d < HEAD_DIM)[None, :]
    x = tl.load(X + b * stride_xb + h * stride_xh + r.to(tl.int64)[:, None] * stride_xl + d[None, :] * stride_xd,
                mask=ok, other=0.0).to(tl.float32)
    mean = tl.load(Mean + pair.to(tl.int64) * HEAD_DIM + d, mask=d < HEAD_DIM, other=0.0)
    xs = x - mean[None, :]  # padding lanes: 0
    amax = tl.max(tl.abs(xs), 1)
    if RECIP:  # PyTorch on CUDA: amax / qmax runs as amax * float32(1 / qmax)
        s = amax * inv_qmax
    else:
        s = tl.math.div_rn(amax, tl.zeros_like(amax) + qmax)
    s = tl.where(amax > 0.0, s, 1.0)
    v = tl.math.div_rn(xs, s[:, None])  # torch's tensor / tensor: correctly rounded
    xi = tl.minimum(tl.maximum(_round_half_even(v), -qmax), qmax)
    rows = pair.to(tl.int64) * L + r
    out = rows[:, None] * HEAD_DIM + d[None, :]
    tl.store(XInt + out, xi.to(XInt.dtype.element_ty), mask=ok)
    tl.store(Scale + rows, s, mask=r < L)
    if KEEP_SMOOTHED:
        tl.store(XS + out, xs, mask=ok)


def smooth_quantize_triton(x: torch.Tensor, mean: torch.Tensor, bits: int, *, out_dtype: torch.dtype = torch.float16,
                           keep_smoothed: bool = False, rows: Optional[int] = None):
    """``quantize_per_token(x.float() - mean, bits)`` of methods/sale.py, in one launch.

    Args:
        x: ``[B, H, L, D]`` fp16 / bf16 / fp32, any strides.
        mean: float32 ``[B, H, 1, D]`` contiguous (``x.float().mean(2, keepdim=True)``).
        bits: 4 or 8 (integers in ``[-7, 7]`` or ``[-127, 127]``).
        out_dtype: torch.float16 or torch.int8, the storage of the integers (``tl.dot`` operands).
        keep_smoothed: also return the smoothed ``x - mean`` (float32, contiguous).
        rows: tokens per program (a power of two; default 64).
    Returns:
        ``(x_int [B, H, L, D] out_dtype, scale float32 [B, H, L], smoothed or None)``, contiguous;
        the same values as the PyTorch function on x's device. No host sync.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.dtype not in DTYPES:
        raise ValueError(f"x must be a 4-d fp16/bf16/fp32 tensor [B, H, L, D], got "
                         f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
    B, H, L, D = x.shape
    if (not isinstance(mean, torch.Tensor) or mean.dtype != torch.float32 or tuple(mean.shape) != (B, H, 1, D)
            or not mean.is_contiguous() or mean.device != x.device):
        raise ValueError(f"mean must be a contiguous float32 [B, H, 1, D] = {(B, H, 1, D)} tensor on {x.device}")
    if bits not in (4, 8) or isinstance(bits, bool):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if out_dtype not in (torch.float16, torch.int8):
        raise ValueError(f"out_dtype must be torch.float16 or torch.int8, got {out_dtype}")
    dev = x.device
    x_int = torch.empty(B, H, L, D, dtype=out_dtype, device=dev)
    scale = torch.empty(B, H, L, dtype=torch.float32, device=dev)
    xs = torch.empty(B, H, L, D, dtype=torch.float32, device=dev) if keep_smoothed else None
    if x.numel() == 0:
        return x_int, scale, xs
    qmax = float(2 ** (bits - 1) - 1)
    inv_qmax = float(torch.tensor(1.0, dtype=torch.float32) / qmax)  # float32 1 / qmax, as CUDA PyTorch
    d_pad = _pow2(D, 16)
    rows = _pow2(rows if rows is not None else min(64, max(16, 8192 // d_pad)), 16)
    _smooth_quantize[(triton.cdiv(L, rows), B * H)](
        x, mean, x_int, scale, xs if xs is not None else scale, *x.stride(), H, L, qmax, inv_qmax,
        HEAD_DIM=D, D_PAD=d_pad, ROWS=rows, RECIP=x.is_cuda, KEEP_SMOOTHED=keep_smoothed, num_warps=4,
        enable_fp_fusion=False)
    return x_int, scale, xs


# ----------------------------------------------------------------------------- the anchor's geometry
@triton.jit
def _local_start(blk, Lq, Lk, nK, sink_blocks, local_blocks, seg_blocks, BLOCK_Q: tl.constexpr,
                 BLOCK_K: tl.constexpr, CAUSAL: tl.constexpr):
    """(first local key tile, tiles visible) of query block ``blk``: ``methods.sale.sale_local_start``."""
    off = Lk - Lq
    first = off + blk * BLOCK_Q
    last = off + tl.minimum((blk + 1) * BLOCK_Q, Lq) - 1
    if CAUSAL:
        n_max = tl.minimum(tl.maximum(last + 1 + BLOCK_K - 1, 0) // BLOCK_K, nK)
    else:
        n_max = nK
    over = n_max - sink_blocks - local_blocks  # tiles beyond sink and minimal local part
    segs = tl.where(over > 0, tl.maximum(over, 0) // seg_blocks, 0)  # non-negative operands only
    start = sink_blocks + segs * seg_blocks
    if CAUSAL:
        start = tl.minimum(start, tl.maximum(first, 0) // BLOCK_K)
    else:
        start = tl.minimum(start, tl.maximum(n_max - 1, 0))
    return start, n_max


# ----------------------------------------------------------------------------- pass 1: anchor thresholds
@triton.jit
def _anchor_thresholds(Q, KS, LogTau, Dense, Thr, stride_qb, stride_qh, stride_ql, stride_qd,
                       Hq, group, Lq, Lk, nK, n_sub, sink_blocks, local_blocks, seg_blocks, scale,
                       BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                       ACCURATE: tl.constexpr):
    pid = tl.program_id(0)
    pair = tl.program_id(1)  # batch x query head
    h = pair % Hq
    if tl.load(Dense + h) == 0:  # a dense head needs no threshold
        b = pair // Hq
        kv = (b * (Hq // group) + h // group).to(tl.int64)
        blk = pid // n_sub
        r_in = (pid % n_sub) * BLOCK_M + tl.arange(0, BLOCK_M)
        row = blk * BLOCK_Q + r_in
        row_ok = (r_in < BLOCK_Q) & (row < Lq)
        off = Lk - Lq
        pos = off + row
        last = off + tl.minimum((blk + 1) * BLOCK_Q, Lq) - 1  # the block's last query position
        start, n_max = _local_start(blk, Lq, Lk, nK, sink_blocks, local_blocks, seg_blocks, BLOCK_Q, BLOCK_K,
                                    CAUSAL)
        a_hi = tl.minimum(sink_blocks * BLOCK_K, Lk)
        b_lo = tl.maximum(start * BLOCK_K, a_hi)  # sink keys are counted once, in the sink part
        b_hi = tl.minimum(n_max * BLOCK_K, Lk)
        if CAUSAL:  # no chunk past the block's last query
            a_hi = tl.minimum(a_hi, last + 1)
            b_hi = tl.minimum(b_hi, last + 1)
        offs_d = tl.arange(0, D_PAD)
        d_ok = offs_d < HEAD_DIM
        q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                    + row.to(tl.int64)[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        ks_base = KS + kv * Lk * HEAD_DIM
        m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l = tl.zeros([BLOCK_M], dtype=tl.float32)
        n_a = tl.cdiv(tl.maximum(a_hi, 0), BLOCK_N)
        n_b = tl.cdiv(tl.maximum(b_hi - b_lo, 0), BLOCK_N)
        for c in range(0, n_a + n_b):  # the sink chunks, then the local chunks (one loop: inlined)
            in_a = c < n_a
            j = tl.where(in_a, c * BLOCK_N, b_lo + (c - n_a) * BLOCK_N) + tl.arange(0, BLOCK_N)
            j_ok = (j >= tl.where(in_a, 0, b_lo)) & (j < tl.where(in_a, a_hi, b_hi))
            k = tl.load(ks_base + j.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :],
                        mask=j_ok[:, None] & d_ok[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # PyTorch: matmul, then * scale
            ok = row_ok[:, None] & j_ok[None, :]
            if CAUSAL:
                ok = ok & (j[None, :] <= pos[:, None])
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: exp gives 0, not NaN
            if ACCURATE:  # libdevice expf: the function PyTorch's CUDA exp calls
                l = l * libdevice.exp(m - m_use) + tl.sum(libdevice.exp(s - m_use[:, None]), 1)
            else:
                l = l * tl.exp(m - m_use) + tl.sum(tl.exp(s - m_use[:, None]), 1)
            m = m_new
        l = tl.where(l > 0.0, l, 1.0)  # rows that see nothing (thr = +inf below)
        if ACCURATE:
            log_l = libdevice.log(l)
        else:
            log_l = tl.log(l)
        thr = m + tl.load(LogTau + h) + log_l  # PyTorch: m_i + log_tau + log(l_i)
        thr = tl.where(m == float("-inf"), float("inf"), thr)  # rows that see nothing pass nothing
        tl.store(Thr + pair.to(tl.int64) * Lq + row, thr, mask=row_ok)


def anchor_thresholds_triton(q: torch.Tensor, ks: torch.Tensor, log_tau: torch.Tensor, dense: torch.Tensor, *,
                             block_q: int, block_k: int, sink_blocks: int, local_blocks: int, seg_blocks: int,
                             causal: bool, block_m: Optional[int] = None, block_n: Optional[int] = None,
                             precision: Optional[str] = None) -> torch.Tensor:
    """SALE's pass 1: per query row, ``thr = m + log(tau_h) + log(l)`` over its anchor keys.

    ``m`` and ``l`` are the max and ``sum exp(s - m)`` of ``s = q . ks / sqrt(D)`` over the
    anchor of the row's query block (``block_q`` rows): the keys of the ``sink_blocks`` first key
    tiles (``block_k`` keys each) and of its local tiles, from ``sale_local_start`` (at least
    ``local_blocks`` tiles, segments of ``seg_blocks`` tiles) to its last visible tile, causal
    (bottom-right) when ``causal``.

    Args:
        q: ``[B, Hq, Lq, D]`` fp16 / bf16 / fp32, any strides (not smoothed).
        ks: float32 ``[B, Hkv, Lk, D]`` contiguous: the smoothed keys ``k - mean(k)``.
        log_tau: float32 ``[Hq]``: ``log(threshold)`` per query head.
        dense: bool ``[Hq]``: heads left dense (their rows are not written).
        block_m, block_n: rows per program and keys per step (powers of two >= 16).
        precision: ``tl.dot`` input precision, ``"ieee"``, ``"tf32"`` or ``"tf32x3"`` (default:
            ``"tf32x3"`` on the GPU, ``"ieee"`` in the interpreter).
    Returns:
        float32 ``[B, Hq, Lq]``; ``+inf`` for rows that see no anchor key. No host sync.
    """
    if not isinstance(ks, torch.Tensor) or ks.dtype != torch.float32 or not ks.is_contiguous():
        raise ValueError(f"ks must be a contiguous float32 tensor, got {getattr(ks, 'dtype', type(ks))}")
    if not isinstance(q, torch.Tensor) or q.dim() != 4 or q.dtype not in DTYPES:
        raise ValueError(f"q must be a 4-d fp16/bf16/fp32 tensor, got {getattr(q, 'dtype', type(q))}")
    B, Hq, Lq, D = q.shape
    if ks.dim() != 4 or ks.shape[0] != B or ks.shape[3] != D or ks.shape[1] == 0 or Hq % ks.shape[1]:
        raise ValueError(f"ks {tuple(ks.shape)} must be [B, Hkv, Lk, D] with Hq % Hkv == 0 for q {tuple(q.shape)}")
    if ks.device != q.device:
        raise ValueError(f"q and ks must be on one device, got {q.device} and {ks.device}")
    Hkv, Lk = ks.shape[1], ks.shape[2]
    _check_heads(log_tau, dense, Hq, q.device)
    _check_geometry(block_q, block_k, sink_blocks, local_blocks, seg_blocks, causal)
    precision = precision or ("ieee" if triton_interpreting() else "tf32x3")
    if precision not in ANCHOR_PRECISIONS:
        raise ValueError(f"precision must be one of {list(ANCHOR_PRECISIONS)}, got {precision!r}")
    thr = torch.empty(B, Hq, Lq, dtype=torch.float32, device=q.device)
    if thr.numel() == 0 or Lk == 0:
        return thr.fill_(float("inf"))
    bsp = padded_block(block_q)
    block_m = min(_pow2(block_m if block_m is not None else 64, 16), bsp)
    block_n = _pow2(block_n if block_n is not None else 64, 16)
    n_sub = bsp // block_m
    nQ = triton.cdiv(Lq, block_q)
    _anchor_thresholds[(nQ * n_sub, B * Hq)](
        q, ks, log_tau, dense.view(torch.uint8), thr, *q.stride(), Hq, Hq // Hkv, Lq, Lk, triton.cdiv(Lk, block_k),
        n_sub, sink_blocks, local_blocks, seg_blocks, 1.0 / math.sqrt(D),
        BLOCK_Q=block_q, BLOCK_K=block_k, HEAD_DIM=D, D_PAD=_pow2(D, 16), BLOCK_M=block_m, BLOCK_N=block_n,
        CAUSAL=causal, PRECISION=precision, ACCURATE=q.is_cuda and not triton_interpreting(), num_warps=4,
        enable_fp_fusion=False)
    return thr


# ----------------------------------------------------------------------------- pass 2: low-bit estimate
@triton.jit
def _estimate_blocks(QI, SQ, KI, SK, QMK, Thr, Dense, Mask, Hq, group, Lq, Lk, nQ, nK, n_qt, sink_blocks,
                     local_blocks, seg_blocks, scale,
                     BLOCK_Q: tl.constexpr, BSP: tl.constexpr, BLOCK_K: tl.constexpr, HEAD_DIM: tl.constexpr,
                     D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     RB: tl.constexpr, QBT: tl.constexpr, TPB: tl.constexpr, KPT: tl.constexpr,
                     BSPK: tl.constexpr, SPLIT: tl.constexpr, CAUSAL: tl.constexpr, INT8_DOT: tl.constexpr):
    # RB rows of one query block per tile, QBT query blocks per tile; a step of BLOCK_N keys is
    # 1 / TPB of a key block (KPT = 1) or KPT whole key blocks of BSPK slots (TPB = 1).
    sp = tl.program_id(0)
    qt = n_qt - 1 - tl.program_id(1)  # the longest causal rows start first
    pair = tl.program_id(2)  # batch x query head
    h = pair % Hq
    if tl.load(Dense + h) == 0:  # a dense head keeps every visible block anyway
        i_first = (qt * BLOCK_M) // BSP
        i_last = tl.minimum((qt * BLOCK_M + BLOCK_M - 1) // BSP, nQ - 1)
        # The key blocks some query block of the tile estimates: [sink, start(last)) (the local
        # start grows with the block; blocks a smaller one holds as anchor are ORed over later).
        start, _ = _local_start(i_last, Lq, Lk, nK, sink_blocks, local_blocks, seg_blocks, BLOCK_Q, BLOCK_K, CAUSAL)
        r_lo = sink_blocks
        r_hi = tl.maximum(tl.minimum(start, nK), r_lo)
        t_lo = sp * SPLIT
        t_hi = tl.minimum(t_lo + SPLIT, (r_hi - r_lo) * TPB if KPT == 1 else tl.cdiv(r_hi - r_lo, KPT))
        if t_lo < t_hi:
            b = pair // Hq
            kv = (b * (Hq // group) + h // group).to(tl.int64)
            slot = qt * BLOCK_M + tl.arange(0, BLOCK_M)
            r_in = slot % BSP
            row = (slot // BSP) * BLOCK_Q + r_in
            row_ok = (r_in < BLOCK_Q) & (row < Lq)
            rows = pair.to(tl.int64) * Lq + row
            offs_d = tl.arange(0, D_PAD)
            d_ok = offs_d < HEAD_DIM
            qi = tl.load(QI + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                         other=0)
            sq = tl.load(SQ + rows, mask=row_ok, other=1.0)
            thr = tl.load(Thr + rows, mask=row_ok, other=float("inf"))  # padding rows pass nothing
            ki_base = KI + kv * Lk * HEAD_DIM
            sk_base = SK + kv * Lk
            qmk_base = QMK + pair.to(tl.int64) * Lk
            blocks = i_first + tl.arange(0, QBT)
            out_rows = Mask + (pair.to(tl.int64) * nQ + blocks) * nK
            for t in range(t_lo, t_hi):
                if KPT == 1:
                    tile = r_lo * TPB + t
                    n = tile // TPB  # the key block of this step
                    c_in = (tile % TPB) * BLOCK_N + tl.arange(0, BLOCK_N)
                    key = n * BLOCK_K + c_in
                    k_ok = (c_in < BLOCK_K) & (key < Lk)
                else:
                    n0 = r_lo + t * KPT  # the first of this step's key blocks
                    c = tl.arange(0, BLOCK_N)
                    c_in = c % BSPK
                    key = (n0 + c // BSPK) * BLOCK_K + c_in
                    k_ok = (c_in < BLOCK_K) & (key < Lk)
                ki = tl.load(ki_base + key.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :],
                             mask=k_ok[:, None] & d_ok[None, :], other=0)
                sk = tl.load(sk_base + key, mask=k_ok, other=1.0)
                qmk = tl.load(qmk_base + key, mask=k_ok, other=float("-inf"))  # masked keys: est = -inf
                if INT8_DOT:
                    acc = tl.dot(qi, tl.trans(ki), out_dtype=tl.int32)
                    # int32 -> float32 exactly for |x| < 2**22 without the slow conversion unit
                    dots = (acc + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
                else:
                    dots = tl.dot(qi, tl.trans(ki))  # fp16 integers, fp32 sums: exact
                est = dots * sk[None, :] * sq[:, None] + qmk[None, :]  # PyTorch's order, no FMA
                if KPT == 1:
                    hit = (tl.max(est, 1) * scale >= thr).to(tl.int32)  # some pair of the row passes
                    hit = tl.max(tl.reshape(hit, [QBT, RB]), 1)
                    tl.store(out_rows + n, tl.full([QBT], 1, dtype=tl.uint8), mask=(hit > 0) & (blocks < nQ))
                else:  # a row max per key block of the step
                    row_max = tl.max(tl.reshape(est, [BLOCK_M, KPT, BSPK]), 2)
                    hit = (row_max * scale >= thr[:, None]).to(tl.int32)  # [BLOCK_M, KPT]
                    hit = tl.max(tl.reshape(hit, [QBT, RB, KPT]), 1)
                    n = n0 + tl.arange(0, KPT)
                    tl.store(out_rows[:, None] + n[None, :], tl.full([QBT, KPT], 1, dtype=tl.uint8),
                             mask=(hit > 0) & (blocks < nQ)[:, None] & (n < r_hi)[None, :])


class SaleConfig(NamedTuple):
    """Tiles of the SALE kernels (powers of two).

    Pass 2: ``block_m`` query rows x ``block_n`` keys per step (part of one key tile, or several
    whole ones), ``split`` steps per program, ``int8_dot`` for int8 x int8 -> int32 products
    (else fp16 x fp16 -> fp32). Pass 1: ``anchor_block_m`` rows x ``anchor_block_n`` keys,
    ``anchor_precision`` the fp32 dot's input precision.
    """

    block_m: int
    block_n: int
    split: int
    num_warps: int
    num_stages: int
    int8_dot: bool = False
    anchor_block_m: int = 64
    anchor_block_n: int = 64
    anchor_precision: str = "tf32x3"


# Hopper: 128-row steps of 64 keys (two of the official 32-key tiles per product), 32 steps per
# program for causal load balance, int8 x int8 -> int32 products (twice the fp16 tensor-core
# rate; the integer sums are exact either way). H100, 2026-11-24, scripts/sweep_sale.py (us at
# 9/3/64 32K; ms at 32/8/128 128K), 64 x 32 tiles: one tile per step (128x32x32, int8) 2883 / 161.9,
# two (128x64x32) 2579, 128x64x16 2648 / 148.3, four (128x128x16) 2663 / 146.2, eight
# (128x256x8, 8 warps) 3209 / 176.9, 256x64x16 (8 warps) 2759, fp16 products (128x64x32) 2821;
# before steps could span tiles: fp16 3121, int8 2866. The estimate's time scales with the pairs
# it tests, not with the head size: the per-pair arithmetic after the product bounds it.
# `config=` overrides.
_CONFIG_GPU = SaleConfig(128, 64, 32, 4, 3, int8_dot=True)
# The interpreter pays per operation, not per element: large tiles (the kernel tests pass small
# ones to exercise the multi-tile paths).
_CONFIG_INTERPRET = SaleConfig(64, 64, 16, 4, 1, anchor_block_m=64, anchor_block_n=64, anchor_precision="ieee")


def default_config() -> SaleConfig:
    return _CONFIG_INTERPRET if triton_interpreting() else _CONFIG_GPU


def _check_heads(log_tau, dense, Hq, device):
    if not isinstance(log_tau, torch.Tensor) or log_tau.dtype != torch.float32 or tuple(log_tau.shape) != (Hq,):
        raise ValueError(f"log_tau must be a float32 [Hq={Hq}] tensor, got {getattr(log_tau, 'dtype', log_tau)}")
    if not isinstance(dense, torch.Tensor) or dense.dtype != torch.bool or tuple(dense.shape) != (Hq,):
        raise ValueError(f"dense must be a bool [Hq={Hq}] tensor, got {getattr(dense, 'dtype', dense)}")
    if log_tau.device != device or dense.device != device or not log_tau.is_contiguous() or not dense.is_contiguous():
        raise ValueError(f"log_tau and dense must be contiguous tensors on {device}")


def _check_geometry(block_q, block_k, sink_blocks, local_blocks, seg_blocks, causal):
    for name, v, lo in (("block_q", block_q, 1), ("block_k", block_k, 1), ("sink_blocks", sink_blocks, 0),
                        ("local_blocks", local_blocks, 0), ("seg_blocks", seg_blocks, 1)):
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {causal!r}")


def _check_config(cfg: SaleConfig) -> SaleConfig:
    cfg = SaleConfig(*cfg)
    sizes = (cfg.block_m, cfg.block_n, cfg.split, cfg.anchor_block_m, cfg.anchor_block_n)
    if not all(is_pow2(v) for v in sizes) or min(cfg.block_m, cfg.block_n, cfg.anchor_block_m,
                                                 cfg.anchor_block_n) < 16:
        raise ValueError(f"config tile sizes must be powers of two (blocks >= 16), got {cfg}")
    if cfg.anchor_precision not in ANCHOR_PRECISIONS:
        raise ValueError(f"anchor_precision must be one of {list(ANCHOR_PRECISIONS)}, got {cfg.anchor_precision!r}")
    return cfg


def estimate_block_mask_triton(q_int: torch.Tensor, sq: torch.Tensor, k_int: torch.Tensor, sk: torch.Tensor,
                               qmk: torch.Tensor, thr: torch.Tensor, dense: torch.Tensor, *, block_q: int,
                               block_k: int, sink_blocks: int, local_blocks: int, seg_blocks: int, causal: bool,
                               config: Optional[tuple] = None) -> torch.Tensor:
    """SALE's pass 2: which key tiles hold a pair whose low-bit logit reaches its row threshold.

    For query head ``h`` (key head ``h // (Hq // Hkv)``), row ``i`` and key ``j``:
    ``est = (q_int_i . k_int_j) * sk_j * sq_i + qmk_j`` and the pair passes when
    ``est * scale >= thr_i``, ``scale = 1 / sqrt(D)``.

    Args:
        q_int: ``[B, Hq, Lq, D]`` contiguous, fp16 or int8 integers; k_int: ``[B, Hkv, Lk, D]``
            likewise (the same dtype).
        sq, sk: float32 ``[B, Hq, Lq]`` / ``[B, Hkv, Lk]`` per-token scales; qmk: float32
            ``[B, Hq, Lk]``; thr: float32 ``[B, Hq, Lq]``; all contiguous.
        dense: bool ``[Hq]``: heads not estimated (their rows stay 0).
        block_q, block_k, sink_blocks, local_blocks, seg_blocks, causal: the plan's geometry (query
            blocks, key tiles, and the anchor as in ``methods.sale.sale_local_start``).
        config: a :class:`SaleConfig` (or its fields); ``int8_dot`` must match ``q_int``'s dtype.
    Returns:
        uint8 ``[B, Hq, nQ, nK]`` (``block_q`` x ``block_k`` tiles): for every tile between the
        sink and the local start of its query block, of a non-dense head, 1 when some pair passes,
        else 0. Entries of anchor or invisible tiles are 0 or 1 (meaningless: the caller ORs the
        anchor and ANDs the visible tiles). No host sync.
    """
    for name, t in (("q_int", q_int), ("k_int", k_int)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.dtype not in (torch.float16, torch.int8) \
                or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous fp16 or int8 [B, H, L, D] tensor")
    check_qk_pair(q_int, k_int, (torch.float16, torch.int8))
    B, Hq, Lq, D = q_int.shape
    Hkv, Lk = k_int.shape[1], k_int.shape[2]
    for name, t, shape in (("sq", sq, (B, Hq, Lq)), ("sk", sk, (B, Hkv, Lk)), ("qmk", qmk, (B, Hq, Lk)),
                           ("thr", thr, (B, Hq, Lq))):
        if (not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or tuple(t.shape) != shape
                or not t.is_contiguous() or t.device != q_int.device):
            raise ValueError(f"{name} must be a contiguous float32 {shape} tensor on {q_int.device}")
    if (not isinstance(dense, torch.Tensor) or dense.dtype != torch.bool or tuple(dense.shape) != (Hq,)
            or dense.device != q_int.device):
        raise ValueError(f"dense must be a bool [Hq={Hq}] tensor on {q_int.device}")
    _check_geometry(block_q, block_k, sink_blocks, local_blocks, seg_blocks, causal)
    cfg = _check_config(config if config is not None else default_config())
    if cfg.int8_dot != (q_int.dtype == torch.int8):
        raise ValueError(f"config.int8_dot={cfg.int8_dot} does not match q_int's dtype {q_int.dtype}")
    nQ, nK = triton.cdiv(Lq, block_q), triton.cdiv(Lk, block_k)
    mask = torch.zeros(B, Hq, nQ, nK, dtype=torch.uint8, device=q_int.device)
    if mask.numel() == 0:
        return mask
    bsp, bspk = padded_block(block_q), padded_block(block_k)
    # A step of block_n keys: part of one key block (tpb steps per block), or kpt whole blocks.
    block_n = cfg.block_n
    tpb, kpt = max(1, bspk // block_n), max(1, block_n // bspk)
    n_qt = triton.cdiv(nQ * bsp, cfg.block_m)
    n_split = triton.cdiv(nK * tpb if kpt == 1 else triton.cdiv(nK, kpt), cfg.split)
    _estimate_blocks[(n_split, n_qt, B * Hq)](
        q_int, sq, k_int, sk, qmk, thr, dense.view(torch.uint8), mask, Hq, Hq // Hkv, Lq, Lk, nQ, nK, n_qt,
        sink_blocks, local_blocks, seg_blocks, 1.0 / math.sqrt(D),
        BLOCK_Q=block_q, BSP=bsp, BLOCK_K=block_k, HEAD_DIM=D, D_PAD=_pow2(D, 16), BLOCK_M=cfg.block_m,
        BLOCK_N=block_n, RB=min(cfg.block_m, bsp), QBT=max(1, cfg.block_m // bsp), TPB=tpb, KPT=kpt, BSPK=bspk,
        SPLIT=cfg.split, CAUSAL=causal, INT8_DOT=cfg.int8_dot, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, enable_fp_fusion=False)
    return mask


# ----------------------------------------------------------------------------- the whole estimate
def sale_estimate_triton(q: torch.Tensor, k: torch.Tensor, log_tau: torch.Tensor, dense: torch.Tensor, *,
                         block_q: int, block_k: int, bits: int, local_blocks: int, seg_blocks: int,
                         sink_blocks: int, causal: bool, config: Optional[tuple] = None) -> torch.Tensor:
    """SALE's low-bit pass mask (the steps of ``SALE._plan`` before the anchor / visible union).

    Args:
        q: ``[B, Hq, Lq, D]``, k: ``[B, Hkv, Lk, D]``: fp16 / bf16 / fp32, any strides.
        log_tau: float32 ``[Hq]`` = ``log(threshold)``; dense: bool ``[Hq]`` = ``threshold < 1e-5``.
        block_q, block_k, bits, sink_blocks, causal: as in ``SALE`` (``block_size``, ``block_k``, ...);
            local_blocks = ``cdiv(local_window, block_k)``, seg_blocks = ``block_seg // block_k``.
        config: a :class:`SaleConfig` overriding the default tiles.
    Returns:
        uint8 ``[B, Hq, nQ, nK]`` (see :func:`estimate_block_mask_triton`). Seven launches (two
        means with their fp32 casts, two quantizations, the ``qmk`` product, two passes) plus the
        mask's memset; no host sync.
    """
    check_qk_pair(q, k, DTYPES)
    if bits not in (4, 8) or isinstance(bits, bool):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    cfg = _check_config(config if config is not None else default_config())
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    # The PyTorch path's own ops: the same means, bit for bit, on either device.
    q_mean = q.to(torch.float32).mean(2, keepdim=True)
    k_mean = k.to(torch.float32).mean(2, keepdim=True)
    int_dtype = torch.int8 if cfg.int8_dot else torch.float16
    q_int, sq, _ = smooth_quantize_triton(q, q_mean, bits, out_dtype=int_dtype)
    k_int, sk, ks = smooth_quantize_triton(k, k_mean, bits, out_dtype=int_dtype, keep_smoothed=True)
    qmk = torch.matmul(q_mean.reshape(B, Hkv, G, D), ks.transpose(-1, -2)).reshape(B, Hq, Lk)
    geo = dict(block_q=block_q, block_k=block_k, sink_blocks=sink_blocks, local_blocks=local_blocks,
               seg_blocks=seg_blocks, causal=causal)
    thr = anchor_thresholds_triton(q, ks, log_tau, dense, **geo, block_m=cfg.anchor_block_m,
                                   block_n=cfg.anchor_block_n, precision=cfg.anchor_precision)
    return estimate_block_mask_triton(q_int, sq, k_int, sk, qmk, thr, dense, **geo, config=cfg)
