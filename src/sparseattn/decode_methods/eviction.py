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

What a step costs. Besides the mask, the state holds the kept tokens as a device *list* (ascending
positions ``[B, Hkv, cap]`` + counts), built once from the mask at the first selection and kept
in sync from then on: a step appends its new positions at the count (they are the largest, so
the list stays ascending) and an eviction drops the entries whose mask bit it cleared (a stable
compaction of the list, not of the mask). The selection handed to the kernel is the list itself,
so a decode step of SnapKV / PyramidKV costs O(new tokens) besides the attention. H2O and TOVA
score each decode step from the list too (:meth:`StepEvictionMethod._observe_listed`): the step's
queries meet only the listed keys (``listed_attention``: gathered through the page table by the
Triton kernel :mod:`sparseattn.kernels.list_logits_triton`), the softmax, the group reduction,
the ranking (a sort over the list width) and the updates of the scores and keep bits (scatters at
the listed positions) run over the list width ``W`` (the kept bound ``budget + Lq`` plus
:data:`SELECTION_SLACK`), and the list drops the evicted entries: O(W) per (batch, KV head), no
``N``-wide pass at all. At 32/8/128, budget 2048 and B = 8 a layer step reads about
``B * Hkv * W * D * 2`` = 35 MB of keys (bf16) instead of the 2.1 GB of all 128K keys. The prompt
(:meth:`on_prefill`, whose queries see every token) and dense steps still score over the mask
(``kept_attention``, O(N)): that path is also the oracle of the list path. On CUDA the append and
the compaction are one small Triton launch each, and an H2O / TOVA decode step is the list-logits
launch plus one fused tail (:mod:`sparseattn.kernels.evict_listed_triton`: softmax, group
reduction, ranking by bisection, score / keep updates and list compaction; TOVA in two launches).

CUDA graphs: every state tensor a step writes is updated in place, so a captured step can be
replayed over later steps, as long as no buffer grows (the cache allocates no page, the mask and
the list keep their widths) and the counts stay within the selection width, which is the host
bound plus :data:`SELECTION_SLACK` (SnapKV / PyramidKV grow by ``Lq`` per step).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, List, Optional, Tuple

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


def listed_attention(q: torch.Tensor, cache: PagedKVCache, layer: int, tokens: torch.Tensor,
                     counts: torch.Tensor, *, scale: Optional[float] = None, return_logits: bool = False):
    """:func:`kept_attention` over a kept-token list: O(list width) instead of O(N).

    ``q [B, Hq, Lq, D]`` as there (rows bottom-right aligned to each length); ``tokens`` int32
    ``[B, Hkv, W]`` (unit last stride, a view of the state's list is fine): each row's kept
    positions, the first ``counts`` (int32 ``[B, Hkv]``, capped at ``W``) live, the rest stale.
    Only the listed keys are read (through the page table); each row's softmax runs over the
    listed tokens causally visible to it, in float32 (float64 for float64 inputs). Returns
    ``[B, Hkv, G, W]``: entry ``j`` is the probability mass token ``tokens[..., j]`` receives from
    each query head, summed over the rows; 0 past the count. With the list holding exactly the
    keep mask's tokens this is :func:`kept_attention` read at the listed positions.
    ``return_logits``: also return the scaled logits ``[B, Hkv, G, Lq, W]`` it computed (float32;
    float64 for float64 inputs).
    """
    from ..kernels.list_logits_triton import list_logits_torch

    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    fused_dtypes = (torch.float16, torch.bfloat16, torch.float32)
    args = (q, cache.k_pages(layer), cache.page_table, tokens, counts, cache.layer_lengths(layer))
    if q.dtype in fused_dtypes and cache.dtype in fused_dtypes and use_triton_estimator(q):
        from ..kernels.list_logits_triton import list_logits_triton

        logits = list_logits_triton(*args, page_size=cache.page_size, scale=scale)
    else:
        logits = list_logits_torch(*args, page_size=cache.page_size, scale=scale)
    # (a row that sees nothing, e.g. an empty list, is all -inf: its NaNs become 0)
    mass = torch.softmax(logits, dim=-1).nan_to_num(0.0).sum(3)
    return (mass, logits) if return_logits else mass


def listed_lanes(tokens: torch.Tensor, counts: torch.Tensor, row_width: int):
    """Where a list's lanes write, race-free: ``(pos, lane, live, nonempty)``.

    ``tokens`` int32 ``[B, H, W]``, ``counts`` ``[B, H]``; ``row_width`` the width of the rows
    written (positions are clamped into it). ``live`` bool ``[B, H, W]``: the lane is one of the
    first ``counts``; ``lane`` int64 ``[B, H, W]``: the lane whose value a lane writes (itself when
    live; past the count, the row's last live lane); ``pos`` int64 ``[B, H, W]``: the position it
    writes (``tokens`` at ``lane``); ``nonempty`` bool ``[B, H, 1]``. Entries past the count are
    stale and may name live tokens: redirected this way, no two lanes of a row write different
    values to one place (the live positions are distinct). See :func:`scatter_listed`.
    """
    W = tokens.shape[-1]
    c = counts.long().clamp(max=W).unsqueeze(-1)
    j = torch.arange(W, device=tokens.device)
    lane = torch.minimum(j, (c - 1).clamp(min=0)).expand(tokens.shape)
    pos = tokens.gather(-1, lane).long().clamp(0, row_width - 1)
    return pos, lane, j < c, c > 0


def scatter_listed(dst: torch.Tensor, pos: torch.Tensor, lane: torch.Tensor, nonempty: torch.Tensor,
                   values: torch.Tensor) -> None:
    """``dst[b, h, pos] = values`` for each row's live lanes, in place (``dst [B, H, >= row_width]``,
    ``values [B, H, W]``, the rest from :func:`listed_lanes`). A lane past the count repeats its
    row's last live lane; in a row with an empty list every lane rewrites what ``dst`` holds."""
    vals = values.gather(-1, lane).to(dst.dtype)
    vals = torch.where(nonempty, vals, dst.gather(-1, pos))
    dst.scatter_(-1, pos, vals)


# ----------------------------------------------------------------------------- kept-token lists
# Room past the host bound of the kept counts in a selection's width: a step captured in a CUDA
# graph stays valid while replays append at most this many tokens (SnapKV / PyramidKV keep every
# new token; H2O / TOVA stay at their budget).
SELECTION_SLACK = 64

def _check_list_args(keep: torch.Tensor, tokens: Optional[torch.Tensor], counts: Optional[torch.Tensor]) -> None:
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.dim() != 3 or keep.stride(-1) != 1:
        raise ValueError(f"keep must be a bool [B, Hkv, W] tensor with unit last stride, got "
                         f"{(keep.dtype, tuple(keep.shape)) if isinstance(keep, torch.Tensor) else type(keep).__name__}")
    if (tokens is None) != (counts is None):
        raise ValueError("tokens and counts go together (or neither)")
    if tokens is None:
        return
    B, H = keep.shape[:2]
    if tokens.dtype != torch.int32 or tokens.dim() != 3 or tuple(tokens.shape[:2]) != (B, H) or tokens.shape[-1] < 2 \
            or tokens.stride(-1) != 1:
        raise ValueError(f"tokens must be int32 [B={B}, Hkv={H}, cap + 1] (the last column is scratch) with unit "
                         f"last stride, got {tokens.dtype} {tuple(tokens.shape)}")
    if counts.dtype != torch.int32 or tuple(counts.shape) != (B, H):
        raise ValueError(f"counts must be int32 [B={B}, Hkv={H}], got {counts.dtype} {tuple(counts.shape)}")
    if tokens.device != keep.device or counts.device != keep.device:
        raise ValueError("keep, tokens and counts must be on one device")


def admit_tokens(keep: torch.Tensor, seen: torch.Tensor, lengths: torch.Tensor, max_new: int,
                 tokens: Optional[torch.Tensor] = None, counts: Optional[torch.Tensor] = None, *,
                 use_triton: Optional[bool] = None, block: int = 128) -> None:
    """Admit the tokens appended since the last visit, in place: positions ``[seen, length)`` of
    each row become kept in ``keep``, are appended to the list at its count, and ``seen`` becomes
    the length. No host sync.

    ``keep`` bool ``[B, Hkv, W]`` (``W >=`` every length); ``seen`` int64 ``[B, Hkv]``;
    ``lengths`` int ``[B]``; ``max_new`` a host bound of ``length - seen`` (the PyTorch path's
    width); optional ``tokens`` int32 ``[B, Hkv, cap + 1]`` (ascending positions, last column
    scratch) with ``counts`` int32 ``[B, Hkv]`` (new entries past ``cap`` are dropped).
    ``use_triton``: default :func:`use_triton_estimator`; ``block`` the Triton tile (a power of 2).
    """
    _check_list_args(keep, tokens, counts)
    B, H, W = keep.shape
    if seen.dtype != torch.int64 or tuple(seen.shape) != (B, H) or seen.device != keep.device:
        raise ValueError(f"seen must be int64 [B={B}, Hkv={H}] on {keep.device}, got {seen.dtype} "
                         f"{tuple(seen.shape)} on {seen.device}")
    if lengths.dim() != 1 or lengths.shape[0] != B or lengths.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"lengths must be int32/int64 [B={B}], got {lengths.dtype} {tuple(lengths.shape)}")
    if max_new <= 0 or B * H == 0:
        return
    if use_triton is None:
        use_triton = use_triton_estimator(keep)
    if use_triton:
        from ..kernels.eviction_lists_triton import admit_kernel as admit

        has_list = tokens is not None
        t, c = (tokens, counts) if has_list else (seen, seen)  # unused when there is no list
        admit[(B * H,)](keep.view(torch.uint8), t, c, seen, lengths, H, t.shape[-1] - 1 if has_list else 0,
                        keep.stride(0), keep.stride(1), t.stride(0), t.stride(1), c.stride(0), c.stride(1),
                        seen.stride(0), seen.stride(1), lengths.stride(0), HAS_LIST=has_list, BLOCK=block,
                        num_warps=4)
        return
    n = lengths.long().view(B, 1, 1)
    j = torch.arange(max_new, device=keep.device)
    pos = seen.unsqueeze(-1) + j  # [B, H, m]
    valid = pos < n
    # Every lane of a row with new tokens lands on one of them; a row without any rewrites the
    # value it holds at its last token (no two lanes write different values to one place).
    idx = torch.minimum(pos, n - 1).clamp(min=0)
    keep.scatter_(-1, idx, (seen.unsqueeze(-1) < n) | keep.gather(-1, idx))
    if tokens is not None:
        cap = tokens.shape[-1] - 1
        dest = counts.long().unsqueeze(-1) + j
        dest = torch.where(valid & (dest < cap), dest, torch.full_like(dest, cap))
        tokens.scatter_(-1, dest, pos.to(torch.int32))
        counts += (n.view(B, 1) - seen).clamp(min=0).to(torch.int32)
    seen.copy_(lengths.long().view(B, 1).expand(B, H))


def drop_evicted(keep: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor, width: int, *,
                 use_triton: Optional[bool] = None, block: int = 1024) -> None:
    """Remove from the list the entries whose ``keep`` bit is clear (after an eviction), in place:
    the first ``counts`` (at most ``width``) entries of ``tokens`` are compacted stably, so the
    list stays ascending, and ``counts`` becomes the number left. Entries past the new count are
    unspecified. O(width) per row, no host sync. Shapes as :func:`admit_tokens`.
    """
    _check_list_args(keep, tokens, counts)
    B, H, _ = keep.shape
    width = min(int(width), tokens.shape[-1] - 1)
    if B * H == 0 or width <= 0:
        return
    if use_triton is None:
        use_triton = use_triton_estimator(keep)
    if use_triton:
        from ..kernels.eviction_lists_triton import drop_kernel as drop

        drop[(B * H,)](keep.view(torch.uint8), tokens, counts, H, width, keep.stride(0), keep.stride(1),
                       tokens.stride(0), tokens.stride(1), counts.stride(0), counts.stride(1), BLOCK=block,
                       num_warps=4)
        return
    ent = tokens[..., :width].clone()  # the source: the compaction writes back over it
    j = torch.arange(width, device=keep.device)
    alive = (j < counts.unsqueeze(-1)) & keep.gather(-1, ent.long())
    c = torch.cumsum(alive, -1)
    n_alive = c[..., -1:]
    # A stable partition (survivors first, then the rest): a permutation, so no two writes collide.
    dest = torch.where(alive, c - 1, n_alive + j - c)
    tokens[..., :width].scatter_(-1, dest, ent)
    counts.copy_(n_alive.squeeze(-1))


@dataclass(kw_only=True)
class EvictionMethod(DecodeMethod):
    """Base of the eviction baselines: a per-(layer, batch, KV head) keep-set on the cache's device.

    State (``self.state(cache, layer)``): ``"keep"`` bool ``[B, Hkv, W]`` (``W >= N``, grown by
    doubling), ``"seen"`` int64 ``[B, Hkv]`` (lengths at the last visit: positions from there on
    are new and enter as kept), host lists ``"seen_host"`` and ``"bound"`` (an upper bound of each
    sequence's kept count, the width of the selection), from the first selection on the kept
    tokens as a list, ``"tokens"`` int32 ``[B, Hkv, cap + 1]`` (ascending, last column scratch) and
    ``"count"`` int32 ``[B, Hkv]``, always the same set as the mask; plus what a subclass adds (its
    ``_row_state`` tensors ``[B, Hkv, W]`` grow with ``"keep"``).

    A subclass implements :meth:`_init_state` (budgets, scores), :meth:`_observe` (score with the
    step's queries and evict when asked, through :meth:`_commit`) and its ``_select``/``on_prefill``
    from these pieces. Call ``select`` once per step and layer (a second call scores the same step
    again).
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
        fresh = torch.arange(N, device=keep.device).view(1, 1, -1) >= st["seen"].unsqueeze(-1)
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

    @staticmethod
    def _list_width(st: dict, N: int) -> int:
        """Width of the selection (host): the kept-count bound plus the graph slack, at most ``N``."""
        return max(1, min(N, max(st["bound"], default=1) + SELECTION_SLACK))

    @staticmethod
    def _fit_list(st: dict, need: int) -> None:
        """Give the list room for ``need`` entries: grow (or shrink a far too wide one) to ``2 * need``.
        Reallocates (host-known, rare: amortised by the doubling), which a captured graph cannot follow."""
        t = st["tokens"]
        cap = t.shape[-1] - 1
        if need <= cap <= 4 * need:
            return
        new_cap = 2 * need
        fitted = torch.zeros(*t.shape[:-1], new_cap + 1, dtype=t.dtype, device=t.device)
        m = min(cap, new_cap)  # holds every live entry: counts <= bound <= the old width <= cap
        fitted[..., :m] = t[..., :m]
        st["tokens"] = fitted

    def _prepare(self, cache: PagedKVCache, layer: int) -> dict:
        """The layer's state, created on first use, wide enough for the cache, new tokens admitted."""
        st = self.state(cache, layer)
        B, H = cache.batch, cache.num_kv_heads
        N = cache.max_pages * cache.page_size
        dev = cache.device
        if "keep" not in st:
            st["keep"] = torch.zeros(B, H, N, dtype=torch.bool, device=dev)
            st["seen"] = torch.zeros(B, H, dtype=torch.long, device=dev)
            st["seen_host"] = [0] * B
            st["bound"] = [0] * B
            self._init_state(st, cache, layer)
        self._width(st, N)
        host = cache.host_lengths(layer)
        max_new = max((n - s for n, s in zip(host, st["seen_host"])), default=0)
        st["bound"] = [min(n, b + n - s) for n, b, s in zip(host, st["bound"], st["seen_host"])]
        st["seen_host"] = host
        if "tokens" in st:
            self._fit_list(st, self._list_width(st, N))
        admit_tokens(st["keep"], st["seen"], cache.layer_lengths(layer), max_new, st.get("tokens"), st.get("count"))
        return st

    def _commit(self, st: dict, keep: torch.Tensor, bound: List[int]) -> None:
        """Store the keep-set ``[B, Hkv, N]`` after an eviction (a subset of the kept tokens) that
        keeps at most ``bound[b]`` tokens; the list drops what the mask dropped."""
        N = keep.shape[-1]
        st["keep"][..., :N] = keep
        if "tokens" in st:
            drop_evicted(st["keep"], st["tokens"], st["count"], self._list_width(st, N))
        st["bound"] = [min(b, int(c)) for b, c in zip(st["bound"], bound)]

    def _commit_listed(self, st: dict, width: int, survive: torch.Tensor, bound: List[int],
                       lanes: Optional[tuple] = None) -> None:
        """Store an eviction decided over the list (the list path of :meth:`_commit`): ``survive``
        bool ``[B, Hkv, width]`` says which of the first ``width`` list entries stay (False past
        the counts is fine: those lanes are ignored); their keep bits are cleared where False,
        the list drops them and ``bound[b]`` caps the kept counts. O(width) per row.
        ``lanes``: :func:`listed_lanes` of the list, when the caller has them."""
        keep = st["keep"]
        pos, lane, _, nonempty = lanes or listed_lanes(st["tokens"][..., :width], st["count"], keep.shape[-1])
        scatter_listed(keep, pos, lane, nonempty, survive)
        drop_evicted(keep, st["tokens"], st["count"], width)
        st["bound"] = [min(b, int(c)) for b, c in zip(st["bound"], bound)]

    def _list_view(self, st: dict, cache: PagedKVCache) -> Tuple[torch.Tensor, int]:
        """``(tokens, width)``: a view of the kept-token list's first ``width`` lanes (the list is
        built from the mask on first use)."""
        N = cache.max_pages * cache.page_size
        width = self._list_width(st, N)
        if "tokens" not in st:  # once per layer: one pass over the mask
            sel = DecodeSelection.from_token_mask(st["keep"][..., :N], page_size=cache.page_size,
                                                  max_tokens=2 * width)
            st["tokens"] = torch.nn.functional.pad(sel.tokens, (0, 1))
            st["count"] = sel.token_counts
        return st["tokens"][..., :width], width

    def _selection(self, st: dict, cache: PagedKVCache, snapshot: bool = False) -> DecodeSelection:
        """The kept tokens as a token selection: the list (built from the mask on first use).

        Without ``snapshot`` the selection views the list (cheap; valid until the state changes
        below the count: an eviction); ``snapshot`` copies it, for a step that evicts after reading.
        """
        tokens, width = self._list_view(st, cache)
        if snapshot:
            tokens = tokens.clone()
        # A copy of the counts (the list's grow later) capped at the width: a replay past the
        # slack never reads beyond the view.
        return DecodeSelection(None, None, cache.page_size, st["count"].clamp(max=width), tokens)

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


__all__ = ["EvictionMethod", "GQA_AGGREGATIONS", "ListSnapshot", "SELECTION_SLACK", "StepEvictionMethod",
           "admit_tokens", "check_prompt_queries", "drop_evicted", "group_reduce", "kept_attention", "listed_attention",
           "listed_lanes", "scatter_listed", "to_device_ints"]


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

    # False: a decode step scores over the whole mask (``_observe``, O(N)) as the prompt does; the
    # tests set it on an instance to run that path as the oracle of the list path.
    _score_from_list: ClassVar[bool] = True

    # False: the attention recomputes the step's logits over the list instead of reading the ones
    # the scoring computed (the tests set it on an instance to compare the two).
    _reuse_logits: ClassVar[bool] = True

    def _select(self, q, cache, layer):
        st = self._prepare(cache, layer)
        if not self._score_from_list:
            sel = self._selection(st, cache, snapshot=True)  # what this step reads: kept + new tokens
            self._observe(q, cache, layer, st, evict=True)
            return sel
        tokens, width = self._list_view(st, cache)
        snapshot = ListSnapshot(tokens, st["count"], width)
        logits = self._observe_listed(q, cache, layer, st, width, snapshot)
        if snapshot.taken is None:
            raise RuntimeError(f"{type(self).__name__}._observe_listed evicted without taking the step's snapshot")
        # What this step reads: the kept + new tokens, as listed before this step's eviction.
        snap_tokens, snap_counts = snapshot.taken
        sel = DecodeSelection(None, None, cache.page_size, snap_counts, snap_tokens)
        if logits is not None and self._reuse_logits:
            # The scoring's logits are over the snapshot's lanes: the attention reads them instead
            # of the keys.
            sel = replace(sel, token_logits=logits, logits_scale=q.shape[-1] ** -0.5)
        return sel

    def _observe_listed(self, q, cache, layer, st, width, snapshot: "ListSnapshot"):
        """:meth:`_observe` with ``evict=True``, reading only the first ``width`` entries of the
        kept-token list (every kept token is there): O(width) work, the same result. Takes
        ``snapshot`` (the list as the step reads it) before it rewrites the list. Returns the
        float32 logits of all ``Lq`` queries over the list's ``width`` lanes (``[B, Hkv, G, Lq,
        width]``, scale ``D ** -0.5``) when it computed exactly those, else None (TOVA at ``Lq > 1``
        scores with the last query only; float64 caches)."""
        snapshot.copy()
        self._observe(q, cache, layer, st, evict=True)
        return None


class ListSnapshot:
    """The kept-token list of a step as its attention reads it: taken before the step's eviction
    rewrites the list. The fused list-logits launch fills it on the way (:meth:`buffers`, no
    launch of its own); otherwise :meth:`copy` takes it with PyTorch (two small launches)."""

    def __init__(self, tokens: torch.Tensor, counts: torch.Tensor, width: int):
        self.tokens, self.counts, self.width = tokens, counts, width
        self.taken: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def buffers(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Empty ``(tokens [B, Hkv, width] int32, counts)`` for a kernel to fill with the list's
        lanes and the counts capped at the width."""
        self.taken = (torch.empty(self.tokens.shape, dtype=self.tokens.dtype, device=self.tokens.device),
                      torch.empty_like(self.counts))
        return self.taken

    def copy(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Take it now with PyTorch (a copy of the lanes; the counts capped at the width: a graph
        replayed past the slack never reads beyond the view)."""
        if self.taken is None:
            self.taken = (self.tokens.clone(), self.counts.clamp(max=self.width))
        return self.taken
