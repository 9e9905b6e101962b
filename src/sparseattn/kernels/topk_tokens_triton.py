"""Triton assembly of a token-level ``DecodeSelection`` from sorted top-k positions.

The token-level decode methods (TokenSelect, TidalDecode, Double Sparsity, Recycled Attention)
pick ``k`` tokens per row (``kernels/radix_topk_triton.py``, ascending; or ``torch.topk`` and a
sort) and, for a union over query heads, sort the ``G * k`` picked positions; ``_assemble_tokens``
then writes each row's selection in one pass
over those sorted positions: the forced head ``[0, s0)``, the picks that are candidates (once
each: a union's duplicates sit next to each other after the sort), the forced tail
``[r0, len)``, zeros after the count. O(k) per row instead of the O(N) mask compaction of
``DecodeSelection.from_token_mask``; no host sync. ``decode_methods.base.topk_token_selection``
is the caller.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Positions per loop step. One program walks one row; at the sizes that matter (k = 2048, a
# width of ~2.7K) that is 2-3 steps of 1024 int32 loads/stores, so a row is a few microseconds of
# latency and the launch (B * H programs) is over before a finer split would pay off.
DEFAULT_BLOCK = 1024


@triton.jit
def _assemble_tokens(Keys, Lengths, Counts, Tokens, H, n_keys, width, sink, forced_last,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # b * H + h
    n = tl.load(Lengths + row // H).to(tl.int32)
    r0 = tl.maximum(n - forced_last, 0)  # forced tail [r0, n)
    s0 = tl.minimum(r0, sink)  # forced head [0, s0); candidates [s0, r0)
    keys = Keys + row * n_keys
    out = Tokens + row * width

    found = tl.zeros([], dtype=tl.int32)
    for c in range(0, n_keys, BLOCK):
        offs = c + tl.arange(0, BLOCK)
        key = tl.load(keys + offs, mask=offs < n_keys, other=-1)
        # The previous entry (from the last step too): equal neighbours are one position picked
        # by several query heads, kept once.
        prev = tl.load(keys + offs - 1, mask=(offs > 0) & (offs < n_keys), other=-1)
        keep = (key >= s0) & (key < r0) & (key != prev)
        slot = s0 + found + tl.cumsum(keep.to(tl.int32), 0) - 1
        tl.store(out + slot, key, mask=keep & (slot < width))  # never into the next row
        found += tl.sum(keep.to(tl.int32), 0)

    tail = s0 + found
    n_tail = n - r0
    for c in range(0, width, BLOCK):
        offs = c + tl.arange(0, BLOCK)
        val = tl.where(offs < s0, offs, tl.where(offs < tail + n_tail, r0 + offs - tail, 0))
        tl.store(out + offs, val, mask=(offs < width) & ((offs < s0) | (offs >= tail)))
    # Capped at the width, so a reader of the count never leaves the row (the callers' widths
    # hold every count).
    tl.store(Counts + row, tl.minimum(tail + n_tail, width))


def assemble_token_selection(keys: torch.Tensor, lengths: torch.Tensor, *, width: int, sink: int = 0,
                             forced_last: int = 0, block: int = DEFAULT_BLOCK, num_warps: int = 4):
    """Per (batch, head) row: forced head, candidate picks, forced tail, as ascending token lists.

    Args:
        keys: int32 ``[B, H, n]``, each row ascending (``torch.sort``): picked positions; entries
            outside the row's candidates ``[s0, r0)`` (e.g. a sentinel ``>= N`` for dropped picks)
            are skipped, repeated entries count once.
        lengths: int32/int64 ``[B]``: tokens per sequence.
        width: index width of the output (>= every count, else the row is cut at ``width``).
        sink: the first ``sink`` tokens are forced; ``forced_last``: the last ``forced_last``.
            With ``r0 = max(len - forced_last, 0)`` and ``s0 = min(sink, r0)`` a row reads
            ``[0, s0)``, its candidate picks, then ``[r0, len)``.
        block, num_warps: tile (positions per loop step, a power of two) and warps.

    Returns:
        ``(counts int32 [B, H], tokens int32 [B, H, width])``, strictly ascending, zeros after the
        count: what ``DecodeSelection.from_token_mask`` builds from the same set.
    """
    if not isinstance(keys, torch.Tensor) or keys.dim() != 3 or keys.dtype != torch.int32:
        got = (keys.dtype, tuple(keys.shape)) if isinstance(keys, torch.Tensor) else type(keys).__name__
        raise ValueError(f"keys must be an int32 [B, H, n] tensor, got {got}")
    B, H, n = keys.shape
    if not isinstance(lengths, torch.Tensor) or lengths.dtype not in (torch.int32, torch.int64) \
            or tuple(lengths.shape) != (B,) or lengths.device != keys.device:
        raise ValueError(f"lengths must be an int32/int64 [B={B}] tensor on {keys.device}, got "
                         f"{getattr(lengths, 'dtype', type(lengths).__name__)} {tuple(getattr(lengths, 'shape', ()))}")
    for name, value, low in (("width", width, 1), ("sink", sink, 0), ("forced_last", forced_last, 0),
                             ("block", block, 16)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")
    if n == 0:
        raise ValueError("keys needs at least one column (pass one out-of-range sentinel for no picks)")
    counts = torch.empty(B, H, dtype=torch.int32, device=keys.device)
    tokens = torch.empty(B, H, width, dtype=torch.int32, device=keys.device)
    if B * H == 0:
        return counts, tokens
    block = min(block, max(16, triton.next_power_of_2(max(n, width))))
    _assemble_tokens[(B * H,)](keys.contiguous(), lengths, counts, tokens, H, n, width, sink, forced_last,
                               BLOCK=block, num_warps=num_warps)
    return counts, tokens


__all__ = ["assemble_token_selection"]
