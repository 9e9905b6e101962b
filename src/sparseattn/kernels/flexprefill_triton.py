"""Triton kernels of FlexPrefill's estimate after the profiles (methods/flexprefill.py, CUDA path).

``FlexPrefill._plan``'s PyTorch code (the CPU path and the oracle) turns the last queries'
vertical / slash profiles into a plan with ~110 small PyTorch ops (sum pools, the pattern test's
softmax and JSD, ``where``s, gathers building the mask, the block map's masked softmax); on the
GPU they are launch-bound. Here the same steps take four launches around the row selections of
``row_select_triton`` (``rank_mask_triton`` for the top vertical / slash blocks,
``cumsum_mask_triton`` for the query-aware block map):

* :func:`pool_blocks_triton`: mean-pooled blocks of q and k in one launch (the twin of
  ``methods.base.pool_blocks(x, block)``), which also stacks the two profiles into the one
  ``[2, B, Hq, Lk]`` tensor that the row selections take (a ``torch.stack`` launch less).
* :func:`flexprefill_heads_triton`: one program per (batch, query head): the block sums of both
  profiles, the budgets in blocks, the pattern test ``sqrt(JSD)(softmax(mean(q_last) . k_pool^T /
  sqrt(D)), vertical blocks) < tau``, the query-aware budgets, the forced ``+inf`` of vertical
  block 0 and slash block ``nK - 1``, and the block map's cumulative target.
* :func:`pooled_probs_triton`: per (batch, query head, tile of query blocks): the block map
  ``softmax(q_pool . k_pool^T / sqrt(D))`` over the causally visible key blocks (0 elsewhere),
  skipping heads that are not query-aware (their rows are never read).
* :func:`flexprefill_plan_triton`: one program per (batch, query head, query block): the union of
  the top vertical blocks, the top slash blocks moved onto the row's diagonal, the forced sink and
  diagonal blocks and the query-aware block map, clipped to the visible blocks and compacted into
  the plan's sorted index row (what ``BlockPlan.from_block_mask(..., causal=True)`` gives).

Exactness. Every integer step (budgets, ranks, the slash shift, the forced and visible blocks,
the compaction) is exact. The float parts (block sums, pooled means, softmaxes, the JSD) sum in
another order than PyTorch and may differ in the last bits: that can change a plan only where a
value sits at a decision boundary within rounding (a JSD within ~1e-6 of ``tau``, two block sums
within an ulp at the top-n cut, a cumulative mass within rounding of its target).

Cost, measured on an H100 (SmolLM2-like heads at 32K: B=1, Hq=9, Hkv=3, D=64, bf16, block 128):
the whole estimate is 12 kernels (the PyTorch code: 122) and 0.26 ms of GPU time at ``tau=0.1``
(0.45 ms), 0.39 ms at ``tau=1`` with every head query-aware (0.53 ms). Of these kernels:
pooling ~22 us (reads q and k once), the per-head kernel ~12 us (one program per head reads its
two profile rows), the block map ~1-50 us (only query-aware heads), the plan rows ~5 us. The
same plans as the PyTorch code's CUDA path, bit for bit, on ten shapes up to 128K.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .dispatch import triton_interpreting

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, triton.next_power_of_2(max(int(n), 1)))


# ----------------------------------------------------------------------------- pooling
@triton.jit
def _pool_one(X, Out, bh, n, H, L, n_blocks, stride_xb, stride_xh, stride_xl, stride_xd,
              BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, ROWS: tl.constexpr):
    """Out[bh, n, :] = the mean of block ``n``'s real rows of ``X[b, h]`` (fp32 sums)."""
    if n < n_blocks:
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        offs_d = tl.arange(0, D_PAD)
        d_ok = offs_d < HEAD_DIM
        start = n.to(tl.int64) * BLOCK_SIZE
        acc = tl.zeros([ROWS, D_PAD], dtype=tl.float32)  # reduced after the loop (see _block_sums)
        for r0 in range(0, BLOCK_SIZE, ROWS):
            r = r0 + tl.arange(0, ROWS)
            rows = start + r
            ok = (r < BLOCK_SIZE) & (rows < L)
            ptrs = X + b * stride_xb + h * stride_xh + rows[:, None] * stride_xl + offs_d[None, :] * stride_xd
            acc += tl.load(ptrs, mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        count = tl.minimum(L - start, BLOCK_SIZE)  # a partial last block averages its real rows
        out = (bh.to(tl.int64) * n_blocks + n) * HEAD_DIM + offs_d
        tl.store(Out + out, tl.sum(acc, 0) / count.to(tl.float32), mask=d_ok)


@triton.jit
def _pool_blocks(X1, Out1, X2, Out2, S1, S2, Stacked,
                 rows1, H1, L1, nb1, s1b, s1h, s1l, s1d,
                 rows2, H2, L2, nb2, s2b, s2h, s2l, s2d,
                 stack_rows, stack_len, stride_s1, stride_s2,
                 BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, ROWS: tl.constexpr,
                 COPY_BLOCK: tl.constexpr):
    n = tl.program_id(0)  # block (or chunk of a copied row)
    r = tl.program_id(1)  # (batch, head) of X1, then of X2, then the rows of S1 and S2 to stack
    if r < rows1:
        _pool_one(X1, Out1, r, n, H1, L1, nb1, s1b, s1h, s1l, s1d, BLOCK_SIZE, HEAD_DIM, D_PAD, ROWS)
    elif r < rows1 + rows2:
        _pool_one(X2, Out2, r - rows1, n, H2, L2, nb2, s2b, s2h, s2l, s2d, BLOCK_SIZE, HEAD_DIM, D_PAD, ROWS)
    else:  # Stacked[c] = S1[c] for c < stack_rows, else S2[c - stack_rows]: an exact copy
        c = (r - rows1 - rows2).to(tl.int64)
        offs = n.to(tl.int64) * COPY_BLOCK + tl.arange(0, COPY_BLOCK)
        ok = offs < stack_len
        if c < stack_rows:
            x = tl.load(S1 + c * stride_s1 + offs, mask=ok, other=0.0)
        else:
            x = tl.load(S2 + (c - stack_rows) * stride_s2 + offs, mask=ok, other=0.0)
        tl.store(Stacked + c * stack_len + offs, x, mask=ok)


def _check_block(block) -> int:
    if not isinstance(block, numbers.Integral) or isinstance(block, bool) or block < 1:
        raise ValueError(f"block must be an int >= 1, got {block!r}")
    return int(block)


def _rows_of(x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def pool_blocks_triton(xs: Sequence[torch.Tensor], block: int, *,
                       stack: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
    """Mean-pool one or two tensors over blocks of ``block`` rows in one launch.

    The twin of ``methods.base.pool_blocks(x, block)`` (mode ``"mean"``): ``x [B, H, L, D]``
    (fp16 / bf16 / fp32, any strides) -> float32 ``[B, H, ceil(L / block), D]``; a partial last
    block averages its real rows. Sums in float32 (in another order than PyTorch: equal up to
    rounding).

    Args:
        xs: one tensor or a sequence of two with the same ``D`` and device (e.g. ``(q, k)``).
        block: rows per block.
        stack: optional pair of float32 tensors of one shape ``[..., N]``: the same launch also
            returns ``torch.stack(stack)`` (FlexPrefill's two profiles; a launch less).
    Returns:
        ``(pooled, stacked)``: a list with one pooled tensor per input, and the stack (or None).
    No host sync.
    """
    if isinstance(xs, torch.Tensor):
        xs = (xs,)
    xs = tuple(xs)
    if len(xs) not in (1, 2):
        raise ValueError(f"pool_blocks_triton pools one or two tensors, got {len(xs)}")
    block = _check_block(block)
    for i, x in enumerate(xs):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.dtype not in DTYPES:
            raise ValueError(f"xs[{i}] must be a float16 / bfloat16 / float32 tensor [B, H, L, D], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
                             f"{' ' + str(x.dtype) if isinstance(x, torch.Tensor) else ''}")
    D, dev = xs[0].shape[-1], xs[0].device
    if any(x.shape[-1] != D or x.device != dev for x in xs):
        raise ValueError("the tensors must share the head dim D and the device")
    outs = [torch.empty(x.shape[0], x.shape[1], triton.cdiv(x.shape[2], block), D, dtype=torch.float32, device=dev)
            for x in xs]
    a = xs[0]
    b = xs[1] if len(xs) == 2 else xs[0]
    oa, ob = outs[0], outs[-1]
    rows1 = a.shape[0] * a.shape[1]
    rows2 = b.shape[0] * b.shape[1] if len(xs) == 2 else 0
    n_pool = max(o.shape[2] for o in outs)
    stacked, s1, s2, stack_rows, stack_len = None, oa, oa, 0, 0
    if stack is not None:
        s1, s2 = stack
        if not (isinstance(s1, torch.Tensor) and isinstance(s2, torch.Tensor) and s1.shape == s2.shape
                and s1.dim() >= 1 and s1.dtype == s2.dtype == torch.float32 and s1.device == s2.device == dev):
            raise ValueError("stack must be two float32 tensors of one shape [..., N] on the inputs' device")
        stacked = torch.empty((2,) + tuple(s1.shape), dtype=torch.float32, device=dev)
        s1, s2 = _rows_of(s1), _rows_of(s2)
        stack_rows, stack_len = s1.shape[0], s1.shape[1]
    # copied rows go in chunks of a power of two >= 128, as many chunks as the grid has blocks at most
    copy_block = _pow2(max(128, triton.cdiv(stack_len, max(n_pool, 1))))
    n_grid = max(n_pool, triton.cdiv(stack_len, copy_block))
    rows = rows1 + rows2 + 2 * stack_rows
    if rows * n_grid == 0:
        return outs, stacked
    d_pad = _pow2(D, 16)
    _pool_blocks[(n_grid, rows)](
        a, oa, b, ob, s1, s2, stacked if stacked is not None else oa,
        rows1, a.shape[1], a.shape[2], oa.shape[2], *a.stride(),
        rows2, b.shape[1], b.shape[2], ob.shape[2], *b.stride(),
        stack_rows, stack_len, s1.stride(0), s2.stride(0),
        BLOCK_SIZE=block, HEAD_DIM=D, D_PAD=d_pad, ROWS=min(_pow2(block, 16), max(16, 4096 // d_pad)),
        COPY_BLOCK=copy_block, num_warps=4)
    return outs, stacked


# ----------------------------------------------------------------------------- per-head pattern test
@triton.jit
def _xlogy(x, y):
    """torch.xlogy: x * log(y), and 0 where x == 0 (unless y is NaN)."""
    zero = (x == 0.0) & (y == y)
    return tl.where(zero, 0.0, x * tl.log(tl.where(zero, 1.0, y)))  # no 0 * log(0) computed


@triton.jit
def _block_sums(row, n, n_ok, Lk, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr):
    """Sums of ``row[n * BLOCK_SIZE:(n + 1) * BLOCK_SIZE]`` (the last block: its real entries)."""
    # A 2-D accumulator reduced once after the loop: Triton 3.6's thread-locality pass fails on a
    # reduction accumulated inside a loop nested in another.
    acc = tl.zeros([BLOCK_N, BLOCK_J], dtype=tl.float32)
    for j0 in range(0, BLOCK_SIZE, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        t = n.to(tl.int64)[:, None] * BLOCK_SIZE + j[None, :]
        ok = n_ok[:, None] & (j < BLOCK_SIZE)[None, :] & (t < Lk)
        acc += tl.load(row + t, mask=ok, other=0.0)
    return tl.sum(acc, 1)


@triton.jit
def _est_logits(kp_row, q_mean, n, n_ok, offs_d, d_ok, sqrt_d, HEAD_DIM: tl.constexpr):
    """``q_mean . k_pool[n] / sqrt(D)`` for a chunk of key blocks ``n`` (the pattern test's logits;
    both passes of its softmax form them the same way, so the same bits)."""
    kp = tl.load(kp_row + n.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :],
                 mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    return tl.sum(kp * q_mean[None, :], 1) / sqrt_d


@triton.jit
def _heads(Prof, Tokens, Q, KPool, Blocks, NOut, QA, Target,
           stride_qb, stride_qh, stride_ql, stride_qd,
           pairs, Hq, group, Lq, Lk, nK, P, min_blocks, max_blocks, sqrt_d, tau, target,
           BLOCK_SIZE: tl.constexpr, LEGACY: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
           ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr):
    pair = tl.program_id(0)
    b = pair // Hq
    h = pair % Hq
    kv = (b * (Hq // group) + h // group).to(tl.int64)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM

    # mean of the last P query rows, fp32
    acc = tl.zeros([ROWS, D_PAD], dtype=tl.float32)
    q_row = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    for r0 in range(0, P, ROWS):
        r = r0 + tl.arange(0, ROWS)
        ptrs = q_row + (Lq - P + r).to(tl.int64)[:, None] * stride_ql + offs_d[None, :] * stride_qd
        acc += tl.load(ptrs, mask=(r < P)[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    q_mean = tl.sum(acc, 0) / P

    # est = softmax over all key blocks of q_mean . k_pool / sqrt(D): max and sum first
    kp_row = KPool + kv * nK * HEAD_DIM
    # (per lane, merged after the loop: no reduction accumulated inside a loop, see _block_sums)
    m_lane = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    l_lane = tl.zeros([BLOCK_N], dtype=tl.float32)
    for n0 in range(0, nK, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < nK
        s = tl.where(n_ok, _est_logits(kp_row, q_mean, n, n_ok, offs_d, d_ok, sqrt_d, HEAD_DIM), float("-inf"))
        m_new = tl.maximum(m_lane, s)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a lane past nK: stays 0
        l_lane = l_lane * tl.exp(m_lane - m_use) + tl.exp(s - m_use)
        m_lane = m_new
    m = tl.max(m_lane, 0)  # finite: block 0 is real
    l = tl.sum(tl.where(m_lane == float("-inf"), 0.0, l_lane * tl.exp(m_lane - m)), 0)

    # block sums of both profiles, est, and the JSD terms; the blocks are written with the forced +inf
    v_row = Prof + pair.to(tl.int64) * Lk
    s_row = Prof + (pairs + pair).to(tl.int64) * Lk
    b_row = Blocks + pair.to(tl.int64) * nK
    kl_p = tl.zeros([BLOCK_N], dtype=tl.float32)
    kl_q = tl.zeros([BLOCK_N], dtype=tl.float32)
    for n0 in range(0, nK, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < nK
        s = _est_logits(kp_row, q_mean, n, n_ok, offs_d, d_ok, sqrt_d, HEAD_DIM)
        p = tl.where(n_ok, tl.exp(s - m) / l, 0.0)
        vb = _block_sums(v_row, n, n_ok, Lk, BLOCK_SIZE, BLOCK_N, BLOCK_J)
        sb = _block_sums(s_row, n, n_ok, Lk, BLOCK_SIZE, BLOCK_N, BLOCK_J)
        mid = (p + vb) / 2
        kl_p += _xlogy(p, p) - _xlogy(p, mid)  # 0 on padding lanes (p = vb = 0)
        kl_q += _xlogy(vb, vb) - _xlogy(vb, mid)
        tl.store(b_row + n, tl.where(n == 0, float("inf"), vb), mask=n_ok)
        tl.store(Blocks + (pairs + pair).to(tl.int64) * nK + n, tl.where(n == nK - 1, float("inf"), sb), mask=n_ok)
    jsd = tl.sqrt(tl.maximum(0.5 * tl.sum(kl_p, 0) + 0.5 * tl.sum(kl_q, 0), 0.0))
    query_aware = jsd < tau  # NaN: False, as in PyTorch

    # budgets in blocks; a query-aware head keeps only min_blocks of each
    tv = tl.load(Tokens + pair)
    ts = tl.load(Tokens + pairs + pair)
    if LEGACY:  # the official tokens // 128 + 1 (whatever the block size)
        nv = tv // 128 + 1
        ns = ts // 128 + 1
    else:  # tokens >= 1: plain integer division rounds up correctly
        nv = (tv + BLOCK_SIZE - 1) // BLOCK_SIZE
        ns = (ts + BLOCK_SIZE - 1) // BLOCK_SIZE
    nv = tl.minimum(tl.maximum(nv, min_blocks), max_blocks)
    ns = tl.minimum(tl.maximum(ns, min_blocks), max_blocks)
    nv = tl.where(query_aware, min_blocks, nv)
    ns = tl.where(query_aware, min_blocks, ns)
    tl.store(NOut + pair, nv.to(tl.int64))
    tl.store(NOut + pairs + pair, ns.to(tl.int64))
    tl.store(QA + pair, query_aware.to(tl.uint8))
    tl.store(Target + pair, tl.zeros([], dtype=tl.float32) + target)


def flexprefill_heads_triton(profiles: torch.Tensor, tokens: torch.Tensor, q: torch.Tensor, k_pool: torch.Tensor, *,
                             block_size: int, min_blocks: int, max_blocks: int, legacy_budget: bool, tau: float,
                             target: float = 0.0, block_n: Optional[int] = None):
    """FlexPrefill's per-head steps 2-3 (and 4's forced blocks), one program per (batch, query head).

    Args:
        profiles: float32 ``[2, B, Hq, Lk]`` contiguous: the vertical and slash profiles.
        tokens: int64 ``[2, B, Hq]``: their cover counts (``cover_count_triton(profiles, gamma)``).
        q: ``[B, Hq, Lq, D]`` (any strides): the last ``P = min(block_size, Lq)`` rows are averaged.
        k_pool: float32 ``[B, Hkv, nK, D]`` contiguous: mean-pooled keys (:func:`pool_blocks_triton`).
        block_size, min_blocks, max_blocks, legacy_budget, tau: as in ``FlexPrefill``.
        target: written to every entry of ``targets`` (the block map's cumulative target).
        block_n: key blocks per chunk (default 64; tests force several chunks).
    Returns:
        ``(blocks, n, query_aware, targets)``: ``blocks`` float32 ``[2, B, Hq, nK]`` = the block
        sums of both profiles (``sum_pool_last``), vertical block 0 and slash block ``nK - 1`` set
        to ``+inf``; ``n`` int64 ``[2, B, Hq]`` = the budgets in blocks (``min_blocks`` for a
        query-aware head); ``query_aware`` bool ``[B, Hq]`` = ``sqrt(JSD) < tau``; ``targets``
        float32 ``[B, Hq]``. No host sync.
    """
    _, B, Hq, Lk = profiles.shape
    Hkv, nK, D = k_pool.shape[1], k_pool.shape[2], k_pool.shape[3]
    Lq = q.shape[2]
    if profiles.dtype != torch.float32 or not profiles.is_contiguous() or tokens.dtype != torch.int64:
        raise ValueError("profiles must be contiguous float32 [2, B, Hq, Lk] and tokens int64 [2, B, Hq]")
    if k_pool.dtype != torch.float32 or not k_pool.is_contiguous() or nK != triton.cdiv(Lk, block_size):
        raise ValueError(f"k_pool must be contiguous float32 [B, Hkv, cdiv(Lk, block_size), D], got "
                         f"{tuple(k_pool.shape)} {k_pool.dtype}")
    dev = profiles.device
    blocks = torch.empty(2, B, Hq, nK, dtype=torch.float32, device=dev)
    n = torch.empty(2, B, Hq, dtype=torch.int64, device=dev)
    query_aware = torch.empty(B, Hq, dtype=torch.bool, device=dev)
    targets = torch.empty(B, Hq, dtype=torch.float32, device=dev)
    pairs = B * Hq
    if pairs == 0 or nK == 0:
        return blocks, n, query_aware, targets
    tokens = tokens.contiguous()
    P = min(block_size, Lq)
    d_pad = _pow2(D, 16)
    block_n = _pow2(block_n if block_n is not None else min(64, nK), 16)
    _heads[(pairs,)](
        profiles, tokens, q, k_pool, blocks, n, query_aware.view(torch.uint8), targets, *q.stride(),
        pairs, Hq, Hq // Hkv, Lq, Lk, nK, P, int(min_blocks), int(max_blocks), math.sqrt(D), float(tau),
        float(target),
        BLOCK_SIZE=block_size, LEGACY=bool(legacy_budget), HEAD_DIM=D, D_PAD=d_pad,
        ROWS=min(_pow2(P, 16), max(16, 4096 // d_pad)), BLOCK_N=block_n,
        BLOCK_J=min(_pow2(block_size, 16), max(16, 4096 // block_n)), num_warps=8)
    return blocks, n, query_aware, targets


# ----------------------------------------------------------------------------- block map softmax
@triton.jit
def _pooled_logits(qp, kp_row, n, nK, lim, sqrt_d, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    offs_d = tl.arange(0, D_PAD)
    kp = tl.load(kp_row + n.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :],
                 mask=(n < nK)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    s = tl.dot(qp, tl.trans(kp), input_precision="ieee") / sqrt_d  # fp32 operands: exact products
    return tl.where(n[None, :] < lim[:, None], s, float("-inf"))


@triton.jit
def _pooled_probs(QPool, KPool, Limits, Active, Probs, Hq, group, nQ, nK, sqrt_d,
                  HAS_ACTIVE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                  BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr):
    pair = tl.program_id(0)
    tile = tl.program_id(1)
    run = True
    if HAS_ACTIVE:
        run = tl.load(Active + pair) != 0  # rows of other heads are never read: skip them
    if run:
        b = pair // Hq
        h = pair % Hq
        kv = (b * (Hq // group) + h // group).to(tl.int64)
        i = tile * BLOCK_I + tl.arange(0, BLOCK_I)
        i_ok = i < nQ
        offs_d = tl.arange(0, D_PAD)
        rows = pair.to(tl.int64) * nQ + i
        qp = tl.load(QPool + rows[:, None] * HEAD_DIM + offs_d[None, :],
                     mask=i_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
        lim = tl.load(Limits + i, mask=i_ok, other=0)  # visible key blocks of each query block
        tile_lim = tl.max(lim, 0)
        kp_row = KPool + kv * nK * HEAD_DIM
        m = tl.full([BLOCK_I], float("-inf"), dtype=tl.float32)
        l = tl.zeros([BLOCK_I], dtype=tl.float32)
        for n0 in range(0, tile_lim, BLOCK_N):
            s = _pooled_logits(qp, kp_row, n0 + tl.arange(0, BLOCK_N), nK, lim, sqrt_d, HEAD_DIM, D_PAD)
            m_new = tl.maximum(m, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
            l = l * tl.exp(m - m_use) + tl.sum(tl.exp(s - m_use[:, None]), 1)
            m = m_new
        m_use = tl.where(m == float("-inf"), 0.0, m)
        l = tl.where(l > 0.0, l, 1.0)  # rows that see nothing: every entry is 0 below
        out = Probs + rows[:, None] * nK
        for n0 in range(0, tile_lim, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            s = _pooled_logits(qp, kp_row, n, nK, lim, sqrt_d, HEAD_DIM, D_PAD)
            # not visible (and rows that see nothing): 0, as masked_fill(-inf) + softmax + nan_to_num
            p = tl.where(n[None, :] < lim[:, None], tl.exp(s - m_use[:, None]) / l[:, None], 0.0)
            tl.store(out + n[None, :], p, mask=i_ok[:, None] & (n < nK)[None, :])
        for n0 in range(tl.cdiv(tile_lim, BLOCK_N) * BLOCK_N, nK, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            tl.store(out + n[None, :], tl.zeros([BLOCK_I, BLOCK_N], dtype=tl.float32),
                     mask=i_ok[:, None] & (n < nK)[None, :])


def pooled_probs_triton(q_pool: torch.Tensor, k_pool: torch.Tensor, limits: torch.Tensor, *,
                        active: Optional[torch.Tensor] = None, block_i: Optional[int] = None,
                        block_n: Optional[int] = None) -> torch.Tensor:
    """FlexPrefill's block map: ``softmax(q_pool . k_pool^T / sqrt(D))`` over the visible key blocks.

    Args:
        q_pool: float32 ``[B, Hq, nQ, D]`` contiguous; k_pool: float32 ``[B, Hkv, nK, D]``
            contiguous (query head ``h`` reads key head ``h // (Hq // Hkv)``).
        limits: int32 ``[nQ]``: query block ``I`` sees key blocks ``< limits[I]``
            (``BlockPlan.causal_block_limits``).
        active: optional bool ``[B, Hq]``: heads whose rows are computed; the rows of the others
            are left unwritten (``cumsum_mask_triton(..., active=)`` never reads them).
        block_i, block_n: query blocks per program and key blocks per step (powers of two >= 16).
    Returns:
        float32 ``[B, Hq, nQ, nK]``: each row the softmax over its visible blocks, 0 elsewhere; a
        row that sees no block is all 0 (PyTorch: ``masked_fill(-inf)``, ``softmax``,
        ``nan_to_num``). Logits in float32 (exact products), sums in another order than PyTorch.
        No host sync.
    """
    B, Hq, nQ, D = q_pool.shape
    Hkv, nK = k_pool.shape[1], k_pool.shape[2]
    for name, t in (("q_pool", q_pool), ("k_pool", k_pool)):
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 tensor, got {t.dtype}")
    if limits.dtype != torch.int32 or tuple(limits.shape) != (nQ,):
        raise ValueError(f"limits must be int32 [nQ={nQ}], got {limits.dtype} {tuple(limits.shape)}")
    probs = torch.empty(B, Hq, nQ, nK, dtype=torch.float32, device=q_pool.device)
    if B * Hq * nQ * nK == 0:
        return probs
    interp = triton_interpreting()
    block_i = _pow2(block_i if block_i is not None else min(16 if interp else 32, nQ), 16)
    block_n = _pow2(block_n if block_n is not None else min(64, nK), 16)
    act = active.reshape(-1).contiguous().view(torch.uint8) if active is not None else limits
    _pooled_probs[(B * Hq, triton.cdiv(nQ, block_i))](
        q_pool, k_pool, limits.contiguous(), act, probs, Hq, Hq // Hkv, nQ, nK, math.sqrt(D),
        HAS_ACTIVE=active is not None, HEAD_DIM=D, D_PAD=_pow2(D, 16), BLOCK_I=block_i, BLOCK_N=block_n,
        num_warps=4)
    return probs


# ----------------------------------------------------------------------------- plan rows
@triton.jit
def _plan_rows(Keep, BlockMap, QA, Limits, Counts, Indices, pairs, nQ, nK, q_len, offset,
               BLOCK_SIZE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # (batch, query head, query block)
    pair = row // nQ
    i = (row % nQ).to(tl.int32)
    limit = tl.load(Limits + i)
    # absolute positions of the query block's first and last rows (bottom-right: offset = Lk - Lq)
    first = offset + i * BLOCK_SIZE
    last = offset + tl.minimum((i + 1) * BLOCK_SIZE, q_len) - 1
    diag = tl.maximum(last, 0) // BLOCK_SIZE  # the slash block on this row's diagonal
    d_lo = tl.maximum(first, 0) // BLOCK_SIZE  # forced diagonal blocks [d_lo, d_hi] (two when straddling)
    d_hi = tl.where(last >= 0, tl.maximum(last, 0) // BLOCK_SIZE, -1)
    qa = tl.load(QA + pair).to(tl.int32)
    found = tl.zeros([], dtype=tl.int32)
    for c in range(0, nK, BLOCK):
        n = c + tl.arange(0, BLOCK)
        n_ok = n < nK
        from_v = tl.load(Keep + pair * nK + n, mask=n_ok, other=0) != 0
        s_idx = n - diag + nK - 1
        s_ok = n_ok & (s_idx >= 0) & (s_idx < nK)
        from_s = tl.load(Keep + (pairs + pair) * nK + s_idx, mask=s_ok, other=0) != 0
        forced = (n < 1) | ((n >= d_lo) & (n <= d_hi))  # the sink block and the diagonal
        qa_n = (tl.zeros([BLOCK], dtype=tl.int32) + qa) != 0
        from_map = tl.load(BlockMap + row * nK + n, mask=n_ok & qa_n, other=0) != 0
        keep = (from_v | from_s | forced | from_map) & n_ok & (n < limit)
        rank = found + tl.cumsum(keep.to(tl.int32), 0) - 1
        tl.store(Indices + row * nK + rank, n, mask=keep)
        found += tl.sum(keep.to(tl.int32), 0)
    for c in range(0, nK, BLOCK):  # zeros after the count, as from_block_mask leaves them
        n = c + tl.arange(0, BLOCK)
        tl.store(Indices + row * nK + n, tl.zeros([BLOCK], dtype=tl.int32), mask=(n >= found) & (n < nK))
    tl.store(Counts + row, found)


def flexprefill_plan_triton(keep: torch.Tensor, block_map: torch.Tensor, query_aware: torch.Tensor,
                            limits: torch.Tensor, *, block_size: int, q_len: int, k_len: int,
                            block: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """FlexPrefill's plan rows (step 4's union and step 5's block map), compacted.

    Per (batch, query head ``h``, query block ``I``) the key blocks ``n < limits[I]`` with
    ``keep[0, b, h, n]`` (a top vertical block), or ``keep[1, b, h, s]`` for ``s = n - diag(I) +
    nK - 1`` in ``[0, nK)`` (a top slash block on ``I``'s diagonal, ``diag(I)`` = the key block of
    its last query), or ``n`` forced (block 0 and the key blocks holding ``I``'s queries:
    ``forced_blocks(sink_blocks=1, local_blocks=0, diagonal=True)``), or ``block_map[b, h, I, n]``
    on a query-aware head.

    Args:
        keep: bool ``[2, B, Hq, nK]`` (``rank_mask_triton`` of the vertical / slash blocks).
        block_map: bool ``[B, Hq, nQ * nK]`` (or ``[B, Hq, nQ, nK]``), contiguous.
        query_aware: bool ``[B, Hq]``; limits: int32 ``[nQ]`` (``BlockPlan.causal_block_limits``).
    Returns:
        ``(counts int32 [B, Hq, nQ], indices int32 [B, Hq, nQ, nK])``: sorted, zeros after the
        count (``BlockPlan.from_block_mask(mask, ..., causal=True)``). No host sync.
    """
    _, B, Hq, nK = keep.shape
    nQ = triton.cdiv(q_len, block_size)
    if nK != triton.cdiv(k_len, block_size) or block_map.numel() != B * Hq * nQ * nK:
        raise ValueError(f"keep / block_map do not match nQ={nQ}, nK={triton.cdiv(k_len, block_size)}")
    for name, t in (("keep", keep), ("block_map", block_map), ("query_aware", query_aware)):
        if t.dtype != torch.bool:
            raise ValueError(f"{name} must be a bool tensor, got {t.dtype}")
    dev = keep.device
    counts = torch.empty(B, Hq, nQ, dtype=torch.int32, device=dev)
    indices = torch.empty(B, Hq, nQ, nK, dtype=torch.int32, device=dev)
    rows = B * Hq * nQ
    if rows == 0 or nK == 0:
        return counts, indices
    block = _pow2(block if block is not None else min(1024, nK), 16)
    _plan_rows[(rows,)](
        keep.contiguous().view(torch.uint8), block_map.contiguous().view(torch.uint8),
        query_aware.contiguous().view(torch.uint8), limits.contiguous(), counts, indices,
        B * Hq, nQ, nK, q_len, k_len - q_len, BLOCK_SIZE=block_size, BLOCK=block, num_warps=4)
    return counts, indices
