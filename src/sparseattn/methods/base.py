"""Method base classes and the shared estimator building blocks.

Two levels (CONVENTIONS.md, "A two-level hierarchy"):

* :class:`PrefillMethod` - a dataclass of hyperparameters with a ``plan(q, k, v)`` hook that
  returns a :class:`~sparseattn.plan.BlockPlan`. Static patterns (dense, streaming, MoA, ...)
  implement ``plan()`` directly.
* :class:`ScoreBasedMethod` - owns "score blocks ``[B, H, nQ, nK]`` -> force sink / local /
  diagonal blocks -> drop future blocks -> keep by top-k or cumulative mass -> plan". A method
  then writes only ``score()`` (and says which budget field it uses).

Every helper here works on the inputs' device in batched tensor code: no host syncs, no Python
loops over blocks.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence, Tuple, Union

import torch

from ..checks import check_qkv
from ..plan import NO_WINDOW, BlockPlan

# One chunk of an estimator's temporary [.., rows, cols] tensor stays near this many elements.
ESTIMATE_CHUNK_ELEMENTS = 1 << 26

GQA_POLICIES = ("per_q_head", "group_sum", "group_union")

PerHead = Union[float, int, Sequence[float], Sequence[Sequence[float]]]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def use_triton_estimator(x: torch.Tensor) -> bool:
    """True when an estimator should run its Triton kernels for tensors like ``x``: CUDA tensors
    with a working Triton. Elsewhere (CPU) the PyTorch code runs; it is also the tests' oracle.
    ``SPARSEATTN_ESTIMATORS=torch`` forces the PyTorch code on CUDA too (for comparisons)."""
    if not x.is_cuda or os.environ.get("SPARSEATTN_ESTIMATORS", "").lower() == "torch":
        return False
    from ..kernels.dispatch import triton_environment_reason

    return triton_environment_reason(x.device) is None


# ----------------------------------------------------------------------------- config checks
def check_int(name: str, value, *, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return int(value)


def check_float(name: str, value, *, minimum: Optional[float] = None, maximum: Optional[float] = None,
                open_min: bool = False) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and (value < minimum or (open_min and value == minimum)):
        raise ValueError(f"{name} must be {'>' if open_min else '>='} {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return float(value)


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_per_head(name: str, value, check_one) -> Union[float, int, tuple]:
    """Normalise a scalar, a per-head sequence or a per-(layer, head) table to immutable tuples.

    ``check_one(name, x)`` validates and converts one entry. A per-head sequence has one entry
    per query head (Hq) or per KV head (Hkv); a table has one such row per layer and needs
    ``layer_idx`` at plan time. Lengths are checked at plan time, when H is known.
    """
    if isinstance(value, torch.Tensor):
        value = value.tolist()  # config time, not estimation time
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            raise ValueError(f"{name} must not be an empty sequence")
        if all(isinstance(row, (list, tuple)) for row in value):
            widths = {len(row) for row in value}
            if len(widths) != 1 or 0 in widths:
                raise ValueError(f"{name} as a per-(layer, head) table must have rows of one non-zero length, "
                                 f"got row lengths {sorted(widths)}")
            return tuple(tuple(check_one(f"{name}[{i}][{j}]", x) for j, x in enumerate(row))
                         for i, row in enumerate(value))
        if any(isinstance(row, (list, tuple)) for row in value):
            raise ValueError(f"{name} mixes numbers and sequences; give a scalar, one value per head, "
                             "or one row of per-head values per layer")
        return tuple(check_one(f"{name}[{i}]", x) for i, x in enumerate(value))
    return check_one(name, value)


def head_values(value, *, name: str, heads: int, q_heads: int, kv_heads: int, layer_idx: Optional[int],
                device, dtype=torch.float32) -> torch.Tensor:
    """Resolve a per-head config value to a tensor ``[heads]`` (``heads`` = Hq or Hkv of the plan).

    A scalar is broadcast. A sequence of length Hkv given to a per-query-head plan is repeated
    over each GQA group; a sequence of length Hq cannot be given to a per-KV-head plan.
    """
    if isinstance(value, tuple) and value and isinstance(value[0], tuple):
        if layer_idx is None:
            raise ValueError(f"{name} is a per-(layer, head) table with {len(value)} rows; pass layer_idx= to plan()")
        if not 0 <= layer_idx < len(value):
            raise ValueError(f"{name} has rows for {len(value)} layers, got layer_idx={layer_idx}")
        value = value[layer_idx]
    if not isinstance(value, tuple):
        return torch.full((heads,), value, dtype=dtype, device=device)
    n = len(value)
    if n != heads and not (n == kv_heads and heads == q_heads):
        if n == q_heads and heads == kv_heads:
            hint = "a per-query-head value cannot drive a plan shared by a GQA group; give one per KV head"
        else:
            hint = f"give a scalar or {q_heads} (Hq) or {kv_heads} (Hkv) values"
        raise ValueError(f"{name} has {n} per-head values but this plan has {heads} heads "
                         f"(Hq={q_heads}, Hkv={kv_heads}); {hint}")
    if torch.device(device).type == "cuda":
        # Uploaded once per (values, device): no host sync and no host-to-device copy per call, so
        # an estimator stays capturable in a CUDA graph (methods/graphs.py). Cloned: callers own it.
        t = _device_constant(value, dtype, str(torch.device(device))).clone()
    else:
        t = torch.tensor(value, dtype=dtype, device=device)
    return t if n == heads else t.repeat_interleave(q_heads // kv_heads)


@functools.lru_cache(maxsize=512)
def _device_constant(values: tuple, dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).pin_memory().to(device, non_blocking=True)


# ----------------------------------------------------------------------------- block geometry
def query_block_positions(nQ: int, block_q: int, q_len: int, k_len: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """int64 ``[nQ]`` absolute positions (bottom-right aligned) of each query block's first and last row."""
    m = torch.arange(nQ, device=device, dtype=torch.int64)
    first = k_len - q_len + m * block_q
    last = k_len - q_len + torch.clamp((m + 1) * block_q, max=q_len) - 1
    return first, last


def visible_blocks(*, block_q: int, block_k: int, q_len: int, k_len: int, causal: bool, device) -> torch.Tensor:
    """bool ``[nQ, nK]``: blocks any query of the query block may see (all of them when not causal)."""
    nK = cdiv(k_len, block_k)
    limits = BlockPlan.causal_block_limits(block_q=block_q, block_k=block_k, q_len=q_len, k_len=k_len,
                                           causal=causal, device=device)
    return torch.arange(nK, device=device).view(1, -1) < limits.view(-1, 1).long()


def forced_blocks(*, block_q: int, block_k: int, q_len: int, k_len: int, sink_blocks: int, local_blocks: int,
                  diagonal: bool, device) -> torch.Tensor:
    """bool ``[nQ, nK]``: the sink blocks, the diagonal blocks and ``local_blocks`` blocks before them.

    The diagonal of query block ``m`` is every key block holding the position of one of its
    queries (one block when q and k blocks align, two when a bottom-right offset straddles a
    block edge). Not yet clipped to the causally visible blocks.
    """
    nQ, nK = cdiv(q_len, block_q), cdiv(k_len, block_k)
    first, last = query_block_positions(nQ, block_q, q_len, k_len, device)
    n = torch.arange(nK, device=device, dtype=torch.int64).view(1, -1)
    d_lo = (first.clamp(min=0) // block_k).view(-1, 1)
    d_hi = torch.where(last >= 0, last.clamp(min=0) // block_k, torch.full_like(last, -1)).view(-1, 1)
    out = n < sink_blocks
    if diagonal:
        out = out | ((n >= d_lo) & (n <= d_hi))
    if local_blocks > 0:
        out = out | ((n < d_lo) & (n >= d_lo - local_blocks) & (d_hi >= 0))
    return out.expand(nQ, nK)


def band_block_mask(sink: torch.Tensor, window: torch.Tensor, *, block_q: int, block_k: int, q_len: int,
                    k_len: int) -> torch.Tensor:
    """bool ``[..., nQ, nK]``: blocks a causal sink + window band touches, for per-head bands.

    ``sink`` and ``window`` are int64 tensors of any leading shape ``[...]`` (e.g. ``[H]``):
    query at position ``p`` keeps key ``j <= p`` with ``j < sink`` or ``p - j < window``
    (the same rule as :meth:`BlockPlan.from_band`, with one band per leading index).
    """
    device = sink.device
    nQ, nK = cdiv(q_len, block_q), cdiv(k_len, block_k)
    first, last = query_block_positions(nQ, block_q, q_len, k_len, device)
    n = torch.arange(nK, device=device, dtype=torch.int64)
    start, end = n * block_k, torch.clamp((n + 1) * block_k, max=k_len) - 1
    s = sink.long()[..., None, None]
    w = window.long()[..., None, None]
    in_sink = start.view(1, -1) < s
    in_window = (end.view(1, -1) > first.view(-1, 1) - w) & (w > 0)
    causal_ok = start.view(1, -1) <= last.view(-1, 1)
    return (in_sink | in_window) & causal_ok


def pool_blocks(x: torch.Tensor, block: int, mode: str = "mean") -> torch.Tensor:
    """``x [B, H, L, D]`` -> ``[B, H, ceil(L / block), D]`` pooled over each block's real tokens.

    ``mode`` is ``"mean"``, ``"max"`` or ``"min"``; a partial last block pools only its real rows.
    Computes in float32 (float64 for float64 input).
    """
    B, H, L, D = x.shape
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    full, tail = L // block, L % block
    parts = []  # no padded or upcast copy of x: reductions read it in place
    if mode == "mean":
        if full:
            parts.append(x[:, :, :full * block].reshape(B, H, full, block, D).sum(3, dtype=dt) / block)
        if tail:
            parts.append(x[:, :, full * block:].sum(2, keepdim=True, dtype=dt) / tail)
    elif mode in ("max", "min"):
        reduce = torch.amax if mode == "max" else torch.amin
        if full:
            parts.append(reduce(x[:, :, :full * block].reshape(B, H, full, block, D), 3).to(dt))
        if tail:
            parts.append(reduce(x[:, :, full * block:], 2, keepdim=True).to(dt))
    else:
        raise ValueError(f"pool mode must be 'mean', 'max' or 'min', got {mode!r}")
    return torch.cat(parts, dim=2) if parts else x.new_zeros(B, H, 0, D, dtype=dt)


def last_queries_attention(q: torch.Tensor, k: torch.Tensor, n_last: int) -> torch.Tensor:
    """float ``[B, Hq, P, Lk]``: softmax attention of the last ``P = min(n_last, Lq)`` queries over
    all keys, causal (bottom-right), in float32 (float64 for float64 input). GQA by broadcast.

    Rows with no visible key are 0. Memory ``B * Hq * P * Lk``.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G, P = Hq // Hkv, min(n_last, Lq)
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    ql = q[:, :, Lq - P:].to(dt).reshape(B, Hkv, G * P, D)
    logits = torch.matmul(ql, k.to(dt).transpose(-1, -2)).view(B, Hq, P, Lk) / math.sqrt(D)
    pos = Lk - P + torch.arange(P, device=q.device).view(-1, 1)
    logits = logits.masked_fill(torch.arange(Lk, device=q.device).view(1, -1) > pos, float("-inf"))
    return torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)


def diagonal_sums(a: torch.Tensor) -> torch.Tensor:
    """``a [..., P, Lk]`` (the last ``P`` query rows against all keys) -> ``[..., Lk]``: sums along
    each causal diagonal, indexed by the key that diagonal reaches on the **last** row (index
    ``Lk - 1`` is the main diagonal, index ``t`` is the diagonal at distance ``Lk - 1 - t``).

    Deterministic (a strided view and a sum; no atomics).
    """
    *lead, P, Lk = a.shape
    W = Lk + P - 1
    flat = torch.nn.functional.pad(a.reshape(-1, P, Lk), (P - 1, 0)).contiguous()  # row i shifted right by P-1
    n = flat.shape[0]
    diag = flat.as_strided((n, Lk, P), (P * W, 1, W + 1)).sum(-1)  # sum_i flat[i, t + i]
    return diag.view(*lead, Lk)


def sum_pool_last(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x [..., L]`` -> ``[..., ceil(L / block)]``: sums over consecutive runs of ``block``."""
    L = x.shape[-1]
    n = cdiv(L, block)
    return torch.nn.functional.pad(x, (0, n * block - L)).view(*x.shape[:-1], n, block).sum(-1)


def rank_mask(scores: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """bool, the shape of ``scores [..., N]``: the ``n[...]`` best entries of each row (ties: lower
    index first)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    rank = torch.arange(scores.shape[-1], device=scores.device)
    keep_sorted = (rank < n.unsqueeze(-1)).expand(scores.shape)
    return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(-1, order, keep_sorted)


def compact_rows(mask: torch.Tensor, values: torch.Tensor, width: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per row, the ``values`` where ``mask`` is True, in order, packed left into ``width`` slots.

    Returns ``(counts int32 [...], packed int32 [..., width])``; unused slots hold 0. Builds a
    plan's token-level extra columns (strictly ascending when ``values`` ascend along the row).
    ``width`` must be at least the largest count (entries past it are dropped).
    """
    rank = torch.cumsum(mask, -1) - 1
    dest = torch.where(mask, rank, torch.full_like(rank, width)).clamp(max=width)
    out = torch.zeros(*mask.shape[:-1], width + 1, dtype=torch.int32, device=mask.device)
    out.scatter_(-1, dest, torch.where(mask, values, torch.zeros_like(values)).to(torch.int32))
    return mask.sum(-1, dtype=torch.int32), out[..., :width].contiguous()


# ----------------------------------------------------------------------------- selection
def _sorted_candidates(scores: torch.Tensor, candidates: torch.Tensor):
    """Candidates by descending score; ties keep the lower block index first (stable sort)."""
    neg = torch.full((), float("-inf"), dtype=scores.dtype, device=scores.device)
    s = torch.where(candidates, scores, neg)
    values, order = torch.sort(s, dim=-1, descending=True, stable=True)
    valid = torch.gather(candidates.expand_as(s), -1, order)
    return values, order, valid


def _scatter_back(keep_sorted: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(keep_sorted)
    return out.scatter_(-1, order, keep_sorted)


def select_topk(scores: torch.Tensor, visible: torch.Tensor, forced: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """bool mask: the forced blocks plus the best other visible blocks, ``k`` blocks per row in all.

    ``scores [B, H, nQ, nK]``; ``visible``, ``forced`` broadcast to it; ``k`` int ``[H]`` (total
    blocks per row, forced ones included; forced blocks are kept even when they exceed ``k``).
    Ties are broken by the lower block index.
    """
    scores = torch.nan_to_num(scores, nan=0.0)
    forced = forced & visible
    cand = visible & ~forced
    _, order, valid = _sorted_candidates(scores, cand)
    n_forced = forced.expand_as(scores).sum(-1, keepdim=True)
    extra = (k.view(1, -1, 1, 1).long() - n_forced).clamp(min=0)
    rank = torch.arange(scores.shape[-1], device=scores.device).view(1, 1, 1, -1)
    keep = _scatter_back(valid & (rank < extra), order)
    return keep | forced.expand_as(keep)


def select_threshold(scores: torch.Tensor, visible: torch.Tensor, forced: torch.Tensor,
                     tau: torch.Tensor) -> torch.Tensor:
    """bool mask: the forced blocks plus the shortest prefix of the other visible blocks (by
    descending score) whose cumulative mass, counted together with the forced blocks' mass,
    reaches ``tau`` times the row's visible mass.

    ``scores`` must be non-negative masses. ``tau`` float ``[H]`` in ``[0, 1]``: 0 keeps only the
    forced blocks, 1 keeps every visible block (also those whose estimated mass is 0).
    Ties are broken by the lower block index.
    """
    scores = torch.nan_to_num(scores, nan=0.0).clamp(min=0)
    forced = forced & visible
    cand = visible & ~forced
    zero = torch.zeros((), dtype=scores.dtype, device=scores.device)
    total = torch.where(visible, scores, zero).sum(-1, keepdim=True)
    forced_mass = torch.where(forced, scores, zero).sum(-1, keepdim=True)
    values, order, valid = _sorted_candidates(scores, cand)
    values = torch.where(valid, values, zero)
    before = forced_mass + torch.cumsum(values, -1) - values  # mass kept before this candidate
    tau = tau.view(1, -1, 1, 1).to(scores.dtype)
    keep_sorted = valid & ((before < tau * total) | (tau >= 1))
    keep = _scatter_back(keep_sorted, order)
    return keep | forced.expand_as(keep)


# ----------------------------------------------------------------------------- base classes
# Plans of static methods, least recently used first (a few MB each at 128K: bounded).
_STATIC_PLANS: "dict" = {}
MAX_STATIC_PLANS = 16


@dataclass(kw_only=True)
class PrefillMethod:
    """A prefill sparse-attention method: hyperparameters as dataclass fields + ``plan()``.

    Fields hold the official defaults (each subclass cites its sources) and are checked in
    ``__post_init__`` (``ValueError`` naming the field). Build one with
    :func:`sparseattn.methods.get_method` or the class itself; ``replace(**overrides)`` gives a
    checked copy (assigning a field directly skips the checks). Methods compare by value; key a
    plan cache by ``id(method)`` and the input shape.

    A subclass sets the class attribute ``name``, adds its fields with defaults (keyword-only),
    extends ``__post_init__`` and implements ``_plan`` (inputs already validated and non-empty),
    then registers itself with ``@register``.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "prefill"
    #: True when the plan does not depend on q/k values: :meth:`plan` builds it once per
    #: (config, shapes, dtype, device, causal, layer) and returns that same plan afterwards
    #: (read-only: plans are never changed in place by the library).
    static: ClassVar[bool] = False
    #: Whether the estimate reads v's values (CUDA-graph replay copies only what is read).
    reads_values: ClassVar[bool] = True

    block_size: int = 128

    def __post_init__(self):
        check_int("block_size", self.block_size, minimum=1)

    # -- public
    def plan(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
             layer_idx: Optional[int] = None, transient: bool = False) -> BlockPlan:
        """Build the sparse plan for ``q [B, Hq, Lq, D]``, ``k, v [B, Hkv, Lk, D]``.

        Args:
            causal: bottom-right causal alignment (query ``i`` sees keys ``j <= Lk - Lq + i``).
            layer_idx: the layer this call is for; only needed when a field is a
                per-(layer, head) table.
            transient: on CUDA, where the estimate replays a captured graph
                (:mod:`sparseattn.methods.graphs`), return the graph's own plan tensors instead
                of a copy: valid until this method's next ``plan`` call with the same shapes,
                which overwrites them. For a caller that hands the plan to the kernel at once
                (:func:`sparseattn.sparse_attention` and the Hugging Face integration do); it
                saves a copy of the plan per call.
        Returns:
            a :class:`BlockPlan` on q's device with ``block_q = block_k = block_size`` (a method
            with its own key tile says so, e.g. SALE's ``block_k``).
        """
        B, Hq, Hkv, Lq, Lk, D = check_qkv(q, k, v)
        if not isinstance(causal, bool):
            raise ValueError(f"causal must be a bool, got {causal!r}")
        if not isinstance(transient, bool):
            raise ValueError(f"transient must be a bool, got {transient!r}")
        if layer_idx is not None:
            check_int("layer_idx", layer_idx, minimum=0)
        if B == 0 or Lq == 0 or Lk == 0:
            # Nothing to attend: any plan of the right shape; dense is the obvious one.
            return BlockPlan.dense(1, 1, block_q=self.block_size, block_k=self.block_size, q_len=Lq, k_len=Lk,
                                   causal=causal, device=q.device)
        if self.static:  # value-independent: built once per (config, shape, device), then shared
            key = (type(self), repr(self.config()), B, Hq, Hkv, Lq, Lk, q.dtype, q.device, causal, layer_idx)
            plan = _STATIC_PLANS.get(key)
            if plan is None:
                plan = self._plan(q, k, v, causal=causal, layer_idx=layer_idx)
                _STATIC_PLANS[key] = plan
                while len(_STATIC_PLANS) > MAX_STATIC_PLANS:
                    _STATIC_PLANS.pop(next(iter(_STATIC_PLANS)))
            else:
                _STATIC_PLANS[key] = _STATIC_PLANS.pop(key)  # most recently used last
            return plan
        if q.is_cuda:  # replay a captured graph: the host cost is one launch
            from .graphs import graphed_plan

            plan = graphed_plan(self, q, k, v, causal=causal, layer_idx=layer_idx, transient=transient)
            if plan is not None:
                return plan
        return self._plan(q, k, v, causal=causal, layer_idx=layer_idx)

    def _plan(self, q, k, v, *, causal: bool, layer_idx: Optional[int]) -> BlockPlan:
        raise NotImplementedError

    def query_rows_read(self, q_len: int) -> int:
        """How many of the last query rows the estimate reads (default: all ``q_len``); the
        CUDA-graph replay copies only those into the graph's inputs."""
        return q_len

    def config(self) -> dict:
        """The hyperparameters as a plain dict (for logs and reports)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def replace(self, **overrides) -> "PrefillMethod":
        """A checked copy with some fields changed (unknown names raise ``ValueError``)."""
        check_overrides(type(self), overrides)
        return dataclasses.replace(self, **overrides)

    def _require_causal(self, causal: bool) -> None:
        if not causal:
            raise NotImplementedError(f"method {self.name!r} is a causal pattern; causal=False is not supported")


def check_overrides(cls, overrides: dict) -> None:
    valid = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [key for key in overrides if key not in valid]
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {cls.name!r}; valid options: {valid}")


@dataclass(kw_only=True)
class ScoreBasedMethod(PrefillMethod):
    """Score blocks, force sink/local/diagonal, drop future blocks, select, build the plan.

    Subclasses implement :meth:`score` and :meth:`budget`. Shared fields:

    * ``sink_blocks``: the first key blocks every query block keeps;
    * ``local_blocks``: key blocks kept just before the diagonal;
    * ``keep_diagonal``: keep the key blocks holding the query block's own positions;
    * ``gqa_policy``: ``"per_q_head"`` (one plan row per query head), ``"group_sum"`` (scores
      summed over each KV group, one plan per KV head) or ``"group_union"`` (selected per query
      head, then the union per KV head).
    """

    reads_values: ClassVar[bool] = False  # scores come from q and k only

    sink_blocks: int = 1
    local_blocks: int = 0
    keep_diagonal: bool = True
    gqa_policy: str = "per_q_head"

    def __post_init__(self):
        super().__post_init__()
        check_int("sink_blocks", self.sink_blocks, minimum=0)
        check_int("local_blocks", self.local_blocks, minimum=0)
        if not isinstance(self.keep_diagonal, bool):
            raise ValueError(f"keep_diagonal must be a bool, got {self.keep_diagonal!r}")
        check_choice("gqa_policy", self.gqa_policy, GQA_POLICIES)

    # -- hooks
    def score(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool) -> torch.Tensor:
        """float ``[B, Hq, nQ, nK]`` block scores (non-negative masses for threshold budgets).

        Entries of blocks that are not visible are ignored by the selector.
        """
        raise NotImplementedError

    def budget(self) -> Tuple[str, Any]:
        """``("topk", value)`` or ``("threshold", value)``; value may be per head / per layer."""
        raise NotImplementedError

    # -- the shared pipeline
    def _plan(self, q, k, v, *, causal, layer_idx):
        B, Hq, Lq, _ = q.shape
        Hkv, Lk = k.shape[1], k.shape[2]
        G = Hq // Hkv
        bs = self.block_size
        geo = dict(block_q=bs, block_k=bs, q_len=Lq, k_len=Lk)
        scores = self.score(q, k, causal=causal)
        nQ, nK = scores.shape[-2:]
        if self.gqa_policy == "group_sum":
            scores = scores.view(B, Hkv, G, nQ, nK).sum(2)
        heads = scores.shape[1]
        mode, value = self.budget()
        if mode == "topk":
            k_h = head_values(value, name="topk", heads=heads, q_heads=Hq, kv_heads=Hkv, layer_idx=layer_idx,
                              device=q.device, dtype=torch.int64)
        else:
            tau = head_values(value, name="threshold", heads=heads, q_heads=Hq, kv_heads=Hkv,
                              layer_idx=layer_idx, device=q.device, dtype=scores.dtype)
        if self.gqa_policy != "group_union" and use_triton_estimator(q):
            from ..kernels.select_triton import MAX_KEY_BLOCKS, SCORE_DTYPES, select_blocks_triton

            if scores.dtype in SCORE_DTYPES and nK <= MAX_KEY_BLOCKS:
                # One kernel: selection + compaction, no sort and no [nQ, nK] masks.
                counts, indices = select_blocks_triton(
                    scores, **geo, causal=causal, sink_blocks=self.sink_blocks, local_blocks=self.local_blocks,
                    diagonal=self.keep_diagonal, mode=mode, values=k_h if mode == "topk" else tau)
                return BlockPlan(counts, indices, **geo)
        visible = visible_blocks(**geo, causal=causal, device=q.device)
        forced = forced_blocks(**geo, sink_blocks=self.sink_blocks, local_blocks=self.local_blocks,
                               diagonal=self.keep_diagonal, device=q.device)
        if mode == "topk":
            keep = select_topk(scores, visible, forced, k_h)
        else:
            keep = select_threshold(scores, visible, forced, tau)
        if self.gqa_policy == "group_union":
            keep = keep.view(B, Hkv, G, nQ, nK).any(2)
        return BlockPlan.from_block_mask(keep, **geo, causal=causal)


def band_plan(sink: torch.Tensor, window: torch.Tensor, *, block_size: int, q_len: int, k_len: int,
              dense_rows: Optional[torch.Tensor] = None) -> BlockPlan:
    """A causal plan of per-(batch, head) sink + window bands with exact token edges.

    ``sink``, ``window``: int ``[B, H]``. ``dense_rows``: optional bool ``[B, H, nQ]`` (or
    broadcastable) of query blocks that attend to every causal key instead of the band.
    """
    geo = dict(block_q=block_size, block_k=block_size, q_len=q_len, k_len=k_len)
    mask = band_block_mask(sink, window, **geo)  # [B, H, nQ, nK]
    B, H, nQ, nK = mask.shape
    sink_rows = sink.long().view(B, H, 1).expand(B, H, nQ)
    window_rows = window.long().view(B, H, 1).expand(B, H, nQ)
    if dense_rows is not None:
        dense_rows = dense_rows.expand(B, H, nQ)
        mask = mask | dense_rows.unsqueeze(-1)
        sink_rows = torch.where(dense_rows, torch.zeros_like(sink_rows), sink_rows)
        window_rows = torch.where(dense_rows, torch.full_like(window_rows, NO_WINDOW), window_rows)
    plan = BlockPlan.from_block_mask(mask, **geo, causal=True)
    return dataclasses.replace(plan, band_sink=sink_rows.to(torch.int32).contiguous(),
                               band_window=window_rows.clamp(max=NO_WINDOW).to(torch.int32).contiguous())
