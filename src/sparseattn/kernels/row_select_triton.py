"""Triton sort-free selections over long rows (FlexPrefill and vertical-slash estimators).

The PyTorch twins sort whole rows and scan them with ``cumsum``, which on a few long rows (9
heads x 32K keys at 32K) is poorly parallel: ``methods.base.rank_mask`` / ``compact_rows``,
flexprefill's ``_cover_count`` and its query-aware block map. They stay the CPU path and the
oracle; these kernels give the same results on CUDA:

* ``rank_mask_triton``: the ``n`` largest entries per row (ties to the lower index), a mask.
* ``cover_count_triton``: 1 + how many of the largest entries have a cumulative sum ``<= gamma``.
* ``cumsum_mask_triton``: the entries whose cumulative sum in descending order is ``<= target``.
* ``compact_rows_triton``: a row's kept positions (or values) packed left, and/or the prefix
  counts of kept entries (vertical-slash's column list and diagonal prefix), in one pass.

Selection without sorting. One program per row searches the order-preserving int32 image
``key`` of the float32 values for the cut ``t``: every entry with ``key > t`` is kept, and of
the entries equal to ``t`` a prefix in index order (the stable descending sort's order). ``t``
is the smallest key whose count above it is ``< n`` (top-n) or whose mass above it is
``<= target`` (cumulative mass). The search keeps a bracket ``[lo, hi]`` (initially the row's
``[min - 1, max]``) and costs one pass over a source per step:

* a pass evaluates three probes at the quarters of the bracket (count, and mass, above each),
  accumulating per lane over chunks of ``BLOCK`` entries and reducing once at the end (one
  tuple reduction), so each pass cuts the bracket to a quarter for ~1.5x the work of one probe;
* when at most half of the source still lies in the bracket, that pass also copies the keys in
  the bracket to a per-row scratch, lane-major (lane ``l`` appends to its own column: no scan and
  no cross-lane traffic); the entries above ``hi`` become a count and a mass, and later passes
  read only the candidates;
* once at most ``FIN`` candidates remain (128; 64 for programs of fewer than 8 warps), the count
  / mass above every candidate is one ``FIN x FIN`` comparison in registers and ``t`` is the
  smallest feasible candidate;
* a last pass over the row writes the mask (ties ranked by a running count only when a tie
  group is split).

Cost on an H100 (estimates, not measurements). Vertical-slash at 32K: one launch for both
selections, 18 rows of 32K float32 (128 KB each, just written by the profile kernel, so
L2-resident), one program of 16 warps per row. On these profiles the search takes 1-3 passes
over the whole row (the first from L2, the rest from L1), one compacting pass, 3-5 short passes
and the finish; with the min/max pass and the mask pass that is ~5 row reads, ~16 integer
instructions per entry and probe pass, and ~8 block-wide reductions: ~20-30 K cycles, ~15 us
for the whole launch whatever the number of rows up to one per SM (PyTorch: two radix sorts of
[9, 32K] plus scatters, ~100 us, and the cumsum scans). Worst case (a huge tie block straddling
the cut): ~16 full passes. Scratch: ``2 * N`` int32 per row. With few rows most SMs idle, but
the alternatives (a histogram needs newer Triton; splitting a row over programs, the opt-in
``split=`` path below, has cost more so far) cost more at this size; a 512K row costs ~16x a 32K row. ``compact_rows_triton``: one
program per row, one read of the mask and one write of each output, a scan and a sum per chunk of
8192 entries; or, for fewer than ``COMPACT_SPLIT_ROWS`` long rows, one program per chunk of 1024
entries after a launch that counts each chunk (vertical-slash's 18 rows of 32K on the H100: 21.9 us
on one program per row, 4.6 us chunked; BENCHMARKS.md "Session 18").

Exact rules. Top-n: identical to ``rank_mask`` (NaN ranks above +inf and NaNs tie; -0.0 ties
with +0.0; keys come from integer ops only, so denormals keep their order). Mass: entries must be
finite and >= 0. The mass above a probe is a float32 sum (per-lane running sums, then a tree;
after a compaction, the mass above ``hi`` plus that of the candidates), and the ``j``-th entry
equal to ``t`` (index order, 1-based) is kept when ``M(t) + j * x_t <= target`` in float32. The
PyTorch path sums the sorted row in another order, so the two agree except where ``target`` lies
within float32 rounding of a prefix sum (~``sqrt(N) * 2**-24`` relative, ``N * 2**-24`` at worst);
FlexPrefill's budgets built from these counts are then rounded up to blocks.
"""

from __future__ import annotations

import logging
import math
import numbers
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .dispatch import triton_interpreting

logger = logging.getLogger("sparseattn")

#: Score dtypes the selection kernels read (each converts to float32 exactly, so the order is kept).
SCORE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Once at most this many keys remain, the cut is found in registers (a FIN x FIN comparison;
#: half as many below 8 warps, so that the tile stays at <= 64 entries per thread).
FINISH_KEYS = 128
#: The split path (rows over several programs, opt-in with ``split=``): by default one chunk of
#: SPLIT_BLOCK entries per program of SPLIT_WARPS warps, SPLIT_PROBES probes per round (the best
#: general config of the H100 sweep in BENCHMARKS.md, session 13).
SPLIT_BLOCK = 1024
SPLIT_WARPS = 4
#: Probes per round of the split path (a round cuts the bracket into this many + 1 parts).
SPLIT_PROBES = 8


@triton.jit
def _key_of(x):
    """float32 -> int32 with the same order, in integer ops only (no float op that could flush
    denormals): a negative value maps to minus its magnitude bits, so -0.0 ties with +0.0; every
    NaN maps above +inf (NaNs then tie, and go by index as in the stable sort)."""
    bits = x.to(tl.int32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    sign = bits >> 31  # 0 or -1 (arithmetic shift)
    key = (mag ^ sign) - sign  # mag, or -mag for a negative value
    return tl.where(mag > 0x7F800000, 0x7FFFFFFF, key)


@triton.jit
def _value_of(key):
    """The inverse of ``_key_of`` (up to the canonical +0.0 and NaN)."""
    sign = key >> 31
    bits = ((key ^ sign) - sign) | (sign & (-2147483647 - 1))
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _load_keys(ptr, offs, valid, FROM_INPUT: tl.constexpr):
    if FROM_INPUT:
        key = _key_of(tl.load(ptr + offs, mask=valid, other=0.0).to(tl.float32))
    else:
        key = tl.load(ptr + offs, mask=valid, other=0)
    return key


@triton.jit
def _combine_counts(a1, a2, a3, ak, b1, b2, b3, bk):
    return a1 + b1, a2 + b2, a3 + b3, tl.maximum(ak, bk)


@triton.jit
def _combine_masses(a1, a2, a3, am1, am2, am3, ak, b1, b2, b3, bm1, bm2, bm3, bk):
    return a1 + b1, a2 + b2, a3 + b3, am1 + bm1, am2 + bm2, am3 + bm3, tl.maximum(ak, bk)


@triton.jit
def _probe_pass(src_ptr, n_chunks, lane_cnt, n_input, p1, p2, p3, lo, hi, dst_ptr,
                FROM_INPUT: tl.constexpr, COMPACT: tl.constexpr, MASS: tl.constexpr, BLOCK: tl.constexpr,
                FUSED: tl.constexpr):
    """One pass over a source for three probes ``p1 <= p2 <= p3``: the count (and mass) of its
    keys above each, with per-lane accumulators and one tuple reduction at the end. Three probes
    cut the bracket to a quarter per pass, at ~1.5x the work of one.

    A scratch source is lane-major: lane ``l``'s ``j``-th key is at ``j * BLOCK + l`` for
    ``j < lane_cnt[l]``. ``COMPACT`` also copies the keys in ``[lo, hi]`` to ``dst_ptr`` in that
    layout (each lane appends to its own column: no scan, no cross-lane traffic) and counts only
    those; it returns the new lane counts and their maximum. ``FUSED=False`` reduces each result
    separately (the interpreter runs a tuple reduction element by element).
    """
    lanes = tl.arange(0, BLOCK)
    c1 = tl.zeros([BLOCK], dtype=tl.int32)
    c2 = tl.zeros([BLOCK], dtype=tl.int32)
    c3 = tl.zeros([BLOCK], dtype=tl.int32)
    m1 = tl.zeros([BLOCK], dtype=tl.float32)
    m2 = tl.zeros([BLOCK], dtype=tl.float32)
    m3 = tl.zeros([BLOCK], dtype=tl.float32)
    new_cnt = tl.zeros([BLOCK], dtype=tl.int32)
    for j in range(0, n_chunks):
        offs = j * BLOCK + lanes
        if FROM_INPUT:
            valid = offs < n_input
        else:
            valid = j < lane_cnt
        key = _load_keys(src_ptr, offs, valid, FROM_INPUT)
        if COMPACT:
            valid = valid & (key >= lo) & (key <= hi)
            tl.store(dst_ptr + new_cnt * BLOCK + lanes, key, mask=valid)
            new_cnt += valid.to(tl.int32)
        a1 = valid & (key > p1)
        a2 = valid & (key > p2)
        a3 = valid & (key > p3)
        c1 += a1.to(tl.int32)
        c2 += a2.to(tl.int32)
        c3 += a3.to(tl.int32)
        if MASS:
            x = _value_of(key)
            m1 += tl.where(a1, x, 0.0)
            m2 += tl.where(a2, x, 0.0)
            m3 += tl.where(a3, x, 0.0)
    if not MASS:
        s1, s2, s3 = tl.zeros([], dtype=tl.float32), tl.zeros([], dtype=tl.float32), tl.zeros([], dtype=tl.float32)
    if FUSED:
        if MASS:
            c1, c2, c3, s1, s2, s3, widest = tl.reduce((c1, c2, c3, m1, m2, m3, new_cnt), 0, _combine_masses)
        else:
            c1, c2, c3, widest = tl.reduce((c1, c2, c3, new_cnt), 0, _combine_counts)
    else:
        c1, c2, c3, widest = tl.sum(c1, 0), tl.sum(c2, 0), tl.sum(c3, 0), tl.max(new_cnt, 0)
        if MASS:
            s1, s2, s3 = tl.sum(m1, 0), tl.sum(m2, 0), tl.sum(m3, 0)
    return c1, c2, c3, s1, s2, s3, widest, new_cnt


@triton.jit
def _finish(keys, n_keys, lo, hi, base_c, base_m, n_keep, target, MASS: tl.constexpr):
    """The cut among at most FIN keys (``keys`` [FIN], the first ``n_keys`` valid) in registers:
    the count / mass above every candidate key at once (a FIN x FIN comparison), then the
    smallest feasible one. Returns (t, count above t, mass above t, count of keys >= t)."""
    idx = tl.arange(0, keys.shape[0])
    valid = idx < n_keys
    kj = tl.where(valid, keys, -2147483647 - 1)  # never above a probe (probes are >= min key - 1)
    xj = tl.where(valid, _value_of(keys), 0.0)
    gt = kj[None, :] > kj[:, None]  # [i, j]: key j above probe key i
    s_i = base_c + tl.sum(gt.to(tl.int32), 1)
    if MASS:
        m_i = base_m + tl.sum(tl.where(gt, xj[None, :], 0.0), 1)
        ok_i = m_i <= target
    else:
        ok_i = s_i.to(tl.int64) < n_keep
    ok_i = ok_i & valid & (kj >= lo) & (kj <= hi)
    t = tl.min(tl.where(ok_i, kj, 2147483647), 0)
    above_lo = kj > lo
    if MASS:
        ok_lo = base_m + tl.sum(tl.where(above_lo, xj, 0.0), 0) <= target
    else:
        ok_lo = (base_c + tl.sum(above_lo.to(tl.int32), 0)).to(tl.int64) < n_keep
    t = tl.where(ok_lo, lo, tl.minimum(t, hi))
    above = kj > t
    c_hi = base_c + tl.sum(above.to(tl.int32), 0)
    m_hi = base_m + tl.sum(tl.where(above, xj, 0.0), 0)
    c_ge = base_c + tl.sum((kj >= t).to(tl.int32), 0)
    return t, c_hi, m_hi, c_ge


@triton.jit
def _row_params(Param, Active, row, N, MASS: tl.constexpr, HAS_ACTIVE: tl.constexpr):
    """A row's live length (0 for an inactive row: it selects nothing), and its mass target or
    its count (the other one zero)."""
    n_live = N
    if HAS_ACTIVE:
        n_live = tl.where(tl.load(Active + row) != 0, N, 0)
    if MASS:
        target = tl.load(Param + row).to(tl.float32)
        n_keep = tl.zeros([], dtype=tl.int64)
    else:
        target = tl.zeros([], dtype=tl.float32)
        n_keep = tl.load(Param + row).to(tl.int64)
    return n_live, target, n_keep


@triton.jit
def _write_result(x_ptr, m_ptr, count_ptr, s, len_s, width_s, t, c_hi, m_hi, n_ties, ties_before, n_keep,
                  target, count_bias, MASS: tl.constexpr, WRITE_MASK: tl.constexpr,
                  WRITE_COUNT: tl.constexpr, BLOCK: tl.constexpr):
    """Keep the keys above ``t`` and a prefix (index order, over the whole row) of those equal to
    it; ``x_ptr`` / ``m_ptr`` point at the slice, which spans ``width_s`` mask entries."""
    if MASS:
        x_t = _value_of(t)
        j_lo = tl.zeros([], dtype=tl.int32)
        j_hi = n_ties
        while j_lo < j_hi:
            j_mid = j_lo + (j_hi - j_lo + 1) // 2
            fits = m_hi + j_mid.to(tl.float32) * x_t <= target
            j_lo = tl.where(fits, j_mid, j_lo)
            j_hi = tl.where(fits, j_hi, j_mid - 1)
        kept_ties = j_lo
    else:
        kept_ties = tl.minimum(tl.maximum(n_keep - c_hi.to(tl.int64), 0), n_ties.to(tl.int64)).to(tl.int32)
    if WRITE_COUNT:
        if s == 0:
            tl.store(count_ptr, (c_hi + kept_ties).to(tl.int64) + count_bias)
    if WRITE_MASK:
        lanes = tl.arange(0, BLOCK)
        if (kept_ties == 0) | (kept_ties == n_ties):
            all_ties = kept_ties > 0
            for c in range(0, width_s, BLOCK):
                offs = c + lanes
                live = offs < len_s
                key = _load_keys(x_ptr, offs, live, True)
                keep = live & ((key > t) | ((key == t) & all_ties))
                tl.store(m_ptr + offs, keep.to(tl.uint8), mask=offs < width_s)
        else:  # a split tie group: ranks among the ties in index order, after the earlier slices'
            seen = ties_before
            for c in range(0, width_s, BLOCK):
                offs = c + lanes
                live = offs < len_s
                key = _load_keys(x_ptr, offs, live, True)
                tie = live & (key == t)
                rank = seen + tl.cumsum(tie.to(tl.int32), 0) - 1
                keep = live & ((key > t) | (tie & (rank < kept_ties)))
                tl.store(m_ptr + offs, keep.to(tl.uint8), mask=offs < width_s)
                seen += tl.sum(tie.to(tl.int32), 0)


# Lengths and strides of 1 are not specialised: Triton 3.6's coalescing pass asserts on the
# size-1 layouts that specialisation produces (rows of a single entry, seen on the H100).
@triton.jit(do_not_specialize=["stride_xr", "N", "n_pad", "count_bias", "n_parts"])
def _select_rows(X, Param, Active, Scratch, Mask, Count, Extremes,
                 stride_xr, N, n_pad, count_bias, n_parts,
                 MASS: tl.constexpr, HAS_ACTIVE: tl.constexpr, WRITE_MASK: tl.constexpr,
                 WRITE_COUNT: tl.constexpr, BLOCK: tl.constexpr, FIN: tl.constexpr, FUSED: tl.constexpr,
                 PARTS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_xr
    s_row = Scratch + row * (2 * n_pad)  # two lane-major buffers of n_pad keys
    lanes = tl.arange(0, BLOCK)
    n_live, target, n_keep = _row_params(Param, Active, row, N, MASS, HAS_ACTIVE)

    # Key range: the cut lies in [min - 1, max] (min - 1 keeps everything).
    if PARTS > 0:  # from the per-part extremes the producer kernel wrote: the row is not read here
        parts = tl.arange(0, PARTS)
        ok = parts < tl.where(n_live > 0, n_parts, 0)  # (a scalar bool in a mask fails in the interpreter)
        ext = Extremes + row * n_parts * 2 + parts * 2
        lo = tl.min(tl.load(ext, mask=ok, other=2147483647), 0)
        hi = tl.max(tl.load(ext + 1, mask=ok, other=-2147483647 - 1), 0)
    else:  # this first read of the row comes from L2: two chunks per iteration keep twice the loads in flight
        vmin = tl.full([BLOCK], 2147483647, dtype=tl.int32)
        vmax = tl.full([BLOCK], -2147483647 - 1, dtype=tl.int32)
        for c in range(0, n_live, 2 * BLOCK):
            offs = c + lanes
            valid = offs < n_live
            valid2 = offs + BLOCK < n_live
            key = _load_keys(x_row, offs, valid, True)
            key2 = _load_keys(x_row, offs + BLOCK, valid2, True)
            vmin = tl.minimum(vmin, tl.minimum(tl.where(valid, key, 2147483647), tl.where(valid2, key2, 2147483647)))
            vmax = tl.maximum(vmax, tl.maximum(tl.where(valid, key, -2147483647 - 1),
                                               tl.where(valid2, key2, -2147483647 - 1)))
        lo = tl.min(vmin, 0)
        hi = tl.max(vmax, 0)
    lo = tl.where(lo > -2147483647 - 1, lo - 1, lo)  # an empty row leaves lo > hi

    # Smallest probe p in [lo, hi] whose count above p is < n (mass above p <= target), with
    # c_hi / m_hi the count / mass above hi and c_lo1 the count of keys >= lo.
    c_hi = tl.zeros([], dtype=tl.int32)
    m_hi = tl.zeros([], dtype=tl.float32)
    c_lo1 = tl.zeros([], dtype=tl.int32) + n_live
    # The source of a pass: 0 = the input row, 1 / 2 = scratch buffer 0 / 1 holding the keys of
    # the bracket at the last compaction (lane-major); base_c / base_m: the keys above it.
    src = tl.zeros([], dtype=tl.int32)
    src_total = tl.zeros([], dtype=tl.int32) + n_live
    n_chunks = tl.zeros([], dtype=tl.int32) + tl.cdiv(n_live, BLOCK)  # a tensor even if N == 1 is specialised
    lane_cnt = tl.zeros([BLOCK], dtype=tl.int32)
    base_c = tl.zeros([], dtype=tl.int32)
    base_m = tl.zeros([], dtype=tl.float32)
    while (lo < hi) & (src_total > FIN):
        width = hi.to(tl.int64) - lo.to(tl.int64)
        p1 = (lo.to(tl.int64) + width // 4).to(tl.int32)
        p2 = (lo.to(tl.int64) + width // 2).to(tl.int32)
        p3 = (lo.to(tl.int64) + (width * 3) // 4).to(tl.int32)
        if (c_lo1 - c_hi) * 2 <= src_total:  # at most half of the source is still a candidate
            dst = tl.where(src == 1, 2, 1)
            dst_ptr = s_row + tl.where(dst == 1, 0, n_pad)
            if src == 0:
                s1, s2, s3, q1, q2, q3, widest, new_cnt = _probe_pass(
                    x_row, n_chunks, lane_cnt, n_live, p1, p2, p3, lo, hi, dst_ptr, True, True, MASS, BLOCK, FUSED)
            else:
                s1, s2, s3, q1, q2, q3, widest, new_cnt = _probe_pass(
                    s_row + tl.where(src == 1, 0, n_pad), n_chunks, lane_cnt, n_live, p1, p2, p3, lo, hi, dst_ptr,
                    False, True, MASS, BLOCK, FUSED)
            tl.debug_barrier()  # later passes read what other threads wrote
            src = dst
            src_total = c_lo1 - c_hi
            lane_cnt = new_cnt
            n_chunks = widest
            base_c = c_hi
            base_m = m_hi
        else:
            if src == 0:
                s1, s2, s3, q1, q2, q3, widest, new_cnt = _probe_pass(
                    x_row, n_chunks, lane_cnt, n_live, p1, p2, p3, lo, hi, s_row, True, False, MASS, BLOCK, FUSED)
            else:
                s1, s2, s3, q1, q2, q3, widest, new_cnt = _probe_pass(
                    s_row + tl.where(src == 1, 0, n_pad), n_chunks, lane_cnt, n_live, p1, p2, p3, lo, hi, s_row,
                    False, False, MASS, BLOCK, FUSED)
        s1 += base_c
        s2 += base_c
        s3 += base_c
        q1 += base_m
        q2 += base_m
        q3 += base_m
        if MASS:
            f1, f2, f3 = q1 <= target, q2 <= target, q3 <= target
        else:
            f1, f2, f3 = s1.to(tl.int64) < n_keep, s2.to(tl.int64) < n_keep, s3.to(tl.int64) < n_keep
        # Feasibility is monotone in the probe: keep the quarter holding the smallest feasible one.
        hi_new = tl.where(f1, p1, tl.where(f2, p2, tl.where(f3, p3, hi)))
        c_hi = tl.where(f1, s1, tl.where(f2, s2, tl.where(f3, s3, c_hi)))
        m_hi = tl.where(f1, q1, tl.where(f2, q2, tl.where(f3, q3, m_hi)))
        lo = tl.where(f1, lo, tl.where(f2, p1 + 1, tl.where(f3, p2 + 1, p3 + 1)))
        c_lo1 = tl.where(f1, c_lo1, tl.where(f2, s1, tl.where(f3, s2, s3)))
        hi = hi_new

    if lo < hi:  # at most FIN keys left in the source: finish in registers
        idx = tl.arange(0, FIN)
        if src == 0:
            keys = _load_keys(x_row, idx, idx < n_live, True)
        else:
            # Dense copy of the lane-major source into the other buffer, then one load.
            src_ptr = s_row + tl.where(src == 1, 0, n_pad)
            tile = s_row + tl.where(src == 1, n_pad, 0)
            start = tl.cumsum(lane_cnt, 0) - lane_cnt
            for j in range(0, n_chunks):
                has = j < lane_cnt
                tl.store(tile + start + j, tl.load(src_ptr + j * BLOCK + lanes, mask=has, other=0), mask=has)
            tl.debug_barrier()
            keys = tl.load(tile + idx, mask=idx < src_total, other=0)
        t, c_hi, m_hi, c_lo1 = _finish(keys, src_total, lo, hi, base_c, base_m, n_keep, target, MASS)
    else:
        t = lo

    _write_result(x_row, Mask + row * N, Count + row, 0, n_live, N, t, c_hi, m_hi, c_lo1 - c_hi,
                  tl.zeros([], dtype=tl.int32), n_keep, target, count_bias, MASS, WRITE_MASK, WRITE_COUNT, BLOCK)


# ----------------------------------------------------------------------------- split rows
# A row over several programs ("slices", opt-in: ``split=``). The one-program search above leaves
# most SMs idle when rows are few (FlexPrefill: 2 x Hq rows). Here ``S`` programs share a row: each
# counts (and sums) its slice's keys above NP probes spaced evenly over the bracket (a round cuts it
# into NP + 1 parts), publishes the partials and waits at a barrier of the row's programs; then
# every program sums the ``S`` partials in the same order (so all hold the same bracket, bit for
# bit) and goes on. Once at most FIN keys remain in the bracket, each program copies its candidates
# into a shared tile (slice order) and every program finds the cut in registers as above. No
# compaction; a slice of one chunk is read once and kept in registers (ONE_CHUNK).
#
# Rounds, and what each publishes (``Xch[row, round % 2, slot, slice]``, double-buffered):
#   phase 0: the slice's min / max key -> phase 1
#   phase 1 / 2: sum the min / max (1) or the probe partials (2), update the bracket; then
#       probe pass (-> 2), or copy the candidates to the tile (-> 3), or write the result (-> 4)
#   phase 3: the cut from the tile, write the result (-> 4)
# The barrier is a per-row counter (``Counter``, zeroed per call): a program adds 1 after
# publishing (release), reads it until ``round x S`` and then acquires; published data is read
# with ``.cg`` (L2), never from a stale L1 line. All programs of a row must be resident at once:
# the host sizes the grid from the compiled kernel's registers and shared memory. The Triton
# interpreter runs programs one after another, so there (``REPLAY``) each launch runs one round
# and keeps the state in ``State``. Measured on the H100 (session 13, ``scripts/trace_row_select.py``):
# ~6 rounds on profile rows, but each costs 5-15 us (more than its work: the next thing to find),
# so it is not the default; vertical-slash's top-n asks for it at >= 16K keys (``top_n_split``:
# 18 rows of 32K, 51-53 -> 37 us; of 128K, 172 -> 118 us; of 8K no gain; session 19).
_STATE_SCALARS = tl.constexpr(16)


@triton.jit
def _row_barrier(counter_ptr, target):
    tl.debug_barrier()  # every thread's stores precede the release
    seen = tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu") + 1
    while seen < target:  # plain (volatile) reads while waiting: RMW polls of one word serialise
        seen = tl.load(counter_ptr, volatile=True)
    tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")  # the others' partials are visible after it
    tl.debug_barrier()


@triton.jit
def _slice_extremes(x_ptr, n, BLOCK: tl.constexpr):
    lanes = tl.arange(0, BLOCK)
    vmin = tl.full([BLOCK], 2147483647, dtype=tl.int32)
    vmax = tl.full([BLOCK], -2147483647 - 1, dtype=tl.int32)
    for c in range(0, n, BLOCK):
        offs = c + lanes
        valid = offs < n
        key = _load_keys(x_ptr, offs, valid, True)
        vmin = tl.minimum(vmin, tl.where(valid, key, 2147483647))
        vmax = tl.maximum(vmax, tl.where(valid, key, -2147483647 - 1))
    return tl.min(vmin, 0), tl.max(vmax, 0)


@triton.jit
def _probe_chunk(key, valid, probes, MASS: tl.constexpr):
    above = valid[:, None] & (key[:, None] > probes[None, :])
    cnt = tl.sum(above.to(tl.int32), 0)
    if MASS:
        mass = tl.sum(tl.where(above, _value_of(key)[:, None], 0.0), 0)
    else:
        mass = tl.zeros([probes.shape[0]], dtype=tl.float32)
    return cnt, mass


@triton.jit
def _probe_many(x_ptr, n, probes, MASS: tl.constexpr, BLOCK: tl.constexpr):
    """Count (and sum) the keys of ``x_ptr[:n]`` above each of the probes ``[P]``: per-lane
    accumulators ``[BLOCK, P]``, one reduction at the end."""
    lanes = tl.arange(0, BLOCK)
    cnt = tl.zeros([BLOCK, probes.shape[0]], dtype=tl.int32)
    mass = tl.zeros([BLOCK, probes.shape[0]], dtype=tl.float32)
    for c in range(0, n, BLOCK):
        offs = c + lanes
        valid = offs < n
        key = _load_keys(x_ptr, offs, valid, True)
        above = valid[:, None] & (key[:, None] > probes[None, :])
        cnt += above.to(tl.int32)
        if MASS:
            mass += tl.where(above, _value_of(key)[:, None], 0.0)
    return tl.sum(cnt, 0), tl.sum(mass, 0)


@triton.jit
def _probes_of(lo, hi, NP: tl.constexpr):
    """``NP`` probes cutting ``[lo, hi]`` into ``NP + 1`` near-equal parts (non-decreasing)."""
    i = tl.arange(0, NP).to(tl.int64)
    return (lo.to(tl.int64) + ((hi.to(tl.int64) - lo.to(tl.int64)) * (i + 1)) // (NP + 1)).to(tl.int32)


@triton.jit
def _pick(vec, idx, i):
    """``vec[i]`` as a scalar (``idx``: ``arange`` over vec's length)."""
    return tl.sum(tl.where(idx == i, vec, 0), 0)


@triton.jit
def _now():
    """The GPU's global nanosecond timer (``TRACE`` only: the interpreter has no inline asm)."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit(do_not_specialize=["stride_xr", "N", "W", "S", "count_bias"])
def _select_split(X, Param, Active, Xch, Tile, Counter, State, Mask, Count, Trace,
                  stride_xr, N, W, S, count_bias,
                  S_PAD: tl.constexpr, NP: tl.constexpr, MASS: tl.constexpr, HAS_ACTIVE: tl.constexpr,
                  WRITE_MASK: tl.constexpr, WRITE_COUNT: tl.constexpr, BLOCK: tl.constexpr, FIN: tl.constexpr,
                  REPLAY: tl.constexpr, TRACE: tl.constexpr, ONE_CHUNK: tl.constexpr):
    pid = tl.program_id(0)
    row = (pid // S).to(tl.int64)
    s = pid % S
    sidx = tl.arange(0, S_PAD)
    pidx = tl.arange(0, NP)
    in_row = sidx < S
    n_live, target, n_keep = _row_params(Param, Active, row, N, MASS, HAS_ACTIVE)
    start = s * W
    len_s = tl.minimum(tl.maximum(n_live - start, 0), W)  # live keys of this slice
    width_s = tl.minimum(tl.maximum(N - start, 0), W)  # its mask entries
    x_s = X + row * stride_xr + start
    m_s = Mask + row * N + start
    xch = Xch + row * (2 * 2 * NP * S_PAD)
    tile = Tile + row * FIN
    fidx = tl.arange(0, FIN)
    lens = tl.minimum(tl.maximum(n_live - sidx * W, 0), W)  # every slice's live keys
    slots = pidx[:, None] * S_PAD + sidx[None, :]  # [NP, S_PAD]: probe i of slice j
    got_mask = (pidx[:, None] < NP) & in_row[None, :]
    lanes = tl.arange(0, BLOCK)
    if ONE_CHUNK:  # the slice is one chunk: read once, kept in registers for every round
        k_valid = lanes < len_s
        k_reg = _load_keys(x_s, lanes, k_valid, True)
    else:
        k_valid = lanes < 0
        k_reg = tl.zeros([BLOCK], dtype=tl.int32)

    st = State + pid.to(tl.int64) * (_STATE_SCALARS + 2 * S_PAD)
    if REPLAY:
        phase = tl.load(st)
        rnd = tl.load(st + 1)
        lo = tl.load(st + 2)
        hi = tl.load(st + 3)
        c_hi = tl.load(st + 4)
        m_hi = tl.load(st + 5).to(tl.float32, bitcast=True)
        c_lo1 = tl.load(st + 6)
        c_hi_s = tl.load(st + _STATE_SCALARS + sidx)  # per slice: keys above hi
        c_lo1_s = tl.load(st + _STATE_SCALARS + S_PAD + sidx)  # per slice: keys >= lo
    else:
        phase = tl.zeros([], dtype=tl.int32)
        rnd = tl.zeros([], dtype=tl.int32)
        lo = tl.zeros([], dtype=tl.int32)
        hi = tl.zeros([], dtype=tl.int32)
        c_hi = tl.zeros([], dtype=tl.int32)
        m_hi = tl.zeros([], dtype=tl.float32)
        c_lo1 = tl.zeros([], dtype=tl.int32)
        c_hi_s = tl.zeros([S_PAD], dtype=tl.int32)
        c_lo1_s = tl.zeros([S_PAD], dtype=tl.int32)

    go = phase < 4
    while go:
        if TRACE:  # [program, round, (start, published, released)], 64 rounds at most
            tl.store(Trace + (pid * 64 + rnd) * 3, _now())
        pub = xch + (rnd % 2) * (2 * NP * S_PAD) + s  # this round's slots; slot j at + j * S_PAD
        got = xch + ((rnd + 1) % 2) * (2 * NP * S_PAD)  # the previous round's
        if phase == 0:
            if ONE_CHUNK:
                vmin = tl.min(tl.where(k_valid, k_reg, 2147483647), 0)
                vmax = tl.max(tl.where(k_valid, k_reg, -2147483647 - 1), 0)
            else:
                vmin, vmax = _slice_extremes(x_s, len_s, BLOCK)
            tl.store(pub, vmin)
            tl.store(pub + S_PAD, vmax)
            phase = tl.full([], 1, dtype=tl.int32)
        elif phase == 3:
            # The cut among the <= FIN candidates in the tile (slice order), as the one-program search.
            n_cand = c_lo1 - c_hi
            keys = tl.load(tile + fidx, mask=fidx < n_cand, other=0, cache_modifier=".cg")
            t, c_hi_t, m_hi_t, c_ge = _finish(keys, n_cand, lo, hi, c_hi, m_hi, n_keep, target, MASS)
            before = tl.sum(tl.where(in_row & (sidx < s), c_lo1_s - c_hi_s, 0), 0)  # my first tile slot
            ties_before = tl.sum(((fidx < before) & (keys == t)).to(tl.int32), 0)
            _write_result(x_s, m_s, Count + row, s, len_s, width_s, t, c_hi_t, m_hi_t, c_ge - c_hi_t,
                          ties_before, n_keep, target, count_bias, MASS, WRITE_MASK, WRITE_COUNT, BLOCK)
            phase = tl.full([], 4, dtype=tl.int32)
        else:
            if phase == 1:  # the row's key range: the cut lies in [min - 1, max]
                lo = tl.min(tl.load(got + sidx, mask=in_row, other=2147483647, cache_modifier=".cg"), 0)
                lo = tl.where(lo > -2147483647 - 1, lo - 1, lo)  # an empty row leaves lo > hi
                hi = tl.max(tl.load(got + S_PAD + sidx, mask=in_row, other=-2147483647 - 1,
                                    cache_modifier=".cg"), 0)
                c_hi = tl.zeros([], dtype=tl.int32)
                m_hi = tl.zeros([], dtype=tl.float32)
                c_lo1 = tl.zeros([], dtype=tl.int32) + n_live
                c_hi_s = tl.zeros([S_PAD], dtype=tl.int32)
                c_lo1_s = lens
            else:  # the probes' counts (and masses) per slice, summed over the slices in one order
                probes = _probes_of(lo, hi, NP)
                k_all = tl.load(got + slots, mask=got_mask, other=0, cache_modifier=".cg")  # [NP, S_PAD]
                cnt = tl.sum(k_all, 1)
                if MASS:
                    m_all = tl.load(got + NP * S_PAD + slots, mask=got_mask, other=0,
                                    cache_modifier=".cg").to(tl.float32, bitcast=True)
                    mass = tl.sum(m_all, 1)
                    feasible = mass <= target
                else:
                    mass = tl.zeros([NP], dtype=tl.float32)
                    feasible = cnt.to(tl.int64) < n_keep
                # Feasibility is monotone in the probe: the cut lies between the last infeasible
                # probe (exclusive) and the first feasible one.
                first = tl.min(tl.where(feasible, pidx, NP), 0)
                if first < NP:
                    hi = _pick(probes, pidx, first)
                    c_hi = _pick(cnt, pidx, first)
                    m_hi = _pick(mass, pidx, first)
                    c_hi_s = tl.sum(tl.where(pidx[:, None] == first, k_all, 0), 0)
                if first > 0:
                    lo = _pick(probes, pidx, first - 1) + 1
                    c_lo1 = _pick(cnt, pidx, first - 1)
                    c_lo1_s = tl.sum(tl.where(pidx[:, None] == first - 1, k_all, 0), 0)
            if (lo < hi) & (c_lo1 - c_hi > FIN):  # another probe pass over the slice
                if ONE_CHUNK:
                    cnt, mass = _probe_chunk(k_reg, k_valid, _probes_of(lo, hi, NP), MASS)
                else:
                    cnt, mass = _probe_many(x_s, len_s, _probes_of(lo, hi, NP), MASS, BLOCK)
                tl.store(pub + pidx * S_PAD, cnt)
                if MASS:
                    tl.store(pub + (NP + pidx) * S_PAD, mass.to(tl.int32, bitcast=True))
                phase = tl.full([], 2, dtype=tl.int32)
            elif lo < hi:  # <= FIN candidates: copy mine to the tile after the earlier slices'
                slot = tl.sum(tl.where(in_row & (sidx < s), c_lo1_s - c_hi_s, 0), 0)
                if ONE_CHUNK:
                    cand = k_valid & (k_reg >= lo) & (k_reg <= hi)
                    tl.store(tile + slot + tl.cumsum(cand.to(tl.int32), 0) - 1, k_reg, mask=cand)
                else:
                    for c in range(0, len_s, BLOCK):
                        offs = c + lanes
                        valid = offs < len_s
                        key = _load_keys(x_s, offs, valid, True)
                        cand = valid & (key >= lo) & (key <= hi)
                        pos = slot + tl.cumsum(cand.to(tl.int32), 0) - 1
                        tl.store(tile + pos, key, mask=cand)
                        slot += tl.sum(cand.to(tl.int32), 0)
                phase = tl.full([], 3, dtype=tl.int32)
            else:  # the bracket is one key (or the row is empty): t = lo, its ties per slice known
                ties = tl.where(in_row, c_lo1_s - c_hi_s, 0)
                ties_before = tl.sum(tl.where(sidx < s, ties, 0), 0)
                _write_result(x_s, m_s, Count + row, s, len_s, width_s, lo, c_hi, m_hi, c_lo1 - c_hi,
                              ties_before, n_keep, target, count_bias, MASS, WRITE_MASK, WRITE_COUNT, BLOCK)
                phase = tl.full([], 4, dtype=tl.int32)
        rnd += 1
        if REPLAY:
            go = phase < 0
        else:
            go = phase < 4
            if go:
                if TRACE:
                    tl.store(Trace + (pid * 64 + rnd - 1) * 3 + 1, _now())
                _row_barrier(Counter + row, rnd * S)
                if TRACE:
                    tl.store(Trace + (pid * 64 + rnd - 1) * 3 + 2, _now())

    if REPLAY:
        tl.store(st, phase)
        tl.store(st + 1, rnd)
        tl.store(st + 2, lo)
        tl.store(st + 3, hi)
        tl.store(st + 4, c_hi)
        tl.store(st + 5, m_hi.to(tl.int32, bitcast=True))
        tl.store(st + 6, c_lo1)
        tl.store(st + _STATE_SCALARS + sidx, c_hi_s)
        tl.store(st + _STATE_SCALARS + S_PAD + sidx, c_lo1_s)


def _shape_name(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def _check_rows(name: str, x) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"{name} must be a tensor [..., N], got {_shape_name(x)}")
    if x.dtype not in SCORE_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")


def _per_row(name: str, value, lead, device, dtype) -> torch.Tensor:
    """A per-row parameter as a contiguous ``[R]`` tensor (broadcast from a scalar or ``lead``)."""
    if isinstance(value, torch.Tensor):
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but the rows are on {device}")
        try:
            value = value.expand(lead)
        except RuntimeError:
            raise ValueError(f"{name} of shape {tuple(value.shape)} does not broadcast to the rows' "
                             f"leading shape {tuple(lead)}") from None
        return value.to(dtype).reshape(-1).contiguous()
    return torch.full((math.prod(lead),), value, dtype=dtype, device=device)


def _block_and_warps(N: int, block: Optional[int], num_warps: Optional[int]) -> Tuple[int, int]:
    # H100 sweep (`scripts/sweep_row_select.py`, BENCHMARKS.md "Session 12"): 1024-entry chunks on 16
    # warps beat 2048 on rows of 32K (cover counts 50.3 -> 46.9 us, top-n 49.8 -> 46.4); on 64K-entry
    # rows (FlexPrefill's block map) 32 warps (105.6 -> 98.7 us).
    if block is None:
        block = min(1024, max(128, triton.next_power_of_2(max(N, 1))))
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    if num_warps is None:
        num_warps = 32 if (N > 32768 and block >= 1024) else min(16, max(4, block // 64))
    return block, num_warps


_RESIDENT: dict = {}


def _resident_per_sm(args, consts: dict, num_warps: int, device: torch.device) -> int:
    """How many programs of ``_select_split`` (compiled with ``consts``) an SM holds at once, from
    the compiled kernel's registers and shared memory (cached per configuration)."""
    key = (device.index, num_warps, tuple(sorted(consts.items())))
    if key not in _RESIDENT:
        props = torch.cuda.get_device_properties(device)
        # A compile error propagates (the launch would fail too); a Triton whose compiled kernel
        # does not report its registers / shared memory gets the worst case (255 registers), i.e.
        # fewer programs per row, and one log line.
        kernel = _select_split.warmup(*args, grid=(1,), num_warps=num_warps, **consts)
        init = getattr(kernel, "_init_handles", None)
        if init is not None:
            init()
        n_regs, n_shared = getattr(kernel, "n_regs", None), getattr(getattr(kernel, "metadata", None), "shared", None)
        if n_regs is None or n_shared is None:
            logger.info("sparseattn: the split row selection's kernel does not report its registers / shared "
                        "memory; sizing its grid for the worst case")
            regs, shared = 255, 0
        else:
            regs, shared = int(n_regs), int(n_shared)
        warp_regs = -(-regs * 32 // 256) * 256  # registers are allocated per warp, 256 at a time
        smem = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
        by_threads = props.max_threads_per_multi_processor // (32 * num_warps)
        by_regs = 65536 // (warp_regs * num_warps)
        by_smem = smem // (shared + 1024) if shared else 32  # 1 KB per block reserved by the driver
        _RESIDENT[key] = max(1, min(32, by_threads, by_regs, by_smem))
    return _RESIDENT[key]


def _select_split_rows(rows, param, act, mask, count, *, R, N, mass, write_mask, write_count, count_bias,
                       has_active, block, num_warps, split, probes, trace):
    """The split path (see "split rows" above); returns False, launching nothing, if a row would
    get fewer than two programs."""
    dev = rows.device
    replay = triton_interpreting()  # the interpreter runs programs in turn: one round per launch
    block = SPLIT_BLOCK if block is None else block
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    num_warps = SPLIT_WARPS if num_warps is None else num_warps
    n_probes = SPLIT_PROBES if probes is None else probes
    if n_probes < 2 or n_probes & (n_probes - 1):
        raise ValueError(f"probes must be a power of two >= 2, got {n_probes!r}")
    # `split` slices of whole chunks; a slice of one chunk is kept in registers (ONE_CHUNK).
    W = triton.cdiv(triton.cdiv(N, split), block) * block
    fin = FINISH_KEYS if num_warps >= 8 else FINISH_KEYS // 2
    for _ in range(3):
        S = triton.cdiv(N, W)
        if S < 2:
            return False
        s_pad = triton.next_power_of_2(S)
        consts = dict(S_PAD=s_pad, NP=n_probes, MASS=mass, HAS_ACTIVE=has_active, WRITE_MASK=write_mask,
                      WRITE_COUNT=write_count, BLOCK=block, FIN=fin, REPLAY=replay, TRACE=trace is not None,
                      ONE_CHUNK=W == block)
        xch = torch.empty(R, 2, 2 * n_probes, s_pad, dtype=torch.int32, device=dev)
        tile = torch.empty(R, fin, dtype=torch.int32, device=dev)
        counter = torch.zeros(R, dtype=torch.int32, device=dev)
        state = torch.zeros(R * S, _STATE_SCALARS.value + 2 * s_pad, dtype=torch.int32, device=dev) \
            if replay else counter
        args = (rows, param, act, xch, tile, counter, state, mask.view(torch.uint8) if mask is not None else tile,
                count if count is not None else tile, trace if trace is not None else counter,
                rows.stride(0), N, W, S, int(count_bias))
        if replay:
            break
        # The programs of a row wait for each other: all of them must be resident at once.
        per_row = _resident_per_sm(args, consts, num_warps, dev) * \
            torch.cuda.get_device_properties(dev).multi_processor_count // R
        if S <= per_row:
            break
        if per_row < 2:
            return False
        W = triton.cdiv(triton.cdiv(N, per_row), block) * block
    else:
        return False
    for _ in range(64 if replay else 1):
        _select_split[(R * S,)](*args, num_warps=num_warps, **consts)
        if replay and bool((state[:, 0] >= 4).all()):
            break
    else:
        if replay:
            raise RuntimeError("split row selection did not finish in 64 rounds")
    return True


def _select(x: torch.Tensor, param: torch.Tensor, *, mass: bool, write_mask: bool, write_count: bool,
            count_bias: int = 0, active: Optional[torch.Tensor] = None, block: Optional[int] = None,
            num_warps: Optional[int] = None, fused: Optional[bool] = None, split: Optional[int] = None,
            probes: Optional[int] = None, trace: Optional[torch.Tensor] = None,
            extremes: Optional[torch.Tensor] = None):
    lead, N = x.shape[:-1], x.shape[-1]
    R = math.prod(lead)
    dev = x.device
    mask = torch.empty(x.shape, dtype=torch.bool, device=dev) if write_mask else None
    count = torch.empty(lead, dtype=torch.int64, device=dev) if write_count else None
    if R == 0:
        return mask, count
    if N == 0:
        if count is not None:
            count.fill_(count_bias)
        return mask, count
    if split is not None and (not isinstance(split, numbers.Integral) or isinstance(split, bool) or split < 1):
        raise ValueError(f"split must be an int >= 1, got {split!r}")
    rows = x.reshape(R, N)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    act = active.reshape(-1).contiguous().view(torch.uint8) if active is not None else param
    # Split rows only when asked (``top_n_split``): it loses on FlexPrefill's cover counts (BENCHMARKS.md).
    if split is not None and split > 1 and _select_split_rows(rows, param, act, mask, count, R=R, N=N, mass=mass, write_mask=write_mask,
                                        write_count=write_count, count_bias=count_bias,
                                        has_active=active is not None, block=block, num_warps=num_warps,
                                        split=split, probes=probes, trace=trace):
        return mask, count
    fused = not triton_interpreting() if fused is None else bool(fused)
    block, num_warps = _block_and_warps(N, block, num_warps)
    n_pad = triton.cdiv(N, block) * block  # a lane-major buffer: block lanes x ceil(N / block) keys
    scratch = torch.empty(R, 2 * n_pad, dtype=torch.int32, device=dev)
    mask_arg = mask.view(torch.uint8) if mask is not None else scratch
    count_arg = count if count is not None else scratch
    n_parts = 0 if extremes is None else extremes.shape[-2]
    _select_rows[(R,)](rows, param, act, scratch, mask_arg, count_arg,
                       extremes.contiguous() if extremes is not None else scratch,
                       rows.stride(0), N, n_pad, int(count_bias), n_parts,
                       MASS=mass, HAS_ACTIVE=active is not None, WRITE_MASK=write_mask, WRITE_COUNT=write_count,
                       BLOCK=block, FIN=FINISH_KEYS if num_warps >= 8 else FINISH_KEYS // 2,
                       FUSED=fused, PARTS=triton.next_power_of_2(n_parts) if n_parts else 0, num_warps=num_warps)
    return mask, count


#: Top-n selections of few long rows split over programs (``top_n_split``): at most this many rows
#: of at least this many entries get ``TOP_N_SPLIT = (programs per row, block, warps)``.
TOP_N_SPLIT = (32, 1024, 2)
TOP_N_SPLIT_ROWS = 32
TOP_N_SPLIT_MIN_LEN = 16384


def top_n_split(rows: int, n: int) -> dict:
    """``rank_mask_triton`` keyword arguments for ``rows`` rows of ``n`` entries: the split path for
    a few long rows (vertical-slash's 2 x Hq rows of Lk keys), else ``{}`` (one program per row).

    H100, graph replay (BENCHMARKS.md, session 19): 18 rows of 32K (vertical-slash's scores on
    SmolLM2 q/k): one program per row 51-53 us, 32 slices of 1024 entries on 2 warps 37 us (on
    synthetic profiles 46 -> 36 us, session 13); of 128K 172 -> 118 us; of 8K 24.4 -> 25.0 us (so
    not below 16K)."""
    if rows > TOP_N_SPLIT_ROWS or n < TOP_N_SPLIT_MIN_LEN:
        return {}
    split, block, warps = TOP_N_SPLIT
    return dict(split=split, block=block, num_warps=warps)


def rank_mask_triton(scores: torch.Tensor, n, *, block: Optional[int] = None, num_warps: Optional[int] = None,
                     fused: Optional[bool] = None, split: Optional[int] = None) -> torch.Tensor:
    """bool ``[..., N]``: the ``n`` best entries of each row, ties to the lower index.

    The twin of ``methods.base.rank_mask``, exactly (NaN ranks above ``+inf``; ``-0.0`` ties
    with ``+0.0``; ``n <= 0`` keeps nothing, ``n >= N`` everything).

    Args:
        scores: float32 / float16 / bfloat16 ``[..., N]`` (any strides; one program per row).
        n: int tensor broadcastable to ``scores.shape[:-1]``, or a Python int.
        block, num_warps: the chunk of a row one pass reads, and the warps of a row's program.
        fused: one tuple reduction per pass (default: on, except in the interpreter, where a
            tuple reduction runs element by element; tests force it on small rows).
        split: programs per row (default one; see "split rows" in the module). Slices are whole
            chunks of ``block`` entries (default ``SPLIT_BLOCK`` there), and fewer than asked if
            a row's programs would not all be resident at once (they wait for each other); a row
            shorter than two chunks runs on one program. The result does not depend on it, except
            a mass selection's float32 sums (per slice, then over slices).
    No host sync.
    """
    _check_rows("scores", scores)
    if isinstance(n, torch.Tensor):
        if n.dtype.is_floating_point or n.dtype == torch.bool or n.is_complex():
            raise ValueError(f"n must be an integer tensor, got {n.dtype}")
    elif not isinstance(n, numbers.Integral) or isinstance(n, bool):
        raise ValueError(f"n must be an int or an integer tensor, got {n!r}")
    param = _per_row("n", n, scores.shape[:-1], scores.device, torch.int64)
    mask, _ = _select(scores, param, mass=False, write_mask=True, write_count=False, block=block,
                      num_warps=num_warps, fused=fused, split=split)
    return mask


def _check_target(name: str, value) -> None:
    if isinstance(value, torch.Tensor):
        if not value.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got {value.dtype}")
    elif not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number or a float tensor, got {value!r}")


def _check_extremes(extremes, x) -> None:
    if extremes is None:
        return
    lead = tuple(x.shape[:-1])
    if (not isinstance(extremes, torch.Tensor) or extremes.dtype != torch.int32 or extremes.dim() != len(lead) + 2
            or tuple(extremes.shape[:-2]) != lead or extremes.shape[-1] != 2 or extremes.shape[-2] < 1
            or extremes.device != x.device):
        raise ValueError(f"extremes must be an int32 tensor {lead + ('parts', 2)} on the rows' device, got "
                         f"{_shape_name(extremes)}{' ' + str(extremes.dtype) if isinstance(extremes, torch.Tensor) else ''}")


def cover_count_triton(x: torch.Tensor, gamma, *, block: Optional[int] = None, num_warps: Optional[int] = None,
                       fused: Optional[bool] = None, split: Optional[int] = None,
                       extremes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """int64 ``[...]``: per row, 1 + how many of the largest entries have a cumulative sum ``<= gamma``.

    The twin of flexprefill's ``_cover_count`` (``gamma`` compares in float32, as there). Entries
    must be finite and ``>= 0``; see the module docstring for the float32 rule at the cut.

    Args:
        x: float32 / float16 / bfloat16 ``[..., N]``.
        gamma: a float, or a float tensor broadcastable to ``x.shape[:-1]``.
        block, num_warps, fused, split: as in :func:`rank_mask_triton`.
        extremes: optional int32 ``[..., parts, 2]``: per row, the (min, max) order-preserving
            keys (``_key_of``: the float32 bits of a value >= 0) of each of ``parts`` pieces that
            together cover the row, written by the kernel that produced ``x`` (FlexPrefill's
            profiles): the search starts from them instead of a pass over the row. They must be
            exact; ignored by the split path.
    No host sync.
    """
    _check_rows("x", x)
    _check_target("gamma", gamma)
    _check_extremes(extremes, x)
    param = _per_row("gamma", gamma, x.shape[:-1], x.device, torch.float32)
    _, count = _select(x, param, mass=True, write_mask=False, write_count=True, count_bias=1, block=block,
                       num_warps=num_warps, fused=fused, split=split, extremes=extremes)
    return count


def cumsum_mask_triton(x: torch.Tensor, target, *, active: Optional[torch.Tensor] = None,
                       block: Optional[int] = None, num_warps: Optional[int] = None,
                       fused: Optional[bool] = None, split: Optional[int] = None) -> torch.Tensor:
    """bool ``[..., N]``: the entries whose cumulative sum, in stable descending order, is ``<= target``.

    What ``sort(x, descending=True, stable=True)`` + ``cumsum(values) <= target`` scattered back
    gives (FlexPrefill's query-aware block map): a prefix of the descending order, ties to the
    lower index. Entries must be finite and ``>= 0``; see the module docstring for the float32
    rule at the cut.

    Args:
        x: float32 / float16 / bfloat16 ``[..., N]``.
        target: a float, or a float tensor broadcastable to ``x.shape[:-1]`` (compared in float32).
        active: optional bool tensor broadcastable to ``x.shape[:-1]``: rows where it is False
            select nothing (and cost a zero fill).
        block, num_warps, fused, split: as in :func:`rank_mask_triton`.
    No host sync.
    """
    _check_rows("x", x)
    _check_target("target", target)
    lead = x.shape[:-1]
    param = _per_row("target", target, lead, x.device, torch.float32)
    act = None
    if active is not None:
        if not isinstance(active, torch.Tensor) or active.dtype != torch.bool:
            raise ValueError(f"active must be a bool tensor, got "
                             f"{active.dtype if isinstance(active, torch.Tensor) else type(active).__name__}")
        act = _per_row("active", active, lead, x.device, torch.bool)
    mask, _ = _select(x, param, mass=True, write_mask=True, write_count=False, active=act, block=block,
                      num_warps=num_warps, fused=fused, split=split)
    return mask


@triton.jit
def _pack_chunk(Mask, Values, Packed, Prefix, row, offs, found, N, width, rep, stride_vr,
                HAS_VALUES: tl.constexpr, PACK: tl.constexpr, PREFIX: tl.constexpr):
    """One chunk of a row at positions ``offs``, after ``found`` kept entries of the row: its prefix
    counts and its packed entries; returns how many it keeps."""
    valid = offs < N
    keep = valid & (tl.load(Mask + row * N + offs, mask=valid, other=0) != 0)
    incl = found + tl.cumsum(keep.to(tl.int32), 0)
    if PREFIX:
        tl.store(Prefix + row * (N + 1) + 1 + offs, incl, mask=valid)
    if PACK:
        if HAS_VALUES:
            val = tl.load(Values + (row // rep) * stride_vr + offs, mask=keep, other=0).to(tl.int32)
        else:
            val = offs
        rank = incl - 1
        tl.store(Packed + row * width + rank, val, mask=keep & (rank < width))
    return tl.sum(keep.to(tl.int32), 0)


@triton.jit
def _finish_row(Counts, Packed, Prefix, row, total, N, width, PACK: tl.constexpr, PREFIX: tl.constexpr,
                BLOCK_W: tl.constexpr):
    """A row's count, its prefix's leading 0 and zeros after its packed entries (as compact_rows)."""
    if PREFIX:
        tl.store(Prefix + row * (N + 1), total * 0)
    if PACK:
        for w in range(0, width, BLOCK_W):
            slots = w + tl.arange(0, BLOCK_W)
            tl.store(Packed + row * width + slots, tl.zeros([BLOCK_W], dtype=tl.int32),
                     mask=(slots >= total) & (slots < width))
    tl.store(Counts + row, total)


@triton.jit(do_not_specialize=["N", "width", "rep", "stride_vr"])
def _compact_rows(Mask, Values, Counts, Packed, Prefix, N, width, rep, stride_vr,
                  HAS_VALUES: tl.constexpr, PACK: tl.constexpr, PREFIX: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    found = tl.zeros([], dtype=tl.int32)
    for c in range(0, N, BLOCK):
        found += _pack_chunk(Mask, Values, Packed, Prefix, row, c + tl.arange(0, BLOCK), found, N, width, rep,
                             stride_vr, HAS_VALUES, PACK, PREFIX)
    _finish_row(Counts, Packed, Prefix, row, found, N, width, PACK, PREFIX, BLOCK)


@triton.jit(do_not_specialize=["N", "n_chunks"])
def _chunk_counts(Mask, ChunkCounts, N, n_chunks, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    offs = c * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N
    keep = valid & (tl.load(Mask + row * N + offs, mask=valid, other=0) != 0)
    tl.store(ChunkCounts + row * n_chunks + c, tl.sum(keep.to(tl.int32), 0))


@triton.jit(do_not_specialize=["N", "width", "rep", "stride_vr", "n_chunks"])
def _compact_chunks(Mask, Values, Counts, Packed, Prefix, ChunkCounts, N, width, rep, stride_vr, n_chunks,
                    HAS_VALUES: tl.constexpr, PACK: tl.constexpr, PREFIX: tl.constexpr, BLOCK: tl.constexpr,
                    CHUNKS: tl.constexpr, BLOCK_W: tl.constexpr):
    # One program per (row, chunk of BLOCK entries): its kept entries start after those of the
    # row's earlier chunks (their counts, from _chunk_counts); the row's last chunk writes the
    # count, the prefix's leading 0 and the zeros after the packed entries.
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    offs_c = tl.arange(0, CHUNKS)
    found = tl.sum(tl.load(ChunkCounts + row * n_chunks + offs_c, mask=offs_c < c, other=0), 0)
    kept = _pack_chunk(Mask, Values, Packed, Prefix, row, c * BLOCK + tl.arange(0, BLOCK), found, N, width, rep,
                       stride_vr, HAS_VALUES, PACK, PREFIX)
    if c == n_chunks - 1:
        _finish_row(Counts, Packed, Prefix, row, found + kept, N, width, PACK, PREFIX, BLOCK_W)


#: compact_rows_triton splits rows over programs (chunks of COMPACT_CHUNK entries, two launches)
#: when there are fewer rows than this and each has at least two chunks: vertical-slash's 18 rows of
#: 32K on the H100 took ~22 us on one program per row (BENCHMARKS.md "Session 18").
COMPACT_SPLIT_ROWS = 64
COMPACT_CHUNK = 1024


def compact_rows_triton(mask: torch.Tensor, values: Optional[torch.Tensor] = None, width: int = 0, *,
                        prefix: bool = False, block: Optional[int] = None, num_warps: Optional[int] = None,
                        chunked: Optional[bool] = None):
    """Pack each row's kept entries left, as ``methods.base.compact_rows``, and/or its prefix counts.

    Args:
        mask: bool ``[..., N]``.
        values: optional int tensor ``[..., N]`` broadcastable to ``mask``: the values packed
            (cast to int32); default the positions ``0 .. N - 1``. A tensor shared along the
            next-to-last dimension (``[..., 1, N]`` for a mask ``[..., M, N]``) is read in place.
        width: slots per row (entries past it are dropped; 0 packs nothing).
        prefix: also return ``int32 [..., N + 1]``: ``[0, cumsum(mask)]`` per row.
        chunked: split each row over programs of ``block`` entries (default ``COMPACT_CHUNK``):
            one launch counts each chunk's kept entries, a second packs every chunk after the
            counts of the chunks before it. Default: when there are fewer than
            ``COMPACT_SPLIT_ROWS`` rows of at least two chunks (few long rows leave most SMs idle).
    Returns:
        ``(counts int32 [...], packed int32 [..., width])`` (unused slots hold 0), plus the prefix
        when ``prefix=True``. One program per row and one pass, or chunked as above; the same
        result either way. No host sync.
    """
    if not isinstance(mask, torch.Tensor) or mask.dim() < 1 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor [..., N], got "
                         f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if not isinstance(width, numbers.Integral) or isinstance(width, bool) or width < 0:
        raise ValueError(f"width must be an int >= 0, got {width!r}")
    lead, N = mask.shape[:-1], mask.shape[-1]
    R, dev = math.prod(lead), mask.device
    rep, stride_vr, vals = 1, N, None
    if values is not None:
        if not isinstance(values, torch.Tensor) or values.dtype.is_floating_point or values.dtype == torch.bool:
            raise ValueError(f"values must be an integer tensor, got "
                             f"{values.dtype if isinstance(values, torch.Tensor) else type(values).__name__}")
        if values.device != dev:
            raise ValueError(f"values is on {values.device} but mask is on {dev}")
        try:
            torch.broadcast_shapes(values.shape, mask.shape)
        except RuntimeError:
            raise ValueError(f"values of shape {tuple(values.shape)} does not broadcast to mask "
                             f"{tuple(mask.shape)}") from None
        if values.dim() == mask.dim() and mask.dim() >= 2 and values.shape[-2] == 1 and \
                values.shape[:-2] == mask.shape[:-2] and values.shape[-1] == N:
            rep = mask.shape[-2]  # one values row per group of `rep` mask rows
            vals = values.reshape(-1, N)
        else:
            vals = values.expand(mask.shape).reshape(R, N)
        if vals.stride(-1) != 1:
            vals = vals.contiguous()
        stride_vr = vals.stride(0) if vals.shape[0] > 1 else N
    counts = torch.empty(lead, dtype=torch.int32, device=dev)
    packed = torch.empty(*lead, width, dtype=torch.int32, device=dev)
    pre = torch.empty(*lead, N + 1, dtype=torch.int32, device=dev) if prefix else None
    if R > 0:
        m = mask.reshape(R, N)
        if not m.is_contiguous():
            m = m.contiguous()
        if chunked is None:
            chunked = R < COMPACT_SPLIT_ROWS and N >= 2 * (block or COMPACT_CHUNK)
        if block is None:  # few, wide chunks: each costs a scan and a sum (two block-wide barriers)
            block = COMPACT_CHUNK if chunked else min(8192, max(16, triton.next_power_of_2(max(N, 1))))
        if block < 16 or block & (block - 1):
            raise ValueError(f"block must be a power of two >= 16, got {block}")
        if num_warps is None:
            num_warps = min(16, max(1, block // 512)) if not chunked else 4
        if chunked:
            n_chunks = triton.cdiv(N, block)
            chunk_counts = torch.empty(R, n_chunks, dtype=torch.int32, device=dev)
            m8 = m.view(torch.uint8)
            _chunk_counts[(R, n_chunks)](m8, chunk_counts, N, n_chunks, BLOCK=block, num_warps=num_warps)
            _compact_chunks[(R, n_chunks)](
                m8, vals if vals is not None else counts, counts, packed, pre if pre is not None else counts,
                chunk_counts, N, width, rep, stride_vr, n_chunks,
                HAS_VALUES=vals is not None, PACK=width > 0, PREFIX=prefix, BLOCK=block,
                CHUNKS=triton.next_power_of_2(n_chunks), BLOCK_W=min(1024, max(16, triton.next_power_of_2(width))),
                num_warps=num_warps)
            return (counts, packed, pre) if prefix else (counts, packed)
        _compact_rows[(R,)](m.view(torch.uint8), vals if vals is not None else counts, counts, packed,
                            pre if pre is not None else counts, N, width, rep, stride_vr,
                            HAS_VALUES=vals is not None, PACK=width > 0, PREFIX=prefix, BLOCK=block,
                            num_warps=num_warps)
    return (counts, packed, pre) if prefix else (counts, packed)
