"""Triton soft votes of TokenSelect's decode step, from the paged K cache in two light passes.

``token_votes_triton`` is what :meth:`sparseattn.decode_methods.tokenselect.TokenSelect.votes`
runs on CUDA: ``S(j) = sum_h softmax_{candidates}(logit_h(j))`` over every query row ``h`` of a
sequence, ``-inf`` outside its candidates. The PyTorch code there (``exact_logits``, then
``where`` + ``softmax`` + ``nan_to_num`` + ``sum`` + ``where``: five passes over ``[B, Hq, N]``
fp32) is the CPU path and the oracle.

1. The logits launch of :mod:`~sparseattn.kernels.decode_logits_triton` (K read once through the
   page table, fp32 logits written) also writes each row's per-run (max, sum-exp) *over the
   candidates only* (its ``stats_mask``): the softmax denominators come free with the logits.
2. ``_votes``: one program per (tile of ``BLOCK_N`` tokens, sequence). For each block of
   ``BLOCK_H`` rows it folds their per-run statistics (a short vector per row, L2-resident) into
   ``(m_h, 1 / l_h)``, reads the rows' logits on the tile's candidates, and accumulates
   ``exp(l - m_h) / l_h`` over the rows in registers; it writes one fp32 vote per token. A tile
   without any candidate (the forced sinks / window, tokens past a short sequence) reads no logits.

Bytes per step (Hq = 32, N = 128K, B = 8): the logits are written once (134 MB, by the logits
kernel, as before) and read once here (134 MB, masked loads skip non-candidates), plus the
candidate mask (1 MB, read by both kernels) and the votes (4 MB): ~140 MB, i.e. ~45 us at
~3 TB/s, against ~0.5 ms for the PyTorch passes. The statistics add ``B * Hq * runs * 8`` bytes
(16 KB per sequence at ``runs = 64``) re-read from L2 by each program.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .decode_logits_triton import _check, _launch, _pow2_at_least
from .dispatch import triton_interpreting


@triton.jit
def _votes(X, Stats, Cand, Out,
           n_tokens, num_runs, stride_cb, stride_cn, stride_ob, stride_on,
           ROWS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, RUN_BLOCK: tl.constexpr):
    tile = tl.program_id(0)
    b64 = tl.program_id(1).to(tl.int64)
    offs = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs64 = offs.to(tl.int64)
    in_row = offs < n_tokens
    cand = tl.load(Cand + b64 * stride_cb + offs64 * stride_cn, mask=in_row, other=0) != 0
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    if tl.max(cand.to(tl.int32), 0) > 0:  # else every entry is -inf: nothing to read
        offs_h = tl.arange(0, BLOCK_H)
        offs_r = tl.arange(0, RUN_BLOCK)
        for h0 in range(0, ROWS, BLOCK_H):
            h = h0 + offs_h
            h_ok = h < ROWS
            row64 = b64 * ROWS + h  # row of the flat [B * Hq * Lq, N] logits, this sequence's rows
            # The logits load comes first: it does not wait for the statistics below.
            x = tl.load(X + row64[:, None] * n_tokens + offs64[None, :], mask=h_ok[:, None] & cand[None, :],
                        other=float("-inf"))
            st = Stats + row64 * num_runs * 2
            m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
            l = tl.zeros([BLOCK_H], dtype=tl.float32)
            for r0 in range(0, num_runs, RUN_BLOCK):  # fold the runs' (max, sum-exp), as _normalise
                r = r0 + offs_r
                ok = h_ok[:, None] & (r < num_runs)[None, :]
                m_r = tl.load(st[:, None] + r[None, :] * 2, mask=ok, other=float("-inf"))
                l_r = tl.load(st[:, None] + r[None, :] * 2 + 1, mask=ok, other=0.0)
                m_new = tl.maximum(m, tl.max(m_r, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                l = l * tl.exp(m - m_safe) + tl.sum(l_r * tl.exp(m_r - m_safe[:, None]), 1)
                m = m_new
            m_safe = tl.where(m == float("-inf"), 0.0, m)
            inv = tl.where(l > 0.0, 1.0 / tl.where(l > 0.0, l, 1.0), 0.0)  # a row with no candidate: votes 0
            acc += tl.sum(tl.exp(x - m_safe[:, None]) * inv[:, None], 0)
    tl.store(Out + b64 * stride_ob + offs64 * stride_on, tl.where(cand, acc, float("-inf")), mask=in_row)


# (BLOCK_N, BLOCK_H, num_warps). A [BLOCK_H, BLOCK_N] fp32 logits tile of 8 x 512 is 16 KB in
# flight per program (32 registers a thread at 4 warps); 512 tokens give 256 programs at B = 1,
# N = 128K (about 2 per SM) and enough at larger batches. The interpreter: small tiles that make
# several token tiles and head blocks in the tests' shapes.
DEFAULT_CONFIG = (512, 8, 4)
_CONFIG_INTERPRET = (32, 4, 4)
MAX_RUN_BLOCK = 64


def token_votes_triton(q: torch.Tensor, k_pages: torch.Tensor, page_table: torch.Tensor, lengths: torch.Tensor,
                       candidate: torch.Tensor, *, page_size: int, scale: float, use_dot: Optional[bool] = None,
                       logits_config: Optional[tuple] = None, config: Optional[tuple] = None) -> torch.Tensor:
    """TokenSelect's soft votes: per sequence, the sum over its query rows of each row's softmax
    over the candidate tokens.

    Args:
        q: ``[B, Hq, Lq, D]`` float16/bfloat16/float32 queries (TokenSelect: the mean query,
            ``Lq = 1``); row ``i`` sits at position ``len_b - Lq + i`` (it sees no later token).
        k_pages: ``[capacity, Hkv, page_size, D]`` key pool, same device; ``Hq`` a multiple of ``Hkv``.
        page_table: int32 ``[B, max_pages]``; lengths: int32/int64 ``[B]``.
        candidate: bool ``[B, N]`` (``N = max_pages * page_size``, any strides): the tokens each
            sequence votes over.
        scale: multiplies ``q . k`` (TokenSelect's ``logit_scale``).
        use_dot, logits_config: passed to the logits launch (see
            :func:`~sparseattn.kernels.decode_logits_triton.paged_logits_triton`).
        config: ``(BLOCK_N, BLOCK_H, num_warps)`` of the votes kernel (powers of two).

    Returns float32 ``[B, N]``: ``sum_{h, i} softmax_j(logit_{h,i}(j) | candidate[b, j])`` where
    ``candidate``, ``-inf`` elsewhere; a row (query head, new token) that sees no candidate adds 0
    (a sequence without candidates is all ``-inf``). Equal to ``where(candidate, softmax(where(
    candidate, logits, -inf)).nan_to_num(0).sum(rows), -inf)`` up to fp32 rounding (exp of the
    logit minus the row max, times the reciprocal of the folded sum). No host sync.
    """
    B, Hq, Lq, D, Hkv = _check(q, k_pages, page_table, lengths, page_size, scale)
    N = page_table.shape[1] * page_size
    if not isinstance(candidate, torch.Tensor) or candidate.dtype != torch.bool \
            or tuple(candidate.shape) != (B, N) or candidate.device != q.device:
        got = (candidate.dtype, tuple(candidate.shape), candidate.device) \
            if isinstance(candidate, torch.Tensor) else type(candidate).__name__
        raise ValueError(f"candidate must be a bool [B={B}, N={N}] tensor on {q.device}, got {got}")
    block_n, block_h, num_warps = config or (_CONFIG_INTERPRET if triton_interpreting() else DEFAULT_CONFIG)
    for name, value in (("BLOCK_N", block_n), ("BLOCK_H", block_h)):
        if not isinstance(value, int) or value < 2 or value & (value - 1):
            raise ValueError(f"config {name} must be a power of two >= 2, got {value!r}")
    if B == 0 or N == 0:
        return torch.empty((B, N), dtype=torch.float32, device=q.device)
    if B > 65535:
        raise ValueError(f"B = {B} must be <= 65535 (grid limit)")
    logits, stats, runs, _ = _launch(q, k_pages, page_table, lengths, page_size, scale, use_dot, logits_config,
                                     stats=True, stats_mask=candidate)
    if logits.numel() == 0:  # no query row: every candidate gets 0 votes
        return torch.where(candidate, 0.0, float("-inf")).to(torch.float32)
    rows = Hq * Lq
    out = torch.empty((B, N), dtype=torch.float32, device=q.device)
    cand = candidate.view(torch.uint8)  # same bytes, no copy
    _votes[(triton.cdiv(N, block_n), B)](
        logits, stats, cand, out,
        N, runs, *cand.stride(), *out.stride(),
        ROWS=rows, BLOCK_H=min(block_h, max(2, _pow2_at_least(rows))), BLOCK_N=block_n,
        RUN_BLOCK=min(MAX_RUN_BLOCK, max(2, _pow2_at_least(runs))), num_warps=num_warps,
    )
    return out


__all__ = ["token_votes_triton"]
