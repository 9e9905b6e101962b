"""Run a Hugging Face model with sparse prefill attention: ``with sparseattn.patch(model, ...)``.

How it works (CONVENTIONS.md 10: registration and scoped hooks, never patching at import): a
function is registered in transformers' ``AttentionInterface`` under a private name, together
with the mask builder of the implementation the model was using (SDPA for models from
:func:`sparseattn.models.load_model`); the model is switched to that name for the ``with``
block and switched back, with both registry entries removed, in ``finally``
(:func:`sparseattn.integrations.interface.temporary_attention`, shared with ``capture``).

Inside the block every attention call of the model goes through :class:`SparsePatch`:

* **prefill** (``q_len > 1``, including chunked prefill where ``k_len > q_len``): the layer's
  method builds a :class:`~sparseattn.plan.BlockPlan` from ``q [B, Hq, Lq, D]``,
  ``k, v [B, Hkv, Lk, D]`` (post-RoPE, before any GQA repeat) and
  :func:`sparseattn.block_sparse_attention` executes it with ``causal=True`` (bottom-right) and
  the module's ``scaling``. The output is returned as ``[B, Lq, Hq, D]``, the layout
  transformers expects from an attention function (as its ``sdpa_attention_forward`` does).
* **decode** (``q_len == 1``): dense, the model's own attention function with the model's mask.
  Only ``decode="dense"`` exists for now; any other value raises ``NotImplementedError`` at
  ``patch()`` time.

**Masks and padding.** The plan engine has no per-sequence lengths, so a sparse plan is used
only when the mask the model built is the plain causal mask (``None``, or equal to the
bottom-right causal pattern for every sequence of the batch). Anything else - left/right
padding in a batch, a static cache with unfilled slots, a sliding window, a bias in a float
mask, a non-causal layer, a logit softcap - falls back to the model's dense attention for that call with one logged warning per
reason, and the call is counted in ``stats.fallbacks`` (its density recorded as 1.0). Pass
``on_mask="raise"`` to get a ``NotImplementedError`` instead. A ``None`` mask with
``k_len > q_len`` is SDPA's "empty static cache" case (top-left alignment, keys past ``q_len``
are unfilled slots); it is handled as SDPA handles it, by dropping those slots.

**Statistics.** ``ctx.stats`` (:class:`PatchStats`) records every prefill call: layer, method,
``q_len``, ``k_len`` and the plan's achieved density (share of the causal area computed);
``stats.per_layer()`` and ``stats.mean_density()`` summarise them, ``stats.reset()`` clears.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Union

import torch

from ..api import block_sparse_attention
from ..methods import LayerMethods, get_method, list_methods
from ..methods.base import PrefillMethod
from ..plan import BlockPlan
from .interface import base_attention, temporary_attention

logger = logging.getLogger(__name__)

DECODE_METHODS = ("dense",)
MASK_POLICIES = ("dense", "raise")


@dataclass(frozen=True)
class LayerCall:
    """One prefill attention call: which layer, which method, its shape and achieved density."""

    layer: int
    method: str
    q_len: int
    k_len: int
    density: float
    fallback: Optional[str] = None  # the reason when the dense fallback ran instead of the plan

    @property
    def area(self) -> int:
        """Causal-visible (query, key) pairs of this call (bottom-right alignment)."""
        return _area_closed(self.q_len, self.k_len)


def _area_closed(q_len: int, k_len: int) -> int:
    off = k_len - q_len
    if off >= 0:  # every row sees off + i + 1 <= k_len keys
        return q_len * (off + 1) + q_len * (q_len - 1) // 2
    first = -off  # rows before this see no key
    n = q_len - first
    return n * (n + 1) // 2


@dataclass
class PatchStats:
    """Per-call record of the prefill attention a patched model ran (see :class:`LayerCall`)."""

    calls: List[LayerCall] = field(default_factory=list)
    decode_calls: int = 0
    fallbacks: Dict[str, int] = field(default_factory=dict)

    def reset(self) -> None:
        """Forget everything recorded so far (e.g. between evaluation samples)."""
        self.calls.clear()
        self.decode_calls = 0
        self.fallbacks.clear()

    def per_layer(self) -> Dict[int, float]:
        """``{layer: density}``, averaged over that layer's prefill calls weighted by causal area."""
        num: Dict[int, float] = {}
        den: Dict[int, int] = {}
        for c in self.calls:
            a = c.area
            num[c.layer] = num.get(c.layer, 0.0) + c.density * a
            den[c.layer] = den.get(c.layer, 0) + a
        return {layer: (num[layer] / den[layer] if den[layer] else 1.0) for layer in sorted(num)}

    def mean_density(self) -> Optional[float]:
        """Area-weighted mean density over all recorded prefill calls (``None`` when there are none):
        the share of the dense prefill attention work the plans computed."""
        total = sum(c.area for c in self.calls)
        if not self.calls:
            return None
        if total == 0:
            return 1.0
        return sum(c.density * c.area for c in self.calls) / total

    def summary(self) -> Dict[str, Any]:
        """JSON-friendly digest: mean density, per-layer densities, call counts, fallbacks."""
        return {"mean_density": self.mean_density(), "per_layer": self.per_layer(),
                "prefill_calls": len(self.calls), "decode_calls": self.decode_calls,
                "fallbacks": dict(self.fallbacks)}


def _resolve_prefill(prefill, overrides: Mapping[str, Any], n_layers: Optional[int]) -> LayerMethods:
    if isinstance(prefill, (LayerMethods, Mapping)) and not (isinstance(prefill, Mapping) and "name" in prefill):
        if overrides:
            raise ValueError(f"keyword overrides {sorted(overrides)} apply to a single prefill method; with a "
                             "per-layer spec put the options inside it, e.g. {'default': ('xattention', "
                             "{'threshold': 0.9}), 'layers': {0: 'dense'}}")
        layers = LayerMethods(prefill)
    elif isinstance(prefill, (str, PrefillMethod)):
        layers = LayerMethods(get_method(prefill, **overrides))
    elif isinstance(prefill, (tuple, Mapping)):
        if overrides:
            raise ValueError(f"keyword overrides {sorted(overrides)} cannot be combined with a (name, options) "
                             "spec; put every option in one place")
        layers = LayerMethods(prefill)
    else:
        raise ValueError(f"prefill must be a method name (one of {list_methods()}), a method object, a "
                         f"LayerMethods or a per-layer dict, got {type(prefill).__name__}")
    if n_layers is not None:
        bad = sorted(i for i in layers.layers if i >= n_layers)
        if bad:
            raise ValueError(f"per-layer spec names layers {bad} but the model has {n_layers} layers "
                             f"(0..{n_layers - 1})")
    return layers


def _check_decode(decode) -> str:
    if decode in DECODE_METHODS:
        return decode
    registered = list_methods("decode")
    raise NotImplementedError(
        f"decode={decode!r} is not supported by patch() yet: decode steps (q_len == 1) run dense attention "
        f"only, decode must be one of {list(DECODE_METHODS)} (registered decode methods: {registered or 'none'}; "
        "sparse decoding with a paged KV cache is a separate integration)")


class SparsePatch:
    """What ``patch()`` yields: the resolved per-layer methods, the settings and ``stats``.

    The attention function itself is :meth:`attention`; it is only installed in the model while
    the ``with`` block of :func:`patch` is open.
    """

    def __init__(self, model, layers: LayerMethods, *, decode: str, backend: str, on_mask: str,
                 record_density: bool):
        self.model = model
        self.layers = layers
        self.decode = decode
        self.backend = backend
        self.on_mask = on_mask
        self.record_density = record_density
        self.stats = PatchStats()
        self.n_layers = getattr(model.config, "num_hidden_layers", None)
        self._base_fn = None
        self._warned: set = set()
        self._plan_cache: Dict[tuple, tuple] = {}  # static plans: same for every layer of a forward
        self._mask_memo: Optional[tuple] = None  # (weakref(mask), q_len, k_len, reason)
        self._counter = 0

    def method_for(self, layer: int) -> PrefillMethod:
        """The prefill method of ``layer``."""
        return self.layers.for_layer(layer)

    def __repr__(self) -> str:
        return f"SparsePatch(prefill={self.layers!r}, decode={self.decode!r}, backend={self.backend!r})"

    # ------------------------------------------------------------------ mask analysis
    def _mask_reason(self, mask: Optional[torch.Tensor], q_len: int, k_len: int) -> Optional[str]:
        """None when ``mask`` is the plain bottom-right causal mask for every sequence, else why not."""
        if mask is None:
            return None
        memo = self._mask_memo
        if memo is not None and memo[0]() is mask and memo[1:3] == (q_len, k_len):
            return memo[3]  # the model passes one mask object to every layer of a forward
        reason = _mask_reason(mask, q_len, k_len)
        try:
            self._mask_memo = (weakref.ref(mask), q_len, k_len, reason)
        except TypeError:  # pragma: no cover - tensors support weak references
            self._mask_memo = None
        return reason

    def _fallback(self, reason: str, layer: int, q_len: int, k_len: int):
        if self.on_mask == "raise":
            raise NotImplementedError(
                f"sparse prefill needs the plain causal mask, but layer {layer} got {reason}; the plan engine has "
                "no per-sequence lengths yet. Use batch 1 without padding, or patch(..., on_mask='dense') to run "
                "such calls densely")
        if reason not in self._warned:
            self._warned.add(reason)
            logger.warning("sparseattn.patch: %s; running dense attention for these calls (the plan engine has "
                           "no per-sequence lengths yet)", reason)
        self.stats.fallbacks[reason] = self.stats.fallbacks.get(reason, 0) + 1
        self.stats.calls.append(LayerCall(layer, "dense", q_len, k_len, 1.0, fallback=reason))

    # ------------------------------------------------------------------ the attention function
    def attention(self, module, query, key, value, attention_mask, *args, **kwargs):
        """transformers attention-function signature; returns ``(out [B, Lq, Hq, D], None)``."""
        q_len, k_len = query.shape[2], key.shape[2]
        if q_len <= 1:  # decode step: dense (the only decode mode for now)
            self.stats.decode_calls += 1
            return self._base_fn(module, query, key, value, attention_mask, *args, **kwargs)
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            layer = self._counter % self.n_layers if self.n_layers else self._counter
        layer = int(layer)
        self._counter += 1
        dropout = kwargs.get("dropout", args[0] if args else 0.0)
        reason = None
        if not kwargs.get("is_causal", getattr(module, "is_causal", True)):
            reason = "non-causal attention"
        elif kwargs.get("softcap") is not None:
            reason = "a logit softcap"
        elif kwargs.get("position_bias") is not None:
            reason = "a position bias"
        elif module.training and dropout:
            reason = "attention dropout in training mode"
        elif attention_mask is None and k_len > q_len:
            # SDPA's empty-static-cache prefill: top-left causal over the first q_len slots.
            key, value = key[:, :, :q_len], value[:, :, :q_len]
            k_len = q_len
        else:
            reason = self._mask_reason(attention_mask, q_len, k_len)
        if reason is not None:
            self._fallback(reason, layer, q_len, k_len)
            return self._base_fn(module, query, key, value, attention_mask, *args, **kwargs)

        method = self.method_for(layer)
        plan, density = self._plan(method, query, key, value, layer)
        scale = kwargs.get("scaling", args[1] if len(args) > 1 else None)
        if scale is None:
            scale = getattr(module, "scaling", None)
        out = block_sparse_attention(query, key, value, plan, causal=True, scale=scale, backend=self.backend)
        self.stats.calls.append(LayerCall(layer, method.name, q_len, k_len, density))
        return out.transpose(1, 2).contiguous(), None

    def _plan(self, method: PrefillMethod, q, k, v, layer: int):
        if method.static:  # value-independent: build (and measure) once per shape
            key = (id(method), q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.device)
            hit = self._plan_cache.get(key)
            if hit is None:
                plan = method.plan(q, k, v, causal=True, layer_idx=layer)
                hit = (plan, self._density(plan))
                if len(self._plan_cache) > 64:
                    self._plan_cache.clear()
                self._plan_cache[key] = hit
            return hit
        plan = method.plan(q, k, v, causal=True, layer_idx=layer)
        return plan, self._density(plan)

    def _density(self, plan: BlockPlan) -> float:
        return float(plan.density()) if self.record_density else float("nan")


def _mask_reason(mask: torch.Tensor, q_len: int, k_len: int) -> Optional[str]:
    if mask.dim() != 4 or mask.shape[-2:] != (q_len, k_len):
        return f"an attention mask of shape {tuple(mask.shape)} (expected [B, 1, {q_len}, {k_len}])"
    allowed = mask if mask.dtype == torch.bool else (mask == 0)
    rows = torch.arange(q_len, device=mask.device).view(-1, 1) + (k_len - q_len)
    causal = torch.arange(k_len, device=mask.device).view(1, -1) <= rows
    if bool((allowed == causal).all()):
        return None
    if mask.dtype != torch.bool and bool(((mask != 0) & (mask > torch.finfo(mask.dtype).min / 2)).any()):
        return "a float attention mask with a bias"
    if mask.shape[0] > 1:
        return "a padded batch (the mask differs from the causal mask)"
    return "an attention mask that is not the plain causal mask (padding, static-cache slots or a window)"


@contextlib.contextmanager
def patch(model, prefill: Union[str, PrefillMethod, LayerMethods, Mapping, tuple] = "xattention",
          decode: str = "dense", *, backend: str = "auto", on_mask: str = "dense", record_density: bool = True,
          **overrides) -> Iterator[SparsePatch]:
    """Context manager: ``model`` runs sparse prefill attention inside the block.

    Example::

        with sparseattn.patch(model, prefill="xattention", threshold=0.9) as ctx:
            out = model.generate(ids, max_new_tokens=20, do_sample=False)
        print(ctx.stats.mean_density(), ctx.stats.per_layer())

    Args:
        model: a transformers model whose attention dispatches through ``AttentionInterface``
            (Llama, Qwen2, Mistral, ...; e.g. from :func:`sparseattn.load_model`). Attention
            tensors are ``q [B, Hq, Lq, D]``, ``k, v [B, Hkv, Lk, D]``, ``Hq % Hkv == 0``.
        prefill: the prefill method for calls with ``q_len > 1``: a registered name (see
            :func:`sparseattn.list_methods`), a method object, ``(name, {options})``, a
            :class:`~sparseattn.LayerMethods` or its dict spec for a per-layer choice, e.g.
            ``{"default": "xattention", "layers": {0: "dense", 1: "dense"}}``. Resolved now: an
            unknown name raises ``ValueError`` listing the valid ones.
        decode: the decode method for ``q_len == 1`` steps; only ``"dense"`` (the model's own
            attention with its mask) is supported now, anything else raises
            ``NotImplementedError``.
        backend: kernel backend for :func:`sparseattn.block_sparse_attention` (``"auto"``,
            ``"reference"``, ``"triton"``).
        on_mask: what to do with a prefill call whose mask is not the plain causal mask (a padded
            batch, ...): ``"dense"`` runs the model's dense attention for it (logged once per
            reason, counted in ``stats.fallbacks``); ``"raise"`` raises ``NotImplementedError``.
        record_density: measure each plan's density for ``stats`` (a small cost per call).
        overrides: hyperparameters of a single prefill method, passed to
            :func:`sparseattn.get_method` (e.g. ``threshold=0.9``).

    Yields:
        a :class:`SparsePatch`; ``ctx.stats`` holds the per-layer achieved density.

    On exit (also when the block raises) the model's attention implementation is restored and
    the temporary registry entries are removed; nothing is patched at import time.
    """
    decode = _check_decode(decode)
    if on_mask not in MASK_POLICIES:
        raise ValueError(f"on_mask must be one of {list(MASK_POLICIES)}, got {on_mask!r}")
    if backend not in ("auto", "reference", "triton"):
        raise ValueError(f"backend must be one of ['auto', 'reference', 'triton'], got {backend!r}")
    if not hasattr(model, "config"):
        raise ValueError(f"patch() needs a transformers model (with .config), got {type(model).__name__}")
    layers = _resolve_prefill(prefill, overrides, getattr(model.config, "num_hidden_layers", None))
    ctx = SparsePatch(model, layers, decode=decode, backend=backend, on_mask=on_mask,
                      record_density=record_density)
    base_name, ctx._base_fn = base_attention(model)
    with temporary_attention(model, ctx.attention, prefix="sparseattn_patch", mask_of=base_name):
        yield ctx


__all__ = ["patch", "SparsePatch", "PatchStats", "LayerCall", "DECODE_METHODS"]
