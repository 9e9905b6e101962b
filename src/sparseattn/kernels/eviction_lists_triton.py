"""Triton kernels that keep an eviction method's kept-token list in step with its keep mask.

Used by ``decode_methods/eviction.py`` (``admit_tokens``, ``drop_evicted``; their PyTorch code is the
CPU path and the oracle): appending a step's new positions and compacting the list after an
eviction cost O(new) and O(kept) per row instead of recompacting the whole [B, Hkv, N] mask.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def admit_kernel(Keep, Tokens, Counts, Seen, Lengths, num_heads, cap,
                 stride_kb, stride_kh, stride_tb, stride_th, stride_cb, stride_ch, stride_sb, stride_sh, stride_l,
                 HAS_LIST: tl.constexpr, BLOCK: tl.constexpr):
    # One program per (batch, KV head) row: its own seen entry, so no program reads what another writes.
    row = tl.program_id(0).to(tl.int64)
    b = row // num_heads
    h = row % num_heads
    seen_ptr = Seen + b * stride_sb + h * stride_sh
    seen = tl.load(seen_ptr)
    n = tl.load(Lengths + b * stride_l).to(tl.int64)
    new = tl.maximum(n - seen, 0).to(tl.int32)
    offs = tl.arange(0, BLOCK)
    keep_row = Keep + b * stride_kb + h * stride_kh
    for j0 in range(0, new, BLOCK):
        j = j0 + offs
        tl.store(keep_row + seen + j, tl.full([BLOCK], 1, tl.uint8), mask=j < new)
    if HAS_LIST:
        c_ptr = Counts + b * stride_cb + h * stride_ch
        count = tl.load(c_ptr)
        tok_row = Tokens + b * stride_tb + h * stride_th
        for j0 in range(0, new, BLOCK):
            j = j0 + offs
            dest = count + j
            # dest < cap always holds eagerly; it guards replays of a captured step past the slack
            tl.store(tok_row + dest, (seen + j).to(tl.int32), mask=(j < new) & (dest < cap))
        tl.store(c_ptr, count + new)
    tl.store(seen_ptr, n)


@triton.jit
def drop_kernel(Keep, Tokens, Counts, num_heads, width,
                stride_kb, stride_kh, stride_tb, stride_th, stride_cb, stride_ch, BLOCK: tl.constexpr):
    # In place: a block is loaded whole before its (cumsum-dependent) stores, which land at or
    # before the block's own entries, never in a block still to be read.
    row = tl.program_id(0).to(tl.int64)
    b = row // num_heads
    h = row % num_heads
    keep_row = Keep + b * stride_kb + h * stride_kh
    tok_row = Tokens + b * stride_tb + h * stride_th
    c_ptr = Counts + b * stride_cb + h * stride_ch
    count = tl.minimum(tl.load(c_ptr), width)
    kept = tl.zeros([], dtype=tl.int32)
    for j0 in range(0, count, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        ok = j < count
        pos = tl.load(tok_row + j, mask=ok, other=0)
        alive = ok & (tl.load(keep_row + pos.to(tl.int64), mask=ok, other=0) != 0)
        a = alive.to(tl.int32)
        tl.store(tok_row + kept + tl.cumsum(a, 0) - a, pos, mask=alive)
        kept += tl.sum(a, 0)
    tl.store(c_ptr, kept)
