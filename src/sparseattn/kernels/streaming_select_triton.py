"""Triton StreamingLLM decode selection: sink tokens + recent window in one launch.

The PyTorch selection (``decode_methods/streaming.py``) is ~25 tiny kernels, about 75 us per step
on the H100 even replayed from a CUDA graph, for a selection that is closed-form in each
sequence's length. One program per sequence writes the window's whole pages and the single
tokens (sink, then the window's head in a partial page) straight into the
:class:`~sparseattn.decode_api.DecodeSelection` layout.

``duo_select_triton``: DuoAttention's per-KV-head selection in one launch as well (a retrieval
head gets every page, a streaming head the streaming selection above): its PyTorch twin in
``decode_methods/duo.py`` is ~10 kernels plus a copy of the ``[B, Hkv, max_pages]`` page list.
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
    ws, first_page, n_pages, count = _window(n, q_len, window, width_pages, PAGE_SIZE)
    for c in range(0, width_pages, BLOCK_P):
        i = c + tl.arange(0, BLOCK_P)
        page = tl.where(i < count, first_page + i, 0)
        tl.store(Pages + b.to(tl.int64) * width_pages + i, page.to(tl.int32), mask=i < width_pages)
    tl.store(PageCounts + b, count.to(tl.int32))
    n_tok = _single_tokens(Tokens + b.to(tl.int64) * width_tokens, n, ws, first_page, sink, width_tokens,
                           False, PAGE_SIZE, BLOCK_T)
    tl.store(TokenCounts + b, n_tok.to(tl.int32))


@triton.jit
def _window(n, q_len, window, width_pages, PAGE_SIZE: tl.constexpr):
    """The streaming window of a sequence of ``n`` tokens: (its first position, its first whole
    page, the sequence's pages, the whole pages kept: at most ``width_pages``)."""
    ws = tl.maximum(n - q_len - window + 1, 0)
    first_page = (ws + PAGE_SIZE - 1) // PAGE_SIZE
    n_pages = (n + PAGE_SIZE - 1) // PAGE_SIZE
    count = tl.minimum(tl.maximum(n_pages - first_page, 0), width_pages)
    return ws, first_page, n_pages, count


@triton.jit
def _single_tokens(row, n, ws, first_page, sink, width_tokens, empty, PAGE_SIZE: tl.constexpr,
                   BLOCK_T: tl.constexpr):
    """Write a row of single tokens, ascending: the sink tokens before the window, then the
    window's head up to its first whole page (or the sequence end); zeros past them, and only
    zeros when ``empty``. Returns how many."""
    n_sink = tl.minimum(ws, sink)
    n_head = tl.minimum(tl.maximum(tl.minimum(first_page * PAGE_SIZE, n) - ws, 0), PAGE_SIZE - 1)
    n_tok = tl.where(empty, 0, n_sink + n_head)
    for c in range(0, width_tokens, BLOCK_T):
        j = c + tl.arange(0, BLOCK_T)
        tok = tl.where(j < n_sink, j, tl.where(j < n_sink + n_head, ws + j - n_sink, 0))
        tl.store(row + j, tl.where(empty, 0, tok).to(tl.int32), mask=j < width_tokens)
    return n_tok


@triton.jit
def _duo_select(Lengths, Retrieval, PageCounts, Pages, TokenCounts, Tokens, stride_rb, stride_rh, num_kv_heads,
                q_len, sink, window, max_pages, width_tokens, PAGE_SIZE: tl.constexpr, BLOCK_P: tl.constexpr,
                BLOCK_T: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_kv_heads
    h = bh % num_kv_heads
    n = tl.load(Lengths + b).to(tl.int64)
    retrieval = tl.load(Retrieval + b * stride_rb + h * stride_rh) != 0
    ws, first_page, n_pages, count = _window(n, q_len, window, max_pages, PAGE_SIZE)
    # A retrieval head lists every page (lane i holds page i); a streaming head its window's pages.
    i = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    page = tl.where(retrieval, i, tl.where(i < count, first_page + i, 0))
    tl.store(Pages + bh.to(tl.int64) * max_pages + i, page.to(tl.int32), mask=i < max_pages)
    if tile == 0:
        tl.store(PageCounts + bh, tl.where(retrieval, n_pages, count).to(tl.int32))
        n_tok = _single_tokens(Tokens + bh.to(tl.int64) * width_tokens, n, ws, first_page, sink, width_tokens,
                               retrieval, PAGE_SIZE, BLOCK_T)
        tl.store(TokenCounts + bh, n_tok.to(tl.int32))


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


def duo_select_triton(lengths: torch.Tensor, retrieval: torch.Tensor, *, num_kv_heads: int, q_len: int, sink: int,
                      window: int, page_size: int, max_pages: int):
    """DuoAttention's decode selection in one launch: ``(page_counts [B, Hkv], pages [B, Hkv,
    max_pages], token_counts [B, Hkv], tokens [B, Hkv, sink + P - 1])``, int32, on ``lengths``'
    device. A KV head with ``retrieval[b, h]`` True lists every page of its sequence (lane ``i``
    holds page ``i``) and no single token; the others get :func:`streaming_select_triton`'s pages
    (padded with zeros to ``max_pages``) and tokens. ``retrieval``: bool ``[B or 1, Hkv]``."""
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be [B], got shape {tuple(lengths.shape)}")
    for name, value, low in (("num_kv_heads", num_kv_heads, 1), ("q_len", q_len, 0), ("sink", sink, 0),
                             ("window", window, 1), ("page_size", page_size, 1), ("max_pages", max_pages, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    B, dev = lengths.shape[0], lengths.device
    if not (isinstance(retrieval, torch.Tensor) and retrieval.dtype == torch.bool and retrieval.dim() == 2
            and retrieval.shape[0] in (1, B) and retrieval.shape[1] == num_kv_heads and retrieval.device == dev):
        got = tuple(retrieval.shape) if isinstance(retrieval, torch.Tensor) else type(retrieval).__name__
        raise ValueError(f"retrieval must be a bool [B={B} or 1, Hkv={num_kv_heads}] tensor on {dev}, got {got}")
    width_tokens = sink + page_size - 1
    page_counts = torch.empty(B, num_kv_heads, dtype=torch.int32, device=dev)
    pages = torch.empty(B, num_kv_heads, max_pages, dtype=torch.int32, device=dev)
    token_counts = torch.empty(B, num_kv_heads, dtype=torch.int32, device=dev)
    tokens = torch.empty(B, num_kv_heads, max(width_tokens, 1), dtype=torch.int32, device=dev)
    if B:
        flags = retrieval.view(torch.uint8)
        block_p = min(1024, triton.next_power_of_2(max_pages))
        pdl = dependent_launch(dev)
        _duo_select[(triton.cdiv(max_pages, block_p), B * num_kv_heads)](
            lengths.contiguous(), flags, page_counts, pages, token_counts, tokens,
            flags.stride(0) if retrieval.shape[0] == B else 0, flags.stride(1), num_kv_heads, q_len, sink, window,
            max_pages, max(width_tokens, 1), PAGE_SIZE=page_size, BLOCK_P=block_p,
            BLOCK_T=min(1024, triton.next_power_of_2(max(width_tokens, 1))), PDL=pdl, num_warps=4,
            **pdl_kwargs(pdl))
    return page_counts, pages, token_counts, tokens[..., :width_tokens]
