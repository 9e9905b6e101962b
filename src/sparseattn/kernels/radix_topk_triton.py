"""Triton top-k of long rows by radix select: the ``k`` largest scores of each row, as ascending
positions, with ties to the lower position (what a stable descending sort keeps).

The token-level decode methods (Double Sparsity, TokenSelect, Recycled Attention, TidalDecode)
pick ``k`` ~ 2048 of up to 128K+ token scores per row. ``torch.topk`` does that as a multi-block
radix select (~150 us for 64 rows of 128K on the H100) and a sort of the ``k`` picks follows;
here the rows are split into chunks, one program per (row, chunk), and six launches do it:

1. four digit passes over the scores, as order-preserving int32 keys: pass ``p`` finds the
   previous pass's cut (the digit bin that holds the ``k``-th largest element, from that pass's
   per-row histogram) and histograms the next 8-bit digit of the elements that share the cut's
   prefix (``tl.histogram`` per chunk, bins added into the row's histogram with atomics). After
   four passes the cut is the exact ``k``-th largest key ``t`` and the number of elements equal
   to ``t`` that still fit. (8-bit digits: ``tl.histogram``'s cost per element grows with the bin
   count; 11-bit digits in three passes were 3-4x slower on the H100.)
2. a count pass: per chunk, the elements above ``t`` and those equal to it;
3. an emit pass: each chunk's picks at their ascending rank (the counts of the chunks before it),
   equal-to-``t`` elements in position order until the budget is full; the slots past the row's
   pick count read ``N``.

No sort, no host sync; every pass reads the row once (the later ones mostly from L2). Each pass's
first chunk records the cut so far (``State``) for the next launch, so no program repeats an
earlier pass's search. Scores that are ``-inf`` or NaN are never picked and take no slot; ``-0.0``
equals ``+0.0``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .select_triton import _inclusive_count

#: The key's digits, most significant first: (shift, bits); bins per digit histogram.
DIGITS = ((24, 8), (16, 8), (8, 8), (0, 8))
BINS = tl.constexpr(256)
N_DIGITS = tl.constexpr(len(DIGITS))
SCORE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Positions per program: the smallest chunk that keeps the launch near TARGET_PROGRAMS programs,
#: within these bounds; 8 warps per program up to WIDE_WARPS_PROGRAMS programs, else 4. From
#: ``scripts/sweep_topk.py`` on the H100 (k = 2048): 1 row of 128K c1024 w8 26 us, 8 rows c1024 w8
#: 41 us, 64 rows c2048 w4 164 us (c4096 w8 170, c1024 w8 185).
MIN_CHUNK, MAX_CHUNK = 1024, 2048
TARGET_PROGRAMS = 1024
WIDE_WARPS_PROGRAMS = 1024
#: Past pass 0 a chunk with at most CHUNK / FEW_MATCHES keys on the cut's prefix adds them to the
#: row's histogram with one atomic each instead of ``tl.histogram``, whose cost (~80 instructions
#: per element at 256 bins) does not depend on how many elements the mask keeps.
FEW_MATCHES = tl.constexpr(16)


@triton.jit
def _keys(Score, row_off, offs, n):
    """(int32 keys whose signed order is the scores' order, bool candidates) of ``offs``."""
    inb = offs < n
    x = tl.load(Score + row_off + offs, mask=inb, other=float("-inf")).to(tl.float32)
    cand = inb & (x > float("-inf")) & (x == x)  # NaN compares unequal to itself
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 -> +0.0: they compare equal
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF), cand  # negative floats: reverse their order


@triton.jit
def _cut(Hist, k_rem, BINS: tl.constexpr):
    """(bin, what is left to pick inside it): the highest bin ``d`` whose elements and those of the
    bins above it number at least ``k_rem`` (bin 0 when the whole histogram is fewer), and
    ``k_rem`` minus the elements above ``d``."""
    i = tl.arange(0, BINS)
    h = tl.load(Hist + i)
    upto = _inclusive_count(h, BINS)
    total = tl.sum(h, 0)
    at_or_above = total - upto + h
    d = tl.max(tl.where(at_or_above >= k_rem, i, 0), 0)
    above = tl.sum(tl.where(i == d, total - upto, 0), 0)
    return d, k_rem - above


@triton.jit
def _radix_pass(Score, Hist, State, Counts, n, stride_r, k, n_chunks,
                PASS: tl.constexpr, PREV_SHIFT: tl.constexpr, PREV_BITS: tl.constexpr,
                SHIFT: tl.constexpr, BITS: tl.constexpr, CHUNK: tl.constexpr):
    """Pass 0-3: histogram of digit ``PASS`` among the keys that share the cut so far.
    Pass 4: per chunk, the keys above the finished cut and those equal to it (``Counts``)."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    key, cand = _keys(Score, row * stride_r, offs, n)

    if PASS == 0:
        t = tl.zeros([], dtype=tl.int32)
        match = cand
    else:
        if PASS == 1:
            t = tl.zeros([], dtype=tl.int32)
            k_rem = k + tl.zeros([], dtype=tl.int32)
        else:
            t = tl.load(State + row * (2 * N_DIGITS + 2) + PASS * 2 - 2)
            k_rem = tl.load(State + row * (2 * N_DIGITS + 2) + PASS * 2 - 1)
        d, k_rem = _cut(Hist + (row * N_DIGITS + PASS - 1) * BINS, k_rem, 1 << PREV_BITS)
        if PREV_SHIFT + PREV_BITS == 32:
            d = d ^ (1 << (PREV_BITS - 1))  # the top digit holds the sign bit: flipped, as in the key
        t = t | (d << PREV_SHIFT)
        if c == 0:  # the next launch reads the cut from here
            tl.store(State + row * (2 * N_DIGITS + 2) + PASS * 2, t)
            tl.store(State + row * (2 * N_DIGITS + 2) + PASS * 2 + 1, k_rem)
        match = cand & ((key >> PREV_SHIFT) == (t >> PREV_SHIFT))

    if PASS < N_DIGITS:
        digit = (key >> SHIFT) & ((1 << BITS) - 1)
        if SHIFT + BITS == 32:
            digit = digit ^ (1 << (BITS - 1))
        hist_row = Hist + (row * N_DIGITS + PASS) * BINS
        if PASS == 0 or tl.sum(match.to(tl.int32), 0) > CHUNK // FEW_MATCHES:
            hist = tl.histogram(digit, 1 << BITS, mask=match)
            bins = tl.arange(0, 1 << BITS)
            tl.atomic_add(hist_row + bins, hist, mask=hist > 0)
        else:  # few keys share the cut's prefix (the usual case past pass 0): one atomic each
            tl.atomic_add(hist_row + digit, tl.full([CHUNK], 1, tl.int32), mask=match)
    else:
        out = Counts + (row * n_chunks + c) * 2
        tl.store(out, tl.sum((cand & (key > t)).to(tl.int32), 0))
        tl.store(out + 1, tl.sum(match.to(tl.int32), 0))  # sharing all 32 bits: equal to the cut


@triton.jit
def _radix_emit(Score, State, Counts, Out, n, stride_r, k, n_chunks,
                CHUNK: tl.constexpr, MAX_CHUNKS: tl.constexpr, FILL: tl.constexpr):
    """Each chunk's picks at their ascending rank; the first chunk fills the slots past the count."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    t = tl.load(State + row * (2 * N_DIGITS + 2) + 2 * N_DIGITS)
    k_ties = tl.load(State + row * (2 * N_DIGITS + 2) + 2 * N_DIGITS + 1)
    ci = tl.arange(0, MAX_CHUNKS)
    counts = Counts + (row * n_chunks + ci) * 2
    above_before = tl.sum(tl.load(counts, mask=ci < c, other=0), 0)
    ties_before = tl.sum(tl.load(counts + 1, mask=ci < c, other=0), 0)

    offs = c * CHUNK + tl.arange(0, CHUNK)
    key, cand = _keys(Score, row * stride_r, offs, n)
    tie = cand & (key == t)
    tie_rank = _inclusive_count(tie.to(tl.int32), CHUNK) - 1
    take = (cand & (key > t)) | (tie & (ties_before + tie_rank < k_ties))
    slot = above_before + tl.minimum(ties_before, k_ties) + _inclusive_count(take.to(tl.int32), CHUNK) - 1
    out = Out + row * k
    tl.store(out + slot, offs, mask=take)

    if c == 0:
        live = ci < n_chunks
        n_picked = tl.sum(tl.load(counts, mask=live, other=0), 0) + \
            tl.minimum(tl.sum(tl.load(counts + 1, mask=live, other=0), 0), k_ties)
        for s in range(0, k, FILL):
            j = s + tl.arange(0, FILL)
            tl.store(out + j, tl.zeros([FILL], dtype=tl.int32) + n, mask=(j >= n_picked) & (j < k))


def _chunk_for(rows: int, n: int) -> int:
    want = triton.cdiv(rows * n, TARGET_PROGRAMS)
    return max(MIN_CHUNK, min(MAX_CHUNK, triton.next_power_of_2(max(want, 1))))


def radix_top_positions(score: torch.Tensor, k: int, *, chunk: int | None = None,
                        num_warps: int | None = None) -> torch.Tensor:
    """int32 ``[..., k]``: per row of ``score [..., N]``, the positions of its ``k`` largest entries,
    ascending; ties go to the lower position (a stable descending sort's first ``k``). ``-inf`` and
    NaN entries are never picked; a row with fewer than ``k`` other entries gets them all, then
    ``N`` in the remaining slots (a sentinel: never a position).

    Args:
        score: float16 / bfloat16 / float32 ``[..., N]`` on a device Triton runs on (or under the
            interpreter), ``N < 2**31``.
        k: picks per row (a host int), ``0 <= k <= N``.
        chunk: positions per program (a power of two >= 16; default: from the row count and
            length, see ``MIN_CHUNK`` / ``MAX_CHUNK``); num_warps: per program (default: 8 for
            launches of at most ``WIDE_WARPS_PROGRAMS`` programs, else 4).
    """
    if not isinstance(score, torch.Tensor) or score.dim() < 1 or score.dtype not in SCORE_DTYPES:
        got = (score.dtype, tuple(score.shape)) if isinstance(score, torch.Tensor) else type(score).__name__
        raise ValueError(f"score must be a float16/bfloat16/float32 tensor [..., N], got {got}")
    N = score.shape[-1]
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= N:
        raise ValueError(f"k must be an int in [0, N={N}], got {k!r}")
    if N >= 2**31 - 1:
        raise ValueError(f"at most 2**31 - 2 positions per row, got {N}")
    lead = score.shape[:-1]
    rows = score.reshape(-1, N)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    R = rows.shape[0]
    out = torch.empty(R, k, dtype=torch.int32, device=score.device)
    if R == 0 or k == 0:
        return out.view(*lead, k)
    if chunk is None:
        chunk = _chunk_for(R, N)
    if not isinstance(chunk, int) or chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two >= 16, got {chunk!r}")
    n_chunks = triton.cdiv(N, chunk)
    if num_warps is None:
        num_warps = 8 if R * n_chunks <= WIDE_WARPS_PROGRAMS else 4
    hist = torch.zeros(R, len(DIGITS), BINS.value, dtype=torch.int32, device=score.device)
    state = torch.empty(R, len(DIGITS) + 1, 2, dtype=torch.int32, device=score.device)
    counts = torch.empty(R, n_chunks, 2, dtype=torch.int32, device=score.device)
    grid = (R, n_chunks)
    prev = (0, 0)
    for p in range(len(DIGITS) + 1):
        shift, bits = DIGITS[p] if p < len(DIGITS) else (0, 1)
        _radix_pass[grid](rows, hist, state, counts, N, rows.stride(0), k, n_chunks, PASS=p,
                          PREV_SHIFT=prev[0], PREV_BITS=max(prev[1], 1), SHIFT=shift, BITS=bits,
                          CHUNK=chunk, num_warps=num_warps)
        prev = (shift, bits)
    _radix_emit[grid](rows, state, counts, out, N, rows.stride(0), k, n_chunks, CHUNK=chunk,
                      MAX_CHUNKS=max(2, triton.next_power_of_2(n_chunks)), FILL=min(1024, triton.next_power_of_2(k)),
                      num_warps=num_warps)
    return out.view(*lead, k)


__all__ = ["radix_top_positions"]
