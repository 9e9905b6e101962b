"""Triton last-queries attention profiles (MInference vertical-slash, FlexPrefill).

``last_queries_profiles_triton(q, k, n_last)`` returns ``(A.sum(-2), diagonal_sums(A))`` for
``A = last_queries_attention(q, k, n_last)`` (methods/base.py; those PyTorch functions are the CPU
path and the oracle) without building ``A``, its float32 copies of q/k or the padded copy that
``diagonal_sums`` makes. Three launches per chunk of (batch, query head) pairs:

1. ``_logits``: one program per (key tile, row tile, pair): ``S = q_last . K_tile^T`` on the
   tensor cores (fp32 accumulation), scaled to log2 units, causal entries masked to -inf, written
   to a float32 scratch ``[pairs, P, Lk_pad]``; plus the tile's row max and row sum of exp2 (and,
   with ``pool_block``, the key tile's mean: FlexPrefill's pooled keys without a launch of their own).
2. ``_row_lse``: one program per (row tile, pair) merges the tiles' partials into each row's
   log2-sum-exp (``+inf`` for a row that sees no key, so its probabilities come out as exactly 0).
3. ``_profiles``: one program per (output tile of ``BLOCK_T`` keys, pair) walks the P rows in
   chunks of ``BLOCK_P``: column sums read ``S[i, t]``, diagonal sums read ``S[i, t - (P - 1 - i)]``
   (the diagonal reaching key ``t`` on the last row), both as ``exp2(S - lse_i)`` accumulated in
   registers and written once. No atomics: deterministic.

The skew of the diagonal sums is why ``S`` goes through memory: a per-row shift of a register tile
is not expressible in Triton, and per-row dot products instead of the GEMM would lose the tensor
cores. The scratch is the only large buffer (``P * Lk`` floats per pair).

Cost on an H100 (SmolLM2 at 32K: B=1, Hq=9, Hkv=3, D=64, bf16): ``2 * P * Lk * D * Hq`` GEMM
FLOPs (4.8 GFLOP at P=128: a few microseconds of tensor-core time), ``P * Lk * Hq`` floats of
scratch written once and read once from HBM (151 MB each way at P=128, 75 MB at P=64; the diagonal
reads overlap the column reads of the neighbouring tile and mostly hit L2), 3 exp2 per scratch
entry, 12.6 MB of K from HBM (each query head re-reads its key head's tiles: 38 MB through L2),
0.15 MB of q and 2 x 1.2 MB of output. So memory-bound at about 2 x 151 MB, i.e. ~100-120 us at
P=128 and ~50-60 us at P=64 (the PyTorch path: ~0.7 ms).
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
# One launch's scratch of logits stays near this many floats (chunks of (batch, head) pairs; a
# single pair may exceed it).
SCRATCH_ELEMENTS = 1 << 26

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _logits(Q, K, Scratch, PartM, PartL, KPool,
            stride_qb, stride_qh, stride_ql, stride_qd, stride_kb, stride_kh, stride_kl, stride_kd,
            Hq, group, Lq, Lk, P, row_stride, n_key_tiles, pair0, qk_scale,
            HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, POOL_K: tl.constexpr):
    kt = tl.program_id(0)
    rt = tl.program_id(1)
    pair_local = tl.program_id(2)
    pair = pair0 + pair_local
    b = (pair // Hq).to(tl.int64)
    h = pair % Hq
    hk = (h // group).to(tl.int64)

    rows = rt * BLOCK_M + tl.arange(0, BLOCK_M)  # row i of the last P queries
    row_ok = rows < P
    pos = Lk - P + rows  # its absolute position (bottom-right alignment); < 0: sees nothing
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    q_ptrs = (Q + b * stride_qb + h.to(tl.int64) * stride_qh + (Lq - P + rows).to(tl.int64)[:, None] * stride_ql
              + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    cols = kt * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ptrs = K + b * stride_kb + hk * stride_kh + cols.to(tl.int64)[:, None] * stride_kl + offs_d[None, :] * stride_kd
    k = tl.load(k_ptrs, mask=(cols < Lk)[:, None] & d_ok[None, :], other=0.0)
    if POOL_K:  # the key tile is one pooled block: its mean, once per key head (first row tile, first query head)
        if rt == 0:
            if h % group == 0:
                count = tl.minimum(Lk - kt * BLOCK_N, BLOCK_N).to(tl.float32)  # a partial last block: its real rows
                mean = tl.sum(k.to(tl.float32), 0) / count
                out = ((b * (Hq // group) + hk) * n_key_tiles + kt) * HEAD_DIM + offs_d
                tl.store(KPool + out, mean, mask=d_ok)
    if UPCAST_DOT:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    # pos <= Lk - 1, so the causal test also drops the key tail past Lk.
    s = tl.where(cols[None, :] <= pos[:, None], s * qk_scale, float("-inf"))

    m = tl.max(s, 1)
    # A row with no visible key in this tile keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
    m_use = tl.where(m == float("-inf"), 0.0, m)
    l = tl.sum(tl.math.exp2(s - m_use[:, None]), 1)

    sc_ptrs = Scratch + (pair_local.to(tl.int64) * P + rows.to(tl.int64))[:, None] * row_stride + cols[None, :]
    tl.store(sc_ptrs, s, mask=row_ok[:, None])  # row_stride is a multiple of BLOCK_N: whole tiles
    part = (pair_local.to(tl.int64) * n_key_tiles + kt) * P + rows
    tl.store(PartM + part, m, mask=row_ok)
    tl.store(PartL + part, l, mask=row_ok)


@triton.jit
def _row_lse(PartM, PartL, Lse, P, n_key_tiles, BLOCK_R: tl.constexpr, BLOCK_TILES: tl.constexpr):
    rt = tl.program_id(0)
    pair_local = tl.program_id(1).to(tl.int64)
    rows = rt * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < P
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    m_use = tl.zeros([BLOCK_R], dtype=tl.float32)
    z = tl.zeros([BLOCK_R], dtype=tl.float32)
    base = pair_local * n_key_tiles * P
    for t0 in range(0, n_key_tiles, BLOCK_TILES):
        t = t0 + tl.arange(0, BLOCK_TILES)
        ok = row_ok[:, None] & (t < n_key_tiles)[None, :]
        offs = base + t.to(tl.int64)[None, :] * P + rows[:, None]
        pm = tl.load(PartM + offs, mask=ok, other=float("-inf"))
        pl = tl.load(PartL + offs, mask=ok, other=0.0)
        m_new = tl.maximum(m, tl.max(pm, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        z = z * tl.math.exp2(m - m_use) + tl.sum(pl * tl.math.exp2(pm - m_use[:, None]), 1)
        m = m_new
    # +inf for a row that sees nothing: exp2(S - lse) is then 0 for every entry (S is finite or -inf).
    lse = tl.where(z > 0.0, m_use + tl.math.log2(tl.where(z > 0.0, z, 1.0)), float("inf"))
    tl.store(Lse + pair_local * P + rows, lse, mask=row_ok)


@triton.jit
def _profiles(Scratch, Lse, Col, Diag, stride_ob, stride_oh, stride_ol,
              Hq, Lk, P, row_stride, pair0, sink_columns, local_start, BLOCK_P: tl.constexpr,
              BLOCK_T: tl.constexpr):
    tt = tl.program_id(0)
    pair_local = tl.program_id(1)
    pair = pair0 + pair_local
    b = (pair // Hq).to(tl.int64)
    h = (pair % Hq).to(tl.int64)
    t = tt * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < Lk
    col = tl.zeros([BLOCK_T], dtype=tl.float32)
    diag = tl.zeros([BLOCK_T], dtype=tl.float32)
    for r0 in range(0, P, BLOCK_P):
        rows = r0 + tl.arange(0, BLOCK_P)
        row_ok = rows < P
        lse = tl.load(Lse + pair_local.to(tl.int64) * P + rows, mask=row_ok, other=float("inf"))
        row_ptr = Scratch + (pair_local.to(tl.int64) * P + rows.to(tl.int64))[:, None] * row_stride
        ok = row_ok[:, None] & t_ok[None, :]
        s = tl.load(row_ptr + t[None, :], mask=ok, other=float("-inf"))
        col += tl.sum(tl.math.exp2(s - lse[:, None]), 0)
        # Row i reaches diagonal t at key j = t - (P - 1 - i); j <= t, and j is always causally visible.
        j = t[None, :] - (P - 1 - rows[:, None])
        s = tl.load(row_ptr + j, mask=ok & (j >= 0), other=float("-inf"))
        diag += tl.sum(tl.math.exp2(s - lse[:, None]), 0)
    out = b * stride_ob + h * stride_oh + t.to(tl.int64) * stride_ol
    # vertical-slash's forced entries: the sink columns and the local diagonals rank first
    tl.store(Col + out, tl.where(t < sink_columns, float("inf"), col), mask=t_ok)
    tl.store(Diag + out, tl.where(t >= local_start, float("inf"), diag), mask=t_ok)


class LastQConfig(NamedTuple):
    """Tiles (powers of two).

    ``block_m`` x ``block_n``: the logits GEMM tile (last-query rows x keys, at least 16 each:
    tl.dot); ``num_warps`` for it. ``block_p`` x ``block_t``: rows per step x output keys per
    program of the profile reduction, ``profile_warps`` for it.
    """

    block_m: int
    block_n: int
    num_warps: int
    block_p: int
    block_t: int
    profile_warps: int = 4


# 16-bit inputs, by head dim, from the H100 sweep (`scripts/sweep_last_queries.py`, BENCHMARKS.md
# "Session 12"; graph replay, both profiles): D <= 64, 64 x 128 logit tiles on 4 warps and 32 x 256
# profile steps (9/3/64 at 32K: P = 128 160 -> 138 us, P = 64 94 -> 84 us against the previous
# 128 x 128 x 8 warps, 16 x 256); D = 128, 128 x 128 on 8 warps and 16 x 512 steps (32/8/128 at
# 128K: 2527 -> 2385 us, 1290 -> 1241 us). Each logits program writes a whole tile of scratch
# (32-64 KB, enough bytes in flight per SM to stream at HBM speed).
_CONFIG_16BIT_D64 = LastQConfig(64, 128, 4, 32, 256)
_CONFIG_16BIT = LastQConfig(128, 128, 8, 16, 512)
# float32 runs exact (ieee) dot products on the FMA units: smaller tiles keep them in registers.
_CONFIG_FP32 = LastQConfig(64, 64, 4, 16, 256)
# The interpreter runs tiles as numpy arrays: small tiles exercise the multi-tile paths.
_CONFIG_INTERPRET = LastQConfig(16, 32, 4, 8, 32)


def default_config(dtype: torch.dtype, head_dim: int = 128) -> LastQConfig:
    if triton_interpreting():
        return _CONFIG_INTERPRET
    if dtype == torch.float32:
        return _CONFIG_FP32
    return _CONFIG_16BIT_D64 if head_dim <= 64 else _CONFIG_16BIT


def _check_inputs(q, k, n_last, config):
    check_qk_pair(q, k, DTYPES)
    if not isinstance(n_last, numbers.Integral) or isinstance(n_last, bool) or n_last < 1:
        raise ValueError(f"n_last must be an int >= 1, got {n_last!r}")
    if config is not None:
        cfg = LastQConfig(*config)
        if not all(is_pow2(v) for v in cfg) or min(cfg.block_m, cfg.block_n) < 16:
            raise ValueError(f"config fields must be powers of two (block_m/n >= 16), got {cfg}")


def last_queries_profiles_triton(q: torch.Tensor, k: torch.Tensor, n_last: int, *,
                                 config: Optional[tuple] = None, pool_block: Optional[int] = None,
                                 sink_columns: int = 0, local_diagonals: int = 0,
                                 out: Optional[torch.Tensor] = None) -> tuple:
    """``(column_sums, diagonal_sums)``, both float32 ``[B, Hq, Lk]``, of the last queries' attention.

    ``q [B, Hq, Lq, D]``, ``k [B, Hkv, Lk, D]`` (fp16 / bf16 / fp32, one dtype, any strides; Hq a
    multiple of Hkv, query head ``h`` reads key head ``h // (Hq // Hkv)``). With
    ``A = last_queries_attention(q, k, n_last)`` (the last ``P = min(n_last, Lq)`` queries, causal
    bottom-right, softmax per row over its visible keys, rows that see no key are 0), returns
    ``A.sum(-2)`` and ``diagonal_sums(A)`` (index ``t``: the diagonal reaching key ``t`` on the last
    row) up to float32 rounding (logits accumulate in fp32; 16-bit inputs are multiplied exactly).
    ``config`` = a :class:`LastQConfig` (or its fields) overriding the default tiles.
    ``pool_block``: also return ``k`` mean-pooled over blocks of that many keys, float32 ``[B, Hkv,
    ceil(Lk / pool_block), D]`` (``methods.base.pool_blocks``; FlexPrefill's pattern test), as a
    third output: written by the logits launch when its key tile is that size (the default tiles
    at 128), else by one pooling launch. ``sink_columns`` / ``local_diagonals``: the column sums
    of the first ``sink_columns`` keys and the diagonal sums of the last ``local_diagonals``
    indices (distances ``0 .. local_diagonals - 1``) come out as ``+inf`` (vertical-slash's forced
    entries, written by the profile launch). ``out``: a float32 ``[2, B, Hq, Lk]`` tensor to write
    the two profiles into (then returned as its two halves: both stacked, without a copy). No host
    sync.
    """
    _check_inputs(q, k, n_last, config)
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    P = min(int(n_last), Lq)
    cfg = LastQConfig(*config) if config is not None else default_config(q.dtype, q.shape[-1])
    k_pool = None
    if pool_block is not None:
        if not isinstance(pool_block, numbers.Integral) or isinstance(pool_block, bool) or pool_block < 1:
            raise ValueError(f"pool_block must be an int >= 1, got {pool_block!r}")
        if pool_block != cfg.block_n or B * Hq * Lk == 0 or P == 0:
            from .flexprefill_triton import pool_blocks_triton  # (that module imports this one's neighbours)

            k_pool = pool_blocks_triton(k, int(pool_block))
            pool_block = None  # done
        else:
            k_pool = torch.empty(B, Hkv, triton.cdiv(Lk, pool_block), D, dtype=torch.float32, device=q.device)
    for name, value in (("sink_columns", sink_columns), ("local_diagonals", local_diagonals)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if out is None:
        out = torch.empty((2, B, Hq, Lk), dtype=torch.float32, device=q.device)  # every entry is written
    elif out.shape != (2, B, Hq, Lk) or out.dtype != torch.float32 or out.device != q.device:
        raise ValueError(f"out must be a float32 [2, B, Hq, Lk] = {[2, B, Hq, Lk]} tensor on {q.device}, got "
                         f"{out.dtype} {list(out.shape)} on {out.device}")
    col, diag = out.unbind(0)
    local_start = max(Lk - int(local_diagonals), 0)
    if B * Hq * Lk == 0 or P == 0:
        out.zero_()
        col[..., :sink_columns] = float("inf")
        diag[..., local_start:] = float("inf")
        return (col, diag) + ((k_pool,) if k_pool is not None else ())

    block_m = min(cfg.block_m, max(16, triton.next_power_of_2(P)))
    block_p = min(cfg.block_p, max(2, triton.next_power_of_2(P)))
    block_t = min(cfg.block_t, max(16, triton.next_power_of_2(Lk)))
    n_key_tiles = triton.cdiv(Lk, cfg.block_n)
    row_stride = n_key_tiles * cfg.block_n  # whole tiles per scratch row; aligned rows for vector access
    pairs = B * Hq
    pairs_per = max(1, min(pairs, SCRATCH_ELEMENTS // (P * row_stride), 65535))
    scratch = torch.empty(pairs_per * P * row_stride, dtype=torch.float32, device=q.device)
    part_m = torch.empty(pairs_per * n_key_tiles * P, dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    lse = torch.empty(pairs_per * P, dtype=torch.float32, device=q.device)

    qk_scale = LOG2E / math.sqrt(D)
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
    # Triton's interpreter (3.9) computes bf16 dot products wrongly; there the operands are upcast.
    upcast = q.dtype == torch.bfloat16 and triton_interpreting()
    n_row_tiles = triton.cdiv(P, block_m)
    for p0 in range(0, pairs, pairs_per):
        np_ = min(pairs_per, pairs - p0)
        _logits[(n_key_tiles, n_row_tiles, np_)](
            q, k, scratch, part_m, part_l, k_pool if pool_block is not None else part_m, *q.stride(), *k.stride(),
            Hq, Hq // Hkv, Lq, Lk, P, row_stride, n_key_tiles, p0, qk_scale,
            HEAD_DIM=D, D_PAD=max(16, triton.next_power_of_2(D)), BLOCK_M=block_m, BLOCK_N=cfg.block_n,
            DOT_PRECISION=dot_precision, UPCAST_DOT=upcast, POOL_K=pool_block is not None, num_warps=cfg.num_warps)
        # 16 rows x 256 tiles per step (H100, 9 pairs of 256 tiles, graph-timed: 2.4 us, against
        # 4.2 for 32 x 64; BENCHMARKS.md "Session 14"): fewer dependent steps per program.
        _row_lse[(triton.cdiv(P, 16), np_)](
            part_m, part_l, lse, P, n_key_tiles, BLOCK_R=16,
            BLOCK_TILES=min(256, max(2, triton.next_power_of_2(n_key_tiles))), num_warps=4)
        _profiles[(triton.cdiv(Lk, block_t), np_)](
            scratch, lse, col, diag, *col.stride(), Hq, Lk, P, row_stride, p0, min(int(sink_columns), Lk),
            local_start, BLOCK_P=block_p, BLOCK_T=block_t, num_warps=cfg.profile_warps)
    return (col, diag) + ((k_pool,) if k_pool is not None else ())
