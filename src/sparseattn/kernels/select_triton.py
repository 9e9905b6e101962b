"""Triton block selection: block scores -> a plan's (counts, indices) in one launch, no sort.

``ScoreBasedMethod._plan`` uses this on CUDA; ``select_topk`` / ``select_threshold`` followed by
``BlockPlan.from_block_mask`` (methods/base.py, plan.py) are the CPU path and the oracle.

One program owns one (batch, head, query-block) row and keeps it in registers. The visible and
forced blocks come from the row's geometry (scalars), not from ``[nQ, nK]`` masks. Instead of
sorting, the program bisects over the order-preserving integer image of the float scores for the
cut value ``t``: every candidate above ``t`` is kept, and among the candidates equal to ``t`` a
prefix in index order (a cumsum), which is exactly the stable descending sort's order.

* top-k: ``t`` is the ``extra``-th largest candidate (``extra`` = k minus the forced blocks),
  found by a k-ary search (``_top_lanes``: several probes per pass, one 2-D reduction each) that
  stops early once exactly ``extra`` candidates lie above a probe.
* threshold: ``t`` is the smallest value whose strictly-larger candidates, with the forced
  mass, still hold less than ``tau * total``: in sorted order that is the last entry whose
  mass *before* it is below the target, i.e. the end of the kept prefix.

Each search step is one masked row reduction (threshold: a bisection, about 32 steps; top-k:
about 16 passes of three probes). Causal rows that see at most a half / quarter of the key blocks
run the same code on a smaller tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Rows longer than this (key blocks) are not supported (the row lives in registers).
MAX_KEY_BLOCKS = 16384
#: Score dtypes the kernel reads (each converts to float32 exactly, so the order is kept).
SCORE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _order_key(x):
    """int32 keys whose integer order is the float order of ``x`` (-0.0 ties with +0.0)."""
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _finite_scores(x, finite_max):
    """nan_to_num as the PyTorch path does it: NaN -> 0, +-inf -> the input dtype's largest finite
    value (keeps ties of that dtype); -0.0 -> 0.0 (it ties with 0.0 in the sort)."""
    x = tl.where(x == x, x, 0.0)
    x = tl.minimum(tl.maximum(x, -finite_max), finite_max)
    return tl.where(x == 0.0, 0.0, x)


#: Columns of the two-level scan in :func:`_inclusive_count`.
SCAN_COLUMNS = tl.constexpr(32)  # a constexpr global: jitted code may read it


@triton.jit
def _inclusive_count(flags, TILE: tl.constexpr):
    """int32 [TILE]: ``tl.cumsum(flags, 0)`` of int32 0/1 ``flags``, as a two-level scan for long
    tiles: the tile viewed as ``[TILE / 32, 32]`` rows, a scan along each row plus the count of the
    rows before it (the one-level scan of a long tile is a chain of shuffles per register). On the
    H100 it took the selection of 128 of 8192 pages (8 rows) from 21.4 to 19.6 us and Quest's 128K
    step from 45 to 40 us (``scripts/sweep_select_pages.py``, BENCHMARKS.md, decode, session 10)."""
    if TILE >= 2 * SCAN_COLUMNS:
        rows = tl.reshape(flags, [TILE // SCAN_COLUMNS, SCAN_COLUMNS])
        row_total = tl.sum(rows, 1)
        before = tl.cumsum(row_total, 0) - row_total
        return tl.reshape(tl.cumsum(rows, 1) + before[:, None], [TILE])
    else:
        return tl.cumsum(flags, 0)


@triton.jit
def _top_lanes(x, cand, n_best, TILE: tl.constexpr, PROBE_LANES: tl.constexpr = 0):
    """bool [TILE]: the ``n_best`` largest ``x`` among the ``cand`` lanes (ties -> lower lane,
    the stable descending sort's order): every candidate above the cut value, then a prefix of
    the candidates equal to it. The cut ``t`` (the smallest key with at most ``n_best``
    candidates above it) is searched ``PROBE_LANES``-ary: each pass counts the candidates above
    ``PROBE_LANES`` evenly spaced probes in one 2-D reduction (fewer passes than a bisection, each
    a block-wide reduction whose latency dominates) and keeps the bracket where the count falls
    to ``n_best``; a probe with exactly ``n_best`` above it ends the search. ``PROBE_LANES=2``
    is the plain bisection; 0 (default) picks 4 up to 4096 lanes and 2 above: on the H100 4 was
    the fastest of 2/4/8/16 alone (``scripts/sweep_top_lanes.py``: 10-20 % under the bisection),
    but inside the page selector at 8192 lanes it was slower than the bisection (24 vs 22 us)."""
    key = _order_key(x)
    # The cut lies in [min key - 1, max key] of the candidates. Non-candidates get a key below
    # every probe (finite floats map above -2**31 + 2**23): "key > probe" needs no mask.
    lo = tl.min(tl.where(cand, key, 2147483647), 0).to(tl.int64) - 1
    key = tl.where(cand, key, -2147483647)
    hi = tl.max(key, 0).to(tl.int64)
    extra = tl.minimum(tl.maximum(n_best, 0), TILE).to(tl.int32)
    LANES: tl.constexpr = PROBE_LANES if PROBE_LANES > 0 else (4 if TILE <= 4096 else 2)
    if LANES == 2:
        # Plain bisection: one reduction per step, the rest scalar (the k-ary pass below would add
        # three small reductions per step).
        while lo < hi:
            mid = lo + (hi - lo) // 2
            n_above = tl.sum((key > mid.to(tl.int32)).to(tl.int32), 0)
            exact = n_above == extra  # the cut is "everything above mid": done
            hi = tl.where(n_above <= extra, mid, hi)
            lo = tl.where(exact, mid, tl.where(n_above <= extra, lo, mid + 1))
        t = lo.to(tl.int32)
    else:
        n_cand = tl.sum(cand.to(tl.int32), 0)
        hi = tl.where(n_cand <= extra, lo, hi)  # every candidate wanted: the cut is below them all
        # Invariant: more than ``extra`` candidates lie above ``lo``, at most ``extra`` above ``hi``.
        step = tl.arange(0, LANES).to(tl.int64)
        while hi - lo > 1:
            probes = lo + ((hi - lo) * step) // LANES  # probes[0] = lo
            n_above = tl.sum((key[:, None] > probes.to(tl.int32)[None, :]).to(tl.int32), 0)
            over = n_above > extra  # a prefix of the probes (the count falls as the probe rises)
            new_lo = tl.max(tl.where(over, probes, lo), 0)
            hi = tl.min(tl.where(over, hi, probes), 0)
            # The first probe not over has the largest count of those: exactly ``extra`` above it
            # makes it a valid cut, so the search stops there.
            exact = tl.max(tl.where(over, -1, n_above), 0) == extra
            lo = tl.where(exact, hi - 1, new_lo)
        t = hi.to(tl.int32)
    above = cand & (key > t)
    ties = cand & (key == t)
    tie_rank = _inclusive_count(ties.to(tl.int32), TILE) - 1
    return above | (ties & (tl.sum(above.to(tl.int32), 0) + tie_rank < extra))


@triton.jit
def _select_row(Scores, Counts, Indices, row, score_row, stride_sn, value, num_k_blocks, limit, d_lo, d_hi,
                sink_blocks, local_blocks, finite_max,
                TOPK: tl.constexpr, DIAGONAL: tl.constexpr, TILE: tl.constexpr):
    """Select one row whose visible blocks all lie in [0, TILE); writes its count and indices."""
    offs = tl.arange(0, TILE)
    visible = offs < limit
    x = tl.load(Scores + score_row + offs.to(tl.int64) * stride_sn, mask=visible, other=0.0).to(tl.float32)
    x = _finite_scores(x, finite_max)
    if not TOPK:
        x = tl.maximum(x, 0.0)  # threshold mode reads masses
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 ties with +0.0, as in the sort

    forced = offs < sink_blocks
    if DIAGONAL:
        forced = forced | ((offs >= d_lo) & (offs <= d_hi))
    local_lo = tl.where(d_hi >= 0, d_lo - local_blocks, d_lo)  # no local blocks for a row that sees nothing
    forced = forced | ((offs < d_lo) & (offs >= local_lo))
    forced = forced & visible
    cand = visible & ~forced

    if TOPK:
        n_forced = tl.sum(forced.to(tl.int32), 0)
        chosen = _top_lanes(x, cand, value - n_forced, TILE)
    else:
        key = _order_key(x)
        # Bisection bounds: the cut lies in [min key - 1, max key] of the candidates. Non-candidates
        # get a key below every probe (finite floats map above -2**31 + 2**23), so "key > probe"
        # needs no candidate mask inside the loop.
        lo = tl.min(tl.where(cand, key, 2147483647), 0).to(tl.int64) - 1
        key = tl.where(cand, key, -2147483647)
        hi = tl.max(key, 0).to(tl.int64)
        total = tl.sum(x, 0)  # x is 0 outside the visible blocks
        forced_mass = tl.sum(tl.where(forced, x, 0.0), 0)
        target = value * total
        hi = tl.where(value >= 1.0, lo, hi)  # tau >= 1 keeps every candidate, zero-mass ones too
        while lo < hi:
            mid = lo + (hi - lo) // 2
            before = forced_mass + tl.sum(tl.where(key > mid.to(tl.int32), x, 0.0), 0)
            hi = tl.where(before < target, mid, hi)
            lo = tl.where(before < target, lo, mid + 1)
        t = lo.to(tl.int32)
        above = cand & (key > t)
        ties = cand & (key == t)
        tie_rank = _inclusive_count(ties.to(tl.int32), TILE) - 1
        base = forced_mass + tl.sum(tl.where(above, x, 0.0), 0)
        # mass before the j-th tie, in the PyTorch path's order: (kept so far + j + 1 ties) - this one
        keep_ties = ties & ((base + x * (tie_rank + 1).to(tl.float32)) - x < target)
        chosen = above | keep_ties
    keep = forced | chosen

    # Compaction: kept blocks ascending at their rank, zeros after the count (stray reads stay in bounds).
    width = num_k_blocks
    rank = _inclusive_count(keep.to(tl.int32), TILE) - 1
    count = tl.sum(keep.to(tl.int32), 0)
    out = Indices + row * width
    tl.store(out + rank, offs, mask=keep & (rank < width))  # a caller's narrower width never spills into the next row
    zeros = tl.zeros([TILE], dtype=tl.int32)
    tl.store(out + offs, zeros, mask=(offs >= count) & (offs < width))
    for c in range(TILE, width, TILE):
        o = c + offs
        tl.store(out + o, zeros, mask=o < width)
    tl.store(Counts + row, count)


@triton.jit
def _select_blocks(Scores, Values, Counts, Indices,
                   stride_sb, stride_sh, stride_sm, stride_sn,
                   num_heads, num_q_blocks, num_k_blocks, block_q, block_k, q_len, k_len,
                   sink_blocks, local_blocks, finite_max,
                   CAUSAL: tl.constexpr, DIAGONAL: tl.constexpr, TOPK: tl.constexpr,
                   TILE: tl.constexpr, MIN_SPLIT_TILE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    m = (row % num_q_blocks).to(tl.int32)
    bh = row // num_q_blocks
    h = bh % num_heads
    b = bh // num_heads
    score_row = b * stride_sb + h * stride_sh + m.to(tl.int64) * stride_sm
    value = tl.load(Values + h)

    # Bottom-right geometry (forced_blocks / causal_block_limits): absolute positions of the
    # block's first and last query; negative positions see nothing.
    first = k_len - q_len + m * block_q
    last = k_len - q_len + tl.minimum((m + 1) * block_q, q_len) - 1
    d_lo = tl.maximum(first, 0) // block_k
    d_hi = tl.where(last >= 0, tl.maximum(last, 0) // block_k, -1)
    if CAUSAL:
        limit = tl.where(last >= 0, tl.minimum(tl.maximum(last, 0) // block_k + 1, num_k_blocks), 0)
    else:
        limit = num_k_blocks + 0 * m

    # Early query blocks of a causal problem see few key blocks: they run on a half or quarter
    # tile (about 2/3 of the full-tile work over the whole problem).
    tile_div = 1
    if CAUSAL:
        if TILE >= MIN_SPLIT_TILE:
            tile_div = tl.where(limit <= TILE // 4, 4, tl.where(limit <= TILE // 2, 2, 1))
    if tile_div == 4:
        _select_row(Scores, Counts, Indices, row, score_row, stride_sn, value, num_k_blocks, limit, d_lo, d_hi,
                    sink_blocks, local_blocks, finite_max, TOPK, DIAGONAL, TILE // 4)
    elif tile_div == 2:
        _select_row(Scores, Counts, Indices, row, score_row, stride_sn, value, num_k_blocks, limit, d_lo, d_hi,
                    sink_blocks, local_blocks, finite_max, TOPK, DIAGONAL, TILE // 2)
    else:
        _select_row(Scores, Counts, Indices, row, score_row, stride_sn, value, num_k_blocks, limit, d_lo, d_hi,
                    sink_blocks, local_blocks, finite_max, TOPK, DIAGONAL, TILE)


def select_blocks_triton(scores: torch.Tensor, *, block_q: int, block_k: int, q_len: int, k_len: int,
                         causal: bool, sink_blocks: int, local_blocks: int, diagonal: bool, mode: str,
                         values: torch.Tensor, num_warps: int | None = None, min_split_tile: int = 1024):
    """Select key blocks per row and compact them, as ``from_block_mask(select_*(...))`` does.

    Args:
        scores: float32 / float16 / bfloat16 ``[B, H, nQ, nK]`` (any strides) with
            ``nQ = ceil(q_len / block_q)``, ``nK = ceil(k_len / block_k) <= MAX_KEY_BLOCKS``.
            NaN counts as 0, +-inf as the dtype's largest finite value; threshold mode clamps
            negatives to 0. Entries of invisible blocks are never read.
        causal: bottom-right causal visibility (``BlockPlan.causal_block_limits``).
        sink_blocks, local_blocks, diagonal: the forced blocks (``forced_blocks``), kept when visible.
        mode: ``"topk"`` (``values`` int ``[H]``: blocks per row, forced ones included) or
            ``"threshold"`` (``values`` float ``[H]`` in ``[0, 1]``: mass fraction ``tau``).
        num_warps: per row program (default: about 16 key blocks per thread).
        min_split_tile: causal rows use a half / quarter tile when the full tile is at least this.
    Returns:
        ``(counts int32 [B, H, nQ], indices int32 [B, H, nQ, nK])``: the kept blocks ascending,
        zeros after the count. Ties go to the lower block index. No host sync.
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 4:
        raise ValueError(f"scores must be a [B, H, nQ, nK] tensor, got "
                         f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}")
    if scores.dtype not in SCORE_DTYPES:
        raise ValueError(f"scores must be float32, float16 or bfloat16, got {scores.dtype}")
    for name, v, low in (("block_q", block_q, 1), ("block_k", block_k, 1), ("q_len", q_len, 0),
                         ("k_len", k_len, 0), ("sink_blocks", sink_blocks, 0), ("local_blocks", local_blocks, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    if mode not in ("topk", "threshold"):
        raise ValueError(f"mode must be 'topk' or 'threshold', got {mode!r}")
    B, H, nQ, nK = scores.shape
    want = (-(-q_len // block_q), -(-k_len // block_k))
    if (nQ, nK) != want:
        raise ValueError(f"scores must have (nQ, nK) = {want} for q_len={q_len}, k_len={k_len}, block_q={block_q}, "
                         f"block_k={block_k}; got {(nQ, nK)}")
    if nK > MAX_KEY_BLOCKS:
        raise ValueError(f"at most {MAX_KEY_BLOCKS} key blocks per row are supported, got nK={nK}")
    if not isinstance(values, torch.Tensor) or values.shape != (H,):
        raise ValueError(f"values must be a tensor [H={H}], got "
                         f"{tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__}")
    if values.device != scores.device:
        raise ValueError(f"values is on {values.device} but scores is on {scores.device}")
    if mode == "topk":
        if values.dtype.is_floating_point or values.dtype == torch.bool or values.is_complex():
            raise ValueError(f"topk values must be integers, got {values.dtype}")
        vals = values.to(torch.int64)
    else:
        if not values.dtype.is_floating_point:
            raise ValueError(f"threshold values must be floating point, got {values.dtype}")
        vals = values.to(scores.dtype).to(torch.float32)  # tau rounds like the PyTorch path's
    dev = scores.device
    counts = torch.empty(B, H, nQ, dtype=torch.int32, device=dev)
    indices = torch.empty(B, H, nQ, nK, dtype=torch.int32, device=dev)
    rows = B * H * nQ
    if rows == 0 or nK == 0:
        return counts.zero_(), indices
    tile = max(16, triton.next_power_of_2(nK))
    if num_warps is None:
        num_warps = min(16, max(1, tile // 512))
    sb, sh, sm, sn = scores.stride()
    _select_blocks[(rows,)](scores, vals, counts, indices, sb, sh, sm, sn,
                            H, nQ, nK, block_q, block_k, q_len, k_len, sink_blocks, local_blocks,
                            float(torch.finfo(scores.dtype).max),
                            CAUSAL=bool(causal), DIAGONAL=bool(diagonal), TOPK=mode == "topk",
                            TILE=tile, MIN_SPLIT_TILE=max(16, int(min_split_tile)), num_warps=num_warps)
    return counts, indices
