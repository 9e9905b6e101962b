"""Decode-method base class: a config dataclass whose ``select()`` returns a DecodeSelection.

A decode method looks at the step's queries and the cache (pages, page metadata, lengths) and
says which pages/tokens each (batch, KV head) reads; :func:`sparseattn.decode_api.sparse_decode_attention`
executes it. ``None`` means dense. Everything runs on the cache's device without host syncs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Optional, Tuple

import torch

from ..cache import PagedKVCache
from ..decode_api import DecodeSelection, check_decode_inputs
from ..methods.base import check_int


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
    A subclass sets ``name``, adds fields with the official defaults (citing sources), extends
    ``__post_init__`` and implements ``_select`` (inputs validated, ``B, Lq > 0``, layer not dense).
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "decode"

    dense_layers: Tuple[int, ...] = ()

    def __post_init__(self):
        self.dense_layers = check_layers("dense_layers", self.dense_layers)

    def select(self, q: torch.Tensor, cache: PagedKVCache, layer: int) -> Optional[DecodeSelection]:
        """The selection for ``q [B, Hq, Lq, D]`` (the newest ``Lq`` tokens, already appended) at ``layer``."""
        B, Hq, Lq, D = check_decode_inputs(q, cache, layer, None, None)
        if layer in self.dense_layers or B == 0 or Lq == 0:
            return None
        return self._select(q, cache, layer)

    def _select(self, q: torch.Tensor, cache: PagedKVCache, layer: int) -> Optional[DecodeSelection]:
        raise NotImplementedError

    def config(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def replace(self, **overrides) -> "DecodeMethod":
        """A checked copy with some fields changed (unknown names raise ``ValueError``)."""
        check_overrides(type(self), overrides)
        return dataclasses.replace(self, **overrides)


def check_overrides(cls, overrides: dict) -> None:
    valid = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [key for key in overrides if key not in valid]
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for decode method {cls.name!r}; valid options: {valid}")
