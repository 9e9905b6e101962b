"""StreamingLLM / MInference "A-shape": attention sinks plus a sliding window, exact token edges."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..plan import BlockPlan
from .base import PrefillMethod, check_int
from .registry import register


@register
@dataclass(kw_only=True)
class Streaming(PrefillMethod):
    """A-shape: query at position ``p`` keeps key ``j <= p`` iff ``j < sink`` or ``p - j < window``.

    Exact token edges through the plan's band fields (``BlockPlan.from_band``); the blocks are
    the ones the band touches. No estimation; the plan is shared by the batch and all heads
    (GQA policy: shared). Causal only.

    Defaults (source: microsoft/MInference ``minference/models_patch.py`` and
    ``minference/ops/streaming_kernel.py``, the A-shape used as a *prefill* mask):
    ``sink=128`` (``n_init``), ``window=3968`` (``n_local``; 4096 tokens in all).
    StreamingLLM's own decode setting (mit-han-lab/streaming-llm
    ``examples/run_streaming_llama.py``: ``start_size=4, recent_size=2000``) is
    ``get_method("streaming", sink=4, window=2000)``. ``window`` counts the query itself, so
    ``window >= 1``.
    """

    name: ClassVar[str] = "streaming"
    static: ClassVar[bool] = True

    sink: int = 128
    window: int = 3968

    def __post_init__(self):
        super().__post_init__()
        check_int("sink", self.sink, minimum=0)
        check_int("window", self.window, minimum=1)

    def _plan(self, q, k, v, *, causal, layer_idx):
        self._require_causal(causal)
        return BlockPlan.from_band(1, 1, sink=self.sink, window=self.window, block_q=self.block_size,
                                   block_k=self.block_size, q_len=q.shape[2], k_len=k.shape[2], device=q.device)
