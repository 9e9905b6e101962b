"""Triton kernel of vertical-slash's plan after the row selections (methods/vertical_slash.py, CUDA path).

``VerticalSlash._plan``'s PyTorch code (the CPU path and the oracle) turns the kept diagonals'
prefix counts and the kept columns into a plan with ~45 small PyTorch ops over ``[B, H, nQ, nK]``
and ``[B, H, nQ, width]`` (on CUDA; ~60 on the CPU, where ``from_block_mask`` is PyTorch too):
two gathers of the prefix counts per block, the block mask, ``BlockPlan.from_block_mask`` (a
compaction kernel), the plan's ``block_mask()``, the gather of every kept column's block, the
candidate mask and a second compaction kernel. On the GPU they are launch-bound: most of the
estimate's ~0.45 ms at 32K (H100, 9 query heads; an estimate, not a measurement). Here they are
one launch:

* :func:`vertical_slash_plan_triton`: one program per (batch, head, query block ``I``):

  1. Key blocks. Diagonal distances ``o`` in ``[o_lo, o_hi]`` with ``o_lo = max(0, first(I) -
     end(n))`` and ``o_hi = min(Lk - 1, last(I) - start(n))`` reach key block ``n`` from a query
     of block ``I`` (bottom-right positions); the slash index of distance ``o`` is ``t = Lk - 1 -
     o``, so the block is kept when ``prefix[t_hi + 1] - prefix[t_lo] > 0`` (``prefix`` = the
     counts of kept diagonals, ``[0, cumsum(keep_diag)]``), with the PyTorch code's clamps of
     ``t_lo`` / ``t_hi`` to ``[0, Lk - 1]`` and its ``o_lo <= o_hi``. Blocks past the causal
     limit (``BlockPlan.causal_block_limits``, computed inline) are dropped; the kept blocks are
     packed left in ascending order (a running count plus a scan per chunk of ``BLOCK`` blocks),
     zeros after the count, ``nK`` slots: what ``BlockPlan.from_block_mask(mask, causal=True)``
     gives. Only the causally visible blocks are visited.
  2. Extra columns. The row's kept columns (``cols``, ascending, the first ``n_cols`` slots) at
     or before ``last(I)`` whose key block is not kept in step 1 (the block's membership is
     recomputed from two loads of ``prefix``, the same integer test: no scratch), packed left,
     zeros after the count, ``width`` slots: what ``compact_rows_triton(cand, cols, width)``
     gives. Only the valid slots are visited.

Exactness. Integer-only: positions, clamps, prefix differences and ranks are int32 (int64 for
addresses), so the plan is identical, bit for bit, to the PyTorch path's (``kv_counts``,
``kv_indices``, ``extra_counts``, ``extra_indices``), whatever the device.

Launches: one. The whole vertical-slash estimate on CUDA is then the profiles (three kernels, the
forced sink columns and local diagonals written by the last), the two row selections
(``rank_mask_triton``, split over programs at >= 16K keys: a memset and one launch), the column
packing with the prefix counts (``compact_rows_triton``) and this kernel, plus group_union's unions:
~7-10 kernels instead of ~64 (7 Triton kernels and ~57 PyTorch ops; counted on the CPU twin,
tests/methods/test_vertical_slash_triton.py).

Cost (an estimate, not a measurement; H100, 32K, 9 heads, block 64): 4608 programs, each reads
~2 x 512 prefix entries (L2-resident: the prefix rows are 1.2 MB in all) and ~1000 column slots
with 2 more prefix loads each, and writes 512 + 1000 int32: ~20 MB of L2 traffic, a few us.
"""

from __future__ import annotations

import numbers
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl


def _pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(max(int(n), 1)))


@triton.jit
def _block_kept(prefix_row, n, valid, first, last, k_len, BLOCK_SIZE: tl.constexpr):
    """Whether a kept diagonal passes through key block ``n`` for some query in ``[first, last]``
    (the PyTorch code's ``(at(t_hi + 1) - at(t_lo) > 0) & ok``); False where not ``valid``."""
    start = n * BLOCK_SIZE
    end = tl.minimum(start + BLOCK_SIZE, k_len) - 1
    o_lo = tl.maximum(first - end, 0)
    o_hi = tl.minimum(last - start, k_len - 1)
    ok = valid & (o_lo <= o_hi)
    t_lo = tl.minimum(tl.maximum(k_len - 1 - o_hi, 0), k_len - 1)
    t_hi = tl.minimum(tl.maximum(k_len - 1 - o_lo, 0), k_len - 1)
    hits = tl.load(prefix_row + t_hi + 1, mask=ok, other=0) - tl.load(prefix_row + t_lo, mask=ok, other=0)
    return ok & (hits > 0)


@triton.jit(do_not_specialize=["n_q_blocks", "n_k_blocks", "q_len", "k_len", "width"])
def _vertical_slash_rows(Prefix, Cols, NCols, Counts, Indices, ExtraCounts, ExtraIndices,
                         n_q_blocks, n_k_blocks, q_len, k_len, width,
                         BLOCK_SIZE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr,
                         EXTRAS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # (batch, head, query block)
    pair = row // n_q_blocks  # (batch, head)
    i = (row % n_q_blocks).to(tl.int32)
    prefix_row = Prefix + pair * (k_len + 1)
    # absolute positions of the query block's first and last queries (bottom-right alignment)
    first = k_len - q_len + i * BLOCK_SIZE
    last = k_len - q_len + tl.minimum((i + 1) * BLOCK_SIZE, q_len) - 1
    # causal limit: the blocks up to the last query's own block (none when it precedes key 0)
    limit = tl.where(last >= 0, tl.minimum(tl.maximum(last, 0) // BLOCK_SIZE + 1, n_k_blocks), 0)

    # 1. kept key blocks, ascending, packed left
    lanes = tl.arange(0, BLOCK)
    found = tl.zeros([], dtype=tl.int32)
    out_row = Indices + row * n_k_blocks
    for c in range(0, limit, BLOCK):
        n = c + lanes
        keep = _block_kept(prefix_row, n, n < limit, first, last, k_len, BLOCK_SIZE).to(tl.int32)
        rank = found + tl.cumsum(keep, 0) - 1
        tl.store(out_row + rank, n, mask=keep != 0)
        found += tl.sum(keep, 0)
    for c in range(0, n_k_blocks, BLOCK):  # zeros after the count, as from_block_mask leaves them
        n = c + lanes
        tl.store(out_row + n, tl.zeros([BLOCK], dtype=tl.int32), mask=(n >= found) & (n < n_k_blocks))
    tl.store(Counts + row, found)

    # 2. extra columns: the kept columns at or before `last` outside the row's kept blocks
    if EXTRAS:
        slots = tl.arange(0, BLOCK_E)
        n_valid = tl.minimum(tl.load(NCols + pair), width)
        col_row = Cols + pair * width
        extra_row = ExtraIndices + row * width
        found_e = tl.zeros([], dtype=tl.int32)
        for c in range(0, n_valid, BLOCK_E):
            s = c + slots
            valid = s < n_valid
            col = tl.load(col_row + s, mask=valid, other=0)
            visible = valid & (col <= last)
            in_kept_block = _block_kept(prefix_row, col // BLOCK_SIZE, visible, first, last, k_len, BLOCK_SIZE)
            cand = (visible & ~in_kept_block).to(tl.int32)
            rank = found_e + tl.cumsum(cand, 0) - 1
            tl.store(extra_row + rank, col, mask=cand != 0)
            found_e += tl.sum(cand, 0)
        for c in range(0, width, BLOCK_E):  # zeros after the count, as compact_rows leaves them
            s = c + slots
            tl.store(extra_row + s, tl.zeros([BLOCK_E], dtype=tl.int32), mask=(s >= found_e) & (s < width))
        tl.store(ExtraCounts + row, found_e)


def vertical_slash_plan_triton(prefix: torch.Tensor, cols: torch.Tensor, n_cols: torch.Tensor, *, block_size: int,
                               q_len: int, k_len: int, width: Optional[int] = None, block: Optional[int] = None,
                               block_e: Optional[int] = None
                               ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Vertical-slash's plan rows (kept diagonal blocks) and extra columns, in one launch.

    Args:
        prefix: int32 / int64 ``[B, H, Lk + 1]``: per row ``[0, cumsum(keep_diag)]`` over the slash
            index ``t`` (diagonal distance ``Lk - 1 - t``), as ``compact_rows_triton(..., prefix=True)``
            gives it.
        cols: int32 ``[B, H, width]``: the kept key columns, ascending, in the first ``n_cols`` slots.
        n_cols: integer ``[B, H]`` (or ``[B, H, 1]``): the number of kept columns (slots past
            ``width`` are ignored).
        block_size: query and key block size; q_len, k_len: the sequence lengths.
        width: the extra columns' slots (default ``cols.shape[-1]``); 0 writes no extras.
        block, block_e: key blocks / column slots per chunk (powers of two >= 16; tests force
            several chunks).
    Returns:
        ``(kv_counts int32 [B, H, nQ], kv_indices int32 [B, H, nQ, nK], extra_counts int32
        [B, H, nQ], extra_indices int32 [B, H, nQ, width])``, zeros after each count, exactly the
        PyTorch path's ``BlockPlan.from_block_mask(blocks, causal=True)`` and extra columns; the
        extras are ``None`` when ``width == 0``. No host sync.
    """
    for name, value, minimum in (("block_size", block_size, 1), ("q_len", q_len, 0), ("k_len", k_len, 0)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if not isinstance(prefix, torch.Tensor) or prefix.dim() != 3 or prefix.shape[-1] != k_len + 1 \
            or prefix.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"prefix must be an int32 / int64 tensor [B, H, k_len + 1 = {k_len + 1}], got "
                         f"{tuple(prefix.shape) if isinstance(prefix, torch.Tensor) else type(prefix).__name__}")
    B, H = prefix.shape[:2]
    width = cols.shape[-1] if width is None else int(width)
    if width < 0 or tuple(cols.shape) != (B, H, cols.shape[-1]) or cols.shape[-1] < width:
        raise ValueError(f"cols must be [B, H, >= width] = [{B}, {H}, >= {width}], got {tuple(cols.shape)}")
    if cols.dtype != torch.int32 or n_cols.dtype.is_floating_point or n_cols.dtype == torch.bool \
            or n_cols.numel() != B * H:
        raise ValueError(f"cols must be int32 and n_cols an integer tensor of B * H = {B * H} entries, got "
                         f"{cols.dtype}, {n_cols.dtype} {tuple(n_cols.shape)}")
    nQ, nK = triton.cdiv(q_len, block_size), triton.cdiv(k_len, block_size)
    dev = prefix.device
    counts = torch.empty(B, H, nQ, dtype=torch.int32, device=dev)
    indices = torch.empty(B, H, nQ, nK, dtype=torch.int32, device=dev)
    extras = width > 0
    extra_counts = torch.empty(B, H, nQ, dtype=torch.int32, device=dev) if extras else None
    extra_indices = torch.empty(B, H, nQ, width, dtype=torch.int32, device=dev) if extras else None
    rows = B * H * nQ
    if rows == 0:
        return counts, indices, extra_counts, extra_indices
    block = _pow2(block if block is not None else min(1024, nK))
    block_e = _pow2(block_e if block_e is not None else min(1024, width))
    cols = cols[..., :width].contiguous()  # a no-op for the method's [B, H, width] rows
    n_cols = n_cols.reshape(B * H).contiguous()
    _vertical_slash_rows[(rows,)](
        prefix.contiguous(), cols if extras else prefix, n_cols if extras else prefix, counts, indices,
        extra_counts if extras else counts, extra_indices if extras else indices,
        nQ, nK, q_len, k_len, width,
        BLOCK_SIZE=block_size, BLOCK=block, BLOCK_E=block_e, EXTRAS=extras, num_warps=4)
    return counts, indices, extra_counts, extra_indices
