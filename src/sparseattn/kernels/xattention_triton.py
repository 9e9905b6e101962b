"""Triton XAttention estimate: antidiagonal block masses without the grouped score matrix.

``antidiagonal_block_scores_triton`` returns what
:func:`sparseattn.methods.xattention.antidiagonal_block_scores` returns (that PyTorch function is
the CPU path and the oracle). Two launches, nothing of size ``[L/stride, L/stride]`` in memory:

1. ``_grouped_scores``: one program per (key split, query tile, (batch, query head)). A query tile
   is ``BLOCK_M`` grouped rows (whole query blocks), a key tile ``BLOCK_N`` grouped columns (whole
   key blocks); a split is ``SPLIT`` consecutive key tiles. Each tile's grouped logits come from a
   GEMM-style loop over the ``stride * D`` features (one token of the group and ``BLOCK_D`` dims
   per step), reading grouped query rows reversed and grouped keys straight from q and k. The
   program keeps the online row max ``m`` and row sum ``l`` and writes, per (grouped row, key
   block), ``lp = m_now + log2(sum_tile exp2(s - m_now))``: the block's unnormalised mass in the
   log2 domain, valid whatever the running max ``m_now`` was when the tile was seen. So no second
   pass over the keys is needed, and key splits of one row are independent (load balance under
   causal masking). At the end it writes ``lz = m + log2(l)`` per row and split.
2. ``_block_masses``: one program per (query block, (batch, query head)) merges the splits'
   ``lz`` (log-sum-exp) and writes ``out = sum over the block's rows of exp2(lp - lz)``; key
   blocks no program wrote (past the causal limit) get 0.

The per-(row, key block) floats live in a scratch buffer of ``B * Hq * nQ * rb * nK`` floats
(rb = block / stride grouped rows per block; 9.4 M floats = 38 MB for SmolLM2 at 32K), launched
in chunks of (batch, head) pairs and query rows so one chunk stays near ``SCRATCH_ELEMENTS``.

Cost (SmolLM2 at 32K: B=1, Hq=9, Hkv=3, D=64, block 128, stride 8, causal): 4096 x 4096 grouped
logits per head of 512 features; 528 of the 1024 128x128 tiles are visible, so about
2 * 512 * 528 * 128**2 * 9 = 80 GFLOP of bf16 tensor-core work with fp32 accumulation (one pass:
half of a two-pass max-then-sum design), 78 M exp2, about 1.2 GB of q/k tiles streamed through L2
(q and k are 38 MB + 13 MB in HBM), 20 MB of scratch written and read back, 2.4 MB of output.
Stride 16 halves the FLOPs. At 131K with 32/8/128 heads: about 8.8 TFLOP, 1 GB of scratch
traffic per direction in 256 MB launches.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ..checks import check_qk_pair, is_pow2
from .dispatch import triton_interpreting

LOG2E = 1.4426950408889634
# One launch's scratch of per-(grouped row, key block) log-masses stays near this many floats.
SCRATCH_ELEMENTS = 1 << 26


@triton.jit
def _tile_range(qt, nrows, ncols, ncols_full, offset, STRIDE: tl.constexpr, RB: tl.constexpr,
                RBP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """(t_full, t_end) for query tile ``qt``: key tiles [0, t_full) are seen whole by every real
    row of the tile (no score mask, no load mask), key tiles [0, t_end) by at least one."""
    slot = qt * BLOCK_M + tl.arange(0, BLOCK_M)
    j = slot % RBP
    r = (slot // RBP) * RB + j  # grouped row of each slot (slots j >= RB are padding)
    real = (j < RB) & (r < nrows)
    if CAUSAL:
        last = offset + r * STRIDE + STRIDE - 1  # key group c is visible when c * S <= last
        nv = tl.minimum(tl.where(last >= 0, last // STRIDE + 1, 0), ncols)
    else:
        nv = tl.zeros([BLOCK_M], dtype=tl.int32) + ncols
    cols: tl.constexpr = (BLOCK_N // RBP) * RB  # real grouped columns per key tile
    hi = tl.max(tl.where(real, nv, 0), 0)
    t_end = (hi + cols - 1) // cols
    if RB == RBP:
        lo = tl.min(tl.where(real, nv, ncols), 0)
        t_full = tl.minimum(tl.minimum(lo, ncols_full) // cols, t_end)
    else:  # padding columns inside every tile: all tiles take the masked path
        t_full = t_end * 0
    return t_full, t_end


@triton.jit
def _score_tile(m_i, l_i, q_base, k_base, sc_rows, t, q_tok, q_ok, offs_n, offs_d, Lq, Lk, ncols, nK, offset,
                qk_scale, stride_ql, stride_qd, stride_kl, stride_kd,
                STRIDE: tl.constexpr, HEAD_DIM: tl.constexpr, RB: tl.constexpr, RBP: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
                CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Grouped logits of key tile ``t``, online max/sum update, one log-mass per (row, key block)."""
    NBT: tl.constexpr = BLOCK_N // RBP
    NUM_D: tl.constexpr = (HEAD_DIM + BLOCK_D - 1) // BLOCK_D
    EVEN_D: tl.constexpr = HEAD_DIM % BLOCK_D == 0
    jn = offs_n % RBP
    c = (t * NBT + offs_n // RBP) * RB + jn  # grouped key column of each tile column
    k_tok = c * STRIDE  # first key of the group
    k_ok = jn < RB
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # Feature f = jj * D + d of a group is token jj of the key group and token S-1-jj of the query
    # group (queries reversed), so step (jj, d-chunk) is a plain [rows, BLOCK_D] x [BLOCK_D, cols] GEMM.
    for f in range(0, STRIDE * NUM_D):
        jj = f // NUM_D
        dd = (f % NUM_D) * BLOCK_D + offs_d
        q_t = q_tok - jj
        q_mask = (q_ok & (q_t < Lq))[:, None]
        if not EVEN_D:
            q_mask = q_mask & (dd < HEAD_DIM)[None, :]
        q = tl.load(q_base + q_t.to(tl.int64)[:, None] * stride_ql + dd[None, :] * stride_qd, mask=q_mask, other=0.0)
        kt = k_tok + jj
        k_ptrs = k_base + kt.to(tl.int64)[:, None] * stride_kl + dd[None, :] * stride_kd
        if MASKED:
            k_mask = (k_ok & (kt < Lk))[:, None]
            if not EVEN_D:
                k_mask = k_mask & (dd < HEAD_DIM)[None, :]
            k = tl.load(k_ptrs, mask=k_mask, other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=(dd < HEAD_DIM)[None, :], other=0.0)
        if UPCAST_DOT:
            acc = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(q, tl.trans(k), acc, input_precision=DOT_PRECISION)
    s = acc * qk_scale  # log2 units
    if MASKED:
        keep = (k_ok & (c < ncols))[None, :]
        if CAUSAL:
            keep = keep & (k_tok[None, :] <= (q_tok + offset)[:, None])
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing visible yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = m_new
    p = tl.math.exp2(s - m_use[:, None])
    l_i = l_i * tl.math.exp2(m_i - m_use) + tl.sum(p, 1)
    blk = tl.sum(tl.reshape(p, [BLOCK_M, NBT, RBP]), 2)  # [rows, key blocks of the tile]
    lp = m_use[:, None] + tl.math.log2(blk)  # a block with no visible column: -inf
    n_blk = t * NBT + tl.arange(0, NBT)
    tl.store(sc_rows[:, None] + n_blk[None, :], lp, mask=(n_blk < nK)[None, :])
    return m_new, l_i


@triton.jit
def _grouped_scores(Q, K, Scratch, Lz,
                    stride_qb, stride_qh, stride_ql, stride_qd, stride_kb, stride_kh, stride_kl, stride_kd,
                    Hq, group, Lq, Lk, nK, pair0, qt0, rows_chunk, n_split, qk_scale,
                    STRIDE: tl.constexpr, HEAD_DIM: tl.constexpr, RB: tl.constexpr, RBP: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr,
                    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    sp = tl.program_id(0)
    qt_local = tl.num_programs(1) - 1 - tl.program_id(1)  # the longest causal rows start first
    qt = qt0 + qt_local
    pair_local = tl.program_id(2)
    pair = pair0 + pair_local
    b = (pair // Hq).to(tl.int64)
    h = pair % Hq
    hk = (h // group).to(tl.int64)
    nrows = (Lq + STRIDE - 1) // STRIDE
    ncols = (Lk + STRIDE - 1) // STRIDE
    offset = Lk - Lq
    t_full, t_end = _tile_range(qt, nrows, ncols, Lk // STRIDE, offset, STRIDE, RB, RBP, BLOCK_M, BLOCK_N, CAUSAL)
    t_lo = sp * SPLIT
    t_hi = tl.minimum(t_lo + SPLIT, t_end)

    offs_m = tl.arange(0, BLOCK_M)
    slot = qt * BLOCK_M + offs_m
    jm = slot % RBP
    q_tok = ((slot // RBP) * RB + jm) * STRIDE + STRIDE - 1  # last query of each grouped row
    q_ok = jm < RB
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + b * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b * stride_kb + hk * stride_kh
    row_local = qt_local * BLOCK_M + offs_m
    sc_rows = Scratch + (pair_local.to(tl.int64) * rows_chunk + row_local) * nK
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for t in range(t_lo, tl.minimum(t_hi, t_full)):
        m_i, l_i = _score_tile(m_i, l_i, q_base, k_base, sc_rows, t, q_tok, q_ok, offs_n, offs_d, Lq, Lk, ncols,
                               nK, offset, qk_scale, stride_ql, stride_qd, stride_kl, stride_kd, STRIDE, HEAD_DIM,
                               RB, RBP, BLOCK_M, BLOCK_N, BLOCK_D, False, CAUSAL, DOT_PRECISION, UPCAST_DOT)
    for t in range(tl.maximum(t_lo, t_full), t_hi):
        m_i, l_i = _score_tile(m_i, l_i, q_base, k_base, sc_rows, t, q_tok, q_ok, offs_n, offs_d, Lq, Lk, ncols,
                               nK, offset, qk_scale, stride_ql, stride_qd, stride_kl, stride_kd, STRIDE, HEAD_DIM,
                               RB, RBP, BLOCK_M, BLOCK_N, BLOCK_D, True, CAUSAL, DOT_PRECISION, UPCAST_DOT)
    lz = m_i + tl.math.log2(l_i)  # -inf for a row that saw nothing in this split
    tl.store(Lz + (pair_local.to(tl.int64) * n_split + sp) * rows_chunk + row_local, lz)


@triton.jit
def _block_masses(Scratch, Lz, Out, stride_ob, stride_oh, stride_om, stride_on,
                  Hq, Lq, Lk, nK, pair0, qb0, rows_chunk, n_split,
                  STRIDE: tl.constexpr, RB: tl.constexpr, RBP: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, QT_PER_QB: tl.constexpr, CAUSAL: tl.constexpr):
    qb_local = tl.program_id(0)
    qb = qb0 + qb_local
    pair_local = tl.program_id(1)
    pair = pair0 + pair_local
    b = (pair // Hq).to(tl.int64)
    h = (pair % Hq).to(tl.int64)
    nrows = (Lq + STRIDE - 1) // STRIDE
    ncols = (Lk + STRIDE - 1) // STRIDE
    j = tl.arange(0, RBP)
    slot = qb * RBP + j
    row_local = qb_local * RBP + j  # a chunk starts on a query-block and a query-tile edge
    row_ok = (j < RB) & (qb * RB + j < nrows)

    # Merge the splits' row normalisers: lz = log2(sum_s exp2(lz_s)).
    lz_ptrs = Lz + pair_local.to(tl.int64) * n_split * rows_chunk + row_local
    m = tl.full([RBP], float("-inf"), dtype=tl.float32)
    m_use = tl.zeros([RBP], dtype=tl.float32)
    z = tl.zeros([RBP], dtype=tl.float32)
    for sp in range(0, n_split):
        x = tl.load(lz_ptrs + sp * rows_chunk, mask=row_ok, other=float("-inf"))
        m_new = tl.maximum(m, x)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        z = z * tl.math.exp2(m - m_use) + tl.math.exp2(x - m_use)
        m = m_new
    lz = m_use + tl.math.log2(z)
    row_ok = row_ok & (lz > float("-inf"))  # rows with nothing visible add 0 (the oracle's NaN -> 0)
    lz = tl.where(row_ok, lz, 0.0)

    # Key blocks the query tile of each row wrote; later ones were never visible (mass 0).
    NBT: tl.constexpr = BLOCK_N // RBP
    qt_first = (qb * RBP) // BLOCK_M
    n_written = tl.zeros([RBP], dtype=tl.int32)
    for i in tl.static_range(QT_PER_QB):  # query tiles holding this block's rows
        _, t_end = _tile_range(qt_first + i, nrows, ncols, Lk // STRIDE, Lk - Lq, STRIDE, RB, RBP, BLOCK_M,
                               BLOCK_N, CAUSAL)
        n_written = tl.where(slot // BLOCK_M == qt_first + i, t_end * NBT, n_written)
    n_written = tl.minimum(n_written, nK)

    sc_rows = Scratch + (pair_local.to(tl.int64) * rows_chunk + row_local) * nK
    out_row = Out + b * stride_ob + h * stride_oh + qb.to(tl.int64) * stride_om
    for n0 in range(0, nK, BLOCK_C):
        n = n0 + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (n[None, :] < n_written[:, None])
        lp = tl.load(sc_rows[:, None] + n[None, :], mask=ok, other=float("-inf"))
        mass = tl.sum(tl.math.exp2(lp - lz[:, None]), 0)
        tl.store(out_row + n * stride_on, mass, mask=n < nK)


class XAttnConfig(NamedTuple):
    """Tiles of the estimate kernels (powers of two).

    ``block_m`` grouped query rows x ``block_n`` grouped key columns per tile, ``block_d`` head
    dims per GEMM step (at least 16 each: tl.dot), ``split`` key tiles per program (smaller: more
    programs, better causal load balance), ``reduce_cols`` key blocks per step of the reduction.
    """

    block_m: int
    block_n: int
    block_d: int
    split: int
    num_warps: int
    num_stages: int
    reduce_cols: int = 128


# 16-bit inputs on Hopper: a 128 x 128 fp32 score tile in registers (8 warps) and 64-wide feature
# steps, i.e. the usual 128x128x64 GEMM tile: 64 FLOP per byte of q/k read from L2 per tile.
# Not yet swept on the H100 (see the module notes); `config=` overrides.
_CONFIG_16BIT = XAttnConfig(128, 128, 64, 4, 8, 3)
# float32 runs with exact (ieee) dot products: smaller tiles keep it in registers.
_CONFIG_FP32 = XAttnConfig(64, 64, 32, 4, 4, 2)
# The interpreter runs tiles as numpy arrays: small tiles exercise the multi-tile paths.
_CONFIG_INTERPRET = XAttnConfig(32, 32, 16, 2, 4, 1, 32)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def default_config(dtype: torch.dtype) -> XAttnConfig:
    if triton_interpreting():
        return _CONFIG_INTERPRET
    return _CONFIG_FP32 if dtype == torch.float32 else _CONFIG_16BIT


def _check_inputs(q, k, block, stride, causal, norm, config):
    check_qk_pair(q, k, _DTYPES)
    for name, v in (("block", block), ("stride", stride)):
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if block % stride:
        raise ValueError(f"block must be a multiple of stride, got block={block}, stride={stride}")
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    if (not isinstance(norm, numbers.Real) or isinstance(norm, bool) or not math.isfinite(norm)
            or norm <= 0):
        raise ValueError(f"norm must be a finite number > 0, got {norm!r}")
    if config is not None:
        cfg = XAttnConfig(*config)
        if not all(is_pow2(v) for v in cfg) or min(cfg.block_m, cfg.block_n, cfg.block_d) < 16:
            raise ValueError(f"config fields must be powers of two (block_m/n/d >= 16), got {cfg}")


def antidiagonal_block_scores_triton(q: torch.Tensor, k: torch.Tensor, *, block: int, stride: int, causal: bool,
                                     norm: float = 1.0, config: Optional[tuple] = None) -> torch.Tensor:
    """float32 ``[B, Hq, nQ, nK]``: XAttention's antidiagonal block masses (see the module notes).

    ``q [B, Hq, Lq, D]``, ``k [B, Hkv, Lk, D]`` (fp16 / bf16 / fp32, any strides; Hq a multiple of
    Hkv, query head ``h`` reads key head ``h // (Hq // Hkv)``), ``nQ = cdiv(Lq, block)``,
    ``nK = cdiv(Lk, block)``; ``block`` a multiple of ``stride``; causal alignment bottom-right.
    Same result as :func:`~sparseattn.methods.xattention.antidiagonal_block_scores` on float32
    inputs up to float32 rounding (logits accumulate in fp32; 16-bit inputs are not rounded to
    16 bits after the product, unlike that function's CUDA half path). ``config`` = an
    :class:`XAttnConfig` (or its fields) overriding the default tiles. No host sync.
    """
    _check_inputs(q, k, block, stride, causal, norm, config)
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    nQ, nK = triton.cdiv(Lq, block), triton.cdiv(Lk, block)
    out = torch.empty((B, Hq, nQ, nK), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out

    cfg = XAttnConfig(*config) if config is not None else default_config(q.dtype)
    rb = block // stride
    rbp = triton.next_power_of_2(rb)
    block_n = max(cfg.block_n, rbp)  # whole key blocks per key tile
    block_m = min(cfg.block_m, max(16, (cfg.block_m * cfg.block_n) // block_n))  # keep the tile's size
    block_d = min(cfg.block_d, max(16, triton.next_power_of_2(D)))
    cols_per_tile = (block_n // rbp) * rb
    n_split = triton.cdiv(triton.cdiv(triton.cdiv(Lk, stride), cols_per_tile), cfg.split)

    # Scratch chunks: a chunk is a range of (batch, head) pairs and, if one pair is too big, a
    # range of query rows starting on an edge of both a query block and a query tile.
    unit = max(block_m, rbp)
    n_units = triton.cdiv(nQ * rbp, unit)
    pairs = B * Hq
    per_pair = n_units * unit * nK
    if per_pair <= SCRATCH_ELEMENTS:
        pairs_per, units_per = min(pairs, SCRATCH_ELEMENTS // per_pair, 65535), n_units
    else:
        pairs_per, units_per = 1, max(1, SCRATCH_ELEMENTS // (unit * nK))
    units_per = min(units_per, 65535 * block_m // unit)  # grid y limit
    rows_chunk = units_per * unit
    scratch = torch.empty(pairs_per * rows_chunk * nK, dtype=torch.float32, device=q.device)
    lz = torch.empty(pairs_per * n_split * rows_chunk, dtype=torch.float32, device=q.device)

    qk_scale = LOG2E / (math.sqrt(D) * stride * norm)
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
    # Triton's interpreter (3.9) computes bf16 dot products wrongly; there the operands are upcast.
    upcast = q.dtype == torch.bfloat16 and triton_interpreting()
    geo = dict(STRIDE=stride, RB=rb, RBP=rbp, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal)
    for p0 in range(0, pairs, pairs_per):
        np_ = min(pairs_per, pairs - p0)
        for u0 in range(0, n_units, units_per):
            nu = min(units_per, n_units - u0)
            qt0, nqt = u0 * unit // block_m, nu * unit // block_m
            _grouped_scores[(n_split, nqt, np_)](
                q, k, scratch, lz, *q.stride(), *k.stride(),
                Hq, Hq // Hkv, Lq, Lk, nK, p0, qt0, rows_chunk, n_split, qk_scale,
                HEAD_DIM=D, BLOCK_D=block_d, SPLIT=cfg.split, DOT_PRECISION=dot_precision, UPCAST_DOT=upcast,
                **geo, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            qb0 = u0 * unit // rbp
            nqb = min(nQ, (u0 + nu) * unit // rbp) - qb0
            _block_masses[(nqb, np_)](
                scratch, lz, out, *out.stride(), Hq, Lq, Lk, nK, p0, qb0, rows_chunk, n_split,
                BLOCK_C=min(cfg.reduce_cols, triton.next_power_of_2(nK)), QT_PER_QB=max(1, rbp // block_m), **geo,
                num_warps=4)
    return out
