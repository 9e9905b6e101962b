"""Decode-method base class: a config dataclass whose ``select()`` returns a DecodeSelection.

A decode method looks at the step's queries and the cache (pages, page metadata, lengths) and
says which pages/tokens each (batch, KV head) reads; :func:`sparseattn.decode_api.sparse_decode_attention`
executes it. ``None`` means dense. Everything runs on the cache's device without host syncs.

Life cycle inside a model (what :func:`sparseattn.patch` and :func:`run_decode_step` do, per layer):

1. prompt: ``cache.append(layer, k, v)``; the prefill attention runs; then
   ``method.on_prefill(q_prompt, cache, layer)`` lets methods that score the prompt (SnapKV,
   PyramidKV, H2O) build their state;
2. each decode step: ``cache.append(layer, k_new, v_new)``;
   ``sel = method.select(q_new, cache, layer)``; ``sparse_decode_attention(q_new, cache, layer, sel)``.

State (selection caches, accumulated scores, keep-sets of eviction methods, step counters)
lives on the cache's device in ``cache.method_state``, under :meth:`DecodeMethod.state`; it is
dropped by ``cache.reset()``, so one method object can serve many caches. Layers are visited in
ascending order within a step, so a layer may read what an earlier layer of the same step stored
(TidalDecode, DELTA).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Optional, Tuple

import torch

from ..cache import PagedKVCache
from ..decode_api import DecodeSelection, check_decode_inputs
from ..methods.base import check_int, use_triton_estimator


def check_layers(name: str, value) -> Tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (tuple, list)):
        raise ValueError(f"{name} must be a tuple of layer indices, got {value!r}")
    return tuple(sorted({check_int(f"{name}[{i}]", x, minimum=0) for i, x in enumerate(value)}))


@dataclass(kw_only=True)
class DecodeMethod:
    """A decode-time selection method: hyperparameters as dataclass fields + ``select()``.

    ``dense_layers``: layers that always read everything (``select`` returns ``None``).
    ``dense_below``: read everything while the layer's longest sequence holds fewer tokens than
    this (short contexts gain nothing from selection; decided from the cache's host mirror of
    the lengths, so no sync). ``0`` disables it.

    A subclass sets ``name``, adds fields with the official defaults (citing sources), extends
    ``__post_init__`` and implements ``_select`` (inputs validated, ``B, Lq > 0``, layer not dense,
    context long enough). Stateful methods keep their tensors in :meth:`state` and may override
    :meth:`on_prefill` (prompt scoring) and :meth:`on_dense_step` (a step that ran dense).
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "decode"
    # False when a step branches on host state (a step counter): a captured CUDA graph would
    # replay one branch forever, so benchmarks time such methods eagerly.
    graph_safe: ClassVar[bool] = True

    dense_layers: Tuple[int, ...] = ()
    dense_below: int = 0

    def __post_init__(self):
        self.dense_layers = check_layers("dense_layers", self.dense_layers)
        check_int("dense_below", self.dense_below, minimum=0)
        # The key of this object's state in a cache: an object the cache's dict holds on to, so its
        # identity cannot be reused by a later method object (``id(self)`` could, after GC).
        self._state_token = object()

    def select(self, q: torch.Tensor, cache: PagedKVCache, layer: int) -> Optional[DecodeSelection]:
        """The selection for ``q [B, Hq, Lq, D]`` (the newest ``Lq`` tokens, already appended) at ``layer``."""
        B, Hq, Lq, D = check_decode_inputs(q, cache, layer, None, None)
        if B == 0 or Lq == 0:
            return None
        if layer in self.dense_layers or cache.max_length(layer) < self.dense_below:
            self.on_dense_step(q, cache, layer)
            return None
        return self._select(q, cache, layer)

    def _select(self, q: torch.Tensor, cache: PagedKVCache, layer: int) -> Optional[DecodeSelection]:
        raise NotImplementedError

    # ------------------------------------------------------------------ hooks for stateful methods
    def on_prefill(self, q: torch.Tensor, cache: PagedKVCache, layer: int) -> None:
        """Called after a prompt chunk ``q [B, Hq, Lq, D]`` (``Lq > 1``) was appended to ``layer`` and
        attended by the prefill path. Default: nothing (stateless methods)."""

    def on_dense_step(self, q: torch.Tensor, cache: PagedKVCache, layer: int) -> None:
        """Called for a step that reads everything (a dense layer, or below ``dense_below``).
        Default: nothing."""

    def state(self, cache: PagedKVCache, layer: Optional[int] = None) -> dict:
        """This method's mutable state for ``cache`` (per ``layer``, or shared by all layers with
        ``None``): a dict the method fills with device tensors and host counters."""
        return cache.method_state.setdefault((self._state_token, layer), {})

    def config(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def replace(self, **overrides) -> "DecodeMethod":
        """A checked copy with some fields changed (unknown names raise ``ValueError``)."""
        check_overrides(type(self), overrides)
        return dataclasses.replace(self, **overrides)


# ----------------------------------------------------------------------------- shared helpers
def score_dtype(q: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs (exact tests), float32 otherwise."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def gather_keys(cache: PagedKVCache, layer: int) -> torch.Tensor:
    """``[B, Hkv, maxP * page_size, D]``: every sequence's keys in logical order (a copy; slots past
    a sequence's length hold garbage: mask them with :func:`token_valid`)."""
    pool = cache.k_pages(layer)  # [cap, Hkv, P, D]
    k = pool[cache.page_table.long()]  # [B, maxP, Hkv, P, D]
    B, nP, H, P, D = k.shape
    return k.permute(0, 2, 1, 3, 4).reshape(B, H, nP * P, D)


def page_dot(q: torch.Tensor, cache: PagedKVCache, layer: int, name: str, dtype: torch.dtype) -> torch.Tensor:
    """``[B, Hkv, G * Lq, max_pages]``: each query row of ``q [B, Hkv, G * Lq, D]`` (already grouped
    by KV head) times the page metadata ``name`` (a ``[D]`` vector per page and KV head) of its head.

    The metadata is gathered through the page table as ``[B, max_pages, Hkv * D]`` (one contiguous
    gather) and multiplied by a block-diagonal query ``[B, Hkv * G * Lq, Hkv * D]`` in one batched
    matmul: no strided copy of the gathered pages (which cost several times the gather at 128K),
    at ``Hkv`` times the (tiny) FLOPs. Pages past a sequence's end hold garbage: mask them.
    """
    B, Hkv, R, D = q.shape
    meta = cache.page_meta_pool(layer, name)[cache.page_table.long()]  # [B, maxP, Hkv, D]
    meta = meta.to(dtype).reshape(B, meta.shape[1], Hkv * D)
    eye = torch.eye(Hkv, dtype=dtype, device=q.device).view(1, Hkv, 1, Hkv, 1)
    qbd = (q.to(dtype).unsqueeze(3) * eye).reshape(B, Hkv * R, Hkv * D)  # q of head h in block h
    return torch.bmm(qbd, meta.transpose(1, 2)).view(B, Hkv, R, -1)


def token_valid(cache: PagedKVCache, layer: int, n: int) -> torch.Tensor:
    """bool ``[B, 1, n]``: position ``j`` holds a token of sequence ``b`` (``j < len_b``)."""
    lengths = cache.layer_lengths(layer).long()
    return (torch.arange(n, device=lengths.device).view(1, 1, -1) < lengths.view(-1, 1, 1))


def exact_logits(q: torch.Tensor, cache: PagedKVCache, layer: int, scale: Optional[float] = None) -> torch.Tensor:
    """Exact scaled logits ``[B, Hkv, G, Lq, N]`` of the step's queries over every cached token
    (``N = max_pages * page_size``), ``-inf`` past each sequence's length and in the future of a
    query (bottom-right causal among the ``Lq`` new tokens), in float32 (float64 for float64).

    The scoring step of methods that look at full attention (TidalDecode's selection layers,
    Recycled Attention's full steps, DELTA's Δ layers, TokenSelect, H2O, TOVA): it reads every key,
    so it costs what a dense decode step costs.
    """
    B, Hq, Lq, D = q.shape
    Hkv = cache.num_kv_heads
    G = Hq // Hkv
    dt = score_dtype(q)
    scale = D ** -0.5 if scale is None else scale
    fused = (torch.float16, torch.bfloat16, torch.float32)
    if q.dtype in fused and cache.dtype in fused and use_triton_estimator(q):  # K read once, via the page table
        from ..kernels.decode_logits_triton import paged_logits_triton

        return paged_logits_triton(q, cache.k_pages(layer), cache.page_table, cache.layer_lengths(layer),
                                   page_size=cache.page_size, scale=scale)
    k = gather_keys(cache, layer)  # [B, Hkv, N, D], in the cache dtype
    N = k.shape[2]
    # Half-precision caches: the product runs in the cache dtype (fp32 accumulation in the matmul, one
    # rounding of each logit), never converting every key to float32 - the keys are the bytes that cost.
    qg = q.reshape(B, Hkv, G * Lq, D) if q.dtype in (torch.float16, torch.bfloat16) else q.to(dt).reshape(B, Hkv, G * Lq, D)
    s = torch.matmul(qg, k.transpose(-1, -2) if qg.dtype == k.dtype else k.to(dt).transpose(-1, -2))
    s = s.to(dt).view(B, Hkv, G, Lq, N) * scale
    lengths = cache.layer_lengths(layer).long().view(B, 1, 1, 1, 1)
    pos = torch.arange(N, device=q.device).view(1, 1, 1, 1, N)
    qpos = lengths - Lq + torch.arange(Lq, device=q.device).view(1, 1, 1, Lq, 1)  # each query's position
    return s.masked_fill(pos > qpos, float("-inf"))


def exact_probs(q: torch.Tensor, cache: PagedKVCache, layer: int, scale: Optional[float] = None) -> torch.Tensor:
    """Softmax of :func:`exact_logits`: ``[B, Hkv, G, Lq, N]``, 0 where masked."""
    fused = (torch.float16, torch.bfloat16, torch.float32)
    if q.dtype in fused and cache.dtype in fused and use_triton_estimator(q):
        # Logits plus each row's max / sum-exp in one pass over K, then normalised in place.
        from ..kernels.decode_logits_triton import paged_probs_triton

        return paged_probs_triton(q, cache.k_pages(layer), cache.page_table, cache.layer_lengths(layer),
                                  page_size=cache.page_size, scale=q.shape[-1] ** -0.5 if scale is None else scale)
    return torch.softmax(exact_logits(q, cache, layer, scale), dim=-1).nan_to_num(0.0)


_INT32_MAX = 2 ** 31 - 1
# Keys of topk_positions(stable_ties=True): a float32's bits, negative ones with their other 31 bits
# flipped, order like the floats. Keys of -inf and +inf (NaNs lie outside [-inf, +inf]).
_NEG_INF_KEY = -(2 ** 31) + 0x7FFFFF
_POS_INF_KEY = 0x7F800000


def topk_positions(score: torch.Tensor, k: int, *, stable_ties: bool = False) -> torch.Tensor:
    """int32 ``[..., min(k, N)]``: the positions of the ``k`` largest entries of each row of
    ``score [..., N]``, in no particular order; a picked ``-inf`` (or NaN) entry reads ``N``.

    ``torch.topk`` (a radix select, no full sort; ``k`` is a host int). It gives no order among
    equal scores, so at the budget's edge a tie may go to either position. ``stable_ties=True``
    breaks ties like ``rank_mask`` (the lower position wins) by ranking a packed int64 key
    (the fp32 score's order-preserving bits, then the reversed position): one elementwise pass and
    a top-k over 8-byte keys, worth it where ties are common (max-pooled scores); float64 scores
    take a stable sort instead (exact tests only).
    """
    N = score.shape[-1]
    if N >= _INT32_MAX:
        raise ValueError(f"at most 2**31 - 2 positions per row, got {N}")
    kk = min(k, N)
    if not stable_ties:
        vals, idx = torch.topk(score, kk, dim=-1, sorted=False)
        return torch.where(vals > float("-inf"), idx.to(torch.int32), N)
    if score.dtype == torch.float64:
        vals, idx = torch.sort(score, dim=-1, descending=True, stable=True)
        vals, idx = vals[..., :kk], idx[..., :kk]
        return torch.where(vals > float("-inf"), idx.to(torch.int32), N)
    bits = (score.float() + 0.0).view(torch.int32)  # + 0.0: -0.0 becomes +0.0, as they compare equal
    bits = bits ^ ((bits >> 31) & _INT32_MAX)  # negative floats: reverse their order -> monotone int32
    pos = torch.arange(N, dtype=torch.int64, device=score.device)
    key = (bits.to(torch.int64) << 32) | (_INT32_MAX - pos)  # equal scores: the lower position ranks higher
    top = torch.topk(key, kk, dim=-1, sorted=False).values
    val = top >> 32
    pos = (_INT32_MAX - (top & 0xFFFFFFFF)).to(torch.int32)
    return torch.where((val > _NEG_INF_KEY) & (val <= _POS_INF_KEY), pos, N)


def ascending_top_positions(score: torch.Tensor, k: int, *, stable_ties: bool = False) -> torch.Tensor:
    """int32 ``[..., min(k, N)]``: each row's ``k`` best positions, ascending, picked ``-inf``/NaN
    entries as ``N`` at the end. float16 / bfloat16 / float32 scores take the Triton radix select
    (:func:`~sparseattn.kernels.radix_topk_triton.radix_top_positions`: ascending already, ties to
    the lower position, so ``stable_ties`` holds anyway); float64 takes :func:`topk_positions` and
    a sort. Runs wherever Triton runs (CUDA, or the interpreter)."""
    from ..kernels.radix_topk_triton import SCORE_DTYPES, radix_top_positions

    kk = min(k, score.shape[-1])
    if score.dtype in SCORE_DTYPES:
        return radix_top_positions(score, kk)
    return topk_positions(score, kk, stable_ties=stable_ties).sort(dim=-1).values


def topk_token_selection(score: torch.Tensor, k: int, *, lengths: torch.Tensor, page_size: int,
                         width: Optional[int] = None, sink: int = 0, forced_last: int = 0,
                         stable_ties: bool = False) -> DecodeSelection:
    """The forced tokens plus the ``k`` best candidates of each row, as a token-level DecodeSelection.

    Args:
        score: float ``[B, H, N]``, or ``[B, H, G, N]`` for one top-k per query head whose union
            each (batch, KV head) reads. ``-inf`` = not a candidate: the forced tokens and the
            positions at and past ``len - forced_last`` must be ``-inf`` (a finite score there
            would take a top-k slot and then be dropped).
        k: candidates to pick per row (a host int, so no sync); a row with fewer finite scores
            gets them all (picked ``-inf`` entries are dropped).
        lengths: int32/int64 ``[B]`` tokens per sequence.
        page_size: the cache's page size (recorded in the selection).
        width: index width, at least the largest count; default ``min(N, sink + G * k +
            forced_last)`` (at least 1), what the methods' masks were compacted to.
        sink, forced_last: the first ``sink`` and the last ``forced_last`` tokens of each
            sequence are always read (``r0 = max(len - forced_last, 0)``, ``s0 = min(sink, r0)``:
            ``[0, s0)`` and ``[r0, len)``); candidates lie in ``[s0, r0)``.
        stable_ties: break score ties like ``rank_mask`` (see :func:`topk_positions`).

    Returns:
        ``DecodeSelection`` with ``token_counts [B, H]`` and ascending ``tokens [B, H, width]``
        (zeros after the count): the same tensors as ``rank_mask`` + ``from_token_mask`` give on
        scores without ties (with ``stable_ties``: on any scores).

    How: :func:`ascending_top_positions` (float16 / bfloat16 / float32: a Triton radix select over
    row chunks that emits each row's picks ascending, ties to the lower position, no sort after it
    for ``G = 1``; float64: ``torch.topk`` and a sort).
    A union over ``G`` query heads sorts its ``G * k`` picks (short rows). Then one Triton launch
    (:func:`~sparseattn.kernels.topk_tokens_triton.assemble_token_selection`) writes the rows:
    never a ``[B, H, N]`` mask, no host sync. Runs wherever Triton runs (CUDA, or the interpreter
    in tests); the methods call it when :func:`use_triton_estimator` holds and keep ``rank_mask``
    + ``from_token_mask`` on the CPU.

    Ties: ``rank_mask`` (stable sort) keeps the lower position among equal scores at the budget's
    edge, and so does the radix select, so on float16/bfloat16/float32 scores the result equals
    the PyTorch path's whatever ``stable_ties`` says. For float64 scores ``torch.topk`` promises
    no order among ties, so without ``stable_ties`` a tie at the budget's edge may go to another,
    equally scored token (a valid selection of the same size). NaN scores are never read (the radix
    select skips them; ``torch.topk`` ranks them first, then they are dropped).
    """
    if not isinstance(score, torch.Tensor) or score.dim() not in (3, 4) or not score.dtype.is_floating_point:
        got = (score.dtype, tuple(score.shape)) if isinstance(score, torch.Tensor) else type(score).__name__
        raise ValueError(f"score must be a float [B, H, N] or [B, H, G, N] tensor, got {got}")
    B, H, N = score.shape[0], score.shape[1], score.shape[-1]
    G = score.shape[2] if score.dim() == 4 else 1
    if not isinstance(lengths, torch.Tensor) or lengths.dtype not in (torch.int32, torch.int64) \
            or tuple(lengths.shape) != (B,) or lengths.device != score.device:
        raise ValueError(f"lengths must be an int32/int64 [B={B}] tensor on {score.device}, got "
                         f"{getattr(lengths, 'dtype', type(lengths).__name__)} {tuple(getattr(lengths, 'shape', ()))}")
    for name, value, low in (("k", k, 0), ("page_size", page_size, 1), ("sink", sink, 0),
                             ("forced_last", forced_last, 0)):
        check_int(name, value, minimum=low)
    if width is None:
        width = max(1, min(N, sink + G * k + forced_last))
    check_int("width", width, minimum=1)
    from ..kernels.topk_tokens_triton import assemble_token_selection

    kk = min(k, N)
    if kk > 0 and B * H > 0:
        # Ascending per row; dropped picks read N: never a candidate.
        keys = ascending_top_positions(score, kk, stable_ties=stable_ties).reshape(B, H, G * kk)
        if G > 1:
            keys = keys.sort(dim=-1).values  # a union's repeats become neighbours
    else:  # nothing to pick: one sentinel column
        keys = torch.full((B, H, 1), N, dtype=torch.int32, device=score.device)
    counts, tokens = assemble_token_selection(keys, lengths, width=width, sink=sink, forced_last=forced_last)
    return DecodeSelection(None, None, page_size, counts, tokens)


def check_overrides(cls, overrides: dict) -> None:
    valid = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [key for key in overrides if key not in valid]
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for decode method {cls.name!r}; valid options: {valid}")
