"""Shared machinery of the KV-eviction baselines (H2O, TOVA, SnapKV, PyramidKV) on the paged engine.

How eviction is expressed here. The :class:`~sparseattn.cache.PagedKVCache` keeps every token
physically; an eviction method keeps, per (layer, batch, KV head), a device bool *keep-set* over
token positions (``self.state(cache, layer)["keep"]``). The keep-set grows with the sequence (new
tokens enter as kept), a method evicts by clearing entries, and ``select`` returns exactly the
kept tokens (:meth:`DecodeSelection.from_token_mask`). An evicted token is never read again: that
is the semantics of eviction. The memory itself is **not** freed (the pages stay allocated and
hold the evicted keys/values); what these classes reproduce is which tokens the official methods
attend to, not their memory savings.

Timing within a step (as the official code): the step's new tokens are appended and enter the
keep-set; the step reads the keep-set (``budget + Lq`` tokens once the budget is full); then the
method scores with the step's attention probabilities over those tokens and evicts down to the
budget, so that *after each step* exactly ``min(budget, length)`` tokens per (batch, KV head)
remain kept. This is the order of H2O (``H2OKVCache_LayerWise.__call__`` runs after the attention
weights are computed) and TOVA (``TOVACache.reduce`` after the attention). Prompt methods
(SnapKV, PyramidKV) compress once in :meth:`on_prefill`, after the prompt's attention ran.

``dense_below`` for eviction methods: while the layer's longest sequence is shorter than it,
nothing is evicted (a dense step then reads exactly the keep-set, which is everything); scores
still accumulate where a method keeps them. Lengths only grow, so once eviction starts no dense
step reads an evicted token again. ``dense_layers`` never evict.

Everything runs on the cache's device without host syncs: host-side bookkeeping (an upper bound
of each sequence's kept count, to size the selection) comes from the cache's host mirror of the
lengths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Tuple

import torch

from ..cache import PagedKVCache
from ..decode_api import DecodeSelection, check_decode_inputs
from ..methods.base import ESTIMATE_CHUNK_ELEMENTS, use_triton_estimator
from .base import DecodeMethod, gather_keys, score_dtype, token_valid

# How the per-query-head scores of a GQA group become one score per KV head (KVCache-Factory's
# ``gqa_score_agg``, default "mean"; kvpress averages over the group too).
GQA_AGGREGATIONS = ("mean", "max", "sum")


def group_reduce(x: torch.Tensor, how: str) -> torch.Tensor:
    """``[B, Hkv, G, ...] -> [B, Hkv, ...]`` by ``how`` in :data:`GQA_AGGREGATIONS`."""
    if how == "mean":
        return x.mean(2)
    if how == "max":
        return x.amax(2)
    if how == "sum":
        return x.sum(2)
    raise ValueError(f"GQA aggregation must be one of {list(GQA_AGGREGATIONS)}, got {how!r}")


def to_device_ints(values, device) -> torch.Tensor:
    """int64 ``[len(values)]`` on ``device`` from host ints (pinned, non-blocking on CUDA: no sync)."""
    t = torch.tensor(list(values), dtype=torch.int64)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def check_prompt_queries(q: torch.Tensor, cache: PagedKVCache, layer: int) -> Tuple[int, int, int, int]:
    """The checks of :func:`check_decode_inputs` except the length one: a ragged prompt's ``q`` has
    rows for the longest prompt (bottom-right aligned; a shorter sequence's leading rows are padding)."""
    check_decode_inputs(q[:, :, :0] if isinstance(q, torch.Tensor) and q.dim() == 4 else q, cache, layer, None, None)
    return tuple(q.shape)


def kept_attention(q: torch.Tensor, cache: PagedKVCache, layer: int, keep: torch.Tensor, *,
                   scale: Optional[float] = None, chunk_rows: Optional[int] = None) -> torch.Tensor:
    """Attention mass each token receives from ``q``'s rows, over the kept tokens only.

    ``q [B, Hq, L, D]``: rows bottom-right aligned to each sequence's length (row ``i`` sits at
    position ``len_b - L + i``; rows at negative positions are padding of a ragged prompt and add
    nothing). ``keep`` bool ``[B, Hkv, >= N]``. Each row's softmax runs over the tokens that are
    kept and causally visible to it (what the step's attention reads), in float32 (float64 for
    float64 inputs). Returns ``[B, Hkv, G, N]`` (``N = max_pages * page_size``): per query head,
    the probabilities summed over the rows; 0 at evicted positions and past each length.

    Rows are processed in chunks so the temporary logits stay near ``ESTIMATE_CHUNK_ELEMENTS``
    elements: memory ``O(chunk x N)``, not ``O(L x N)`` (``chunk_rows`` overrides the chunk).
    """
    B, Hq, L, D = q.shape
    Hkv = cache.num_kv_heads
    G = Hq // Hkv
    dt = score_dtype(q)
    N = cache.max_pages * cache.page_size
    dev = q.device
    scale = D ** -0.5 if scale is None else scale
    blocked = ~keep[..., :N].reshape(B, Hkv, 1, 1, N)
    lengths = cache.layer_lengths(layer).long().view(B, 1, 1, 1, 1)
    pos = torch.arange(N, device=dev).view(1, 1, 1, 1, N)
    rows = chunk_rows if chunk_rows is not None else max(1, ESTIMATE_CHUNK_ELEMENTS // max(1, B * Hq * N))
    out = torch.zeros(B, Hkv, G, N, dtype=dt, device=dev)
    fused_dtypes = (torch.float16, torch.bfloat16, torch.float32)
    fused = q.dtype in fused_dtypes and cache.dtype in fused_dtypes and use_triton_estimator(q)
    if fused:  # q.k read straight from the pages (no gathered copy of K); keep mask + softmax stay here
        from ..kernels.decode_logits_triton import paged_logits_triton

        k_pages, table, lens = cache.k_pages(layer), cache.page_table, cache.layer_lengths(layer)
    else:
        qd = q.to(dt)
        kt = gather_keys(cache, layer).to(dt).transpose(-1, -2)  # [B, Hkv, D, N]
    for start in range(0, L, rows):
        c = min(rows, L - start)
        if fused:
            # The chunk's last row sits L - start - c before the sequence's end: lengths cut by that
            # much align it (the tokens cut off are in the future of every row of the chunk anyway).
            logits = paged_logits_triton(q[:, :, start:start + c], k_pages, table, lens - (L - start - c),
                                         page_size=cache.page_size, scale=scale)
            logits = logits.masked_fill(blocked, float("-inf"))
        else:
            qc = qd[:, :, start:start + c].reshape(B, Hkv, G * c, D)
            logits = torch.matmul(qc, kt).view(B, Hkv, G, c, N) * scale
            qpos = lengths - L + start + torch.arange(c, device=dev).view(1, 1, 1, c, 1)
            logits = logits.masked_fill(blocked | (pos > qpos), float("-inf"))
        out += torch.softmax(logits, dim=-1).nan_to_num(0.0).sum(3)
    return out


@dataclass(kw_only=True)
class EvictionMethod(DecodeMethod):
    """Base of the eviction baselines: a per-(layer, batch, KV head) keep-set on the cache's device.

    State (``self.state(cache, layer)``): ``"keep"`` bool ``[B, Hkv, W]`` (``W >= N``, grown by
    doubling), ``"seen"`` int64 ``[B]`` (lengths at the last visit: positions from there on are
    new and enter as kept), host lists ``"seen_host"`` and ``"bound"`` (an upper bound of each
    sequence's kept count, the width of the selection), plus what a subclass adds (its
    ``_row_state`` tensors ``[B, Hkv, W]`` grow with ``"keep"``).

    A subclass implements :meth:`_init_state` (budgets, scores), :meth:`_observe` (score with the
    step's queries and evict when asked) and its ``_select``/``on_prefill`` from these pieces.
    Call ``select`` once per step and layer (a second call scores the same step again).
    """

    _row_state: ClassVar[Tuple[str, ...]] = ("keep",)

    # ------------------------------------------------------------------ public view
    def kept(self, cache: PagedKVCache, layer: int) -> torch.Tensor:
        """bool ``[B, Hkv, N]``: the tokens this method keeps now (``N = max_pages * page_size``);
        tokens appended since its last visit count as kept. Read-only (a copy)."""
        N = cache.max_pages * cache.page_size
        valid = token_valid(cache, layer, N)  # [B, 1, N]
        st = self.state(cache, layer)
        if "keep" not in st:
            return valid.expand(cache.batch, cache.num_kv_heads, N).clone()
        keep = self._width(st, N)["keep"][..., :N]
        fresh = torch.arange(N, device=keep.device).view(1, 1, -1) >= st["seen"].view(-1, 1, 1)
        return (keep | fresh) & valid

    # ------------------------------------------------------------------ state machinery
    def _init_state(self, st: dict, cache: PagedKVCache, layer: int) -> None:
        """Fill method-specific state the first time the method sees ``layer`` of ``cache``."""

    def _observe(self, q: torch.Tensor, cache: PagedKVCache, layer: int, st: dict, evict: bool) -> None:
        """Score with ``q`` (update running scores) and, when ``evict``, evict down to the budget."""

    def _width(self, st: dict, N: int) -> dict:
        W = st["keep"].shape[-1]
        if W < N:
            new_w = max(N, 2 * W)
            for key in self._row_state:
                t = st[key]
                st[key] = torch.cat([t, torch.zeros(*t.shape[:-1], new_w - W, dtype=t.dtype, device=t.device)], -1)
        return st

    def _prepare(self, cache: PagedKVCache, layer: int) -> dict:
        """The layer's state, created on first use, wide enough for the cache, new tokens admitted."""
        st = self.state(cache, layer)
        B, H = cache.batch, cache.num_kv_heads
        N = cache.max_pages * cache.page_size
        dev = cache.device
        if "keep" not in st:
            st["keep"] = torch.zeros(B, H, N, dtype=torch.bool, device=dev)
            st["seen"] = torch.zeros(B, dtype=torch.long, device=dev)
            st["seen_host"] = [0] * B
            st["bound"] = [0] * B
            self._init_state(st, cache, layer)
        self._width(st, N)
        lengths = cache.layer_lengths(layer).long()
        pos = torch.arange(st["keep"].shape[-1], device=dev).view(1, -1)
        fresh = (pos >= st["seen"].view(-1, 1)) & (pos < lengths.view(-1, 1))  # [B, W]
        st["keep"] |= fresh.unsqueeze(1)
        st["seen"] = lengths.clone()
        host = cache.host_lengths(layer)
        st["bound"] = [min(n, b + n - s) for n, b, s in zip(host, st["bound"], st["seen_host"])]
        st["seen_host"] = host
        return st

    def _commit(self, st: dict, keep: torch.Tensor, bound) -> None:
        """Store the keep-set ``[B, Hkv, N]`` after an eviction that keeps at most ``bound[b]`` tokens."""
        N = keep.shape[-1]
        st["keep"][..., :N] = keep
        st["bound"] = [min(b, int(c)) for b, c in zip(st["bound"], bound)]

    def _selection(self, st: dict, cache: PagedKVCache) -> DecodeSelection:
        """The keep-set as a token selection (exactly the kept tokens)."""
        N = cache.max_pages * cache.page_size
        width = max(1, min(N, max(st["bound"], default=1)))
        return DecodeSelection.from_token_mask(st["keep"][..., :N], page_size=cache.page_size, max_tokens=width)

    def _evicting(self, cache: PagedKVCache, layer: int) -> bool:
        return cache.max_length(layer) >= self.dense_below

    # ------------------------------------------------------------------ hooks
    def on_dense_step(self, q: torch.Tensor, cache: PagedKVCache, layer: int) -> None:
        """Below ``dense_below`` the step reads everything and nothing is evicted; scores still
        accumulate. ``dense_layers`` keep no state."""
        if layer in self.dense_layers:
            return
        st = self._prepare(cache, layer)
        self._observe(q, cache, layer, st, evict=False)


__all__ = ["EvictionMethod", "GQA_AGGREGATIONS", "group_reduce", "kept_attention", "check_prompt_queries",
           "to_device_ints"]


@dataclass(kw_only=True)
class StepEvictionMethod(EvictionMethod):
    """Eviction that scores every step (H2O, TOVA): the prompt's queries score and evict once in
    ``on_prefill``; each decode step reads the kept tokens plus its new ones, then scores them
    with its queries and evicts down to the budget."""

    def on_prefill(self, q, cache, layer):
        check_prompt_queries(q, cache, layer)
        if layer in self.dense_layers or q.shape[0] == 0 or q.shape[2] == 0:
            return
        st = self._prepare(cache, layer)
        self._observe(q, cache, layer, st, evict=self._evicting(cache, layer))

    def _select(self, q, cache, layer):
        st = self._prepare(cache, layer)
        sel = self._selection(st, cache)  # what this step reads: kept + new tokens
        self._observe(q, cache, layer, st, evict=True)
        return sel
