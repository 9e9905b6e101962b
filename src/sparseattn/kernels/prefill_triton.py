"""Triton block-sparse flash-attention forward for prefill.

Tiers: ``_block_sparse_fwd`` (the ``@triton.jit`` kernel) -> ``_launch`` (grid, strides, config)
-> ``attention_triton`` (called by ``sparseattn.block_sparse_attention`` after validation).

One program computes ``BLOCK_M`` query rows of one (batch, query head). It walks only the key
blocks the plan lists for that query block, in two phases: blocks that every row of the tile sees
completely (no masking at all) and then the few blocks that need an element mask (causal
diagonal, key tail, band edges), followed by the plan's extra key columns (gathered; whole tiles
of columns every row sees without masks, the rest with them). Softmax runs online in
base 2 with fp32 accumulators. Every offset that scales with sequence length is 64-bit.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ..plan import BlockPlan
from .dispatch import device_capability, triton_interpreting

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _attend_tile(acc, l_i, m_i, poison, q, k, v, offs_n, key_ok, pos_m, qk_scale, sink, window,
                 MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_BAND: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, PAD_MASK: tl.constexpr = False):
    """One online-softmax step over a tile of loaded keys ``k``/values ``v`` at key indices ``offs_n``.

    PAD_MASK (unmasked step only): keys with ``key_ok`` False are padding loaded as zeros: dropped
    from the scores; every row must see at least one key of the tile (so its max stays finite).
    """
    if UPCAST_DOT:
        qk = tl.dot(q.to(tl.float32), tl.trans(k).to(tl.float32), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MASKED:
        keep = key_ok[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= pos_m[:, None])
        if HAS_BAND:
            keep = keep & ((offs_n[None, :] < sink) | ((pos_m[:, None] - offs_n[None, :]) < window))
        qk = tl.where(keep, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row that has seen no key yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        # Keys whose value row is not finite: rows that attend them become NaN at the end, while
        # rows that mask them must not see 0 * NaN.
        v_rowsum = tl.sum(v.to(tl.float32) * 0.0, 1)  # 0 for a finite row, NaN otherwise
        v_bad = tl.where(v_rowsum == 0.0, 0.0, 1.0)
        v = tl.where(v_bad[:, None] == 0.0, v, tl.zeros_like(v))
        poison = tl.maximum(poison, tl.max(p * v_bad[None, :], 1))
    else:
        if PAD_MASK:
            qk = tl.where(key_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if UPCAST_DOT:  # same rounding of p as the GPU path, then an exact fp32 product
        acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new, poison


@triton.jit
def _attend_pair(acc, l_i, m_i, q, k_a, v_a, k_b, v_b, qk_scale,
                 DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """One unmasked online-softmax step over two key tiles: one running-max update and one
    rescale of the accumulator for both (small plan blocks cut the tile to 64 keys; pairing
    them halves the per-tile softmax bookkeeping and gives the scheduler two products at once)."""
    if UPCAST_DOT:
        qk_a = tl.dot(q.to(tl.float32), tl.trans(k_a).to(tl.float32), input_precision="ieee")
        qk_b = tl.dot(q.to(tl.float32), tl.trans(k_b).to(tl.float32), input_precision="ieee")
    else:
        qk_a = tl.dot(q, tl.trans(k_a), input_precision=DOT_PRECISION)
        qk_b = tl.dot(q, tl.trans(k_b), input_precision=DOT_PRECISION)
    m_new = tl.maximum(m_i, tl.maximum(tl.max(qk_a, 1), tl.max(qk_b, 1)) * qk_scale)
    p_a = tl.math.exp2(qk_a * qk_scale - m_new[:, None])
    p_b = tl.math.exp2(qk_b * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p_a, 1) + tl.sum(p_b, 1)
    acc = acc * alpha[:, None]
    if UPCAST_DOT:
        acc = tl.dot(p_a.to(v_a.dtype).to(tl.float32), v_a.to(tl.float32), acc, input_precision="ieee")
        acc = tl.dot(p_b.to(v_b.dtype).to(tl.float32), v_b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(p_a.to(v_a.dtype), v_a, acc, input_precision=DOT_PRECISION)
        acc = tl.dot(p_b.to(v_b.dtype), v_b, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _load_kv(K, V, k_base, v_base, kv_row0, start_n, offs_tile_n, offs_d, k_len,
             stride_kn, stride_kd, stride_vn, stride_vd,
             MASKED: tl.constexpr, USE_TMA: tl.constexpr):
    """Load the K and V tile of keys [start_n, start_n + BLOCK_N); zeros past k_len (pointer path)."""
    offs_n = start_n + offs_tile_n
    key_ok = offs_n < k_len
    if USE_TMA:
        # Rows past k_len belong to the next head (or are zero-filled past the tensor): they are
        # masked out of the scores, and their values are sanitised in the masked step.
        k = K.load([kv_row0 + start_n, 0])
        v = V.load([kv_row0 + start_n, 0])
    else:
        k_ptrs = k_base + offs_n.to(tl.int64)[:, None] * stride_kn + offs_d[None, :] * stride_kd
        v_ptrs = v_base + offs_n.to(tl.int64)[:, None] * stride_vn + offs_d[None, :] * stride_vd
        if MASKED:
            k = tl.load(k_ptrs, mask=key_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
    return k, v, offs_n, key_ok


@triton.jit
def _walk_blocks(acc, l_i, m_i, poison, q, K, V, k_base, v_base, kv_row0, idx_row, stride_ik,
                 t_begin, t_end, count, offs_tile_n, offs_d, pos_m, k_len, qk_scale, sink, window,
                 stride_kn, stride_kd, stride_vn, stride_vd,
                 BLOCK_N: tl.constexpr, PLAN_BLOCK_K: tl.constexpr, IS_DENSE: tl.constexpr,
                 MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_BAND: tl.constexpr, USE_TMA: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, PAIR_BLOCKS: tl.constexpr = False):
    """Attend the plan's blocks at list positions [t_begin, t_end) (dense: blocks t_begin..t_end-1).

    PAIR_BLOCKS (unmasked phase of a sparse plan whose blocks are one tile wide): two listed blocks
    per step, then the odd one alone.
    """
    SUB: tl.constexpr = PLAN_BLOCK_K // BLOCK_N
    if PAIR_BLOCKS and not IS_DENSE and not MASKED and SUB == 1:
        n_pairs = (t_end - t_begin) // 2
        blk_a_next = tl.load(idx_row + t_begin * stride_ik, mask=n_pairs > 0, other=0)
        blk_b_next = tl.load(idx_row + (t_begin + 1) * stride_ik, mask=n_pairs > 0, other=0)
        for i in range(n_pairs):
            blk_a = blk_a_next
            blk_b = blk_b_next
            t_next = t_begin + 2 * i + 2
            blk_a_next = tl.load(idx_row + t_next * stride_ik, mask=t_next < count, other=0)
            blk_b_next = tl.load(idx_row + (t_next + 1) * stride_ik, mask=t_next + 1 < count, other=0)
            k_a, v_a, offs_n, key_ok = _load_kv(K, V, k_base, v_base, kv_row0, blk_a * BLOCK_N, offs_tile_n, offs_d,
                                                k_len, stride_kn, stride_kd, stride_vn, stride_vd, False, USE_TMA)
            k_b, v_b, offs_n, key_ok = _load_kv(K, V, k_base, v_base, kv_row0, blk_b * BLOCK_N, offs_tile_n, offs_d,
                                                k_len, stride_kn, stride_kd, stride_vn, stride_vd, False, USE_TMA)
            acc, l_i, m_i = _attend_pair(acc, l_i, m_i, q, k_a, v_a, k_b, v_b, qk_scale, DOT_PRECISION, UPCAST_DOT)
        t_begin = t_begin + 2 * n_pairs
    if IS_DENSE:
        for t in range(t_begin, t_end):
            k, v, offs_n, key_ok = _load_kv(K, V, k_base, v_base, kv_row0, t * BLOCK_N, offs_tile_n, offs_d, k_len,
                                            stride_kn, stride_kd, stride_vn, stride_vd, MASKED, USE_TMA)
            acc, l_i, m_i, poison = _attend_tile(acc, l_i, m_i, poison, q, k, v, offs_n, key_ok, pos_m, qk_scale,
                                                 sink, window, MASKED, CAUSAL, HAS_BAND, DOT_PRECISION, UPCAST_DOT)
    else:
        # The next block index is loaded one iteration ahead, so no K/V address waits on a load
        # issued in the same iteration.
        blk_next = tl.load(idx_row + t_begin * stride_ik, mask=t_begin < t_end, other=0)
        for t in range(t_begin, t_end):
            blk = blk_next
            blk_next = tl.load(idx_row + (t + 1) * stride_ik, mask=t + 1 < count, other=0)
            for sub in tl.static_range(SUB):
                k, v, offs_n, key_ok = _load_kv(K, V, k_base, v_base, kv_row0, blk * PLAN_BLOCK_K + sub * BLOCK_N,
                                                offs_tile_n, offs_d, k_len, stride_kn, stride_kd, stride_vn,
                                                stride_vd, MASKED, USE_TMA)
                acc, l_i, m_i, poison = _attend_tile(acc, l_i, m_i, poison, q, k, v, offs_n, key_ok, pos_m,
                                                     qk_scale, sink, window, MASKED, CAUSAL, HAS_BAND,
                                                     DOT_PRECISION, UPCAST_DOT)
    return acc, l_i, m_i, poison


@triton.jit
def _gather_kv(k_base, v_base, offs_e, cols, offs_d, e_end, k_len,
               stride_kn, stride_kd, stride_vn, stride_vd, MASKED: tl.constexpr):
    """Gather the K and V rows of key columns ``cols`` (list positions ``offs_e``); masked: zeros
    at positions past e_end or columns past k_len."""
    k_ptrs = k_base + cols.to(tl.int64)[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = v_base + cols.to(tl.int64)[:, None] * stride_vn + offs_d[None, :] * stride_vd
    if MASKED:
        col_ok = (offs_e < e_end) & (cols < k_len)
        k = tl.load(k_ptrs, mask=col_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
    else:
        col_ok = offs_e < e_end  # all true
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    return k, v, col_ok


@triton.jit
def _walk_extras(acc, l_i, m_i, poison, q, k_base, v_base, e_row, stride_ek, e_begin, e_end, offs_d,
                 pos_m, k_len, qk_scale, stride_kn, stride_kd, stride_vn, stride_vd,
                 EXTRA_N: tl.constexpr, MODE: tl.constexpr, CAUSAL: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, EXTRA_STAGES: tl.constexpr,
                 PAIR: tl.constexpr = False):
    """Attend the extra key columns at list positions [e_begin, e_end), EXTRA_N per step.

    MODE 0: whole tiles of columns below k_len that every row of the tile sees: no masks (PAIR:
    two tiles per step, one softmax update, then the odd one alone). MODE 1: columns every row
    sees, the last tile partial: only the padding positions are masked out of the scores (their
    K/V load as zeros, so no value checks). MODE 2: columns cut by the causal edge or past k_len:
    element masks and the non-finite value checks of a masked step.
    The next step's column indices are loaded one step ahead, so the K/V gathers of a step never
    wait on an index load issued in the same step.
    """
    offs_tile_e = tl.arange(0, EXTRA_N)
    if PAIR and MODE == 0:
        n_pairs = (e_end - e_begin) // (2 * EXTRA_N)
        offs_a = e_begin + offs_tile_e
        cols_a_next = tl.load(e_row + offs_a * stride_ek, mask=offs_a < e_end, other=0)
        cols_b_next = tl.load(e_row + (offs_a + EXTRA_N) * stride_ek, mask=offs_a + EXTRA_N < e_end, other=0)
        for i in tl.range(0, n_pairs, num_stages=EXTRA_STAGES):
            cols_a = cols_a_next
            cols_b = cols_b_next
            offs_after = e_begin + (2 * i + 2) * EXTRA_N + offs_tile_e
            cols_a_next = tl.load(e_row + offs_after * stride_ek, mask=offs_after < e_end, other=0)
            cols_b_next = tl.load(e_row + (offs_after + EXTRA_N) * stride_ek, mask=offs_after + EXTRA_N < e_end,
                                  other=0)
            k_a, v_a, col_ok = _gather_kv(k_base, v_base, offs_after, cols_a, offs_d, e_end, k_len,
                                          stride_kn, stride_kd, stride_vn, stride_vd, False)
            k_b, v_b, col_ok = _gather_kv(k_base, v_base, offs_after, cols_b, offs_d, e_end, k_len,
                                          stride_kn, stride_kd, stride_vn, stride_vd, False)
            acc, l_i, m_i = _attend_pair(acc, l_i, m_i, q, k_a, v_a, k_b, v_b, qk_scale, DOT_PRECISION, UPCAST_DOT)
        e_begin = e_begin + 2 * EXTRA_N * n_pairs
    offs_e = e_begin + offs_tile_e
    cols_next = tl.load(e_row + offs_e * stride_ek, mask=offs_e < e_end, other=0)
    for t in tl.range(e_begin, e_end, EXTRA_N, num_stages=EXTRA_STAGES):
        cols = cols_next
        offs_e = t + offs_tile_e
        offs_after = offs_e + EXTRA_N
        cols_next = tl.load(e_row + offs_after * stride_ek, mask=offs_after < e_end, other=0)
        k, v, col_ok = _gather_kv(k_base, v_base, offs_e, cols, offs_d, e_end, k_len,
                                  stride_kn, stride_kd, stride_vn, stride_vd, MODE != 0)
        acc, l_i, m_i, poison = _attend_tile(acc, l_i, m_i, poison, q, k, v, cols, col_ok, pos_m, qk_scale,
                                             0, 0, MODE == 2, CAUSAL, False, DOT_PRECISION, UPCAST_DOT,
                                             MODE == 1)
    return acc, l_i, m_i, poison


@triton.jit
def _block_sparse_fwd(
    Q, K, V, Out, Lse,
    Counts, Indices, BandSink, BandWindow, ExtraCounts, ExtraIndices,
    qk_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh,
    stride_cb, stride_ch, stride_cm,
    stride_ib, stride_ih, stride_im, stride_ik,
    stride_eb, stride_eh, stride_em, stride_ek,
    num_q_heads, num_kv_heads, q_len, k_len, num_q_tiles, group, plan_head_div,
    K_ptr, V_ptr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PLAN_BLOCK_Q: tl.constexpr, PLAN_BLOCK_K: tl.constexpr,
    IS_DENSE: tl.constexpr, CAUSAL: tl.constexpr, HAS_BAND: tl.constexpr, HAS_EXTRA: tl.constexpr,
    RETURN_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    USE_TMA: tl.constexpr, COUNT_CHUNK: tl.constexpr, GROUP_PACK: tl.constexpr, EXTRA_STAGES: tl.constexpr,
    PAIR_BLOCKS: tl.constexpr, EXTRA_N: tl.constexpr, EXTRA_PAIR: tl.constexpr, EXTRA_PAD_TAIL: tl.constexpr,
):
    # K, V are tensor descriptors over [B * Hkv * Lk, D] when USE_TMA, else the same as K_ptr, V_ptr.
    # GROUP_PACK > 1: one program holds the queries of GROUP_PACK heads of one GQA group (rows
    # interleaved as (position, head)), so each K/V tile is read once for the whole group; only
    # used when the plan is shared by the group. Rows of padding heads (group < GROUP_PACK) are
    # masked. POS_PER_TILE query positions per program.
    POS_PER_TILE: tl.constexpr = BLOCK_M // GROUP_PACK
    # Heaviest tiles (last rows under causal) first, so the tail of the grid is short work.
    tile = num_q_tiles - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_tile_n = tl.arange(0, BLOCK_N)
    q_offset = k_len - q_len  # bottom-right causal alignment
    if GROUP_PACK > 1:
        b = bh // num_kv_heads
        hk = bh % num_kv_heads
        rows = tl.arange(0, BLOCK_M)
        head_in_group = rows % GROUP_PACK
        offs_m = tile * POS_PER_TILE + rows // GROUP_PACK  # query index of each row
        h_rows = hk * group + head_in_group  # query head of each row
        h = hk * group  # first head of the group: picks the shared plan row
        row_ok = (offs_m < q_len) & (head_in_group < group)
    else:
        b = bh // num_q_heads
        h = bh % num_q_heads
        hk = h // group
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        h_rows = h + offs_m * 0
        row_ok = offs_m < q_len
    b64 = b.to(tl.int64)
    pos_m = q_offset + offs_m  # absolute positions of the tile's queries

    q_ptrs = (Q + b64 * stride_qb + h_rows.to(tl.int64)[:, None] * stride_qh
              + offs_m.to(tl.int64)[:, None] * stride_qm + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    k_base = K_ptr + b64 * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V_ptr + b64 * stride_vb + hk.to(tl.int64) * stride_vh
    kv_row0 = (b * num_kv_heads + hk) * k_len  # first row of this head in the 2-D TMA view

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    poison = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Keys every row of this tile sees: all of them without causal, else up to the first row.
    first_pos = q_offset + tile * POS_PER_TILE
    last_pos = tl.minimum(q_offset + tile * POS_PER_TILE + POS_PER_TILE, q_offset + q_len) - 1
    if CAUSAL:
        full_keys = tl.minimum(tl.maximum(first_pos + 1, 0), k_len)
        vis_keys = tl.minimum(tl.maximum(last_pos + 1, 0), k_len)
    else:
        full_keys = k_len
        vis_keys = k_len
    full_blocks = full_keys // PLAN_BLOCK_K  # blocks entirely inside [0, full_keys)
    vis_blocks = (vis_keys + PLAN_BLOCK_K - 1) // PLAN_BLOCK_K  # blocks with any visible key

    sink = 0
    window = 0
    idx_row = Indices
    if IS_DENSE:
        n_full = full_blocks
        n_vis = vis_blocks
        count = vis_blocks
    else:
        m_plan = (tile * POS_PER_TILE) // PLAN_BLOCK_Q
        ph = (h // plan_head_div).to(tl.int64)
        count = tl.load(Counts + b64 * stride_cb + ph * stride_ch + m_plan * stride_cm)
        idx_row = Indices + b64 * stride_ib + ph * stride_ih + m_plan.to(tl.int64) * stride_im
        if HAS_BAND:
            sink = tl.load(BandSink + b64 * stride_cb + ph * stride_ch + m_plan * stride_cm)
            window = tl.load(BandWindow + b64 * stride_cb + ph * stride_ch + m_plan * stride_cm)
        # The row is sorted, so the fully visible blocks form a prefix and the visible ones a
        # longer prefix; count both (a few vector loads) instead of branching per block.
        n_full = count * 0
        n_vis = count * 0
        n_sink_full = count * 0
        n_outside_window = count * 0
        for c in range(0, count, COUNT_CHUNK):
            offs_c = c + tl.arange(0, COUNT_CHUNK)
            blk = tl.load(idx_row + offs_c * stride_ik, mask=offs_c < count, other=2147483647)
            n_full += tl.sum((blk < full_blocks).to(tl.int32))
            n_vis += tl.sum((blk < vis_blocks).to(tl.int32))
            if HAS_BAND:
                # Blocks wholly inside the sink for every key, and blocks not wholly inside every
                # row's window (a prefix too: the window test weakens as the block index grows).
                n_sink_full += tl.sum(((blk.to(tl.int64) + 1) * PLAN_BLOCK_K <= sink).to(tl.int32))
                n_outside_window += tl.sum((last_pos - blk.to(tl.int64) * PLAN_BLOCK_K >= window).to(tl.int32))

    if HAS_BAND and not IS_DENSE:
        # Band plans: the causal-full prefix splits into [sink blocks | band edge | window interior];
        # only the edge (and the diagonal blocks after the prefix) need element masks.
        band_a = tl.minimum(n_sink_full, n_full)
        band_b = tl.maximum(band_a, tl.minimum(n_outside_window, n_full))
        acc, l_i, m_i, poison = _walk_blocks(
            acc, l_i, m_i, poison, q, K, V, k_base, v_base, kv_row0, idx_row, stride_ik, 0, band_a, count,
            offs_tile_n, offs_d, pos_m, k_len, qk_scale, sink, window, stride_kn, stride_kd, stride_vn, stride_vd,
            BLOCK_N, PLAN_BLOCK_K, IS_DENSE, False, CAUSAL, HAS_BAND, USE_TMA, DOT_PRECISION, UPCAST_DOT,
            PAIR_BLOCKS)
        acc, l_i, m_i, poison = _walk_blocks(
            acc, l_i, m_i, poison, q, K, V, k_base, v_base, kv_row0, idx_row, stride_ik, band_a, band_b, count,
            offs_tile_n, offs_d, pos_m, k_len, qk_scale, sink, window, stride_kn, stride_kd, stride_vn, stride_vd,
            BLOCK_N, PLAN_BLOCK_K, IS_DENSE, True, CAUSAL, HAS_BAND, USE_TMA, DOT_PRECISION, UPCAST_DOT)
        phase1_begin = band_b
    else:
        phase1_begin = n_full * 0

    # Phase 1: blocks needing no mask at all; phase 2: blocks cut by the causal diagonal, the key
    # tail or the band.
    acc, l_i, m_i, poison = _walk_blocks(
        acc, l_i, m_i, poison, q, K, V, k_base, v_base, kv_row0, idx_row, stride_ik, phase1_begin, n_full, count,
        offs_tile_n, offs_d, pos_m, k_len, qk_scale, sink, window, stride_kn, stride_kd, stride_vn, stride_vd,
        BLOCK_N, PLAN_BLOCK_K, IS_DENSE, False, CAUSAL, HAS_BAND, USE_TMA, DOT_PRECISION, UPCAST_DOT,
        PAIR_BLOCKS)
    acc, l_i, m_i, poison = _walk_blocks(
        acc, l_i, m_i, poison, q, K, V, k_base, v_base, kv_row0, idx_row, stride_ik, n_full, n_vis, count,
        offs_tile_n, offs_d, pos_m, k_len, qk_scale, sink, window, stride_kn, stride_kd, stride_vn, stride_vd,
        BLOCK_N, PLAN_BLOCK_K, IS_DENSE, True, CAUSAL, HAS_BAND, USE_TMA, DOT_PRECISION, UPCAST_DOT)

    # Phase 3: token-level extra key columns (vertical lines), gathered EXTRA_N at a time. The list
    # is ascending, so the columns every row of the tile sees (< full_keys) form a prefix: its whole
    # tiles run without element masks, its partial last tile with only the padding masked, and
    # the rest (columns cut by the causal edge or past k_len) with element masks.
    if HAS_EXTRA:
        e_count = tl.load(ExtraCounts + b64 * stride_cb + ph * stride_ch + m_plan * stride_cm)
        e_row = ExtraIndices + b64 * stride_eb + ph * stride_eh + m_plan.to(tl.int64) * stride_em
        n_e_full = e_count * 0
        for c in range(0, e_count, COUNT_CHUNK):
            offs_c = c + tl.arange(0, COUNT_CHUNK)
            cols = tl.load(e_row + offs_c * stride_ek, mask=offs_c < e_count, other=2147483647)
            n_e_full += tl.sum((cols < full_keys).to(tl.int32))
        e_split = (n_e_full // EXTRA_N) * EXTRA_N
        # The partial tile gets padding-only masks when no column after it needs element masks
        # (then every tile still starts at a multiple of EXTRA_N, so the summation order does not
        # depend on where a program's rows start); else it joins the masked steps.
        if EXTRA_PAD_TAIL:
            e_masked = tl.where(n_e_full == e_count, e_count, e_split)
        else:
            e_masked = e_split
        acc, l_i, m_i, poison = _walk_extras(
            acc, l_i, m_i, poison, q, k_base, v_base, e_row, stride_ek, 0, e_split, offs_d, pos_m,
            k_len, qk_scale, stride_kn, stride_kd, stride_vn, stride_vd, EXTRA_N, 0, CAUSAL,
            DOT_PRECISION, UPCAST_DOT, EXTRA_STAGES, EXTRA_PAIR)
        if EXTRA_PAD_TAIL:
            acc, l_i, m_i, poison = _walk_extras(
                acc, l_i, m_i, poison, q, k_base, v_base, e_row, stride_ek, e_split, e_masked, offs_d, pos_m,
                k_len, qk_scale, stride_kn, stride_kd, stride_vn, stride_vd, EXTRA_N, 1, CAUSAL,
                DOT_PRECISION, UPCAST_DOT, EXTRA_STAGES)
        acc, l_i, m_i, poison = _walk_extras(
            acc, l_i, m_i, poison, q, k_base, v_base, e_row, stride_ek, e_masked, e_count, offs_d,
            pos_m, k_len, qk_scale, stride_kn, stride_kd, stride_vn, stride_vd, EXTRA_N, 2, CAUSAL,
            DOT_PRECISION, UPCAST_DOT, EXTRA_STAGES)

    has_mass = l_i > 0.0
    out = acc / tl.where(has_mass, l_i, 1.0)[:, None]
    out = tl.where(poison[:, None] > 0.0, float("nan"), out)
    o_ptrs = (Out + b64 * stride_ob + h_rows.to(tl.int64)[:, None] * stride_oh
              + offs_m.to(tl.int64)[:, None] * stride_om + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    if RETURN_LSE:
        lse = tl.where(has_mass, (m_i + tl.math.log2(tl.where(has_mass, l_i, 1.0))) * 0.6931471805599453,
                       float("-inf"))
        tl.store(Lse + b64 * stride_lb + h_rows.to(tl.int64) * stride_lh + offs_m, lse, mask=row_ok)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head_dim for 16-bit inputs on Hopper; chosen by
# the config sweep of `sparseattn bench kernel --sweep` (see BENCHMARKS.md).
# The last field turns on TMA (tensor-descriptor) loads of K/V where the inputs allow it. Sweep on
# the H100, 32K causal, 2026-11-22: D=128 (128,128,8,3,TMA) 15.9 ms dense vs 18.2 ms for the best
# pointer-load config; D=64 (64,128,4,3,TMA) 2.63 ms vs 2.97 ms.
_CONFIGS_16BIT = {
    16: (128, 64, 4, 3, False),
    32: (128, 64, 4, 3, False),
    64: (64, 128, 4, 3, True),
    128: (128, 128, 8, 3, True),
    256: (64, 32, 8, 2, False),
}
# Pack the heads of a GQA group into one program (K/V read once per group) when the plan allows.
# H100, 2026-11-22 (bench kernel --plan-heads both): D=128, G=4: 32K dense 16.7 -> 15.5 ms, 25 %
# 5.1 -> 4.1 ms; D=64, G=3 (padded to 4 rows): slower everywhere (0.22 -> 0.30 ms at 5 %), so off.
_PACK_GQA_DEFAULT = {16: False, 32: False, 64: False, 128: True, 256: False}
# float32 runs with exact (ieee) dot products: smaller tiles keep it in registers.
_CONFIGS_FP32 = {16: (64, 32, 4, 2), 32: (64, 32, 4, 2), 64: (64, 32, 4, 2), 128: (32, 32, 4, 2),
                 256: (16, 16, 4, 1)}
# The interpreter runs tiles as numpy arrays: small tiles exercise the sub-block paths.
_CONFIG_INTERPRET = (32, 32, 4, 1)


def default_config(head_dim: int, dtype: torch.dtype) -> tuple:
    if triton_interpreting():
        return _CONFIG_INTERPRET
    if dtype == torch.float32:
        return _CONFIGS_FP32[head_dim]
    return _CONFIGS_16BIT[head_dim]


# Software-pipeline stages of the extra-column loops. H100, 2026-11-23, vertical-slash plans on
# structured q/k (BENCHMARKS.md, prefill methods, session 8): 2 and 3 within
# ~5 % of each other (3 ahead with ~1000 extras per row, 2 with ~300); 1 slower; prefetching the
# next step's K/V into registers by hand slower than either.
EXTRA_STAGES = 2
# (stages, two tiles per unmasked step) of the extra-column loops per (head_dim, key tile), where
# they differ from (EXTRA_STAGES, unpaired). H100, 2026-11-24, scripts/sweep_extras.py on SmolLM2's
# q/k/v at 32K (BENCHMARKS.md, session 17; vertical-slash plans, 290-420 columns per row, layers
# 3 / 15 / 24, sum of kernel ms; q/k/v as captured, i.e. K/V through pointer loads, not TMA): with
# the block walk at 2 stages (see "extra" below) 1 stage 3.744, 2 stages 3.779; pairs raise the
# registers from 168 to 188-227 (fewer programs per SM): 4.18-4.21.
# The third field caps the registers per thread (None: the compiler's choice). At D=64 the kernel
# with extra columns holds 167 registers at 1 column stage: 3 programs of 4 warps per SM (65536 /
# 384 threads = 170). At 2 stages the compiler takes more (2 programs per SM, slower: session 17);
# capped at 168 it fits with no spills and the columns cost ~40 % less. Session 18 (H100,
# 2026-11-24, SmolLM2 32K layers 3 / 15 / 24, TMA; scripts/sweep_register_caps.py --set extra and
# scripts/ab_kernel_rules.py --rule regcap; BENCHMARKS.md "Session 18"): kernel 3.53 / 3.56 ms ->
# 3.39 / 3.38 (2 stages, 168; 160: 3.48 / 3.46); end to end 1.413 -> 1.347.
_EXTRA_RULES = {(64, 64): (2, False, 168)}
# The partial tile of columns every row sees runs with padding-only masks (no value checks).
EXTRA_PAD_TAIL = True

# Plans whose 64-blocks cut the tuned tile to 64 x 64: (walk unmasked blocks two per step,
# pipeline stages) per head_dim and plan kind. H100, 2026-11-23, scripts/sweep_plans.py on
# structured q/k/v at 32K (BENCHMARKS.md, prefill methods, session 11; ms, before -> after):
# D=64 block_topk 1.10 -> 1.05-1.08, vertical_slash (extras) 3.21 -> 2.81-2.83, random 35 %
# 1.14-1.16 -> 1.07-1.08; band plans (moa) slower paired (2.31 -> 2.39-2.44): unpaired.
# D=128: pairs slower at 2 stages; unpaired 2 stages beat 3 (block_topk 7.85 -> 6.96,
# random 35 % 8.77 -> 7.08, vertical_slash 19.4 -> 17.4) except band plans (moa 13.5 vs 14.7).
# Extra-column plans at D=64, 2026-11-24 (BENCHMARKS.md, session 17; SmolLM2 q/k/v at 32K, layers
# 3 / 15 / 24): 3 stages need 104 KB of shared memory (two programs per SM), 2 stages 72 KB
# (three). With these rules and the column rules above, scripts/ab_kernel_rules.py (contiguous
# q/k/v, TMA, 8 interleaved rounds) puts vertical-slash's estimate + kernel ratio at 1.454 -> 1.399
# (per round 0.958); the session-11 choice of 3 was on synthetic q/k.
# SALE's official 32-key tiles (64 x 32 plans), D=64, H100, 2026-11-24, scripts/sweep_sale.py on
# structured q/k/v at 32K (BENCHMARKS.md, fidelity, session 16; us, density 0.415, two runs):
# unpaired 1627 / 1634 (2 stages), 1585 / 1614 (3); paired 1467 / 1439 (2), 1457 / 1494 (3).
# Other (head_dim, tile, kind) keep the tuned tile's stages, unpaired.
_SMALL_BLOCK_RULES = {
    (64, 64): {"plain": (True, 2), "extra": (True, 2), "band": (False, 3)},
    (128, 64): {"plain": (False, 2), "extra": (False, 2), "band": (False, 3)},
    (64, 32): {"plain": (True, 2)},
}

# Sparse plans that keep the tuned tile (no extras, no band): (pipeline stages, register cap) per
# (head_dim, key tile). D=64's tuned tile (64 x 128 at 3 stages) takes 254 registers and 104 KB:
# two programs per SM. At 2 stages without a cap it takes 170 (still two); capped at 168, three,
# with no spills. H100, 2026-11-24, SmolLM2 32K layers 3 / 15 / 24 (BENCHMARKS.md "Session 18";
# sum of kernel ms, two rounds): flexprefill 4.14 / 4.20 -> 4.03 / 3.98, xattention 1.89 / 1.91 ->
# 1.82 / 1.84 (2 stages uncapped: 4.52 / 4.46, 2.05 / 2.04; 3 stages capped: spills, 4.27 / 1.99).
_PLAIN_TILE_RULES = {(64, 128): (2, 168)}

# The paired walk's widest key tile (a sweep may raise it to try pairs of 128-key tiles).
PAIR_MAX_BLOCK_N = 64

# Building two TMA descriptors costs ~30 us of host time per call; below this much work
# (B * Hq * Lq * Lk) the kernel is too short for TMA to pay that back.
TMA_MIN_WORK = 1 << 30


# The compiled kernel of the latest launch (diagnostics: registers, spills, shared memory).
_last_compiled: list = [None]


def last_compiled_kernel():
    """The compiled kernel of the latest ``attention_triton`` launch in this process (Triton's
    ``CompiledKernel``: ``n_regs``, ``n_spills``, ``metadata.shared`` on a GPU), or None."""
    return _last_compiled[0]


def _tma_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """TMA descriptors need contiguous K/V, 16-byte rows, and a Hopper+ GPU (not the interpreter)."""
    if triton_interpreting() or k.device.type != "cuda" or device_capability(k.device.index) < (9, 0):
        return False
    if q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] < TMA_MIN_WORK:
        return False
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return (k.is_contiguous() and v.is_contiguous() and k.shape[-1] * k.element_size() % 16 == 0
            and k.data_ptr() % 16 == 0 and v.data_ptr() % 16 == 0 and k.numel() > 0)


def _small_meta(t: Optional[torch.Tensor], shape) -> Optional[torch.Tensor]:
    """[B, H, nQ] metadata made contiguous in one common shape so they share strides."""
    if t is None:
        return None
    return t.expand(shape).contiguous()


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Optional[BlockPlan], *,
                     causal: bool = True, scale: Optional[float] = None, return_lse: bool = False,
                     config: Optional[tuple] = None, out: Optional[torch.Tensor] = None,
                     pack_gqa: Optional[bool] = None, pair_blocks: Optional[bool] = None,
                     extra_config: Optional[tuple] = None, max_registers: Optional[int] = None):
    """Launch the kernel on validated inputs (see ``block_sparse_attention``).

    ``config`` = ``(BLOCK_M, BLOCK_N, num_warps, num_stages[, use_tma])`` overrides the tuned default;
    ``out`` lets tests hand in a poisoned output buffer. ``pack_gqa`` (default per head_dim) packs
    the query heads of a GQA group into one program when the plan is shared by the group.
    ``pair_blocks`` walks a plan's unmasked blocks two per step where each block is one key tile
    of at most ``PAIR_MAX_BLOCK_N`` keys (default: ``_SMALL_BLOCK_RULES``). ``extra_config`` =
    ``(EXTRA_N, stages, pair, pad_tail)`` overrides how the plan's extra columns are walked: tile
    width, pipeline stages, two tiles per unmasked step, the partial tile of columns every row
    sees with padding-only masks (default: the key tile, then ``_EXTRA_RULES`` or ``EXTRA_STAGES``
    unpaired, and padding-only masks on). ``max_registers`` caps the registers per thread of the
    launch (CUDA only; default: ``_EXTRA_RULES``' cap for plans with extra columns,
    ``_PLAIN_TILE_RULES``' for plain plans on the tuned tile, else none; 0: none).
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if out is None:
        out = torch.empty((B, Hq, Lq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device) if return_lse else out
    if B == 0 or Lq == 0:
        return (out, lse) if return_lse else out

    block_m, block_n, num_warps, num_stages, *rest = config or default_config(D, q.dtype)
    use_tma = bool(rest and rest[0]) and _tma_ok(q, k, v)
    if plan is None:
        plan_block_q, plan_block_k = block_m, block_n
        counts = indices = band_sink = band_window = extra_counts = extra_indices = out  # unused
        plan_batch, plan_head_div = 1, 1
        stride_c = (0, 0, 0)
        stride_i = (0, 0, 0, 0)
        stride_e = (0, 0, 0, 0)
        has_band = has_extra = False
    else:
        plan_block_q, plan_block_k = plan.block_q, plan.block_k
        block_m, block_n = min(block_m, plan_block_q), min(block_n, plan_block_k)
        if block_m < 128 and num_warps > 4:
            # Tiles cut down to a plan's 64-blocks: 8 warps over a 64-row tile ran 1.7x slower than 4
            # (H100, 32K, 32/8/128, scripts/sweep_plans.py: block_topk 13.1 -> 7.8 ms, moa 27.5 -> 13.4).
            num_warps = 4
        plan_batch, plan_head_div = plan.batch, plan.head_divisor(Hq)
        shape = tuple(plan.kv_counts.shape)
        counts = _small_meta(plan.kv_counts, shape)
        indices = plan.kv_indices
        has_band, has_extra = plan.has_band, plan.has_extra
        band_sink = _small_meta(plan.band_sink, shape) if has_band else counts
        band_window = _small_meta(plan.band_window, shape) if has_band else counts
        extra_counts = _small_meta(plan.extra_counts, shape) if has_extra else counts
        extra_indices = plan.extra_indices if has_extra else indices
        stride_c = (counts.stride(0) if plan_batch > 1 else 0, counts.stride(1), counts.stride(2))
        stride_i = (indices.stride(0) if plan_batch > 1 else 0, *indices.stride()[1:])
        stride_e = ((extra_indices.stride(0) if plan_batch > 1 else 0, *extra_indices.stride()[1:])
                    if has_extra else (0, 0, 0, 0))

    k_arg, v_arg = k, v
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        k_arg = TensorDescriptor.from_tensor(k.view(B * Hkv * Lk, D), [block_n, D])
        v_arg = TensorDescriptor.from_tensor(v.view(B * Hkv * Lk, D), [block_n, D])
    # Only tiles cut to a plan's small blocks: two 128-key tiles per step need twice the registers and
    # shared memory of the tuned dense tile.
    small_blocks = plan is not None and block_n == plan_block_k and block_n <= PAIR_MAX_BLOCK_N
    kind = "band" if has_band else "extra" if has_extra else "plain"
    rule = _SMALL_BLOCK_RULES.get((D, block_n), {}).get(kind) if small_blocks and q.dtype != torch.float32 else None
    if rule is not None:
        rule_pair, rule_stages = rule
        if config is None:
            num_stages = rule_stages
        if pair_blocks is None:
            pair_blocks = rule_pair
    pair_blocks = bool(pair_blocks) and small_blocks
    plain_rule = None
    if plan is not None and kind == "plain" and not small_blocks and q.dtype != torch.float32 and config is None:
        plain_rule = _PLAIN_TILE_RULES.get((D, block_n))
        if plain_rule is not None:
            num_stages = plain_rule[0]
    group = Hq // Hkv
    pack = 1
    if pack_gqa is None:
        pack_gqa = _PACK_GQA_DEFAULT.get(D, False)
    if pack_gqa and group > 1 and (plan is None or plan.heads in (1, Hkv)):
        pack = triton.next_power_of_2(group)
        if block_m < pack:  # fewer rows than heads in the group: no room to pack
            pack = 1
    positions_per_tile = block_m // pack
    if plan is None:
        plan_block_q = positions_per_tile
    num_q_tiles = triton.cdiv(Lq, positions_per_tile)
    grid = (num_q_tiles, B * (Hkv if pack > 1 else Hq))
    extra_rule = _EXTRA_RULES.get((D, block_n), (EXTRA_STAGES, False, None)) if q.dtype != torch.float32 else (
        EXTRA_STAGES, False, None)
    extra_n, extra_stages, extra_pair, extra_pad_tail = extra_config or (block_n, *extra_rule[:2], EXTRA_PAD_TAIL)
    if max_registers is None:
        max_registers = extra_rule[2] if has_extra else plain_rule[1] if plain_rule is not None else None
    launch_options = {}
    if max_registers and q.device.type == "cuda" and torch.version.cuda and not triton_interpreting():
        launch_options["maxnreg"] = int(max_registers)
    if extra_n & (extra_n - 1) or not 16 <= extra_n <= 256:
        raise ValueError(f"extra_config: EXTRA_N must be a power of two in [16, 256], got {extra_n}")
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
    # Triton's interpreter (3.9) computes bf16 dot products wrongly; there we upcast the operands,
    # which gives the same math as a bf16 tensor-core product with fp32 accumulation.
    upcast_dot = q.dtype == torch.bfloat16 and triton_interpreting()
    _last_compiled[0] = _block_sparse_fwd[grid](
        q, k_arg, v_arg, out, lse,
        counts, indices, band_sink, band_window, extra_counts, extra_indices,
        scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        lse.stride(0), lse.stride(1),
        *stride_c, *stride_i, *stride_e,
        Hq, Hkv, Lq, Lk, num_q_tiles, group, plan_head_div, k, v,
        HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n,
        PLAN_BLOCK_Q=plan_block_q, PLAN_BLOCK_K=plan_block_k,
        IS_DENSE=plan is None, CAUSAL=causal, HAS_BAND=has_band, HAS_EXTRA=has_extra,
        RETURN_LSE=return_lse, DOT_PRECISION=dot_precision, UPCAST_DOT=upcast_dot, USE_TMA=use_tma,
        COUNT_CHUNK=128, GROUP_PACK=pack, EXTRA_STAGES=extra_stages, PAIR_BLOCKS=pair_blocks,
        EXTRA_N=extra_n, EXTRA_PAIR=bool(extra_pair), EXTRA_PAD_TAIL=bool(extra_pad_tail),
        num_warps=num_warps, num_stages=num_stages, **launch_options,
    )
    return (out, lse) if return_lse else out
