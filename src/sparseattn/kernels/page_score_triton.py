"""Triton page scoring and top-k page selection for Quest and block top-k decode.

Tiers: ``_quest_scores`` / ``_mean_scores`` (score every candidate page of one (batch, KV head)
in chunks of ``BLOCK_P`` pages, reading the page metadata through the page table: no gathered
copy), ``_select_pages`` (one program per row: bisection for the cut score, forced pages, ascending
``DecodeSelection`` rows), ``_chunk_candidates`` + ``_pick_candidates`` (the same result in two
launches for long rows: single-warp programs per chunk of pages keep the chunk's best, one program
per row ranks those; the fallback for rows too long for registers is ``torch.topk`` +
``_assemble``) -> ``quest_page_scores_triton``, ``mean_page_scores_triton``, ``top_pages_selection`` ->
``quest_select_triton`` / ``block_topk_select_triton`` (what ``Quest._select`` and
``BlockTopKDecode._select`` call on CUDA).

Pages of a sequence with ``N`` tokens fall in three ranges (``P`` = page size):
``[0, head)`` forced (block top-k's sink pages), ``[head, first_recent)`` candidates, and
``[first_recent, ceil(N / P))`` forced (the pages of the step's new tokens, plus block top-k's
``local`` tokens), where ``first_recent = max(N - recent, 0) // P`` and ``head = min(sink_pages,
first_recent)``. Scores are ``-inf`` outside the candidate range. One step is two launches
(scores, selection) and never reads a device value back on the host.

Ties: the PyTorch path (``rank_mask``: stable sort) keeps the lower page index among equal
scores, and so does the bisection. ``torch.topk`` (the fallback) gives no such guarantee, so on
exact ties at the budget's edge it may pick a different (equally scored) page; the selection is
still valid and of the same size.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .dispatch import triton_interpreting
from .select_triton import MAX_KEY_BLOCKS, _finite_scores, _inclusive_count, _select_row, _top_lanes

SCORE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GQA_REDUCTIONS = ("group_max", "group_sum")
# Pages per program: the program loads its [BLOCK_P, D] metadata tiles at once (Quest: max and
# min, 32 KB at D = 128 in bf16; block top-k: the fp32 mean, 32 KB) and HBM latency is hidden by
# the 2-4 programs resident per SM (64-128 KB in flight), not by a pipelined loop. Register use
# (sm_90, ptxas) picked these: Quest bf16/fp16 with G * Lq <= 16 query rows: 64 pages, 4 warps,
# ~144 registers, no spills; more rows take fewer pages. fp32's exact ("ieee") tl.dot runs on
# FMA units and holds whole operands in registers: 16 pages, 8 warps.
DEFAULT_BLOCK_P = 64
DEFAULT_BLOCK_K = 64  # top-k entries per assembly program (a BLOCK_K x BLOCK_K rank tile)
# Two-stage selection: rows of at least this many pages are cut into chunks of TWO_STAGE_CHUNK
# pages, one single-warp program each (warp-only reductions), whose best candidates a second
# launch ranks. H100 (scripts/sweep_select_pages.py, budget 128, 8 / 64 rows): 16384 pages 27.2 /
# 36.0 us against 39.1 / 42.0 for the bisection (16 warps); 8192 pages 26.2 / 28.7 against 22.8 /
# 24.7 (8 warps), so rows of up to 8192 pages keep the one-launch bisection.
TWO_STAGE_MIN_PAGES = 8193
TWO_STAGE_CHUNK = 1024


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _candidate_range(Lengths, b, page_size, sink_pages, recent):
    """(head, first_recent, n_pages) of sequence ``b``: candidates are ``[head, first_recent)``."""
    n = tl.load(Lengths + b).to(tl.int32)
    n_pages = (n + page_size - 1) // page_size
    first_recent = tl.maximum(n - recent, 0) // page_size
    head = tl.minimum(first_recent, sink_pages)
    return head, first_recent, n_pages


@triton.jit
def _quest_scores(Q, MaxPool, MinPool, Table, Lengths, Out, Hkv, max_pages, page_size, recent,
                  stride_qb, stride_qh, stride_ql, stride_qd, stride_mp, stride_mh, stride_md,
                  stride_ob, stride_oh, stride_op, stride_tb,
                  G: tl.constexpr, LQ: tl.constexpr, D: tl.constexpr, GROUP_SUM: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
                  UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # KV head fastest: the Hkv programs of one page chunk run together and read each page's
    # metadata rows of all heads (contiguous in the pool) and its page table entries once from DRAM.
    chunk = tl.program_id(0) // Hkv
    h = (tl.program_id(0) % Hkv).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    # Candidates: the pages before the first page of the new tokens.
    first_recent = tl.maximum(tl.load(Lengths + b).to(tl.int32) - recent, 0) // page_size

    # The group's G * Lq query rows (row g * Lq + i = head h * G + g, query i), padded to BLOCK_R
    # (>= 16 for tl.dot) with zero rows, split into relu(q) and min(q, 0) as Quest's bound needs.
    rows = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < G * LQ
    q_ptr = (Q + b * stride_qb + (h * G + rows // LQ)[:, None] * stride_qh + (rows % LQ)[:, None] * stride_ql
             + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptr, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    zero = tl.zeros_like(q)
    q_pos = tl.where(q > 0, q, zero)
    q_neg = tl.where(q < 0, q, zero)

    offs_p = chunk * BLOCK_P + tl.arange(0, BLOCK_P)
    cand = offs_p < first_recent  # masked loads move no bytes: pages past it cost nothing
    phys = tl.load(Table + b * stride_tb + offs_p, mask=cand, other=0).to(tl.int64)
    m_off = phys[:, None] * stride_mp + h * stride_mh + offs_d[None, :] * stride_md
    m_ok = cand[:, None] & (offs_d[None, :] < D)
    mx = tl.load(MaxPool + m_off, mask=m_ok, other=0.0)
    mn = tl.load(MinPool + m_off, mask=m_ok, other=0.0)
    if UPCAST:
        mx = mx.to(tl.float32)
        mn = mn.to(tl.float32)
    # U[r, p] = relu(q_r) . M_p + min(q_r, 0) . m_p = sum_c max(q_rc M_pc, q_rc m_pc); fp32 accumulate.
    u = tl.dot(q_pos, tl.trans(mx), input_precision=DOT_PRECISION)
    u = tl.dot(q_neg, tl.trans(mn), u, input_precision=DOT_PRECISION)
    neg_inf = tl.full([BLOCK_R, BLOCK_P], float("-inf"), tl.float32)
    if GROUP_SUM:  # per head: max over its Lq queries, then the sum over the group's heads
        score = tl.zeros([BLOCK_P], dtype=tl.float32)
        for g in tl.static_range(G):
            in_g = (rows >= g * LQ) & (rows < (g + 1) * LQ)
            score += tl.max(tl.where(in_g[:, None], u, neg_inf), 0)
    else:  # max over every (head, query) row of the group
        score = tl.max(tl.where(row_ok[:, None], u, neg_inf), 0)
    score = tl.where(cand, score, float("-inf"))
    tl.store(Out + b * stride_ob + h * stride_oh + offs_p * stride_op, score, mask=offs_p < max_pages)


@triton.jit
def _mean_scores(Q, MeanPool, Table, Lengths, Out, Hkv, max_pages, page_size, sink_pages, recent,
                 stride_qb, stride_qh, stride_ql, stride_qd, stride_mp, stride_mh, stride_md,
                 stride_ob, stride_oh, stride_op, stride_tb,
                 G: tl.constexpr, LQ: tl.constexpr, D: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr):
    chunk = tl.program_id(0) // Hkv  # KV head fastest, as in _quest_scores
    h = (tl.program_id(0) % Hkv).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    head, first_recent, _ = _candidate_range(Lengths, b, page_size, sink_pages, recent)

    # Mean query of the group (the mean of q . kbar over heads and queries is linear): G * Lq x D
    # values, recomputed by every program of the row (a few KB, from L2), BLOCK_R rows at a time.
    offs_d = tl.arange(0, BLOCK_D)
    qsum = tl.zeros([BLOCK_D], dtype=tl.float32)
    for r0 in range(0, G * LQ, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        q_ptr = (Q + b * stride_qb + (h * G + rows // LQ)[:, None] * stride_qh + (rows % LQ)[:, None] * stride_ql
                 + offs_d[None, :] * stride_qd)
        q = tl.load(q_ptr, mask=(rows < G * LQ)[:, None] & (offs_d[None, :] < D), other=0.0)
        qsum += tl.sum(q.to(tl.float32), 0)
    qbar = qsum / (G * LQ)

    offs_p = chunk * BLOCK_P + tl.arange(0, BLOCK_P)
    cand = (offs_p >= head) & (offs_p < first_recent)
    phys = tl.load(Table + b * stride_tb + offs_p, mask=cand, other=0).to(tl.int64)
    kbar = tl.load(MeanPool + phys[:, None] * stride_mp + h * stride_mh + offs_d[None, :] * stride_md,
                   mask=cand[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
    score = tl.sum(kbar * qbar[None, :], 1)
    score = tl.where(cand, score, float("-inf"))
    tl.store(Out + b * stride_ob + h * stride_oh + offs_p * stride_op, score, mask=offs_p < max_pages)


@triton.jit
def _assemble(Top, Lengths, Counts, Pages, H, k, width, page_size, budget, sink_pages, recent,
              FORCED_IN_BUDGET: tl.constexpr, BLOCK_K: tl.constexpr):
    """One (batch, head) row, entries ``[chunk * BLOCK_K, +BLOCK_K)`` of its top-k list.

    The first ``free`` top-k entries (``Top`` is by descending score when ``free < k`` can
    happen) that are candidates are the chosen pages; each one's slot is its rank among them
    (page ids are distinct, so counting the smaller ones sorts them: O(k^2 / BLOCK_K) compares
    per program, no sort kernel). Chunk 0 also writes the forced pages, the zero tail and the count.
    """
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    head, first_recent, n_pages = _candidate_range(Lengths, row // H, page_size, sink_pages, recent)
    n_tail = n_pages - first_recent
    free = budget
    if FORCED_IN_BUDGET:
        free = tl.maximum(budget - head - n_tail, 0)
    big = 2147483647

    n_sel = tl.zeros([], dtype=tl.int32)
    for c in range(0, k, BLOCK_K):
        offs = c + tl.arange(0, BLOCK_K)
        idx = tl.load(Top + row * k + offs, mask=offs < k, other=-1).to(tl.int32)
        n_sel += tl.sum(((offs < free) & (idx >= head) & (idx < first_recent)).to(tl.int32), 0)

    offs_i = chunk * BLOCK_K + tl.arange(0, BLOCK_K)
    idx_i = tl.load(Top + row * k + offs_i, mask=offs_i < k, other=-1).to(tl.int32)
    used_i = (offs_i < k) & (offs_i < free) & (idx_i >= head) & (idx_i < first_recent)
    key_i = tl.where(used_i, idx_i, big)
    rank = tl.zeros([BLOCK_K], dtype=tl.int32)
    for c in range(0, k, BLOCK_K):
        offs_j = c + tl.arange(0, BLOCK_K)
        idx_j = tl.load(Top + row * k + offs_j, mask=offs_j < k, other=-1).to(tl.int32)
        used_j = (offs_j < free) & (idx_j >= head) & (idx_j < first_recent)
        key_j = tl.where(used_j, idx_j, big)
        rank += tl.sum((key_j[None, :] < key_i[:, None]).to(tl.int32), 1)
    tl.store(Pages + row * width + head + rank, idx_i, mask=used_i & (head + rank < width))  # never the next row

    if chunk == 0:
        tail_start = head + n_sel
        for c in range(0, width, BLOCK_K):
            offs = c + tl.arange(0, BLOCK_K)
            val = tl.where(offs < head, offs,
                           tl.where((offs >= tail_start) & (offs < tail_start + n_tail),
                                    first_recent + offs - tail_start, 0))
            tl.store(Pages + row * width + offs, val, mask=(offs < width) & ((offs < head) | (offs >= tail_start)))
        tl.store(Counts + row, tail_start + n_tail)


@triton.jit
def _select_pages(Scores, Lengths, Counts, Pages, H, max_pages, width, page_size, budget, sink_pages, recent,
                  stride_sb, stride_sh, stride_sp, finite_max,
                  FORCED_IN_BUDGET: tl.constexpr, TILE: tl.constexpr):
    """One (batch, head) row: forced pages + the best ``free`` candidates, ascending, in one program.

    The row's geometry maps onto the prefill block selector (``select_triton._select_row``): the
    sink pages are its sink blocks, the tail ``[first_recent, n_pages)`` its "diagonal" run, the
    visible limit ``n_pages``; the cut is found by bisection over the score bits (no sort), ties go
    to the lower page, as in the PyTorch path's stable sort.
    """
    row = tl.program_id(0).to(tl.int64)
    b = row // H
    h = row % H
    head, first_recent, n_pages = _candidate_range(Lengths, b, page_size, sink_pages, recent)
    n_forced = head + (n_pages - first_recent)
    value = budget + 0 * n_forced  # forced pages count toward the budget (Quest) ...
    if not FORCED_IN_BUDGET:
        value = budget + n_forced  # ... or come on top of it (block top-k)
    _select_row(Scores, Counts, Pages, row, b * stride_sb + h * stride_sh, stride_sp, value, width, n_pages,
                first_recent, n_pages - 1, head, 0, finite_max, True, True, TILE)


@triton.jit
def _free_pages(budget, head, first_recent, n_pages, FORCED_IN_BUDGET: tl.constexpr):
    """Candidate pages a row may choose: the budget, less the forced pages when they count toward it."""
    if FORCED_IN_BUDGET:
        return budget - head - (n_pages - first_recent)
    else:
        return budget + 0 * head


@triton.jit
def _chunk_candidates(Scores, Lengths, CandScore, CandPage, H, n_chunks, page_size, budget, sink_pages, recent,
                      stride_sb, stride_sh, stride_sp, finite_max,
                      FORCED_IN_BUDGET: tl.constexpr, CHUNK: tl.constexpr, SLOTS: tl.constexpr):
    """Stage 1 of the two-stage selection: one (row, chunk of ``CHUNK`` pages) per program keeps
    the chunk's best ``free`` candidates (the row's best are among them) and writes their scores
    and pages in page order to ``SLOTS`` slots, page -1 in the unused ones."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    b = row // H
    h = row % H
    head, first_recent, n_pages = _candidate_range(Lengths, b, page_size, sink_pages, recent)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    cand = (offs >= head) & (offs < first_recent)
    x = tl.load(Scores + b * stride_sb + h * stride_sh + offs.to(tl.int64) * stride_sp, mask=cand,
                other=0.0).to(tl.float32)
    x = _finite_scores(x, finite_max)
    chosen = _top_lanes(x, cand, _free_pages(budget, head, first_recent, n_pages, FORCED_IN_BUDGET), CHUNK)
    rank = _inclusive_count(chosen.to(tl.int32), CHUNK) - 1
    n_chosen = tl.sum(chosen.to(tl.int32), 0)
    base = (row * n_chunks + c) * SLOTS
    tl.store(CandScore + base + rank, x, mask=chosen & (rank < SLOTS))
    tl.store(CandPage + base + rank, offs, mask=chosen & (rank < SLOTS))
    slots = tl.arange(0, SLOTS)
    tl.store(CandPage + base + slots, tl.full([SLOTS], -1, tl.int32), mask=slots >= n_chosen)


@triton.jit
def _pick_candidates(CandScore, CandPage, Lengths, Counts, Pages, H, n_cand_slots, width, page_size, budget,
                     sink_pages, recent, FORCED_IN_BUDGET: tl.constexpr, TILE: tl.constexpr,
                     BLOCK_W: tl.constexpr):
    """Stage 2: one row per program chooses its best ``free`` among the chunks' candidates (in page
    order, so ties still go to the lower page) and writes sinks, chosen pages and the recent tail:
    three ascending runs, zeros after the count."""
    row = tl.program_id(0).to(tl.int64)
    b = row // H
    head, first_recent, n_pages = _candidate_range(Lengths, b, page_size, sink_pages, recent)
    offs = tl.arange(0, TILE)
    page = tl.load(CandPage + row * n_cand_slots + offs, mask=offs < n_cand_slots, other=-1)
    cand = page >= 0
    x = tl.load(CandScore + row * n_cand_slots + offs, mask=cand, other=0.0)
    chosen = _top_lanes(x, cand, _free_pages(budget, head, first_recent, n_pages, FORCED_IN_BUDGET), TILE)
    rank = _inclusive_count(chosen.to(tl.int32), TILE) - 1
    n_chosen = tl.sum(chosen.to(tl.int32), 0)
    count = head + n_chosen + (n_pages - first_recent)
    out = Pages + row * width
    tl.store(out + head + rank, page, mask=chosen & (head + rank < width))
    for w0 in range(0, width, BLOCK_W):
        p = w0 + tl.arange(0, BLOCK_W)
        val = tl.where(p < head, p, first_recent + (p - head - n_chosen))
        val = tl.where(p < count, val, 0)
        tl.store(out + p, val, mask=(p < width) & ((p < head) | (p >= head + n_chosen)))
    tl.store(Counts + row, count)


# ----------------------------------------------------------------------------- wrappers
def _check_common(q: torch.Tensor, pools: dict, page_table: torch.Tensor, lengths: torch.Tensor) -> tuple:
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a 4-D [B, Hq, Lq, D] tensor, got "
                         f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    if q.dtype not in SCORE_DTYPES:
        raise ValueError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    B, Hq, Lq, D = q.shape
    Hkv = None
    for name, pool in pools.items():
        if not isinstance(pool, torch.Tensor) or pool.dim() != 3:
            raise ValueError(f"{name} must be a 3-D [capacity, Hkv, D] tensor, got "
                             f"{tuple(pool.shape) if isinstance(pool, torch.Tensor) else type(pool).__name__}")
        if pool.dtype not in SCORE_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16 or float32, got {pool.dtype}")
        if pool.shape[2] != D:
            raise ValueError(f"{name} has head_dim {pool.shape[2]}, q has {D}")
        if Hkv is not None and pool.shape[1] != Hkv:
            raise ValueError(f"metadata pools disagree on Hkv: {Hkv} and {pool.shape[1]}")
        Hkv = pool.shape[1]
        if pool.device != q.device:
            raise ValueError(f"{name} is on {pool.device}, q on {q.device}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads must be a multiple of KV heads (GQA), got Hq={Hq}, Hkv={Hkv}")
    if not isinstance(page_table, torch.Tensor) or page_table.dtype != torch.int32 or page_table.dim() != 2 \
            or page_table.shape[0] != B:
        raise ValueError(f"page_table must be int32 [B={B}, max_pages], got "
                         f"{getattr(page_table, 'dtype', type(page_table).__name__)} "
                         f"{tuple(getattr(page_table, 'shape', ()))}")
    if page_table.shape[1] and page_table.stride(1) != 1:
        raise ValueError("page_table must be contiguous along the page dimension")
    if not isinstance(lengths, torch.Tensor) or lengths.dtype not in (torch.int32, torch.int64) \
            or tuple(lengths.shape) != (B,):
        raise ValueError(f"lengths must be an int32/int64 [B={B}] tensor, got "
                         f"{getattr(lengths, 'dtype', type(lengths).__name__)} {tuple(getattr(lengths, 'shape', ()))}")
    for name, t in (("page_table", page_table), ("lengths", lengths)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    return B, Hq, Lq, D, Hkv


def quest_config(dtype: torch.dtype, rows: int) -> tuple:
    """(BLOCK_P, num_warps) of the Quest kernel for ``rows = G * Lq`` query rows (see DEFAULT_BLOCK_P)."""
    if dtype == torch.float32:
        return 16, 8
    block_r = max(16, triton.next_power_of_2(rows))
    return (64 if block_r <= 16 else 32 if block_r <= 64 else 16), 4


def _tiles(G: int, Lq: int, D: int, max_pages: int, block_p: int) -> tuple:
    block_r = max(16, triton.next_power_of_2(G * Lq))
    block_d = max(16, triton.next_power_of_2(D))
    block_p = max(16, min(triton.next_power_of_2(block_p), triton.next_power_of_2(max(max_pages, 1))))
    return block_r, block_d, block_p


def quest_page_scores_triton(q: torch.Tensor, meta_max: torch.Tensor, meta_min: torch.Tensor,
                             page_table: torch.Tensor, lengths: torch.Tensor, *, page_size: int,
                             gqa_policy: str = "group_max", block_p: Optional[int] = None,
                             num_warps: Optional[int] = None) -> torch.Tensor:
    """Quest's page bound per (batch, KV head, logical page), reduced over the GQA group.

    Args:
        q: ``[B, Hq, Lq, D]`` float16/bfloat16/float32, the step's ``Lq`` new queries (any strides).
        meta_max, meta_min: ``[capacity, Hkv, D]`` per physical page (the cache's ``"max"`` /
            ``"min"`` metadata pools), q's dtype.
        page_table: int32 ``[B, max_pages]`` (rows may be strided; pages contiguous).
        lengths: int32/int64 ``[B]`` tokens per sequence (the new ones included).
        page_size: tokens per page.
        gqa_policy: ``"group_max"`` (max over the group's ``G`` heads and ``Lq`` queries) or
            ``"group_sum"`` (per head the max over the queries, summed over the heads).
        block_p, num_warps: tile override (default :func:`quest_config`).

    Returns:
        float32 ``[B, Hkv, max_pages]``: ``U_p = sum_c max(q_c M_pc, q_c m_pc)`` reduced as
        above (fp32 accumulation, no rounding to the input dtype), ``-inf`` for pages that are
        not candidates (``p >= (len - Lq) // page_size``: the new tokens' pages and beyond).
    """
    if gqa_policy not in GQA_REDUCTIONS:
        raise ValueError(f"gqa_policy must be one of {GQA_REDUCTIONS}, got {gqa_policy!r}")
    B, Hq, Lq, D, Hkv = _check_common(q, {"meta_max": meta_max, "meta_min": meta_min}, page_table, lengths)
    if meta_max.dtype != q.dtype or meta_min.dtype != q.dtype:
        raise ValueError(f"meta_max/meta_min must have q's dtype {q.dtype}, got {meta_max.dtype}/{meta_min.dtype}")
    if meta_max.stride() != meta_min.stride():
        raise ValueError("meta_max and meta_min must share strides (two pools of one cache)")
    max_pages = page_table.shape[1]
    out = torch.empty(B, Hkv, max_pages, dtype=torch.float32, device=q.device)
    if out.numel() == 0 or Lq == 0:
        return out.fill_(float("-inf"))
    G = Hq // Hkv
    cfg = quest_config(q.dtype, G * Lq)
    block_p, num_warps = block_p or cfg[0], num_warps or cfg[1]
    block_r, block_d, block_p = _tiles(G, Lq, D, max_pages, block_p)
    # The interpreter gets bf16 dot products wrong (see decode_triton); upcasting bf16 is exact.
    upcast = q.dtype == torch.bfloat16 and triton_interpreting()
    dot_precision = "ieee" if q.dtype == torch.float32 or upcast else "tf32"  # fp32: exact products, no TF32
    grid = (triton.cdiv(max_pages, block_p) * Hkv, B)
    _quest_scores[grid](
        q, meta_max, meta_min, page_table, lengths, out, Hkv, max_pages, page_size, Lq,
        *q.stride(), *meta_max.stride(), *out.stride(), page_table.stride(0),
        G=G, LQ=Lq, D=D, GROUP_SUM=gqa_policy == "group_sum", BLOCK_R=block_r, BLOCK_D=block_d,
        BLOCK_P=block_p, UPCAST=upcast, DOT_PRECISION=dot_precision, num_warps=num_warps)
    return out


def mean_page_scores_triton(q: torch.Tensor, meta_mean: torch.Tensor, page_table: torch.Tensor,
                            lengths: torch.Tensor, *, page_size: int, sink_pages: int = 0, local: int = 0,
                            block_p: int = DEFAULT_BLOCK_P, num_warps: int = 4) -> torch.Tensor:
    """Block top-k's page score: the group's mean query (over ``G`` heads and ``Lq`` queries) times
    each page's mean key.

    Args:
        q: ``[B, Hq, Lq, D]`` float16/bfloat16/float32.
        meta_mean: ``[capacity, Hkv, D]`` mean key per physical page (float32 in the cache).
        page_table, lengths, page_size: as :func:`quest_page_scores_triton`.
        sink_pages: leading pages that are forced (not candidates).
        local: tokens before the new ones whose pages are forced too.

    Returns:
        float32 ``[B, Hkv, max_pages]``, ``-inf`` outside the candidates
        ``[min(sink_pages, r), r)`` with ``r = max(len - Lq - local, 0) // page_size``.
    """
    B, Hq, Lq, D, Hkv = _check_common(q, {"meta_mean": meta_mean}, page_table, lengths)
    max_pages = page_table.shape[1]
    out = torch.empty(B, Hkv, max_pages, dtype=torch.float32, device=q.device)
    if out.numel() == 0 or Lq == 0:
        return out.fill_(float("-inf"))
    G = Hq // Hkv
    _, block_d, block_p = _tiles(G, Lq, D, max_pages, block_p)
    block_r = min(16, triton.next_power_of_2(G * Lq))  # rows of q per step of the mean
    grid = (triton.cdiv(max_pages, block_p) * Hkv, B)
    _mean_scores[grid](
        q, meta_mean, page_table, lengths, out, Hkv, max_pages, page_size, sink_pages, Lq + local,
        *q.stride(), *meta_mean.stride(), *out.stride(), page_table.stride(0),
        G=G, LQ=Lq, D=D, BLOCK_R=block_r, BLOCK_D=block_d, BLOCK_P=block_p, num_warps=num_warps)
    return out


def top_pages_selection(scores: torch.Tensor, lengths: torch.Tensor, *, page_size: int, budget: int,
                        recent: int, width: int, sink_pages: int = 0, forced_in_budget: bool = False,
                        block_k: int = DEFAULT_BLOCK_K, method: str = "auto", num_warps: Optional[int] = None,
                        chunk: int = TWO_STAGE_CHUNK):
    """The forced pages plus the best candidate pages of each (batch, head) as a ``DecodeSelection``.

    Args:
        scores: float ``[B, H, max_pages]``, ``-inf`` outside each row's candidates.
        lengths: int32/int64 ``[B]``.
        page_size: tokens per page.
        budget: candidate pages to choose (a host int); with ``forced_in_budget`` the forced
            pages count toward it (Quest), else they come on top (block top-k).
        recent: tokens at the end whose pages are forced (``Lq``, plus block top-k's ``local``).
        width: index width of the selection (>= the largest count).
        sink_pages: leading forced pages.

    Returns:
        ``DecodeSelection`` with int32 ``page_counts [B, H]`` and ``pages [B, H, width]``
        (ascending, zeros after the count), as ``DecodeSelection.from_page_mask`` lays it out.
        No host sync.

    ``method``: ``"bisect"`` (default while a row fits one program, ``max_pages <=``
    ``select_triton.MAX_KEY_BLOCKS``): one launch, one program per row holds the row in registers,
    bisects for the cut score and writes the pages; ties go to the lower page (the PyTorch path's
    order). ``"topk"``: ``torch.topk`` picks the candidates (a radix select of ``k`` ids; ``k`` a
    host int from ``budget`` and the shapes), then one Triton launch sorts them and appends the
    forced pages; ties at the budget's edge are unspecified. ``"two_stage"`` (default from
    ``TWO_STAGE_MIN_PAGES`` pages while ``2 * budget <= chunk``): programs of one warp keep each
    ``chunk`` of pages' best candidates, in page order, then one program per row ranks those and
    writes the row (same result as ``"bisect"``, ties included). ``num_warps``: the bisection
    program's (default: 4 warps up to 4096 pages, then about 32 pages per thread up to 16 warps: the
    fastest of 2/4/8/16 in ``scripts/sweep_select_pages.py`` on the H100). On the H100 at 128K tokens (8192
    pages, 8 rows) torch.topk alone took 46 us of a 79 us Quest step (its single-block kernel).
    """
    from ..decode_api import DecodeSelection

    if not isinstance(scores, torch.Tensor) or scores.dim() != 3 or not scores.dtype.is_floating_point:
        raise ValueError(f"scores must be a float [B, H, max_pages] tensor, got "
                         f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}")
    B, H, max_pages = scores.shape
    if not isinstance(lengths, torch.Tensor) or lengths.dtype not in (torch.int32, torch.int64) \
            or tuple(lengths.shape) != (B,) or lengths.device != scores.device:
        raise ValueError(f"lengths must be an int32/int64 [B={B}] tensor on {scores.device}")
    for name, value, low in (("budget", budget, 0), ("recent", recent, 1), ("width", width, 1),
                             ("sink_pages", sink_pages, 0), ("page_size", page_size, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if method not in ("auto", "bisect", "two_stage", "topk"):
        raise ValueError(f"method must be 'auto', 'bisect', 'two_stage' or 'topk', got {method!r}")
    if not isinstance(chunk, int) or chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two >= 16, got {chunk!r}")
    if method in ("bisect", "two_stage") and max_pages > MAX_KEY_BLOCKS:
        raise ValueError(f"method={method!r} holds a row in registers: at most {MAX_KEY_BLOCKS} pages, "
                         f"got {max_pages}")
    if method == "auto":
        method = "topk" if max_pages > MAX_KEY_BLOCKS else (
            "two_stage" if max_pages >= TWO_STAGE_MIN_PAGES and 2 * budget <= chunk else "bisect")
    bisect = method == "bisect"
    # How many ids topk returns. When every row chooses the same number of pages (forced pages on
    # top of the budget, or Quest at Lq = 1, where exactly one page is forced) that number is
    # enough and their order does not matter; otherwise rows take a prefix of a sorted list.
    if not forced_in_budget:
        k, ordered = budget, False
    elif recent == 1 and sink_pages == 0:
        k, ordered = budget - 1, False
    else:
        k, ordered = budget, True
    k = max(1, min(k, max_pages))
    counts = torch.empty(B, H, dtype=torch.int32, device=scores.device)
    pages = torch.empty(B, H, width, dtype=torch.int32, device=scores.device)
    if B * H == 0:
        return DecodeSelection(counts, pages, page_size)
    if max_pages == 0:  # no page anywhere: every count is 0
        return DecodeSelection(counts.zero_(), pages.zero_(), page_size)
    if method == "two_stage":
        sc = scores if scores.dtype in SCORE_DTYPES else scores.float()
        n_chunks = triton.cdiv(max_pages, chunk)
        slots = triton.next_power_of_2(max(1, min(budget, chunk)))
        cand_score = torch.empty(B * H, n_chunks * slots, dtype=torch.float32, device=scores.device)
        cand_page = torch.empty(B * H, n_chunks * slots, dtype=torch.int32, device=scores.device)
        _chunk_candidates[(B * H, n_chunks)](
            sc, lengths, cand_score, cand_page, H, n_chunks, page_size, budget, sink_pages, recent,
            sc.stride(0), sc.stride(1), sc.stride(2), float(torch.finfo(sc.dtype).max),
            FORCED_IN_BUDGET=forced_in_budget, CHUNK=chunk, SLOTS=slots, num_warps=1)
        tile = triton.next_power_of_2(n_chunks * slots)
        _pick_candidates[(B * H,)](
            cand_score, cand_page, lengths, counts, pages, H, n_chunks * slots, width, page_size, budget,
            sink_pages, recent, FORCED_IN_BUDGET=forced_in_budget, TILE=tile, BLOCK_W=256,
            num_warps=num_warps or min(8, max(1, tile // 256)))
        return DecodeSelection(counts, pages, page_size)
    if bisect:
        tile = max(16, triton.next_power_of_2(max_pages))
        sc = scores if scores.dtype in SCORE_DTYPES else scores.float()
        _select_pages[(B * H,)](sc, lengths, counts, pages, H, max_pages, width, page_size, budget, sink_pages,
                                recent, sc.stride(0), sc.stride(1), sc.stride(2), float(torch.finfo(sc.dtype).max),
                                FORCED_IN_BUDGET=forced_in_budget, TILE=tile,
                                num_warps=num_warps or min(16, max(4, tile // 1024)))
        return DecodeSelection(counts, pages, page_size)
    top = torch.topk(scores, k, dim=-1, sorted=ordered).indices.contiguous()
    _assemble[(B * H, triton.cdiv(k, block_k))](
        top, lengths, counts, pages, H, k, width, page_size, budget, sink_pages, recent,
        FORCED_IN_BUDGET=forced_in_budget, BLOCK_K=block_k, num_warps=4)
    return DecodeSelection(counts, pages, page_size)


# ----------------------------------------------------------------------------- decode methods
def _require_meta(cache, names, method: str, pretty: str) -> None:
    missing = [n for n in names if n not in cache.metadata_names]
    if missing:
        raise ValueError(f"{method} needs page metadata {pretty}; this cache keeps {list(cache.metadata_names)} "
                         "(build it with the default metadata)")


def quest_select_triton(q: torch.Tensor, cache, layer: int, *, page_budget: int, gqa_policy: str):
    """``Quest._select`` for ``gqa_policy`` group_max/group_sum: same pages (up to exact score ties)."""
    _require_meta(cache, ("min", "max"), "Quest", "'min' and 'max'")
    P, Lq = cache.page_size, q.shape[2]
    lengths = cache.layer_lengths(layer)
    scores = quest_page_scores_triton(q, cache.page_meta_pool(layer, "max"), cache.page_meta_pool(layer, "min"),
                                      cache.page_table, lengths, page_size=P, gqa_policy=gqa_policy)
    width = min(cache.max_pages, page_budget + Lq // P + 2)
    return top_pages_selection(scores, lengths, page_size=P, budget=page_budget, recent=Lq, width=width,
                               forced_in_budget=True)


def block_topk_select_triton(q: torch.Tensor, cache, layer: int, *, topk_pages: int, sink: int, local: int):
    """``BlockTopKDecode._select``: same pages (up to exact score ties)."""
    _require_meta(cache, ("mean",), "block_topk", "'mean'")
    P, Lq = cache.page_size, q.shape[2]
    lengths = cache.layer_lengths(layer)
    sink_pages = -(-sink // P)
    scores = mean_page_scores_triton(q, cache.page_meta_pool(layer, "mean"), cache.page_table, lengths,
                                     page_size=P, sink_pages=sink_pages, local=local)
    width = max(1, min(cache.max_pages, sink_pages + topk_pages + -(-(Lq + local) // P) + 1))
    return top_pages_selection(scores, lengths, page_size=P, budget=topk_pages, recent=Lq + local, width=width,
                               sink_pages=sink_pages)


__all__ = ["quest_page_scores_triton", "mean_page_scores_triton", "top_pages_selection", "quest_select_triton",
           "block_topk_select_triton"]
