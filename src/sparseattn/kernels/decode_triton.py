"""Triton sparse decode attention over a paged K/V cache (flash-decoding with page gathers).

Tiers: ``_decode_fwd`` / ``_merge_splits`` (the ``@triton.jit`` kernels) -> ``_launch`` (grid,
strides, split count) -> ``decode_attention_triton`` (called by
``sparseattn.sparse_decode_attention`` after validation).

One program owns one (batch, KV head, split) and *all* ``G * Lq`` query rows of that GQA group
(``G = Hq / Hkv``, ``Lq`` = 1 for decode, a few for speculative verification): every selected
K/V tile is read once for the whole group. The selection is walked as a stream of tokens:
selected page ``e`` contributes stream positions ``[e * P, (e + 1) * P)``, extra token ``t``
one position; a tile of ``BLOCK_N`` stream positions may span several pages (or part of one),
and each row's address comes from the page table. Split-K (flash-decoding): the selected pages
(and tokens) are cut into ``num_splits`` equal ranges, one program each, so a single long
sequence fills the GPU; each split writes a normalised fp32 partial output and its
log-sum-exp, and ``_merge_splits`` combines them (``o = sum_s exp(lse_s - lse) o_s``). With one
split the first kernel writes the final output directly. Softmax runs online in base 2 with fp32
accumulators; every offset that scales with the pool or the sequence is 64-bit.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .dispatch import dependent_launch, pdl_kwargs, triton_interpreting

LOG2E = 1.4426950408889634


@triton.jit
def _attend(acc, l_i, m_i, poison, q, k, v, pos, ok, qpos, qk_scale,
            CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """One online-softmax step of the group's rows over a tile of gathered keys/values."""
    if UPCAST_DOT:
        qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    return _attend_scores(acc, l_i, m_i, poison, qk, v, pos, ok, qpos, qk_scale, CAUSAL, DOT_PRECISION, UPCAST_DOT)


@triton.jit
def _attend_scores(acc, l_i, m_i, poison, qk, v, pos, ok, qpos, qk_scale,
                   CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """The online-softmax step of :func:`_attend` from the tile's logits ``qk`` (times ``qk_scale``:
    base-2 units).

    Non-finite values: under ``CAUSAL`` rows see different tokens, so each tile zeroes its
    non-finite value rows and marks (``poison``) the rows that give them weight. Without it every
    row sees the same tokens and a non-finite value reaches every row's accumulator by itself
    (``p * inf``, ``0 * nan``); ``_decode_fwd`` checks the accumulators once at the end instead,
    which keeps this per-tile work off the memory-bound walk."""
    keep = ok[None, :]
    if CAUSAL:  # Lq > 1: query i sees the new tokens up to itself only
        keep = keep & (pos[None, :] <= qpos[:, None])
    qk = tl.where(keep, qk * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # A row that has seen no key yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    if CAUSAL:
        # Tokens whose value row is not finite: rows that attend them become NaN at the end, rows
        # that mask them must not see 0 * NaN.
        v_rowsum = tl.sum(v.to(tl.float32) * 0.0, 1)
        v_bad = tl.where(v_rowsum == 0.0, 0.0, 1.0)
        v = tl.where(v_bad[:, None] == 0.0, v, tl.zeros_like(v))
        poison = tl.maximum(poison, tl.max(p * v_bad[None, :], 1))
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if UPCAST_DOT:  # same rounding of p as the GPU path, then an exact fp32 product
        acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new, poison


@triton.jit
def _load_kv(k_head, v_head, phys, slot, ok, offs_d, stride_kp, stride_ks, stride_kd, stride_vp, stride_vs,
             stride_vd):
    """The tile's K/V rows (page ``phys``, slot ``slot``; zeros where not ``ok``)."""
    phys64 = phys.to(tl.int64)
    slot64 = slot.to(tl.int64)
    k_ptrs = k_head + phys64[:, None] * stride_kp + slot64[:, None] * stride_ks + offs_d[None, :] * stride_kd
    v_ptrs = v_head + phys64[:, None] * stride_vp + slot64[:, None] * stride_vs + offs_d[None, :] * stride_vd
    k = tl.load(k_ptrs, mask=ok[:, None], other=0.0)
    v = tl.load(v_ptrs, mask=ok[:, None], other=0.0)
    return k, v


@triton.jit
def _tile_addresses(idx_row, table_row, offs, end, seq_len, table_width, stride_ik, stride_tp,
                    PAGE_SIZE: tl.constexpr, PAGES: tl.constexpr):
    """Stream positions ``offs`` (< ``end``) of a page selection (``PAGES``) or a token list:
    (physical page, slot, token position, ok). Two dependent loads: the selection, the page table."""
    in_range = offs < end  # never into the next split's range
    if PAGES:
        entry = offs // PAGE_SIZE
        slot = offs - entry * PAGE_SIZE
        lp = tl.load(idx_row + entry.to(tl.int64) * stride_ik, mask=in_range, other=0)
        pos = lp * PAGE_SIZE + slot
        ok = in_range & (lp >= 0) & (lp < table_width) & (pos < seq_len)
    else:
        pos = tl.load(idx_row + offs.to(tl.int64) * stride_ik, mask=in_range, other=0)
        ok = in_range & (pos >= 0) & (pos < seq_len)
        lp = pos // PAGE_SIZE
        slot = pos - lp * PAGE_SIZE
    phys = tl.load(table_row + lp.to(tl.int64) * stride_tp, mask=ok, other=0)
    return phys, slot, pos, ok


@triton.jit
def _walk_selection(acc, l_i, m_i, poison, q, k_head, v_head, idx_row, table_row, start, end, seq_len, table_width,
                    offs_n, offs_d, qpos, qk_scale, stride_ik, stride_tp,
                    stride_kp, stride_ks, stride_kd, stride_vp, stride_vs, stride_vd,
                    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PAGES: tl.constexpr, PREFETCH: tl.constexpr,
                    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Attend stream positions [start, end) of a selection, one BLOCK_N tile at a time.

    Every tile's K/V address sits behind two dependent loads (selection entry, page table).
    ``PREFETCH`` 1 issues the next tile's addresses before this tile is attended; 2 also loads the
    next tile's K/V there (registers), so the address chain and the K/V reads overlap compute."""
    if PREFETCH == 0:
        for s in range(start, end, BLOCK_N):
            phys, slot, pos, ok = _tile_addresses(idx_row, table_row, s + offs_n, end, seq_len, table_width,
                                                  stride_ik, stride_tp, PAGE_SIZE, PAGES)
            k, v = _load_kv(k_head, v_head, phys, slot, ok, offs_d, stride_kp, stride_ks, stride_kd, stride_vp,
                            stride_vs, stride_vd)
            acc, l_i, m_i, poison = _attend(acc, l_i, m_i, poison, q, k, v, pos, ok, qpos, qk_scale, CAUSAL,
                                            DOT_PRECISION, UPCAST_DOT)
    elif PREFETCH == 1:
        phys, slot, pos, ok = _tile_addresses(idx_row, table_row, start + offs_n, end, seq_len, table_width,
                                              stride_ik, stride_tp, PAGE_SIZE, PAGES)
        for s in range(start, end, BLOCK_N):
            k, v = _load_kv(k_head, v_head, phys, slot, ok, offs_d, stride_kp, stride_ks, stride_kd, stride_vp,
                            stride_vs, stride_vd)
            n_phys, n_slot, n_pos, n_ok = _tile_addresses(idx_row, table_row, s + BLOCK_N + offs_n, end, seq_len,
                                                          table_width, stride_ik, stride_tp, PAGE_SIZE, PAGES)
            acc, l_i, m_i, poison = _attend(acc, l_i, m_i, poison, q, k, v, pos, ok, qpos, qk_scale, CAUSAL,
                                            DOT_PRECISION, UPCAST_DOT)
            phys, slot, pos, ok = n_phys, n_slot, n_pos, n_ok
    else:
        phys, slot, pos, ok = _tile_addresses(idx_row, table_row, start + offs_n, end, seq_len, table_width,
                                              stride_ik, stride_tp, PAGE_SIZE, PAGES)
        k, v = _load_kv(k_head, v_head, phys, slot, ok, offs_d, stride_kp, stride_ks, stride_kd, stride_vp,
                        stride_vs, stride_vd)
        phys, slot, n_pos, n_ok = _tile_addresses(idx_row, table_row, start + BLOCK_N + offs_n, end, seq_len,
                                                  table_width, stride_ik, stride_tp, PAGE_SIZE, PAGES)
        for s in range(start, end, BLOCK_N):
            n_k, n_v = _load_kv(k_head, v_head, phys, slot, n_ok, offs_d, stride_kp, stride_ks, stride_kd,
                                stride_vp, stride_vs, stride_vd)
            phys, slot, nn_pos, nn_ok = _tile_addresses(idx_row, table_row, s + 2 * BLOCK_N + offs_n, end,
                                                        seq_len, table_width, stride_ik, stride_tp, PAGE_SIZE,
                                                        PAGES)
            acc, l_i, m_i, poison = _attend(acc, l_i, m_i, poison, q, k, v, pos, ok, qpos, qk_scale, CAUSAL,
                                            DOT_PRECISION, UPCAST_DOT)
            k, v, pos, ok, n_pos, n_ok = n_k, n_v, n_pos, n_ok, nn_pos, nn_ok
    return acc, l_i, m_i, poison


@triton.jit
def _walk_given_logits(acc, l_i, m_i, poison, v_head, idx_row, table_row, lg_rows, row_ok, start, end, seq_len,
                       table_width, offs_n, offs_d, qpos, logit_scale, stride_ik, stride_tp,
                       stride_vp, stride_vs, stride_vd,
                       PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """The token walk over list lanes [start, end) when the step's logits over the list are given
    (``lg_rows``: each row's logits, lane ``j`` at ``+ j``): only values are read. The next tile's
    addresses are issued before this tile is attended, as in ``_walk_selection``'s prefetch 1."""
    phys, slot, pos, ok = _tile_addresses(idx_row, table_row, start + offs_n, end, seq_len, table_width,
                                          stride_ik, stride_tp, PAGE_SIZE, False)
    for s in range(start, end, BLOCK_N):
        qk = tl.load(lg_rows[:, None] + (s + offs_n)[None, :], mask=row_ok[:, None] & ok[None, :],
                     other=float("-inf"))
        v = tl.load(v_head + phys.to(tl.int64)[:, None] * stride_vp + slot.to(tl.int64)[:, None] * stride_vs
                    + offs_d[None, :] * stride_vd, mask=ok[:, None], other=0.0)
        n_phys, n_slot, n_pos, n_ok = _tile_addresses(idx_row, table_row, s + BLOCK_N + offs_n, end, seq_len,
                                                      table_width, stride_ik, stride_tp, PAGE_SIZE, False)
        acc, l_i, m_i, poison = _attend_scores(acc, l_i, m_i, poison, qk, v, pos, ok, qpos, logit_scale, CAUSAL,
                                               DOT_PRECISION, UPCAST_DOT)
        phys, slot, pos, ok = n_phys, n_slot, n_pos, n_ok
    return acc, l_i, m_i, poison


@triton.jit
def _decode_fwd(
    Q, KP, VP, Table, Lengths, PCounts, PIdx, TCounts, TIdx,
    Out, Lse, OPart, LPart, TLogits,
    qk_scale, logit_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kp, stride_kh, stride_ks, stride_kd,
    stride_vp, stride_vh, stride_vs, stride_vd,
    stride_tb, stride_tp,
    stride_pcb, stride_pch, stride_pib, stride_pih, stride_pik,
    stride_tcb, stride_tch, stride_tib, stride_tih, stride_tik,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    stride_xb, stride_xh, stride_xm, stride_xs, stride_xd,
    stride_yb, stride_yh, stride_ym, stride_ys,
    stride_gb, stride_gh, stride_gr,
    num_kv_heads, q_len, table_width, pages_per_split, tokens_per_split,
    PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DENSE: tl.constexpr, HAS_PAGES: tl.constexpr, HAS_TOKENS: tl.constexpr, CAUSAL: tl.constexpr,
    SPLIT: tl.constexpr, RETURN_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    PREFETCH: tl.constexpr, PDL: tl.constexpr, GIVEN_LOGITS: tl.constexpr,
):
    if PDL:  # launched before the selection kernel finished: wait for its writes, let the merge launch
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    split = tl.program_id(0)
    bh = tl.program_id(1)
    mt = tl.program_id(2)
    b = bh // num_kv_heads
    hk = bh % num_kv_heads
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    seq_len = tl.load(Lengths + b)

    # Rows of this program: query head h = hk * GROUP + r // q_len, new token i = r % q_len.
    rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP * q_len
    h64 = (hk * GROUP + rows // q_len).to(tl.int64)
    qi64 = (rows % q_len).to(tl.int64)
    qpos = seq_len - q_len + rows % q_len  # absolute position of each row's query
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    q_ptrs = Q + b64 * stride_qb + h64[:, None] * stride_qh + qi64[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)

    k_head = KP + hk64 * stride_kh
    v_head = VP + hk64 * stride_vh
    table_row = Table + b64 * stride_tb

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    poison = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    if DENSE:
        # Every token: stream position == token position.
        s0 = split * pages_per_split * PAGE_SIZE
        s1 = tl.minimum(s0 + pages_per_split * PAGE_SIZE, seq_len)
        for s in range(s0, s1, BLOCK_N):
            pos = s + offs_n
            ok = pos < s1
            lp = pos // PAGE_SIZE
            phys = tl.load(table_row + lp.to(tl.int64) * stride_tp, mask=ok, other=0)
            k, v = _load_kv(k_head, v_head, phys, pos - lp * PAGE_SIZE, ok, offs_d, stride_kp, stride_ks, stride_kd,
                            stride_vp, stride_vs, stride_vd)
            acc, l_i, m_i, poison = _attend(acc, l_i, m_i, poison, q, k, v, pos, ok, qpos, qk_scale, CAUSAL,
                                            DOT_PRECISION, UPCAST_DOT)
    if HAS_PAGES:
        p_count = tl.load(PCounts + b64 * stride_pcb + hk64 * stride_pch)
        e0 = split * pages_per_split
        e1 = tl.minimum(e0 + pages_per_split, p_count)
        acc, l_i, m_i, poison = _walk_selection(
            acc, l_i, m_i, poison, q, k_head, v_head, PIdx + b64 * stride_pib + hk64 * stride_pih, table_row,
            e0 * PAGE_SIZE, e1 * PAGE_SIZE, seq_len, table_width, offs_n, offs_d, qpos, qk_scale, stride_pik,
            stride_tp, stride_kp, stride_ks, stride_kd, stride_vp, stride_vs, stride_vd,
            PAGE_SIZE, BLOCK_N, True, PREFETCH, CAUSAL, DOT_PRECISION, UPCAST_DOT)
    if HAS_TOKENS:
        t_count = tl.load(TCounts + b64 * stride_tcb + hk64 * stride_tch)
        t0 = split * tokens_per_split
        t1 = tl.minimum(t0 + tokens_per_split, t_count)
        if GIVEN_LOGITS:  # the logits of these rows over the list: row r = (head r // q_len, query r % q_len)
            lg_rows = TLogits + b64 * stride_gb + hk64 * stride_gh + rows.to(tl.int64) * stride_gr
            acc, l_i, m_i, poison = _walk_given_logits(
                acc, l_i, m_i, poison, v_head, TIdx + b64 * stride_tib + hk64 * stride_tih, table_row, lg_rows,
                row_ok, t0, t1, seq_len, table_width, offs_n, offs_d, qpos, logit_scale, stride_tik, stride_tp,
                stride_vp, stride_vs, stride_vd, PAGE_SIZE, BLOCK_N, CAUSAL, DOT_PRECISION, UPCAST_DOT)
        else:
            acc, l_i, m_i, poison = _walk_selection(
                acc, l_i, m_i, poison, q, k_head, v_head, TIdx + b64 * stride_tib + hk64 * stride_tih, table_row,
                t0, t1, seq_len, table_width, offs_n, offs_d, qpos, qk_scale, stride_tik,
                stride_tp, stride_kp, stride_ks, stride_kd, stride_vp, stride_vs, stride_vd,
                PAGE_SIZE, BLOCK_N, False, PREFETCH, CAUSAL, DOT_PRECISION, UPCAST_DOT)

    if not CAUSAL:  # one query per head: a non-finite value made every row's accumulator non-finite
        poison = tl.where(tl.sum(acc * 0.0, 1) == 0.0, 0.0, 1.0)
    has_mass = l_i > 0.0
    out = acc / tl.where(has_mass, l_i, 1.0)[:, None]
    out = tl.where(poison[:, None] > 0.0, float("nan"), out)
    lse = tl.where(has_mass, (m_i + tl.math.log2(tl.where(has_mass, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    if SPLIT:
        x_ptrs = (OPart + b64 * stride_xb + h64[:, None] * stride_xh + qi64[:, None] * stride_xm
                  + split * stride_xs + offs_d[None, :] * stride_xd)
        tl.store(x_ptrs, out, mask=row_ok[:, None])
        tl.store(LPart + b64 * stride_yb + h64 * stride_yh + qi64 * stride_ym + split * stride_ys, lse, mask=row_ok)
    else:
        o_ptrs = (Out + b64 * stride_ob + h64[:, None] * stride_oh + qi64[:, None] * stride_om
                  + offs_d[None, :] * stride_od)
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
        if RETURN_LSE:
            tl.store(Lse + b64 * stride_lb + h64 * stride_lh + qi64 * stride_lm, lse, mask=row_ok)


@triton.jit
def _merge_splits(
    OPart, LPart, Out, Lse,
    stride_xb, stride_xh, stride_xm, stride_xs, stride_xd,
    stride_yb, stride_yh, stride_ym, stride_ys,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    num_heads, q_len, num_splits,
    HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr, RETURN_LSE: tl.constexpr, PDL: tl.constexpr,
):
    """One query row: ``lse = logsumexp_s lse_s``, ``o = sum_s exp(lse_s - lse) o_s`` (0 / -inf if empty)."""
    if PDL:  # scheduled while the split kernel runs: wait for its partials
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0)
    b = row // (num_heads * q_len)
    rem = row % (num_heads * q_len)
    b64 = b.to(tl.int64)
    h64 = (rem // q_len).to(tl.int64)
    i64 = (rem % q_len).to(tl.int64)
    offs_s = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, HEAD_DIM)
    s_ok = offs_s < num_splits
    lse_s = tl.load(LPart + b64 * stride_yb + h64 * stride_yh + i64 * stride_ym + offs_s * stride_ys,
                    mask=s_ok, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_safe)  # 0 for empty splits
    den = tl.sum(w, 0)
    o_s = tl.load(OPart + b64 * stride_xb + h64 * stride_xh + i64 * stride_xm + offs_s[:, None] * stride_xs
                  + offs_d[None, :] * stride_xd, mask=s_ok[:, None], other=0.0)
    out = tl.sum(w[:, None] * o_s, 0) / tl.where(den > 0.0, den, 1.0)
    tl.store(Out + b64 * stride_ob + h64 * stride_oh + i64 * stride_om + offs_d * stride_od,
             out.to(Out.dtype.element_ty))
    if RETURN_LSE:
        lse = tl.where(den > 0.0, m_safe + tl.log(tl.where(den > 0.0, den, 1.0)), float("-inf"))
        tl.store(Lse + b64 * stride_lb + h64 * stride_lh + i64 * stride_lm, lse)


# (BLOCK_N, num_warps, num_stages): decode tiles are short in M (the GQA group), so the key tile
# and the number of loads in flight set the speed. Since session 9 the value tiles go straight to
# shared memory (no per-tile finiteness check at Lq = 1, see ``_attend``), which moved the best
# configs; H100 sweep of session 9 (scripts/sweep_decode.py --per-sm 1,2,4,8, bf16, dense, us, SDPA
# cuDNN in brackets): D=128 (64, 4, 2) at 4 programs per SM: 32K B=1 52.9 [51.2], 128K B=1 184.6
# [180.7], 32K B=8 357.4 [350.8], 128K B=8 1409.9 [1387.2] (the old (128, 4, 3) now gave 201.6 /
# 1598 at the same splits); D=64 (128, 4, 3): 32K B=1 12.0 [11.8], 128K B=1 41.9 [39.9], B=8 73.4
# [72.1] / 272.4 [262.4].
_CONFIGS_16BIT = {16: (64, 4, 2), 32: (64, 4, 2), 64: (128, 4, 3), 128: (64, 4, 2), 256: (32, 4, 2)}
# A dense walk with many (sequence, KV head) pairs fills the GPU with few splits: long 256-key
# tiles at 2 programs per SM stream best there (same sweep, D=128 B=8: 32K 355.9 us, 128K 1376.2
# us, i.e. 0.99x and 1.01x SDPA; at B=1 this config gave 56.6 / 183.2 us).
_WIDE_CONFIGS_16BIT = {128: (256, 8, 2)}
WIDE_PROGRAMS_PER_SM = 2
# Long selections (not dense, over SHORT_SELECTION_TOKENS, e.g. DuoAttention's retrieval heads
# listing every page next to streaming heads with a few) stream best with the old dense tiles: H100,
# bench decode --methods duo, 32/8/128 (ms, 128K B=1 / B=8, 32K B=1 / B=8): (128, 4, 3) 0.138 / 0.751 /
# 0.065 / 0.229; (64, 4, 2) 0.145 / 0.943 / 0.067 / 0.268; (128, 4, 2) 0.139 / 0.776 / 0.065 / 0.233;
# wide (256, 8, 2) at 2 per SM 0.145 / 0.781 / 0.066 / 0.250; (128, 8, 2) 0.169 / 1.002.
_LONG_SELECTION_CONFIGS_16BIT = {128: (128, 4, 3)}
# Wide once the (sequence, KV head, row tile) pairs number at least a quarter of the SMs.
WIDE_MIN_PAIRS_PER_SM = 0.25
# Selections (pages / tokens, not dense) are short walks of gathered pages: smaller key tiles and
# more, shorter splits. H100, scripts/sweep_decode.py --cases pages (2048 random tokens, 128K,
# 2026-11-23): 32/8/128 B=1 10.2 -> 8.9 us with (32, 4, 2) at 64 splits, B=8 38.1 -> 36.4 us;
# 9/3/64 B=1 8.0 -> 6.0 us. The 4th field is the walk's prefetch (see ``_walk_selection``): same
# sweep with prefetch (session 6): 32/8/128 B=8 35.7 -> 33.7 us with (32, 4, 2, 1), B=1 unchanged
# (8.7-9.0 us); 9/3/64 B=8 10.0 -> 9.8 us with (32, 4, 1, 1) at 44 splits. Session 9 (values to
# shared memory): 32/8/128 B=8 31.5 us (2.13 TB/s), 9/3/64 B=8 9.0 us.
_SPARSE_CONFIGS_16BIT = {64: (32, 4, 1, 1), 128: (32, 4, 2, 1)}
_CONFIGS_FP32 = {16: (32, 4, 2), 32: (32, 4, 2), 64: (32, 4, 2), 128: (32, 4, 2), 256: (16, 4, 1)}
# The interpreter runs tiles as numpy arrays: small tiles that span two 16-token pages.
_CONFIG_INTERPRET = (32, 4, 1)
MAX_BLOCK_M = 64  # query rows (G * Lq) per program; more rows go to more programs
MAX_SPLITS = 128
# A split reads at least this many selected tokens (the interpreter uses fewer so tests split).
MIN_TOKENS_PER_SPLIT = 64
MIN_TOKENS_PER_SPLIT_SPARSE = 32  # one 32-token tile per split at B=1 (the sweep above)
# Split until about this many programs per SM, rounding the split count down: the H100 sweep
# (scripts/sweep_decode.py, dense, 32K/128K, B=1/8) found 4 per SM best for D=64 and D=128, and a
# count that spills a few programs into one more wave costs ~10 % (32/8/128 B=8 128K: 8 splits
# 1.41 ms, 17 splits 1.57 ms, SDPA 1.39 ms).
PROGRAMS_PER_SM = 4
# Selections at D=64 are light programs: the same sweep found twice as many best (9/3/64 B=8:
# 44 splits 10.0 us, 22 splits 10.6 us); D=128 keeps 4 per SM (8 splits 35.7 us, 16 splits slower).
SPARSE_PROGRAMS_PER_SM = {64: 8}
MIN_TOKENS_PER_SPLIT_INTERPRET = 32
INTERPRET_TARGET_PROGRAMS = 16


# A selection counts as short (small tiles, prefetch, more splits) up to this many tokens per
# (sequence, KV head). Longer ones, e.g. DuoAttention's retrieval heads listing every page, stream
# like a dense walk and keep its config: with the short-selection config duo's 128K step at
# 32/8/128 B=8 took 1.41 ms against 0.78 ms (H100, bench decode, session 6).
SHORT_SELECTION_TOKENS = 8192


def short_selection(dense: bool, stream_tokens: int) -> bool:
    """Whether a walk of ``stream_tokens`` selected positions takes the short-selection config."""
    return not dense and stream_tokens <= SHORT_SELECTION_TOKENS


def default_config(head_dim: int, dtype: torch.dtype, sparse: bool = False, wide: bool = False,
                   long_selection: bool = False) -> tuple:
    """(BLOCK_N, num_warps, num_stages) for a dense walk, a ``wide`` one (see :func:`wide_walk`),
    (``sparse``) a short selection or a ``long_selection`` (see :func:`short_selection`)."""
    if triton_interpreting():
        return _CONFIG_INTERPRET
    if dtype == torch.float32:
        return _CONFIGS_FP32[head_dim]
    if sparse and head_dim in _SPARSE_CONFIGS_16BIT:
        return _SPARSE_CONFIGS_16BIT[head_dim]
    if long_selection and head_dim in _LONG_SELECTION_CONFIGS_16BIT:
        return _LONG_SELECTION_CONFIGS_16BIT[head_dim]
    if wide and head_dim in _WIDE_CONFIGS_16BIT:
        return _WIDE_CONFIGS_16BIT[head_dim]
    return _CONFIGS_16BIT[head_dim]


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: Optional[int]) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def wide_walk(dense: bool, programs: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a dense walk over ``programs`` (sequence, KV head, row tile) pairs takes the wide
    config: a 16-bit head size that has one, on a GPU, with enough pairs to fill it at few splits."""
    if not dense or dtype == torch.float32 or head_dim not in _WIDE_CONFIGS_16BIT:
        return False
    if triton_interpreting() or device.type != "cuda":
        return False
    return programs >= WIDE_MIN_PAIRS_PER_SM * _sm_count(device.index)


def choose_num_splits(programs: int, stream_tokens: int, device: torch.device, sparse: bool = False,
                      head_dim: int = 128, wide: bool = False) -> int:
    """Splits per (batch, KV head, row tile): enough programs to fill the GPU, each with real work.

    Depends on shapes only (selection widths, never counts), so it costs no host sync.
    """
    if triton_interpreting() or device.type != "cuda":
        target, min_tokens = INTERPRET_TARGET_PROGRAMS, MIN_TOKENS_PER_SPLIT_INTERPRET
    else:
        if wide:
            per_sm = WIDE_PROGRAMS_PER_SM
        elif sparse:
            per_sm = SPARSE_PROGRAMS_PER_SM.get(head_dim, PROGRAMS_PER_SM)
        else:
            per_sm = PROGRAMS_PER_SM
        target = per_sm * _sm_count(device.index)
        min_tokens = MIN_TOKENS_PER_SPLIT_SPARSE if sparse else MIN_TOKENS_PER_SPLIT
    by_occupancy = max(1, target // max(programs, 1))
    by_work = max(1, stream_tokens // min_tokens)
    return max(1, min(by_occupancy, by_work, MAX_SPLITS))


def _sel_strides(counts: Optional[torch.Tensor], idx: Optional[torch.Tensor]) -> tuple:
    """Strides of a [B|1, H|1] count tensor and a [B|1, H|1, W] index tensor; 0 on broadcast dims."""
    if counts is None:
        return (0, 0), (0, 0, 0)
    sc = tuple(0 if counts.shape[i] == 1 else counts.stride(i) for i in range(2))
    si = tuple(0 if idx.shape[i] == 1 else idx.stride(i) for i in range(2)) + (idx.stride(2),)
    return sc, si


def decode_attention_triton(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                            page_table: torch.Tensor, lengths: torch.Tensor, *, page_size: int,
                            pages: Optional[torch.Tensor] = None, page_counts: Optional[torch.Tensor] = None,
                            tokens: Optional[torch.Tensor] = None, token_counts: Optional[torch.Tensor] = None,
                            dense: bool = False, dense_pages: int = 0, scale: Optional[float] = None,
                            return_lse: bool = False, num_splits: Optional[int] = None,
                            config: Optional[tuple] = None, out: Optional[torch.Tensor] = None,
                            token_logits: Optional[torch.Tensor] = None, logits_scale: Optional[float] = None):
    """Launch the decode kernel on validated inputs (see ``sparse_decode_attention``).

    Same arguments as :func:`sparseattn.kernels.decode_reference.decode_attention_reference`
    (``token_logits`` / ``logits_scale`` included: the token walk then reads values only),
    plus ``num_splits`` (default: chosen from the shapes), ``config = (BLOCK_N, num_warps,
    num_stages[, prefetch])`` and ``out`` (tests hand in a poisoned buffer).
    """
    B, Hq, Lq, D = q.shape
    Hkv = k_pages.shape[1]
    G = Hq // Hkv
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if out is None:
        out = torch.empty((B, Hq, Lq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device) if return_lse else out
    if B == 0 or Lq == 0:
        return (out, lse) if return_lse else out

    # Split sizes come from the selection's widths (shapes), not its counts: no host sync.
    width_pages = dense_pages if dense else (pages.shape[-1] if pages is not None else 0)
    width_tokens = tokens.shape[-1] if tokens is not None else 0
    stream_tokens = width_pages * page_size + width_tokens
    short = short_selection(dense, stream_tokens)
    rows = G * Lq
    block_m = min(max(16, _pow2_at_least(rows)), MAX_BLOCK_M)
    row_tiles = triton.cdiv(rows, block_m)
    wide = wide_walk(dense, B * Hkv * row_tiles, D, q.dtype, q.device)
    block_n, num_warps, num_stages, *rest = config or default_config(D, q.dtype, sparse=short, wide=wide,
                                                                     long_selection=not dense and not short)
    prefetch = int(rest[0]) if rest else 0

    if num_splits is None:
        num_splits = choose_num_splits(B * Hkv * row_tiles, stream_tokens, q.device, sparse=short, head_dim=D,
                                       wide=wide)
    num_splits = max(1, int(num_splits))
    pages_per_split = max(1, triton.cdiv(width_pages, num_splits))
    if block_n % page_size == 0:  # whole tiles per split
        step = block_n // page_size
        pages_per_split = triton.cdiv(pages_per_split, step) * step
    tokens_per_split = max(1, triton.cdiv(width_tokens, num_splits))
    tokens_per_split = triton.cdiv(tokens_per_split, block_n) * block_n
    num_splits = max(1, triton.cdiv(width_pages, pages_per_split), triton.cdiv(width_tokens, tokens_per_split))
    split = num_splits > 1

    if split:
        o_part = torch.empty((B, Hq, Lq, num_splits, D), dtype=torch.float32, device=q.device)
        l_part = torch.empty((B, Hq, Lq, num_splits), dtype=torch.float32, device=q.device)
    else:
        o_part, l_part = out, lse  # unused
    has_pages, has_tokens = pages is not None and not dense, tokens is not None
    sc_p, si_p = _sel_strides(page_counts if has_pages else None, pages if has_pages else None)
    sc_t, si_t = _sel_strides(token_counts if has_tokens else None, tokens if has_tokens else None)
    dummy = lengths
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
    # Triton's interpreter (3.9) computes bf16 dot products wrongly; there we upcast the operands,
    # which gives the same math as a bf16 tensor-core product with fp32 accumulation.
    upcast_dot = q.dtype == torch.bfloat16 and triton_interpreting()
    lse_strides = (lse.stride(0), lse.stride(1), lse.stride(2)) if return_lse else (0, 0, 0)
    part_o = o_part.stride() if split else (0, 0, 0, 0, 0)
    part_l = l_part.stride() if split else (0, 0, 0, 0)

    given = token_logits is not None and has_tokens
    if given:
        # [B, Hkv, G, Lq, W] with the (G, Lq) rows evenly strided: row r = g * Lq + i
        if token_logits.stride(-1) != 1 or (Lq > 1 and token_logits.stride(2) != Lq * token_logits.stride(3)):
            token_logits = token_logits.contiguous()
        lg_strides = (token_logits.stride(0), token_logits.stride(1),
                      token_logits.stride(2) if Lq == 1 else token_logits.stride(3))
        logit_mult = LOG2E * scale / (logits_scale if logits_scale is not None else scale)
    else:
        token_logits, lg_strides, logit_mult = dummy, (0, 0, 0), 0.0

    pdl = dependent_launch(q.device)
    grid = (num_splits, B * Hkv, row_tiles)
    _decode_fwd[grid](
        q, k_pages, v_pages, page_table, lengths,
        page_counts if has_pages else dummy, pages if has_pages else dummy,
        token_counts if has_tokens else dummy, tokens if has_tokens else dummy,
        out, lse, o_part, l_part, token_logits,
        scale * LOG2E, logit_mult,
        *q.stride(), *k_pages.stride(), *v_pages.stride(), *page_table.stride(),
        *sc_p, *si_p, *sc_t, *si_t,
        *out.stride(), *lse_strides, *part_o, *part_l, *lg_strides,
        Hkv, Lq, page_table.shape[1], pages_per_split, tokens_per_split,
        PAGE_SIZE=page_size, GROUP=G, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n,
        DENSE=dense, HAS_PAGES=has_pages, HAS_TOKENS=has_tokens, CAUSAL=Lq > 1,
        SPLIT=split, RETURN_LSE=return_lse, DOT_PRECISION=dot_precision, UPCAST_DOT=upcast_dot,
        PREFETCH=prefetch, PDL=pdl, GIVEN_LOGITS=given, num_warps=num_warps, num_stages=num_stages,
        **pdl_kwargs(pdl),
    )
    if split:
        _merge_splits[(B * Hq * Lq,)](
            o_part, l_part, out, lse,
            *o_part.stride(), *l_part.stride(), *out.stride(), *lse_strides,
            Hq, Lq, num_splits,
            HEAD_DIM=D, SPLITS=_pow2_at_least(num_splits), RETURN_LSE=return_lse, PDL=pdl,
            num_warps=1 if D <= 64 else 2, **pdl_kwargs(pdl),
        )
    return (out, lse) if return_lse else out
