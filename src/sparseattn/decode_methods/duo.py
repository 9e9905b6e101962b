"""DuoAttention at decode time: retrieval KV heads read everything, streaming KV heads sink + recent."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from ..decode_api import DecodeSelection
from ..methods.base import PerHead, check_float, check_int, check_per_head, head_values, use_triton_estimator
from ..methods.duo import _check_flag
from ..methods.registry import register
from .base import DecodeMethod, exact_probs
from .streaming import StreamingDecode


def _check_gate(name, x):
    """One trained gate value: a finite number, clipped to [0, 1] as ``load_attn_pattern`` does."""
    return min(1.0, max(0.0, check_float(name, x)))


def binarize_gates(gates, *, threshold: float = 0.5, sparsity: Optional[float] = None):
    """DuoAttention gate values (a per-(layer, KV head) table or one row) -> the same shape of bools
    (True = retrieval head).

    ``sparsity=None``: ``gate > threshold`` (``duo_attn/patch/static_kv_cache.py``:
    ``torch.tensor(layer_full_attention_heads) > 0.5``). Otherwise the rule of
    ``duo_attn/utils.py: sparsify_attention_heads``: ``gate >= quantile(all gates, sparsity)``,
    every head streaming for ``sparsity >= 1`` and every head retrieval for ``sparsity <= 0``
    (without the official 1e-6 random noise, so gates tied at the quantile all become retrieval).
    """
    table = isinstance(gates[0], tuple)
    flat = [g for row in gates for g in row] if table else list(gates)
    if sparsity is None:
        keep = [g > threshold for g in flat]
    elif sparsity >= 1:
        keep = [False] * len(flat)
    elif sparsity <= 0:
        keep = [True] * len(flat)
    else:
        cut = float(torch.quantile(torch.tensor(flat, dtype=torch.float64), sparsity))  # config time, host
        keep = [g >= cut for g in flat]
    if not table:
        return tuple(keep)
    width = len(gates[0])
    return tuple(tuple(keep[i * width:(i + 1) * width]) for i in range(len(gates)))


@register
@dataclass(kw_only=True)
class DuoDecode(DecodeMethod):
    """DuoAttention (Xiao et al., ICLR 2025, arXiv 2410.10819; code mit-han-lab/duo-attention), decode side.

    Each (layer, KV head) is a **retrieval** head, which reads the whole cache, or a **streaming**
    head, which reads the first ``sink`` tokens, the ``recent`` tokens before the step and the
    step's own new token(s): the official ``DuoAttentionStaticKVCache.put`` appends the new token
    to the ``sink + recent`` streaming buffer before attention and ``compress`` trims it back after
    (``duo_attn/patch/static_kv_cache.py``). Nothing is scored per step: the selection is a static
    rule per head (this engine keeps the full cache and *selects*; it does not evict).

    Assignment, one of:

    * ``retrieval_heads``: the prefill ``duo`` method's format, parsed by the same function
      (:func:`sparseattn.methods.base.check_per_head` with ``sparseattn.methods.duo._check_flag``):
      one bool per KV head for every layer, or a per-(layer, KV head) table of bools (DuoAttention's
      ``full_attention_heads.tsv`` binarised). A per-query-head list is refused (the gates are per
      KV head).
    * ``gates``: the raw trained gate values (the TSV's floats, rows = layers, columns = KV heads,
      or one row for every layer), binarised at config time by :func:`binarize_gates` with
      ``gate_threshold`` (default ``0.5``, ``> 0.5`` in ``static_kv_cache.py``) or, when
      ``gate_sparsity`` is given, with ``sparsify_attention_heads``'s quantile rule
      (``duo_attn/utils.py``; ``scripts/run_longbench.sh`` evaluates sparsity 0.5 and 0.75).
    * neither (**default rule, a library addition, not DuoAttention's trained gates**): an online
      proxy, as the prefill ``duo`` method does. The first time a layer is seen (``on_prefill`` with
      the prompt's last ``probe_q`` queries, or else the first decode step's queries) each sequence's
      KV heads are ranked by the attention mass their group's query heads put *outside* the
      streaming pattern (exact softmax over the cache); the ``ceil((1 - sparsity) * Hkv)`` heads
      with the most outside mass (ties: lower head index) are retrieval heads. The assignment is
      then frozen per (cache, layer, sequence) in :meth:`state`, as DuoAttention's is static.

    GQA policy: per KV head (the gates are per KV head; the G query heads of a group share the
    head's type). The selection has ``H = Hkv``: a retrieval head gets every page, a streaming head
    gets whole pages for its window plus single tokens for the sink and the window's leading
    partial page (built by :class:`~sparseattn.decode_methods.streaming.StreamingDecode` with
    ``window = recent + 1``). No host sync; a frozen assignment costs one small device tensor.

    Defaults (mit-han-lab/duo-attention): ``sink=64``, ``recent=256`` (deployment/eval sizes,
    ``scripts/longbench.sh``; spec table 5.3; the prefill ``duo`` method uses the same); the
    training patterns were learnt with ``sink=128, recent=256``
    (``attn_patterns/*/config.json``): pass those with a shipped table. ``sparsity=0.5``: the
    paper's 50 % retrieval heads for GQA models (spec 5.3, marked unverified there; the prefill
    ``duo`` default). ``probe_q=64``: this library's choice (the prefill ``duo`` method's).
    """

    name: ClassVar[str] = "duo"

    sink: int = 64
    recent: int = 256
    retrieval_heads: Optional[PerHead] = None
    gates: Optional[PerHead] = None
    gate_threshold: float = 0.5
    gate_sparsity: Optional[float] = None
    sparsity: float = 0.5
    probe_q: int = 64

    def __post_init__(self):
        super().__post_init__()
        check_int("sink", self.sink, minimum=0)
        check_int("recent", self.recent, minimum=0)
        check_float("gate_threshold", self.gate_threshold, minimum=0.0, maximum=1.0)
        if self.gate_sparsity is not None:
            check_float("gate_sparsity", self.gate_sparsity, minimum=0.0, maximum=1.0)
        check_float("sparsity", self.sparsity, minimum=0.0, maximum=1.0)
        check_int("probe_q", self.probe_q, minimum=1)
        if self.retrieval_heads is not None and self.gates is not None:
            raise ValueError("give retrieval_heads (bools) or gates (trained gate values), not both")
        assignment = None
        if self.retrieval_heads is not None:
            self.retrieval_heads = check_per_head("retrieval_heads", self.retrieval_heads, _check_flag)
            if isinstance(self.retrieval_heads, bool):
                raise ValueError("retrieval_heads must give one bool per KV head (or a per-layer table of them); "
                                 "for all-dense use the 'dense' decode method, for all-streaming 'streaming'")
            assignment = self.retrieval_heads
        elif self.gates is not None:
            self.gates = check_per_head("gates", self.gates, _check_gate)
            if not isinstance(self.gates, tuple):
                raise ValueError("gates must give one value per KV head (or a per-layer table of them), got a scalar")
            assignment = binarize_gates(self.gates, threshold=self.gate_threshold, sparsity=self.gate_sparsity)
        self._assignment = assignment
        self._streaming = StreamingDecode(sink=self.sink, window=self.recent + 1)

    # ------------------------------------------------------------------ assignment
    def static_retrieval(self, layer: int, *, q_heads: int, kv_heads: int, device) -> Optional[torch.Tensor]:
        """bool ``[Hkv]`` from ``retrieval_heads`` / ``gates`` for ``layer`` (None without them)."""
        if self._assignment is None:
            return None
        return head_values(self._assignment, name="retrieval_heads", heads=kv_heads, q_heads=q_heads,
                           kv_heads=kv_heads, layer_idx=layer, device=device, dtype=torch.bool)

    def outside_mass(self, q: torch.Tensor, cache, layer: int) -> torch.Tensor:
        """float ``[B, Hkv]``: attention mass of the last ``probe_q`` of the queries ``q`` (the newest
        tokens of each sequence) outside the streaming pattern, averaged over those queries and
        summed over each KV group. Exact softmax over the cache (ragged lengths, causal)."""
        Lq = q.shape[2]
        P = min(self.probe_q, Lq)
        probs = exact_probs(q[:, :, Lq - P:], cache, layer)  # [B, Hkv, G, P, N], 0 where not visible
        N = probs.shape[-1]
        lengths = cache.layer_lengths(layer).long().view(-1, 1, 1)
        qpos = lengths - P + torch.arange(P, device=q.device).view(1, -1, 1)  # [B, P, 1]
        j = torch.arange(N, device=q.device).view(1, 1, -1)
        outside = (j >= self.sink) & (qpos - j > self.recent)  # [B, P, N]
        return (probs * outside[:, None, None].to(probs.dtype)).sum(-1).mean(-1).sum(-1)

    def online_retrieval(self, q: torch.Tensor, cache, layer: int) -> torch.Tensor:
        """bool ``[B, Hkv]``: the default rule (see the class docstring)."""
        Hkv = cache.num_kv_heads
        n_ret = math.ceil((1.0 - self.sparsity) * Hkv - 1e-9)
        order = torch.sort(self.outside_mass(q, cache, layer), dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(Hkv, device=q.device).expand_as(order))
        return rank < n_ret

    def retrieval(self, q: torch.Tensor, cache, layer: int) -> torch.Tensor:
        """bool ``[B or 1, Hkv]``: this layer's assignment, computed once per cache and frozen."""
        st = self.state(cache, layer)
        if "retrieval" not in st:
            fixed = self.static_retrieval(layer, q_heads=q.shape[1], kv_heads=cache.num_kv_heads, device=q.device)
            st["retrieval"] = fixed.view(1, -1) if fixed is not None else self.online_retrieval(q, cache, layer)
        return st["retrieval"]

    def on_prefill(self, q, cache, layer):
        st = self.state(cache, layer)
        if self._assignment is None and "retrieval" not in st and layer not in self.dense_layers and q.shape[0] \
                and q.shape[2]:
            st["retrieval"] = self.online_retrieval(q, cache, layer)

    # ------------------------------------------------------------------ selection
    def _select(self, q, cache, layer):
        retr = self.retrieval(q, cache, layer)  # [B|1, Hkv]
        B, Hkv, dev = q.shape[0], cache.num_kv_heads, q.device
        if use_triton_estimator(q):  # one launch instead of ~10 small kernels and a page-list copy
            from ..kernels.streaming_select_triton import duo_select_triton

            pc, pages, tc, toks = duo_select_triton(
                cache.layer_lengths(layer), retr, num_kv_heads=Hkv, q_len=q.shape[2], sink=self.sink,
                window=self.recent + 1, page_size=cache.page_size, max_pages=cache.max_pages)
            sel = DecodeSelection(pc, pages, cache.page_size)
            return sel if toks.shape[-1] == 0 else sel.with_tokens(toks, tc)
        retr = retr.expand(B, Hkv)
        maxP = cache.max_pages
        stream = self._streaming._select(q, cache, layer)  # H = 1, pages width <= maxP
        n_pages = cache.num_pages(layer).view(B, 1)
        full = torch.arange(maxP, dtype=torch.int32, device=dev).view(1, 1, -1).expand(B, Hkv, maxP)
        sp = torch.nn.functional.pad(stream.pages, (0, maxP - stream.max_pages)).expand(B, Hkv, maxP)
        pages = torch.where(retr.unsqueeze(-1), full, sp)
        page_counts = torch.where(retr, n_pages, stream.page_counts.expand(B, Hkv))
        sel = DecodeSelection(page_counts.to(torch.int32), pages.contiguous(), cache.page_size)
        if stream.tokens is None:
            return sel
        T = stream.max_tokens
        tokens = torch.where(retr.unsqueeze(-1), torch.zeros_like(stream.tokens), stream.tokens).expand(B, Hkv, T)
        token_counts = torch.where(retr, torch.zeros_like(stream.token_counts), stream.token_counts)
        return sel.with_tokens(tokens, token_counts.expand(B, Hkv))
