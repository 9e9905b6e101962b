"""Triton plan construction: compact each block-mask row into sorted indices in one launch.

``BlockPlan.from_block_mask`` uses this on CUDA (one program per (batch, head, q-block) row,
no host sync); the PyTorch path in plan.py is the CPU path and the oracle.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _compact_rows(Mask, Limits, Counts, Indices, num_q_blocks, num_k_blocks, width,
                  CAUSAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    limit = num_k_blocks
    if CAUSAL:
        limit = tl.load(Limits + row % num_q_blocks)
    found = tl.zeros([], dtype=tl.int32)
    for c in range(0, num_k_blocks, BLOCK):
        offs = c + tl.arange(0, BLOCK)
        keep = tl.load(Mask + row * num_k_blocks + offs, mask=offs < num_k_blocks, other=0) != 0
        keep = keep & (offs < limit)
        rank = found + tl.cumsum(keep.to(tl.int32), 0) - 1
        tl.store(Indices + row * width + rank, offs, mask=keep & (rank < width))
        found += tl.sum(keep.to(tl.int32), 0)
    for c in range(0, width, BLOCK):  # zero padding after the count: stray reads stay in bounds
        offs = c + tl.arange(0, BLOCK)
        tl.store(Indices + row * width + offs, tl.zeros([BLOCK], dtype=tl.int32), mask=(offs >= found) & (offs < width))
    tl.store(Counts + row, found)


def compact_block_mask(mask: torch.Tensor, limits: torch.Tensor | None, width: int):
    """``mask`` bool [B, H, nQ, nK] -> (counts int32 [B, H, nQ], indices int32 [B, H, nQ, width])."""
    B, H, nQ, nK = mask.shape
    m = mask.contiguous().view(torch.uint8)
    counts = torch.empty(B, H, nQ, dtype=torch.int32, device=mask.device)
    indices = torch.empty(B, H, nQ, width, dtype=torch.int32, device=mask.device)
    rows = B * H * nQ
    if rows == 0:
        return counts, indices
    lim = limits if limits is not None else counts  # unused when not causal
    _compact_rows[(rows,)](m, lim, counts, indices, nQ, nK, width, CAUSAL=limits is not None,
                           BLOCK=min(1024, max(16, triton.next_power_of_2(max(nK, 1)))), num_warps=4)
    return counts, indices
