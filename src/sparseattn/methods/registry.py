"""Method registry, per-layer method maps and the one-call ``sparse_attention``.

* :func:`register` - class decorator, one line per method file.
* :func:`list_methods` / :func:`get_method` - the public look-up.
* :class:`LayerMethods` - which method each layer of a model uses (consumed by the HF
  integration).
* :func:`sparse_attention` - plan + :func:`sparseattn.block_sparse_attention` in one call.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Union

import torch

from .base import PrefillMethod, check_overrides

KINDS = ("prefill", "decode")

_REGISTRY: Dict[str, Dict[str, type]] = {kind: {} for kind in KINDS}


def register(cls: type) -> type:
    """Class decorator: make ``cls`` available as ``get_method(cls.name, kind=cls.kind)``.

    Names are unique within a kind; a prefill and a decode method may share one (``"dense"``,
    ``"streaming"``, ``"duo"``, ``"block_topk"`` exist on both sides).
    """
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute 'name' to be registered")
    if cls.kind not in _REGISTRY:
        raise ValueError(f"{cls.__name__}.kind must be one of {list(KINDS)}, got {cls.kind!r}")
    table = _REGISTRY[cls.kind]
    if cls.name in table and table[cls.name] is not cls:
        raise ValueError(f"a {cls.kind} method named {cls.name!r} is already registered ({table[cls.name].__name__})")
    table[cls.name] = cls
    return cls


def _check_kind(kind: str) -> None:
    if kind not in _REGISTRY:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    if kind == "decode":
        from .. import decode_methods  # noqa: F401  (registers the decode methods on first use)


def list_methods(kind: str = "prefill") -> List[str]:
    """Names of the registered methods of ``kind`` ("prefill" or "decode"), in registration order."""
    _check_kind(kind)
    return list(_REGISTRY[kind])


def _lookup(name: str, kind: str) -> type:
    table = _REGISTRY[kind]
    if name in table:
        return table[name]
    others = [k for k, t in _REGISTRY.items() if k != kind and name in t]
    hint = f" ({name!r} is a {others[0]} method: pass kind={others[0]!r})" if others else ""
    raise ValueError(f"unknown {kind} method {name!r}{hint}; available: {list(table)}")


def get_method(name, kind: str = "prefill", **overrides):
    """A method object with the official defaults, changed by ``overrides``.

    Args:
        name: a registered name (see :func:`list_methods`) or a method object (returned as a
            checked copy with the overrides applied).
        kind: ``"prefill"`` (a :class:`~sparseattn.methods.base.PrefillMethod` with ``.plan()``)
            or ``"decode"`` (a :class:`~sparseattn.decode_methods.DecodeMethod` with ``.select()``).
        overrides: hyperparameters, e.g. ``get_method("xattention", threshold=0.95, stride=16)``.
            Unknown names raise ``ValueError`` listing the valid ones; bad values raise
            ``ValueError`` from the method's ``__post_init__``.
    """
    _check_kind(kind)
    if not isinstance(name, str) and hasattr(name, "replace") and getattr(type(name), "kind", None) in KINDS:
        if type(name).kind != kind:
            raise ValueError(f"{type(name).__name__} is a {type(name).kind} method, but kind={kind!r} was asked for")
        return name.replace(**overrides) if overrides else name
    if not isinstance(name, str):
        raise ValueError(f"method must be a name (str) or a method object, got {type(name).__name__}")
    cls = _lookup(name, kind)
    check_overrides(cls, overrides)
    return cls(**overrides)


MethodSpec = Union[str, PrefillMethod, Mapping[str, Any], tuple]


def _resolve(spec: MethodSpec, where: str, kind: str = "prefill"):
    """A method from a name, an object, ``(name, {overrides})`` or ``{"name": ..., **overrides}``."""
    if isinstance(spec, str) or getattr(type(spec), "kind", None) in KINDS:
        return get_method(spec, kind=kind)
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], Mapping):
        return get_method(spec[0], kind=kind, **dict(spec[1]))
    if isinstance(spec, Mapping) and "name" in spec:
        options = {key: value for key, value in spec.items() if key != "name"}
        return get_method(spec["name"], kind=kind, **options)
    raise ValueError(f"{where}: expected a method name, a method object, (name, {{options}}) or "
                     f"{{'name': ..., **options}}, got {spec!r}")


class LayerMethods:
    """Which prefill (or, with ``kind="decode"``, decode) method each layer uses.

    ``spec`` is one of:

    * a method (name, object, ``(name, {options})`` or ``{"name": ..., **options}``): every layer;
    * a mapping ``{"default": <method>, "layers": {layer_idx: <method>, ...}}``; layers missing
      from ``"layers"`` use ``"default"`` (itself defaulting to ``"dense"``). Layer keys may be
      ints or decimal strings (as JSON writes them).

    Example: dense attention in the first two layers, XAttention elsewhere::

        LayerMethods({"default": ("xattention", {"threshold": 0.9}),
                      "layers": {0: "dense", 1: "dense"}})

    Every entry is resolved (and checked) when the object is built, so a typo fails early.
    ``for_layer(i)`` returns the method object (shared across calls, so a caller may cache plans
    per method object).
    """

    def __init__(self, spec: Union[MethodSpec, "LayerMethods"] = "dense", kind: str = "prefill"):
        _check_kind(kind)
        self.kind = kind
        if isinstance(spec, LayerMethods):
            if spec.kind != kind:
                raise ValueError(f"a {spec.kind} LayerMethods cannot serve as {kind} methods")
            self.default, self.layers = spec.default, dict(spec.layers)
            return
        if isinstance(spec, Mapping) and "name" not in spec:
            unknown = set(spec) - {"default", "layers"}
            if unknown:
                raise ValueError(f"layer spec keys must be 'default' and 'layers', got unknown {sorted(unknown)}")
            self.default = _resolve(spec.get("default", "dense"), "default", kind)
            layers = spec.get("layers", {}) or {}
            if not isinstance(layers, Mapping):
                raise ValueError(f"'layers' must map layer index -> method, got {type(layers).__name__}")
            self.layers = {}
            for key, value in layers.items():
                idx = int(key) if isinstance(key, str) and key.strip().isdigit() else key
                if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
                    raise ValueError(f"layer keys must be non-negative ints, got {key!r}")
                self.layers[idx] = _resolve(value, f"layers[{idx}]", kind)
        else:
            self.default = _resolve(spec, "method", kind)
            self.layers = {}

    def for_layer(self, layer_idx: int) -> PrefillMethod:
        """The method of layer ``layer_idx``."""
        if not isinstance(layer_idx, int) or layer_idx < 0:
            raise ValueError(f"layer_idx must be a non-negative int, got {layer_idx!r}")
        return self.layers.get(layer_idx, self.default)

    __getitem__ = for_layer

    def __repr__(self) -> str:
        layers = ", ".join(f"{i}: {m.name}" for i, m in sorted(self.layers.items()))
        kind = "" if self.kind == "prefill" else ", kind='decode'"
        return f"LayerMethods(default={self.default.name}, layers={{{layers}}}{kind})"


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                     method: Union[str, PrefillMethod] = "xattention", causal: bool = True,
                     backend: str = "auto", layer_idx: Optional[int] = None, scale: Optional[float] = None,
                     return_lse: bool = False, **overrides):
    """Sparse attention in one call: ``method.plan(q, k, v)`` then ``block_sparse_attention``.

    Args:
        q: ``[B, Hq, Lq, D]`` queries; ``k, v``: ``[B, Hkv, Lk, D]``, ``Hq % Hkv == 0``.
        method: a registered name or a method object; ``overrides`` change its hyperparameters.
        causal: bottom-right causal alignment (query ``i`` sees keys ``j <= Lk - Lq + i``).
        backend: as in :func:`sparseattn.block_sparse_attention` ("auto", "reference", "triton").
        layer_idx: passed to ``plan()`` for per-(layer, head) tables.
        scale, return_lse: as in :func:`sparseattn.block_sparse_attention`.

    Returns:
        ``out [B, Hq, Lq, D]`` (and ``lse [B, Hq, Lq]`` when ``return_lse``).
    """
    from ..api import block_sparse_attention  # lazy: api may re-export this module's names

    m = get_method(method, **overrides)
    plan = m.plan(q, k, v, causal=causal, layer_idx=layer_idx, transient=True)  # used at once: no copy
    return block_sparse_attention(q, k, v, plan, causal=causal, scale=scale, backend=backend, return_lse=return_lse)
