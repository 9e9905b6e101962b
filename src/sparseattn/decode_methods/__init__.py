"""Decode-time selection methods: which pages/tokens each step reads from a PagedKVCache.

``get_decode_method(name, **overrides)`` gives a method with the official defaults;
``method.select(q, cache, layer)`` returns a :class:`~sparseattn.decode_api.DecodeSelection`
(or ``None`` = dense) for :func:`~sparseattn.decode_api.sparse_decode_attention`.
"""

from __future__ import annotations

from typing import Dict, List, Union

from .base import DecodeMethod, check_overrides
from .dense import DenseDecode
from .quest import Quest
from .streaming import StreamingDecode

DECODE_METHODS: Dict[str, type] = {cls.name: cls for cls in (DenseDecode, StreamingDecode, Quest)}


def list_decode_methods() -> List[str]:
    return list(DECODE_METHODS)


def get_decode_method(name: Union[str, DecodeMethod], **overrides) -> DecodeMethod:
    """A decode method with the official defaults, changed by ``overrides`` (checked)."""
    if isinstance(name, DecodeMethod):
        return name.replace(**overrides) if overrides else name
    if name not in DECODE_METHODS:
        raise ValueError(f"unknown decode method {name!r}; available: {list(DECODE_METHODS)}")
    cls = DECODE_METHODS[name]
    check_overrides(cls, overrides)
    return cls(**overrides)


__all__ = ["DECODE_METHODS", "DecodeMethod", "DenseDecode", "Quest", "StreamingDecode", "get_decode_method",
           "list_decode_methods"]
