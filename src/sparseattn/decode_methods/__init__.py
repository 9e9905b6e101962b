"""Decode-time selection methods: which pages/tokens each step reads from a PagedKVCache.

``sparseattn.get_method(name, kind="decode", **overrides)`` gives a method with the official
defaults; ``method.select(q, cache, layer)`` returns a
:class:`~sparseattn.decode_api.DecodeSelection` (or ``None`` = dense) for
:func:`~sparseattn.decode_api.sparse_decode_attention`. ``sparseattn.list_methods("decode")``
lists them. Each method file registers its class with ``@register`` (kind ``"decode"``).
"""

from __future__ import annotations

from typing import List, Union

from ..methods.registry import get_method, list_methods
from .base import DecodeMethod, check_overrides

# One import per method; the order is list_methods("decode")'s order.
from .dense import DenseDecode  # noqa: E402
from .streaming import StreamingDecode  # noqa: E402
from .quest import Quest  # noqa: E402
from .block_topk import BlockTopKDecode  # noqa: E402
from .tokenselect import TokenSelect  # noqa: E402
from .tidaldecode import TidalDecode  # noqa: E402
from .double_sparsity import DoubleSparsity  # noqa: E402
from .recycled import RecycledAttention  # noqa: E402
from .delta import Delta  # noqa: E402
from .duo import DuoDecode  # noqa: E402
from .h2o import H2O  # noqa: E402
from .snapkv import SnapKV  # noqa: E402
from .tova import TOVA  # noqa: E402
from .pyramidkv import PyramidKV  # noqa: E402


def list_decode_methods() -> List[str]:
    """``sparseattn.list_methods("decode")``."""
    return list_methods("decode")


def get_decode_method(name: Union[str, DecodeMethod], **overrides) -> DecodeMethod:
    """``sparseattn.get_method(name, kind="decode", **overrides)``."""
    return get_method(name, kind="decode", **overrides)


__all__ = ["DecodeMethod", "check_overrides", "get_decode_method", "list_decode_methods",
           "DenseDecode", "StreamingDecode", "Quest", "BlockTopKDecode", "TokenSelect", "TidalDecode", "DoubleSparsity",
           "RecycledAttention", "Delta", "DuoDecode", "H2O", "SnapKV", "TOVA", "PyramidKV"]
