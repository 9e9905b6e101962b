"""Dense decode: every cached token (the baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..methods.registry import register
from .base import DecodeMethod


@register
@dataclass(kw_only=True)
class DenseDecode(DecodeMethod):
    """Reads the whole cache: ``select`` returns ``None`` (dense on the same kernel). No options."""

    name: ClassVar[str] = "dense"

    def _select(self, q, cache, layer):
        return None
