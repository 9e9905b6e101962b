"""Triton StreamingLLM decode selection: sink tokens + recent window in one launch.

The PyTorch selection (``decode_methods/streaming.py``) is ~25 tiny kernels, about 75 us per step
on the H100 even replayed from a CUDA graph, for a selection that is closed-form in each
sequence's length. One program per sequence writes the window's whole pages and the single
tokens (sink, then the window's head in a partial page) straight into the
:class:`~sparseattn.decode_api.DecodeSelection` layout.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import dependent_launch, pdl_kwargs


@triton.jit
def _streaming_select(Lengths, PageCounts, Pages, TokenCounts, Tokens, q_len, sink, window, width_pages,
                      width_tokens, PAGE_SIZE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr,
                      PDL: tl.constexpr):
    if PDL:  # the decode kernel that reads this selection may be scheduled now; it waits for our writes
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    b = tl.program_id(0)
    n = tl.load(Lengths + b).to(tl.int64)
    ws = tl.maximum(n - q_len - window + 1, 0)  # first position of the window
    first_page = (ws + PAGE_SIZE - 1) // PAGE_SIZE  # first page wholly in the window
    n_pages = (n + PAGE_SIZE - 1) // PAGE_SIZE
    count = tl.minimum(tl.maximum(n_pages - first_page, 0), width_pages)
    for c in range(0, width_pages, BLOCK_P):
        i = c + tl.arange(0, BLOCK_P)
        page = tl.where(i < count, first_page + i, 0)
        tl.store(Pages + b.to(tl.int64) * width_pages + i, page.to(tl.int32), mask=i < width_pages)
    tl.store(PageCounts + b, count.to(tl.int32))
    # Tokens, ascending: the sink tokens before the window, then the window's head up to the first
    # whole page (or the sequence end).
    n_sink = tl.minimum(ws, sink)
    n_head = tl.minimum(tl.maximum(tl.minimum(first_page * PAGE_SIZE, n) - ws, 0), PAGE_SIZE - 1)
    for c in range(0, width_tokens, BLOCK_T):
        j = c + tl.arange(0, BLOCK_T)
        tok = tl.where(j < n_sink, j, tl.where(j < n_sink + n_head, ws + j - n_sink, 0))
        tl.store(Tokens + b.to(tl.int64) * width_tokens + j, tok.to(tl.int32), mask=j < width_tokens)
    tl.store(TokenCounts + b, (n_sink + n_head).to(tl.int32))


def streaming_select_triton(lengths: torch.Tensor, *, q_len: int, sink: int, window: int, page_size: int,
                            width_pages: int):
    """``(page_counts [B, 1], pages [B, 1, width_pages], token_counts [B, 1], tokens [B, 1, sink + P - 1])``,
    int32, on ``lengths``' device: what ``Streaming._select`` builds, for one selection shared by
    every KV head. ``lengths`` int32 ``[B]``: each sequence's length including the ``q_len`` new tokens."""
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be [B], got shape {tuple(lengths.shape)}")
    for name, value, low in (("q_len", q_len, 0), ("sink", sink, 0), ("window", window, 1),
                             ("page_size", page_size, 1), ("width_pages", width_pages, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    B, dev = lengths.shape[0], lengths.device
    width_tokens = sink + page_size - 1
    page_counts = torch.empty(B, 1, dtype=torch.int32, device=dev)
    pages = torch.empty(B, 1, width_pages, dtype=torch.int32, device=dev)
    token_counts = torch.empty(B, 1, dtype=torch.int32, device=dev)
    tokens = torch.empty(B, 1, max(width_tokens, 1), dtype=torch.int32, device=dev)
    if B:
        pdl = dependent_launch(dev)
        _streaming_select[(B,)](lengths.contiguous(), page_counts, pages, token_counts, tokens, q_len, sink, window,
                                width_pages, max(width_tokens, 1), PAGE_SIZE=page_size,
                                BLOCK_P=min(1024, triton.next_power_of_2(width_pages)),
                                BLOCK_T=min(1024, triton.next_power_of_2(max(width_tokens, 1))), PDL=pdl,
                                num_warps=1, **pdl_kwargs(pdl))
    return page_counts, pages, token_counts, tokens[..., :width_tokens]
