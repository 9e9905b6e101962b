"""Scoped use of transformers' attention registry (shared by ``capture`` and ``hf``).

A temporary attention function is registered under a fresh private name with
``transformers.AttentionInterface.register``; the model builds its attention mask by
implementation name, so the mask builder of the implementation it was using is registered
under the same name with ``AttentionMaskInterface``. The model is switched to the new name for
the duration of a ``with`` block and, in ``finally``, switched back and both registry entries are
removed. Nothing is patched at import time.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Callable, Iterator, Optional, Tuple

_ids = itertools.count()


def hf_interfaces():
    """``(AttentionInterface, ALL_ATTENTION_FUNCTIONS, AttentionMaskInterface, ALL_MASK_ATTENTION_FUNCTIONS)``.

    The last two are ``None`` on transformers versions that do not dispatch masks by name.
    """
    try:
        from transformers import AttentionInterface
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the Hugging Face integration needs transformers; install with: pip install transformers"
                          ) from exc
    try:
        from transformers import AttentionMaskInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    except ImportError:  # older transformers: masks are not dispatched by name
        AttentionMaskInterface = ALL_MASK_ATTENTION_FUNCTIONS = None
    return AttentionInterface, ALL_ATTENTION_FUNCTIONS, AttentionMaskInterface, ALL_MASK_ATTENTION_FUNCTIONS


def current_impl(model) -> Optional[str]:
    """The attention implementation name the model uses now (``model.config._attn_implementation``)."""
    return getattr(model.config, "_attn_implementation", None)


def set_impl(model, name: Optional[str]) -> None:
    """Switch the model (and its sub-configs) to the attention implementation ``name``."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
        if current_impl(model) == name:
            return
    model.config._attn_implementation = name  # older API, or a model that refused the switch


def base_attention(model) -> Tuple[str, Callable]:
    """``(name, fn)`` of the registered attention function the model uses now (``sdpa`` when its
    implementation is not in the registry, e.g. ``eager``, which lives in the modeling file)."""
    _, ALL_ATTENTION_FUNCTIONS, _, _ = hf_interfaces()
    previous = current_impl(model)
    name = previous if previous in ALL_ATTENTION_FUNCTIONS else "sdpa"
    return name, ALL_ATTENTION_FUNCTIONS[name]


def registered_names(prefix: str = "sparseattn_") -> set:
    """Names starting with ``prefix`` in the attention and mask registries (tests use it to check
    that a block left nothing behind)."""
    AttentionInterface, _, AttentionMaskInterface, _ = hf_interfaces()
    names = {k for k in AttentionInterface._global_mapping if k.startswith(prefix)}
    if AttentionMaskInterface is not None:
        names |= {k for k in AttentionMaskInterface._global_mapping if k.startswith(prefix)}
    return names


@contextlib.contextmanager
def temporary_attention(model, fn: Callable, *, prefix: str, mask_of: Optional[str] = None) -> Iterator[str]:
    """Context manager: ``model`` runs ``fn`` as its attention function while inside.

    Args:
        model: a transformers model whose attention dispatches through ``AttentionInterface``.
        fn: ``fn(module, query, key, value, attention_mask, *args, **kwargs) -> (out [B, L, H, D], weights)``,
            the attention-function signature of transformers.
        prefix: start of the private registry name (a counter makes it unique).
        mask_of: the implementation whose mask builder the model should use (default: the one
            :func:`base_attention` picks), so ``fn`` receives the mask that implementation expects.

    Yields the registered name. On exit (also on an exception) the previous implementation is
    restored and both registry entries are removed.
    """
    AttentionInterface, _, AttentionMaskInterface, ALL_MASK = hf_interfaces()
    previous = current_impl(model)
    if mask_of is None:
        mask_of = base_attention(model)[0]
    name = f"{prefix}_{next(_ids)}"
    AttentionInterface.register(name, fn)
    mask_registered = False
    try:
        if AttentionMaskInterface is not None and mask_of in ALL_MASK:
            AttentionMaskInterface.register(name, ALL_MASK[mask_of])
            mask_registered = True
        set_impl(model, name)
        yield name
    finally:
        try:
            set_impl(model, previous)
        finally:
            AttentionInterface._global_mapping.pop(name, None)
            if mask_registered:
                AttentionMaskInterface._global_mapping.pop(name, None)


__all__ = ["hf_interfaces", "current_impl", "set_impl", "base_attention", "registered_names", "temporary_attention"]
