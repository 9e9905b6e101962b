"""StreamingLLM at decode time: attention sinks plus a window of recent tokens, exact token edges."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..decode_api import DecodeSelection
from ..methods.base import check_int, use_triton_estimator
from ..methods.registry import register
from .base import DecodeMethod

_BIG = torch.iinfo(torch.int32).max


@register
@dataclass(kw_only=True)
class StreamingDecode(DecodeMethod):
    """Keep tokens ``[0, sink)`` and the ``window`` most recent ones; one list shared by all heads.

    The newest token at position ``N - 1`` sees ``j < sink`` or ``N - 1 - j < window`` (the
    window counts the token itself). With ``Lq > 1`` new tokens (speculative verification) the
    window is extended back to cover the first new token's window, so every query sees at least
    its own sink + window (the causal mask among the new tokens is the kernel's).

    Expressed on the paged engine as whole pages for the window (the partial last page included)
    plus single tokens for the sink and the window's leading partial page, so reads are exact
    to the token and mostly page-granular. Built on the device from the cache lengths: no sync.

    Unlike StreamingLLM this *selects* from the full cache (nothing is evicted) and keeps the
    original positions (keys cached post-RoPE, no re-rotation into the window, spec E7b), which
    is what matters inside the training length.

    Defaults (mit-han-lab/streaming-llm ``examples/run_streaming_llama.py``): ``start_size=4``
    -> ``sink=4``, ``recent_size=2000`` -> ``window=2000``. The class default in
    ``streaming_llm/kv_cache.py`` is ``recent_size=512``: ``get_decode_method("streaming",
    window=512)``.
    """

    name: ClassVar[str] = "streaming"

    sink: int = 4
    window: int = 2000

    def __post_init__(self):
        super().__post_init__()
        check_int("sink", self.sink, minimum=0)
        check_int("window", self.window, minimum=1)

    def _select(self, q, cache, layer):
        P, Lq, S, W = cache.page_size, q.shape[2], self.sink, self.window
        dev = q.device
        width_p = max(1, min(-(-(W + Lq - 1) // P) + 1, cache.max_pages))
        if use_triton_estimator(q):  # one launch instead of ~25 tiny kernels
            from ..kernels.streaming_select_triton import streaming_select_triton

            pc, pages, tc, toks = streaming_select_triton(cache.layer_lengths(layer), q_len=Lq, sink=S, window=W,
                                                          page_size=P, width_pages=width_p)
            sel = DecodeSelection(pc, pages, P)
            return sel if toks.shape[-1] == 0 else sel.with_tokens(toks, tc)
        N = cache.layer_lengths(layer).long()  # [B]
        B = N.shape[0]
        ws = (N - Lq - W + 1).clamp(min=0)  # window start
        first_page = torch.div(ws + P - 1, P, rounding_mode="floor")  # first page wholly in the window
        n_pages = torch.div(N + P - 1, P, rounding_mode="floor")
        pages = first_page.view(-1, 1) + torch.arange(width_p, device=dev).view(1, -1)
        page_counts = (n_pages - first_page).clamp(min=0, max=width_p)
        pages = torch.where(torch.arange(width_p, device=dev).view(1, -1) < page_counts.view(-1, 1), pages,
                            torch.zeros_like(pages))
        sel = DecodeSelection(page_counts.to(torch.int32).view(B, 1), pages.to(torch.int32).view(B, 1, width_p), P)
        # Single tokens: the sink before the window, and the window's head in a partial page.
        sink_t = torch.arange(S, device=dev).view(1, -1).expand(B, S)
        sink_ok = sink_t < torch.minimum(ws, torch.full_like(ws, S)).view(-1, 1)
        head_t = ws.view(-1, 1) + torch.arange(P - 1, device=dev).view(1, -1)
        head_ok = head_t < torch.minimum(first_page * P, N).view(-1, 1)
        toks = torch.cat([sink_t, head_t], 1)
        ok = torch.cat([sink_ok, head_ok], 1)
        if toks.shape[1] == 0:
            return sel
        toks = torch.where(ok, toks, torch.full_like(toks, _BIG)).sort(-1).values  # sink < window head
        toks = torch.where(toks == _BIG, torch.zeros_like(toks), toks)
        counts = ok.sum(-1, dtype=torch.int32)
        return sel.with_tokens(toks.to(torch.int32).view(B, 1, -1), counts.view(B, 1))
