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
* **decode** (``q_len <= decode_max_q`` once the prompt is cached): with a decode method (any of
  ``sparseattn.list_methods("decode")``, ``"dense"`` included) ``model.generate`` gets a
  :class:`~sparseattn.integrations.hf_cache.PagedCache` (unless the caller passes a cache): the
  K/V go into a :class:`~sparseattn.cache.PagedKVCache`, the decode method selects pages/tokens
  per step and :func:`sparseattn.sparse_decode_attention` reads them. For a manual loop pass
  ``past_key_values=ctx.new_cache()``. ``decode=None`` leaves decoding to the model's own
  attention and cache.

**Masks and padding.** A sparse plan is used when the mask the model built is the plain causal
mask (``None``, or the bottom-right causal pattern for every sequence), or a *left-padded* causal
mask: then each sequence's real tokens are planned and attended on their own (one plan per
sequence; pad query rows give 0, which the model never reads). Anything else - right padding,
a static cache with unfilled slots, a sliding window, a bias in a float mask, a non-causal layer,
a logit softcap - falls back to the model's dense attention for that call with one logged
warning per reason, counted in ``stats.fallbacks`` (its density recorded as 1.0). Pass
``on_mask="raise"`` to get a ``NotImplementedError`` instead. A ``None`` mask with
``k_len > q_len`` is SDPA's "empty static cache" case (top-left alignment, keys past ``q_len``
are unfilled slots); it is handled as SDPA handles it, by dropping those slots. With a
``PagedCache`` the pages store only real tokens (left padding is dropped), so decode steps of a
padded batch read exactly each sequence's own tokens; decode methods that score the prompt
(``on_prefill``: H2O, SnapKV, PyramidKV, ...) refuse padded prompts with ``NotImplementedError``.

**Statistics.** ``ctx.stats`` (:class:`PatchStats`) records every prefill call: layer, method,
``q_len``, ``k_len`` and the plan's achieved density (share of the causal area computed);
``stats.per_layer()`` and ``stats.mean_density()`` summarise them, ``stats.reset()`` clears.
Decode steps are counted in ``stats.decode_calls``; with ``record_density`` the share of cached
tokens each step read is averaged in ``stats.decode_density()`` (a host sync per step).
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Union

import torch

from ..api import block_sparse_attention
from ..decode_api import sparse_decode_attention
from ..decode_methods.base import DecodeMethod
from ..methods import LayerMethods, get_method, list_methods
from ..methods.base import PrefillMethod
from ..plan import BlockPlan
from .interface import base_attention, temporary_attention

logger = logging.getLogger(__name__)

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
    decode_reads: List[float] = field(default_factory=list)  # per decode call: share of cached tokens read

    def reset(self) -> None:
        """Forget everything recorded so far (e.g. between evaluation samples)."""
        self.calls.clear()
        self.decode_calls = 0
        self.fallbacks.clear()
        self.decode_reads.clear()

    def decode_density(self) -> Optional[float]:
        """Mean share of the cached tokens a sparse decode step read (``None`` when none was recorded)."""
        return sum(self.decode_reads) / len(self.decode_reads) if self.decode_reads else None

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
                "decode_density": self.decode_density(), "fallbacks": dict(self.fallbacks)}


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


def _resolve_decode(decode, n_layers: Optional[int]) -> Optional[LayerMethods]:
    """``None`` (the model's own decoding) or the per-layer decode methods."""
    if decode is None:
        return None
    if isinstance(decode, (str, LayerMethods, Mapping, tuple, DecodeMethod)):
        layers = LayerMethods(decode, kind="decode")
    else:
        raise ValueError(f"decode must be None, a decode method name (one of {list_methods('decode')}), a decode "
                         f"method object, (name, {{options}}) or a per-layer dict, got {type(decode).__name__}")
    if n_layers is not None:
        bad = sorted(i for i in layers.layers if i >= n_layers)
        if bad:
            raise ValueError(f"per-layer decode spec names layers {bad} but the model has {n_layers} layers")
    return layers


class SparsePatch:
    """What ``patch()`` yields: the resolved per-layer methods, the settings and ``stats``.

    The attention function itself is :meth:`attention`; it is only installed in the model while
    the ``with`` block of :func:`patch` is open.
    """

    def __init__(self, model, layers: LayerMethods, *, decode: Optional[LayerMethods], backend: str, on_mask: str,
                 record_density: bool, page_size: int = 16, decode_max_q: int = 16, fast_cpu: bool = True):
        self.model = model
        self.fast_cpu = fast_cpu
        self.layers = layers
        self.decode = decode
        self.page_size = page_size
        self.decode_max_q = decode_max_q
        self.active = False
        self._pending: Optional[tuple] = None  # (cache, layer, k, v, first) handed over by PagedCache.update
        self.backend = backend
        self.on_mask = on_mask
        self.record_density = record_density
        self.stats = PatchStats()
        self.n_layers = getattr(model.config, "num_hidden_layers", None)
        self._base_fn = None
        self._warned: set = set()
        self._plan_cache: Dict[tuple, tuple] = {}  # static plans: same for every layer of a forward
        self._mask_memo: Optional[tuple] = None  # (weakref(mask), q_len, k_len, reason)
        self._pads_memo: Optional[tuple] = None  # (weakref(mask), q_len, k_len, pads)
        self._counter = 0

    def method_for(self, layer: int) -> PrefillMethod:
        """The prefill method of ``layer``."""
        return self.layers.for_layer(layer)

    def decode_method_for(self, layer: int) -> DecodeMethod:
        """The decode method of ``layer`` (``decode=None``: raises)."""
        if self.decode is None:
            raise ValueError("this patch was made with decode=None (the model's own decoding)")
        return self.decode.for_layer(layer)

    def new_cache(self):
        """A :class:`~sparseattn.integrations.hf_cache.PagedCache` for this block (for manual loops:
        ``model(ids, past_key_values=ctx.new_cache(), use_cache=True)``); ``generate`` gets one
        automatically."""
        from .hf_cache import PagedCache

        if self.decode is None:
            raise ValueError("patch(..., decode=None) decodes with the model's own cache; pass a decode method "
                             "(e.g. decode='dense') to use a paged cache")
        return PagedCache(self, self.n_layers, page_size=self.page_size)

    def __repr__(self) -> str:
        return f"SparsePatch(prefill={self.layers!r}, decode={self.decode!r}, backend={self.backend!r})"

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            logger.warning("sparseattn.patch: %s", message)

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
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            layer = self._counter % self.n_layers if self.n_layers else self._counter
        layer = int(layer)
        self._counter += 1
        pending, self._pending = self._pending, None
        if pending is not None and pending[2] is key and pending[1] == layer:
            return self._paged_attention(pending, module, query, attention_mask, layer, args, kwargs)
        if query.shape[2] <= 1:  # decode step with the model's own cache: dense
            self.stats.decode_calls += 1
            return self._base_fn(module, query, key, value, attention_mask, *args, **kwargs)
        return self._prefill(module, query, key, value, attention_mask, layer, args, kwargs)

    @staticmethod
    def _scale(module, args, kwargs):
        scale = kwargs.get("scaling", args[1] if len(args) > 1 else None)
        return getattr(module, "scaling", None) if scale is None else scale

    def _prefill(self, module, query, key, value, attention_mask, layer: int, args, kwargs, *, pads=None):
        """Sparse prefill of ``query`` over ``key, value`` (or the model's dense attention with a reason)."""
        q_len, k_len = query.shape[2], key.shape[2]
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
        elif pads is not None:
            pass  # the caller found left padding already
        elif attention_mask is None and k_len > q_len:
            # SDPA's empty-static-cache prefill: top-left causal over the first q_len slots.
            key, value = key[:, :, :q_len], value[:, :, :q_len]
            k_len = q_len
        else:
            reason = self._mask_reason(attention_mask, q_len, k_len)
            if reason is not None:
                pads = self._left_pads(attention_mask, q_len, k_len)
                if pads is not None:
                    reason = None
        if reason is not None:
            self._fallback(reason, layer, q_len, k_len)
            return self._base_fn(module, query, key, value, attention_mask, *args, **kwargs)

        method = self.method_for(layer)
        scale = self._scale(module, args, kwargs)
        if pads is None:
            plan, density = self._plan(method, query, key, value, layer)
            out = self._execute(query, key, value, plan, density, scale)
            self.stats.calls.append(LayerCall(layer, method.name, q_len, k_len, density))
            return out.transpose(1, 2).contiguous(), None
        # Left padding: each sequence's real tokens on their own (one plan per sequence).
        out = torch.zeros_like(query)
        for b, pad in enumerate(pads):
            q_pad = max(0, pad - (k_len - q_len))  # query rows sitting on padding positions
            if q_pad >= q_len:
                continue
            qb, kb, vb = query[b:b + 1, :, q_pad:], key[b:b + 1, :, pad:], value[b:b + 1, :, pad:]
            plan, density = self._plan(method, qb, kb, vb, layer)
            out[b:b + 1, :, q_pad:] = self._execute(qb, kb, vb, plan, density, scale)
            self.stats.calls.append(LayerCall(layer, method.name, q_len - q_pad, k_len - pad, density))
        return out.transpose(1, 2).contiguous(), None

    def _execute(self, q, k, v, plan: BlockPlan, density: float, scale):
        """The plan's attention: the engine, or on the CPU (``fast_cpu``, backend "auto") SDPA with the
        plan's exact element mask - the same result up to rounding, several times faster than the
        reference kernel, which materialises more of the score matrix."""
        if not (self.fast_cpu and self.backend == "auto" and q.device.type == "cpu"):
            return block_sparse_attention(q, k, v, plan, causal=True, scale=scale, backend=self.backend)
        import torch.nn.functional as F

        Hq, Hkv = q.shape[1], k.shape[1]
        if density == 1.0 and q.shape[2] == k.shape[2]:  # the whole causal triangle
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=Hq != Hkv)
        mask = plan.to_dense_mask(causal=True)  # [B|1, H, Lq, Lk], H in (Hq, Hkv, 1)
        if mask.shape[1] not in (1, Hq):
            mask = mask.repeat_interleave(Hq // mask.shape[1], dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=Hq != Hkv)
        return out.nan_to_num(0.0)  # rows with no key: 0, as the engine gives

    def _left_pads(self, mask: torch.Tensor, q_len: int, k_len: int) -> Optional[List[int]]:
        """Per sequence, the number of left-padding keys when ``mask`` is a left-padded causal mask
        (one host read), else ``None``."""
        memo = self._pads_memo
        if memo is not None and memo[0]() is mask and memo[1:3] == (q_len, k_len):
            return memo[3]
        pads = _left_padding(mask, q_len, k_len)
        self._pads_memo = (weakref.ref(mask), q_len, k_len, pads)
        return pads

    def _paged_attention(self, pending, module, query, attention_mask, layer: int, args, kwargs):
        """Attention of a layer whose cache is a :class:`PagedCache` (see the module docstring)."""
        cache, _, key, value, first = pending
        paged = cache.paged
        q_len, t_len = query.shape[2], key.shape[2]
        method = self.decode_method_for(layer)
        if first:  # the prompt
            pads = None
            if attention_mask is not None and self._mask_reason(attention_mask, q_len, t_len) is not None:
                pads = self._left_pads(attention_mask, q_len, t_len)
                if pads is None:
                    raise NotImplementedError(
                        f"sparseattn's PagedCache needs a causal or left-padded prompt mask; layer {layer} got "
                        f"{self._mask_reason(attention_mask, q_len, t_len)}")
            if pads is None or not any(pads):
                paged.append(layer, key, value)
                out = self._prefill(module, query, key, value, attention_mask, layer, args, kwargs)
                method.on_prefill(query, paged, layer)
                return out
            if type(method).on_prefill is not DecodeMethod.on_prefill:
                raise NotImplementedError(
                    f"decode method {method.name!r} scores the prompt (on_prefill) and does not support a left-padded "
                    "batch yet; run the sequences one at a time, or pick a method that only selects per step")
            cache.padded = True
            shift = torch.tensor(pads, device=key.device).view(-1, 1, 1, 1)
            idx = (torch.arange(t_len, device=key.device).view(1, 1, -1, 1) + shift) % t_len  # real tokens first
            idx = idx.expand(key.shape)
            paged.append(layer, torch.gather(key, 2, idx), torch.gather(value, 2, idx),
                         seq_lens=[t_len - p for p in pads])
            return self._prefill(module, query, key, value, attention_mask, layer, args, kwargs, pads=pads)
        paged.append(layer, key, value)
        if q_len <= self.decode_max_q:  # a decode step (or a few speculative queries)
            sel = method.select(query, paged, layer)
            out = sparse_decode_attention(query, paged, layer, sel, scale=self._scale(module, args, kwargs),
                                          backend=self.backend)
            self.stats.decode_calls += 1
            if self.record_density:
                self.stats.decode_reads.append(_read_share(sel, paged, layer))
            return out.transpose(1, 2).contiguous(), None
        # A longer chunk after the prompt (chunked prefill, a second turn): prefill over the whole context.
        if getattr(cache, "padded", False):
            raise NotImplementedError("a second multi-token chunk on a left-padded batch is not supported by "
                                      "sparseattn's PagedCache; generate the batch in one call")
        k_all, v_all = paged.gather(layer)
        out = self._prefill(module, query, k_all, v_all, None, layer, args, kwargs, pads=None)
        method.on_prefill(query, paged, layer)
        return out

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
        # transient: the caller executes the plan at once, before this method's next plan() call
        plan = method.plan(q, k, v, causal=True, layer_idx=layer, transient=True)
        return plan, self._density(plan)

    def _density(self, plan: BlockPlan) -> float:
        return float(plan.density()) if self.record_density else float("nan")


def _left_padding(mask: torch.Tensor, q_len: int, k_len: int) -> Optional[List[int]]:
    """Pads per sequence when ``mask`` [B, 1, q_len, k_len] is causal with a left-padding prefix, else None."""
    if mask.dim() != 4 or mask.shape[-2:] != (q_len, k_len) or mask.shape[1] != 1:
        return None
    if mask.dtype != torch.bool and bool(((mask != 0) & (mask > torch.finfo(mask.dtype).min / 2)).any()):
        return None  # a bias, not just a mask
    allowed = mask[:, 0] if mask.dtype == torch.bool else (mask[:, 0] == 0)
    pads = (k_len - allowed[:, -1].sum(-1)).view(-1, 1, 1)  # the last query sees every real key
    qpos = torch.arange(q_len, device=mask.device).view(1, -1, 1) + (k_len - q_len)
    kpos = torch.arange(k_len, device=mask.device).view(1, 1, -1)
    want = (kpos <= qpos) & (kpos >= pads)
    real_rows = qpos >= pads  # rows of padding queries may hold anything
    if not bool(((allowed == want) | ~real_rows).all()):
        return None
    return [int(p) for p in pads.view(-1).tolist()]


def _read_share(sel, paged, layer: int) -> float:
    """Share of the cached tokens a selection reads (1.0 for dense); a host sync."""
    if sel is None:
        return 1.0
    lengths = paged.layer_lengths(layer)
    picked = sel.token_mask(lengths, paged.max_length(layer)).sum()
    return float(picked) / max(1, int(lengths.sum()) * sel.heads)


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


def _generate_hook(model, ctx: SparsePatch):
    """A scoped wrapper of ``model._prepare_cache_for_generation`` that hands ``generate`` a
    :class:`PagedCache` when the caller gave no cache (restored by :func:`patch` on exit)."""
    original = model._prepare_cache_for_generation

    def prepare(generation_config, model_kwargs, *args, **kwargs):
        wants_cache = getattr(generation_config, "use_cache", True) is not False
        if (model_kwargs.get("past_key_values") is None and wants_cache
                and getattr(generation_config, "cache_implementation", None) is None):
            model_kwargs["past_key_values"] = ctx.new_cache()
        return original(generation_config, model_kwargs, *args, **kwargs)

    return prepare


@contextlib.contextmanager
def patch(model, prefill: Union[str, PrefillMethod, LayerMethods, Mapping, tuple] = "xattention",
          decode: Union[None, str, DecodeMethod, LayerMethods, Mapping, tuple] = "dense", *, backend: str = "auto",
          on_mask: str = "dense", record_density: bool = True, page_size: int = 16, decode_max_q: int = 16,
          fast_cpu: bool = True, **overrides) -> Iterator[SparsePatch]:
    """Context manager: ``model`` runs sparse prefill and sparse decode attention inside the block.

    Example::

        with sparseattn.patch(model, prefill="xattention", decode="quest", threshold=0.9) as ctx:
            out = model.generate(ids, max_new_tokens=20, do_sample=False)
        print(ctx.stats.mean_density(), ctx.stats.decode_density())

    Args:
        model: a transformers model whose attention dispatches through ``AttentionInterface``
            (Llama, Qwen2, Mistral, ...; e.g. from :func:`sparseattn.load_model`). Attention
            tensors are ``q [B, Hq, Lq, D]``, ``k, v [B, Hkv, Lk, D]``, ``Hq % Hkv == 0``.
        prefill: the prefill method for calls with ``q_len > 1``: a registered name (see
            :func:`sparseattn.list_methods`), a method object, ``(name, {options})``, a
            :class:`~sparseattn.LayerMethods` or its dict spec for a per-layer choice, e.g.
            ``{"default": "xattention", "layers": {0: "dense", 1: "dense"}}``. Resolved now: an
            unknown name raises ``ValueError`` listing the valid ones.
        decode: the decode method (``sparseattn.list_methods("decode")``), in the same forms
            (``("quest", {"token_budget": 1024})``, ``{"default": "quest", "layers": {...}}``, a
            decode method object). ``generate`` then runs on a paged cache (see the module
            docstring); ``"dense"`` reads the whole paged cache. ``None``: the model's own cache
            and dense attention for decode steps.
        backend: kernel backend for prefill and decode (``"auto"``, ``"reference"``, ``"triton"``).
        on_mask: what to do with a prefill call whose mask is neither causal nor left-padded
            causal: ``"dense"`` runs the model's dense attention for it (logged once per
            reason, counted in ``stats.fallbacks``); ``"raise"`` raises ``NotImplementedError``.
        record_density: measure each plan's density and each decode step's read share for
            ``stats`` (a small cost per call, a host sync per decode step).
        page_size: tokens per page of the paged caches this block makes.
        decode_max_q: calls with at most this many queries after the prompt are decode steps
            (speculative verification reads through the decode kernel); longer ones are prefill.
        fast_cpu: on the CPU with ``backend="auto"``, run each prefill plan as SDPA with the plan's
            exact element mask (same result up to rounding, 3-15x faster than the reference
            kernel); ``False`` runs the reference kernel (the engine's oracle).
        overrides: hyperparameters of a single prefill method, passed to
            :func:`sparseattn.get_method` (e.g. ``threshold=0.9``).

    Yields:
        a :class:`SparsePatch`; ``ctx.stats`` holds the per-layer achieved density;
        ``ctx.new_cache()`` makes a paged cache for a manual decoding loop.

    On exit (also when the block raises) the model's attention implementation and its
    ``generate`` cache set-up are restored and the temporary registry entries are removed;
    nothing is patched at import time. Beam search and ``num_return_sequences > 1`` are not
    supported with a decode method (the paged cache refuses to reorder); greedy and sampling are.
    """
    if on_mask not in MASK_POLICIES:
        raise ValueError(f"on_mask must be one of {list(MASK_POLICIES)}, got {on_mask!r}")
    if backend not in ("auto", "reference", "triton"):
        raise ValueError(f"backend must be one of ['auto', 'reference', 'triton'], got {backend!r}")
    for name, value in (("page_size", page_size), ("decode_max_q", decode_max_q)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not hasattr(model, "config"):
        raise ValueError(f"patch() needs a transformers model (with .config), got {type(model).__name__}")
    n_layers = getattr(model.config, "num_hidden_layers", None)
    layers = _resolve_prefill(prefill, overrides, n_layers)
    decode_layers = _resolve_decode(decode, n_layers)
    ctx = SparsePatch(model, layers, decode=decode_layers, backend=backend, on_mask=on_mask,
                      record_density=record_density, page_size=page_size, decode_max_q=decode_max_q,
                      fast_cpu=fast_cpu)
    base_name, ctx._base_fn = base_attention(model)
    hooked = decode_layers is not None and hasattr(model, "_prepare_cache_for_generation")
    had_own = "_prepare_cache_for_generation" in vars(model)
    own = vars(model).get("_prepare_cache_for_generation")
    with temporary_attention(model, ctx.attention, prefix="sparseattn_patch", mask_of=base_name):
        if hooked:
            model._prepare_cache_for_generation = _generate_hook(model, ctx)
        ctx.active = True
        try:
            yield ctx
        finally:
            ctx.active = False
            ctx._pending = None
            if hooked:
                if had_own:
                    model._prepare_cache_for_generation = own
                else:
                    del model._prepare_cache_for_generation


__all__ = ["patch", "SparsePatch", "PatchStats", "LayerCall"]
