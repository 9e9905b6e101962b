"""Triton kernels of FlexPrefill's estimate after the profiles (methods/flexprefill.py, CUDA path).

``FlexPrefill._plan``'s PyTorch code (the CPU path and the oracle) turns the last queries'
vertical / slash profiles into a plan with ~110 small PyTorch ops (sum pools, the pattern test's
softmax and JSD, ``where``s, gathers building the mask, the block map's masked softmax); on the
GPU they are launch-bound. Here the same steps take six launches around the row selections of
``row_select_triton`` (``cover_count_triton`` for the budgets' token counts, ``cumsum_mask_triton``
for the query-aware block map):

* :func:`profile_blocks_triton`: the two profiles divided by ``P`` and stacked into the one
  ``[2, B, Hq, Lk]`` tensor the cover counts read, their block sums, and for the cover counts the
  ``gamma`` per row (a fill launch less) and the key range of each piece of a row (the search then
  starts without its own pass over the row).
* :func:`pool_blocks_triton`: mean-pooled blocks of q for the query-aware heads only (the twin of
  ``methods.base.pool_blocks(x, block)``). The pooled keys come from the last-queries logits
  launch (``last_queries_profiles_triton(..., pool_block=)``).
* :func:`flexprefill_test_triton`: one program per (batch, query head): the pattern test
  ``sqrt(JSD)(softmax(mean(q_last) . k_pool^T / sqrt(D)), vertical blocks) < tau``, the block map's
  cumulative target, and then the forced ``+inf`` of vertical block 0 and slash block ``nK - 1``.
* :func:`block_ranks_triton`: every block's place in its row's stable descending order, so that
  ``ranks < n`` is the top-``n`` mask for whatever budget ``n`` the token counts give later.
* :func:`pooled_probs_triton`: per (batch, query head, tile of query blocks): the block map
  ``softmax(q_pool . k_pool^T / sqrt(D))`` over the causally visible key blocks (0 elsewhere),
  skipping heads that are not query-aware (their rows are never read).
* :func:`flexprefill_plan_triton`: one program per (batch, query head, query block): the budgets
  in blocks from the token counts (``min_blocks`` for query-aware heads), then the union of the
  top vertical blocks, the top slash blocks moved onto the row's diagonal, the forced sink and
  diagonal blocks and the query-aware block map, clipped to the visible blocks and compacted into
  the plan's sorted index row (what ``BlockPlan.from_block_mask(..., causal=True)`` gives).

Only the budgets need the token counts: ``FlexPrefill._plan_triton`` runs the test, the ranks and
the block map beside the cover counts (~40-50 us at 32K on one SM per row: 18 of 132
SMs busy), on a second stream (``dispatch.concurrent_branch``); after the join only the plan rows
remain.

Exactness. Every integer step (budgets, ranks, the slash shift, the forced and visible blocks,
the compaction) is exact. The float parts (block sums, pooled means, softmaxes, the JSD) sum in
another order than PyTorch and may differ in the last bits: that can change a plan only where a
value sits at a decision boundary within rounding (a JSD within ~1e-6 of ``tau``, two block sums
within an ulp at the top-n cut, a cumulative mass within rounding of its target).

Cost, measured on an H100 (SmolLM2-like heads at 32K: B=1, Hq=9, Hkv=3, D=64, bf16, block 128),
before the second stream (session 12): the whole estimate is 12 kernels (the PyTorch code: 122) and
0.26 ms of GPU time at ``tau=0.1`` (0.45 ms), 0.39 ms at ``tau=1`` with every head query-aware
(0.53 ms); pooling ~22 us (reads q and k once), the per-head test and budgets ~12 us, the block
map ~1-50 us (only query-aware heads), the plan rows ~5 us. BENCHMARKS.md has the later figures.
"""

from __future__ import annotations

import math
import numbers
import struct
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .dispatch import triton_interpreting
from .row_select_triton import _key_of

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
        acc = tl.zeros([ROWS, D_PAD], dtype=tl.float32)  # reduced after the loop (see _pattern_test)
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
def _pool_blocks(X, Out, Active, H, L, n_blocks, sxb, sxh, sxl, sxd,
                 BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, ROWS: tl.constexpr,
                 HAS_ACTIVE: tl.constexpr):
    n = tl.program_id(0)  # block
    r = tl.program_id(1)  # (batch, head)
    run = True
    if HAS_ACTIVE:
        run = tl.load(Active + r) != 0  # rows of other heads are never read: skip them
    if run:
        _pool_one(X, Out, r, n, H, L, n_blocks, sxb, sxh, sxl, sxd, BLOCK_SIZE, HEAD_DIM, D_PAD, ROWS)


def _check_block(block) -> int:
    if not isinstance(block, numbers.Integral) or isinstance(block, bool) or block < 1:
        raise ValueError(f"block must be an int >= 1, got {block!r}")
    return int(block)


def pool_blocks_triton(x: torch.Tensor, block: int, *, active: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean-pool ``x`` over blocks of ``block`` rows in one launch.

    The twin of ``methods.base.pool_blocks(x, block)`` (mode ``"mean"``): ``x [B, H, L, D]``
    (fp16 / bf16 / fp32, any strides) -> float32 ``[B, H, ceil(L / block), D]``; a partial last
    block averages its real rows. Sums in float32 (in another order than PyTorch: equal up to
    rounding).

    Args:
        x: the tensor to pool; block: rows per block.
        active: optional bool ``[B, H]``: the heads whose blocks are pooled; the others' rows are
            left unwritten (FlexPrefill pools q only for query-aware heads).
    No host sync.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.dtype not in DTYPES:
        raise ValueError(f"x must be a float16 / bfloat16 / float32 tensor [B, H, L, D], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
                         f"{' ' + str(x.dtype) if isinstance(x, torch.Tensor) else ''}")
    block = _check_block(block)
    B, H, L, D = x.shape
    if active is not None and (not isinstance(active, torch.Tensor) or active.dtype != torch.bool
                               or tuple(active.shape) != (B, H) or active.device != x.device):
        raise ValueError(f"active must be a bool tensor [B, H] = {(B, H)} on the input's device")
    out = torch.empty(B, H, triton.cdiv(L, block), D, dtype=torch.float32, device=x.device)
    if out.numel() == 0:
        return out
    d_pad = _pow2(D, 16)
    act = active.contiguous().view(torch.uint8) if active is not None else out
    _pool_blocks[(out.shape[2], B * H)](
        x, out, act, H, L, out.shape[2], *x.stride(),
        BLOCK_SIZE=block, HEAD_DIM=D, D_PAD=d_pad, ROWS=min(_pow2(block, 16), max(16, 4096 // d_pad)),
        HAS_ACTIVE=active is not None, num_warps=4)
    return out


# ----------------------------------------------------------------------------- profiles, scaled and block-summed
@triton.jit
def _profile_blocks(Col, Diag, Prof, Blocks, Gamma, Extremes, rows, Lk, nK, n_chunks, inv_p, gamma,
                    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr):
    chunk = tl.program_id(0)  # BLOCK_N key blocks
    r = tl.program_id(1).to(tl.int64)  # the rows of Col, then those of Diag
    n = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < nK
    # 2-D accumulators reduced once after the loop (see _pattern_test)
    acc = tl.zeros([BLOCK_N, BLOCK_J], dtype=tl.float32)
    kmin = tl.full([BLOCK_N, BLOCK_J], 2147483647, dtype=tl.int32)
    kmax = tl.full([BLOCK_N, BLOCK_J], -2147483647 - 1, dtype=tl.int32)
    for j0 in range(0, BLOCK_SIZE, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        t = n.to(tl.int64)[:, None] * BLOCK_SIZE + j[None, :]
        ok = n_ok[:, None] & (j < BLOCK_SIZE)[None, :] & (t < Lk)
        if r < rows:
            x = tl.load(Col + r * Lk + t, mask=ok, other=0.0)
        else:
            x = tl.load(Diag + (r - rows) * Lk + t, mask=ok, other=0.0)
        x = x * inv_p  # what PyTorch's CUDA ``x / P`` computes (a multiply by float32(1 / P))
        tl.store(Prof + r * Lk + t, x, mask=ok)
        acc += x
        key = _key_of(x)
        kmin = tl.minimum(kmin, tl.where(ok, key, 2147483647))
        kmax = tl.maximum(kmax, tl.where(ok, key, -2147483647 - 1))
    tl.store(Blocks + r * nK + n, tl.sum(acc, 1), mask=n_ok)
    # this chunk's key range, so that the cover counts start without a pass over the row
    ext = Extremes + (r * n_chunks + chunk) * 2
    tl.store(ext, tl.min(tl.min(kmin, 1), 0))
    tl.store(ext + 1, tl.max(tl.max(kmax, 1), 0))
    if chunk == 0:
        tl.store(Gamma + r, tl.zeros([], dtype=tl.float32) + gamma)


def profile_blocks_triton(columns: torch.Tensor, diagonals: torch.Tensor, n_rows: int, block_size: int,
                          gamma: float, *, block_n: Optional[int] = None):
    """FlexPrefill's profiles, their block sums and the cover counts' ``gamma``, in one launch.

    Args:
        columns, diagonals: float32 ``[B, Hq, Lk]`` contiguous: the last ``n_rows`` queries' column
            and diagonal sums (``last_queries_profiles_triton``).
        n_rows: ``P``, the divisor (profiles are means over the ``P`` rows).
        block_size: key block size; gamma: written to every entry of ``gammas``.
        block_n: key blocks per program (default 16; tests force several chunks).
    Returns:
        ``(profiles, blocks, gammas, extremes)``: ``profiles`` float32 ``[2, B, Hq, Lk]`` =
        ``stack((columns, diagonals)) / P`` bit for bit as PyTorch computes it on CUDA; ``blocks``
        float32 ``[2, B, Hq, nK]`` = their block sums (``sum_pool_last``, in another order: equal
        up to rounding); ``gammas`` float32 ``[2, B, Hq]``; ``extremes`` int32 ``[2, B, Hq, parts,
        2]``: the (min, max) keys of each program's piece of a profile row (the
        ``cover_count_triton(..., extremes=)`` input). No host sync.
    """
    if (columns.shape != diagonals.shape or columns.dim() != 3 or columns.dtype != torch.float32
            or diagonals.dtype != torch.float32 or not columns.is_contiguous() or not diagonals.is_contiguous()):
        raise ValueError("columns and diagonals must be contiguous float32 tensors [B, Hq, Lk] of one shape")
    block_size = _check_block(block_size)
    if not isinstance(n_rows, numbers.Integral) or n_rows < 1:
        raise ValueError(f"n_rows must be an int >= 1, got {n_rows!r}")
    B, Hq, Lk = columns.shape
    nK = triton.cdiv(Lk, block_size)
    dev = columns.device
    block_n = _pow2(block_n if block_n is not None else min(16, nK), 16)
    n_chunks = max(1, triton.cdiv(nK, block_n))
    profiles = torch.empty(2, B, Hq, Lk, dtype=torch.float32, device=dev)
    blocks = torch.empty(2, B, Hq, nK, dtype=torch.float32, device=dev)
    gammas = torch.empty(2, B, Hq, dtype=torch.float32, device=dev)
    extremes = torch.empty(2, B, Hq, n_chunks, 2, dtype=torch.int32, device=dev)
    rows = B * Hq
    if rows == 0 or Lk == 0:
        gammas.fill_(gamma)
        return profiles, blocks, gammas, extremes
    block_j = min(_pow2(block_size, 16), max(16, 2048 // block_n))
    # float32(1 / P): the reciprocal PyTorch's CUDA division by a Python scalar multiplies with
    # (1 / P in double, then rounded to float32: correctly rounded, as double has >= 2 * 24 + 2 bits)
    inv_p = struct.unpack("f", struct.pack("f", 1.0 / int(n_rows)))[0]
    _profile_blocks[(n_chunks, 2 * rows)](
        columns, diagonals, profiles, blocks, gammas, extremes, rows, Lk, nK, n_chunks, inv_p, float(gamma),
        BLOCK_SIZE=block_size, BLOCK_N=block_n, BLOCK_J=block_j, num_warps=4)
    return profiles, blocks, gammas, extremes


# ----------------------------------------------------------------------------- per-head pattern test
@triton.jit
def _xlogy(x, y):
    """torch.xlogy: x * log(y), and 0 where x == 0 (unless y is NaN)."""
    zero = (x == 0.0) & (y == y)
    return tl.where(zero, 0.0, x * tl.log(tl.where(zero, 1.0, y)))  # no 0 * log(0) computed


@triton.jit
def _est_logits(kp_row, q_mean, n, n_ok, offs_d, d_ok, sqrt_d, HEAD_DIM: tl.constexpr):
    """``q_mean . k_pool[n] / sqrt(D)`` for a chunk of key blocks ``n`` (the pattern test's logits;
    both passes of its softmax form them the same way, so the same bits)."""
    kp = tl.load(kp_row + n.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :],
                 mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    return tl.sum(kp * q_mean[None, :], 1) / sqrt_d


@triton.jit
def _pattern_test(Blocks, Q, KPool, QA, Target,
                  stride_qb, stride_qh, stride_ql, stride_qd,
                  pairs, Hq, group, Lq, nK, P, sqrt_d, tau, target,
                  HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    pair = tl.program_id(0)
    b = pair // Hq
    h = pair % Hq
    kv = (b * (Hq // group) + h // group).to(tl.int64)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM

    # mean of the last P query rows, fp32
    # A 2-D accumulator reduced once after the loop: Triton 3.6's thread-locality pass fails on a
    # reduction accumulated inside a loop nested in another.
    acc = tl.zeros([ROWS, D_PAD], dtype=tl.float32)
    q_row = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    for r0 in range(0, P, ROWS):
        r = r0 + tl.arange(0, ROWS)
        ptrs = q_row + (Lq - P + r).to(tl.int64)[:, None] * stride_ql + offs_d[None, :] * stride_qd
        acc += tl.load(ptrs, mask=(r < P)[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    q_mean = tl.sum(acc, 0) / P

    # est = softmax over all key blocks of q_mean . k_pool / sqrt(D): max and sum first (per lane,
    # merged after the loop)
    kp_row = KPool + kv * nK * HEAD_DIM
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

    # the JSD between est and the vertical block sums
    v_row = Blocks + pair.to(tl.int64) * nK
    kl_p = tl.zeros([BLOCK_N], dtype=tl.float32)
    kl_q = tl.zeros([BLOCK_N], dtype=tl.float32)
    for n0 in range(0, nK, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < nK
        s = _est_logits(kp_row, q_mean, n, n_ok, offs_d, d_ok, sqrt_d, HEAD_DIM)
        p = tl.where(n_ok, tl.exp(s - m) / l, 0.0)
        vb = tl.load(v_row + n, mask=n_ok, other=0.0)
        mid = (p + vb) / 2
        kl_p += _xlogy(p, p) - _xlogy(p, mid)  # 0 on padding lanes (p = vb = 0)
        kl_q += _xlogy(vb, vb) - _xlogy(vb, mid)
    jsd = tl.sqrt(tl.maximum(0.5 * tl.sum(kl_p, 0) + 0.5 * tl.sum(kl_q, 0), 0.0))
    tl.store(QA + pair, (jsd < tau).to(tl.uint8))  # NaN: False, as in PyTorch
    tl.store(Target + pair, tl.zeros([], dtype=tl.float32) + target)
    # the forced blocks, once the test has read vertical block 0: vertical 0 and slash nK - 1
    tl.store(v_row, float("inf"))
    tl.store(Blocks + (pairs + pair).to(tl.int64) * nK + nK - 1, float("inf"))


def flexprefill_test_triton(blocks: torch.Tensor, q: torch.Tensor, k_pool: torch.Tensor, *, block_size: int,
                            tau: float, target: float = 0.0, block_n: Optional[int] = None):
    """FlexPrefill's per-head pattern test (step 3) and step 4's forced blocks, one program per
    (batch, query head).

    Args:
        blocks: float32 ``[2, B, Hq, nK]`` contiguous: the block sums of the vertical and slash
            profiles (:func:`profile_blocks_triton`). Changed in place: after the test has read
            them, vertical block 0 and slash block ``nK - 1`` are set to ``+inf`` (always kept).
        q: ``[B, Hq, Lq, D]`` (any strides): the last ``P = min(block_size, Lq)`` rows are averaged.
        k_pool: float32 ``[B, Hkv, nK, D]`` contiguous: mean-pooled keys (:func:`pool_blocks_triton`).
        tau: the test's threshold; target: written to every entry of ``targets`` (the block map's
            cumulative target).
        block_n: key blocks per chunk (default: up to 16384 / D; tests force several chunks).
    Returns:
        ``(query_aware, targets)``: ``query_aware`` bool ``[B, Hq]`` = ``sqrt(JSD)(softmax(mean(q_last)
        . k_pool^T / sqrt(D)), vertical blocks) < tau``; ``targets`` float32 ``[B, Hq]``. No host sync.
    """
    _, B, Hq, nK = blocks.shape
    Hkv, D = k_pool.shape[1], k_pool.shape[3]
    Lq = q.shape[2]
    if blocks.dtype != torch.float32 or not blocks.is_contiguous():
        raise ValueError("blocks must be contiguous float32 [2, B, Hq, nK]")
    if k_pool.dtype != torch.float32 or not k_pool.is_contiguous() or k_pool.shape[2] != nK:
        raise ValueError(f"k_pool must be contiguous float32 [B, Hkv, nK={nK}, D], got "
                         f"{tuple(k_pool.shape)} {k_pool.dtype}")
    dev = blocks.device
    query_aware = torch.empty(B, Hq, dtype=torch.bool, device=dev)
    targets = torch.empty(B, Hq, dtype=torch.float32, device=dev)
    pairs = B * Hq
    if pairs == 0 or nK == 0:
        return query_aware, targets
    block_size = _check_block(block_size)
    P = min(block_size, Lq)
    d_pad = _pow2(D, 16)
    # Up to 256 key blocks (32K keys at block 128) in one chunk on 8 warps: the program is a chain
    # of dependent loads and reductions, so the fewer steps the better.
    block_n = _pow2(block_n if block_n is not None else min(16384 // d_pad, nK), 16)
    _pattern_test[(pairs,)](
        blocks, q, k_pool, query_aware.view(torch.uint8), targets, *q.stride(),
        pairs, Hq, Hq // Hkv, Lq, nK, P, math.sqrt(D), float(tau), float(target),
        HEAD_DIM=D, D_PAD=d_pad, ROWS=min(_pow2(P, 16), max(16, 8192 // d_pad)), BLOCK_N=block_n, num_warps=8)
    return query_aware, targets


@triton.jit
def _budget(tokens, aware, min_blocks, max_blocks, BLOCK_SIZE: tl.constexpr, LEGACY: tl.constexpr):
    """Budget in blocks from a token count: ``clamp(ceil(tokens / block), min, max)`` (legacy:
    the official ``tokens // 128 + 1``, whatever the block size); ``min`` for a query-aware head."""
    if LEGACY:
        n = tokens // 128 + 1
    else:  # tokens >= 1: plain integer division rounds up correctly
        n = (tokens + BLOCK_SIZE - 1) // BLOCK_SIZE
    n = tl.minimum(tl.maximum(n, min_blocks), max_blocks)
    return tl.where(aware, min_blocks, n)


@triton.jit
def _block_ranks(X, Ranks, N, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < N
    kc = _key_of(tl.load(X + row * N + c, mask=c_ok, other=0.0))
    # [BLOCK_C, BLOCK_J] counts reduced once after the loop (see _pattern_test)
    acc = tl.zeros([BLOCK_C, BLOCK_J], dtype=tl.int32)
    for j0 in range(0, N, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        j_ok = j < N
        kj = _key_of(tl.load(X + row * N + j, mask=j_ok, other=0.0))
        # j ranks before c: a larger key, or the same key at a lower index (the stable descending sort)
        before = (kj[None, :] > kc[:, None]) | ((kj[None, :] == kc[:, None]) & (j[None, :] < c[:, None]))
        acc += (before & j_ok[None, :]).to(tl.int32)
    tl.store(Ranks + row * N + c, tl.sum(acc, 1), mask=c_ok)


def block_ranks_triton(scores: torch.Tensor, *, block_c: Optional[int] = None,
                       block_j: Optional[int] = None) -> torch.Tensor:
    """int32 ``[..., N]``: each entry's position in its row's stable descending order.

    ``ranks < n`` is ``rank_mask(scores, n)`` for every ``n`` at once (ties to the lower index;
    NaN above ``+inf``, NaNs tied; ``-0.0`` ties with ``+0.0``): FlexPrefill ranks its block sums
    before the budgets are known, beside the cover counts, and the plan kernel compares.
    ``O(N^2)`` comparisons per row over ``(rows, N / block_c)`` programs, for rows of block
    scores (256 at 32K tokens in blocks of 128; 4096 at 512K). No host sync.

    Args:
        scores: float32 ``[..., N]`` contiguous.
        block_c, block_j: entries ranked per program, compared per step (powers of two >= 16).
    """
    if not isinstance(scores, torch.Tensor) or scores.dtype != torch.float32 or not scores.is_contiguous() \
            or scores.dim() < 1:
        raise ValueError("scores must be a contiguous float32 tensor [..., N]")
    ranks = torch.empty(scores.shape, dtype=torch.int32, device=scores.device)
    N = scores.shape[-1]
    rows = scores.numel() // N if N else 0
    if rows == 0:
        return ranks
    block_c = _pow2(block_c if block_c is not None else min(64, N), 16)
    block_j = _pow2(block_j if block_j is not None else min(128, N), 16)
    _block_ranks[(rows, triton.cdiv(N, block_c))](scores, ranks, N, BLOCK_C=block_c, BLOCK_J=block_j, num_warps=4)
    return ranks


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
def _plan_rows(Ranks, Tokens, BlockMap, QA, Limits, Counts, Indices, pairs, nQ, nK, q_len, offset,
               min_blocks, max_blocks, BLOCK_SIZE: tl.constexpr, LEGACY: tl.constexpr, BLOCK: tl.constexpr):
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
    n_v = _budget(tl.load(Tokens + pair), qa != 0, min_blocks, max_blocks, BLOCK_SIZE, LEGACY)
    n_s = _budget(tl.load(Tokens + pairs + pair), qa != 0, min_blocks, max_blocks, BLOCK_SIZE, LEGACY)
    found = tl.zeros([], dtype=tl.int32)
    for c in range(0, nK, BLOCK):
        n = c + tl.arange(0, BLOCK)
        n_ok = n < nK
        from_v = tl.load(Ranks + pair * nK + n, mask=n_ok, other=2147483647).to(tl.int64) < n_v
        s_idx = n - diag + nK - 1
        s_ok = n_ok & (s_idx >= 0) & (s_idx < nK)
        from_s = tl.load(Ranks + (pairs + pair) * nK + s_idx, mask=s_ok, other=2147483647).to(tl.int64) < n_s
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


def flexprefill_plan_triton(ranks: torch.Tensor, tokens: torch.Tensor, block_map: torch.Tensor,
                            query_aware: torch.Tensor, limits: torch.Tensor, *, block_size: int, q_len: int,
                            k_len: int, min_blocks: int, max_blocks: int, legacy_budget: bool,
                            block: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """FlexPrefill's budgets (step 2, and step 3's for query-aware heads), plan rows (step 4's
    union and step 5's block map), compacted.

    Per (batch, query head ``h``): the budgets ``n_v, n_s = clamp(ceil(tokens / block_size),
    min_blocks, max_blocks)`` (legacy: ``tokens // 128 + 1``), ``min_blocks`` for a query-aware
    head. Per query block ``I``: the key blocks ``n < limits[I]`` with ``ranks[0, b, h, n] < n_v``
    (a top vertical block), or ``ranks[1, b, h, s] < n_s`` for ``s = n - diag(I) + nK - 1`` in
    ``[0, nK)`` (a top slash block on ``I``'s diagonal, ``diag(I)`` = the key block of its last
    query), or ``n`` forced (block 0 and the key blocks holding ``I``'s queries:
    ``forced_blocks(sink_blocks=1, local_blocks=0, diagonal=True)``), or ``block_map[b, h, I, n]``
    on a query-aware head.

    Args:
        ranks: int32 ``[2, B, Hq, nK]`` (:func:`block_ranks_triton` of the vertical / slash blocks).
        tokens: int64 ``[2, B, Hq]``: the cover counts of the vertical / slash profiles.
        block_map: bool ``[B, Hq, nQ * nK]`` (or ``[B, Hq, nQ, nK]``), contiguous.
        query_aware: bool ``[B, Hq]``; limits: int32 ``[nQ]`` (``BlockPlan.causal_block_limits``).
        min_blocks, max_blocks, legacy_budget: as in ``FlexPrefill``.
    Returns:
        ``(counts int32 [B, Hq, nQ], indices int32 [B, Hq, nQ, nK])``: sorted, zeros after the
        count (``BlockPlan.from_block_mask(mask, ..., causal=True)``). No host sync.
    """
    _, B, Hq, nK = ranks.shape
    nQ = triton.cdiv(q_len, block_size)
    if nK != triton.cdiv(k_len, block_size) or block_map.numel() != B * Hq * nQ * nK:
        raise ValueError(f"ranks / block_map do not match nQ={nQ}, nK={triton.cdiv(k_len, block_size)}")
    if ranks.dtype != torch.int32 or tokens.dtype != torch.int64 or tuple(tokens.shape) != (2, B, Hq):
        raise ValueError(f"ranks must be int32 [2, B, Hq, nK] and tokens int64 [2, B, Hq], got {ranks.dtype}, "
                         f"{tokens.dtype} {tuple(tokens.shape)}")
    for name, t in (("block_map", block_map), ("query_aware", query_aware)):
        if t.dtype != torch.bool:
            raise ValueError(f"{name} must be a bool tensor, got {t.dtype}")
    dev = ranks.device
    counts = torch.empty(B, Hq, nQ, dtype=torch.int32, device=dev)
    indices = torch.empty(B, Hq, nQ, nK, dtype=torch.int32, device=dev)
    rows = B * Hq * nQ
    if rows == 0 or nK == 0:
        return counts, indices
    block = _pow2(block if block is not None else min(1024, nK), 16)
    _plan_rows[(rows,)](
        ranks.contiguous(), tokens.contiguous(), block_map.contiguous().view(torch.uint8),
        query_aware.contiguous().view(torch.uint8), limits.contiguous(), counts, indices,
        B * Hq, nQ, nK, q_len, k_len - q_len, int(min_blocks), int(max_blocks), BLOCK_SIZE=_check_block(block_size),
        LEGACY=bool(legacy_budget), BLOCK=block, num_warps=4)
    return counts, indices
