"""Recycled Attention (RefreshKV): a full step every ``stride`` steps picks the tokens the steps in
between read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from ..decode_api import DecodeSelection
from ..methods.base import check_choice, check_int, compact_rows, rank_mask, use_triton_estimator
from ..methods.registry import register
from .base import DecodeMethod, exact_probs, topk_token_selection
from .tidaldecode import group_scores

GQA_POLICIES = ("group_max", "group_sum", "first_head")
PHASES = ("full", "recycle")


@register
@dataclass(kw_only=True)
class RecycledAttention(DecodeMethod):
    """Recycled Attention (Xu et al., arXiv 2411.05787, v2 "RefreshKV"), spec section 7.

    Per layer (except ``dense_layers``), with a step counter ``c`` kept as a host int in the
    layer's state (``self.state(cache, layer)["step"]``), wrapping every ``stride`` (S) steps:

    * **Full step** (``c == 0``, or no recycled set yet): attention is dense (``select`` returns
      ``None``); the exact attention probabilities of the step's queries over every cached token
      (:func:`exact_probs`) pick the top ``top_k`` (K) tokens per KV head among the tokens
      before the step's own new ones. This scoring reads **all keys** of the layer: a full
      step costs a dense step plus a second pass over K (a fused engine would take the
      probabilities from the dense kernel, spec E5b). The set and the position where the step's
      new tokens start (``base``) are stored on the cache's device.
    * **Recycle step** (``c = 1 .. S-1``): reads only the recycled tokens plus every token from
      ``base`` on (the tokens generated since the full step, this step's included), so the
      newest tokens are always read: ``min(K, base) + (len - base)`` tokens per KV head.

    The prompt counts as a full step: :meth:`on_prefill` picks the recycled set from the last
    prompt query's attention (the last column of ``q``: each sequence's last prompt token, as
    with left padding; that token itself is then read as the first "generated since" token)
    and sets ``c = 1``, as the paper initialises the recycled cache from the prefill's last
    token (spec 7.1 step 1). Without it the first decode step is a full step. A step that runs
    dense through ``dense_layers``/``dense_below`` (:meth:`on_dense_step`) drops the layer's state,
    so the next selected step is a full step.

    Deviations, stated: the paper keeps the recycled cache at a fixed size K, appending each new
    token and dropping its lowest-attention token (spec 7.1 step 2); here nothing is dropped
    between full steps (at most ``(S-1)`` steps' tokens are added; the task asks for "the tokens
    generated since"). The dynamic schedule variant (query-similarity check every QC=5 steps,
    threshold 0.8) is not implemented. Selection never evicts anything from the cache
    (the full cache stays, as in the paper).

    GQA (``gqa_policy``): one token list per KV head serves the group. The official code
    reportedly uses the group's first query head (spec 7.4, from an OpenReview answer [3p]):
    ``"first_head"``; the spec prefers aggregating probabilities: ``"group_max"`` (default; the
    max over the group's query heads and the ``Lq`` new queries) or ``"group_sum"``. Ties go to
    the lower position.

    Defaults (paper via the third-party note cited in spec 7.3; the repository
    ``carriex/recycled-attention`` is not in the store): ``top_k=4096``, ``stride=50`` (RULER
    32K/64K main setting; LM 16K uses K 2048, S 10; PG19 100K uses K 2048, S 256).
    ``dense_layers=()``: the method applies to every layer.

    CUDA graphs, per phase: ``graph_safe`` stays ``False`` (which phase a ``select`` runs is a
    host decision, so no single captured step serves both), but each phase on its own is
    capturable and replays correctly:

    * the full step writes the recycled set, its counts and ``base`` **in place** into buffers
      made at the layer's first refresh (reallocated only when their shape changes: another
      batch size, or a context shorter than ``top_k`` that grew), so a replayed full step
      refreshes what a captured recycle step reads;
    * the recycle step's selection has a fixed shape ``[B, Hkv, Kw + W]``: the stored set's
      width ``Kw`` plus the "generated since ``base``" part rounded up to ``W``
      (:meth:`recycle_width`, a multiple of ``64 * ceil(stride / 64)``: with one new token a step,
      the full step and the recycle steps of a cycle add at most ``stride`` tokens since
      ``base``, so one width serves every recycle step of every cycle; steps with ``Lq > 1`` may
      outgrow it, and the multiple of 64 then keeps the widths few. The padding costs unused
      int32 entries only: the kernel walks each row up to its count, not the width). The
      counts come from the device lengths, so a captured recycle step replayed after the cache
      grew in place selects the grown range, as long as the count fits ``W``.

    A caller that captures the phases separately picks the phase of the next ``select`` with
    :meth:`set_phase` (and reads it with :meth:`phase`), e.g. ``sparseattn bench decode``. What a
    replay does not do is the host bookkeeping of a step (the counter, the host copy of
    ``base`` that sizes ``W``): such a caller keeps its own schedule, and recaptures the
    recycle step when :meth:`recycle_width` changes and both phases when the state is dropped
    (a dense step, ``cache.reset()``) or the page table widens (the full step's shape).
    """

    name: ClassVar[str] = "recycled"
    graph_safe: ClassVar[bool] = False  # the full/recycled choice follows a host step counter
    # The recycle step's "generated since base" width is a multiple of this, rounded up to
    # cover the stride (see the class docstring).
    width_quantum: ClassVar[int] = 64

    top_k: int = 4096
    stride: int = 50
    gqa_policy: str = "group_max"

    def __post_init__(self):
        super().__post_init__()
        check_int("top_k", self.top_k, minimum=1)
        check_int("stride", self.stride, minimum=1)
        check_choice("gqa_policy", self.gqa_policy, GQA_POLICIES)

    # ------------------------------------------------------------------ hooks
    def on_prefill(self, q, cache, layer):
        if layer in self.dense_layers or q.shape[0] == 0 or q.shape[2] == 0:
            return
        st = self.state(cache, layer)
        self._refresh(q[:, :, -1:], cache, layer, st)
        st["step"] = 1 % self.stride

    def on_dense_step(self, q, cache, layer):
        self.state(cache, layer).clear()

    # ------------------------------------------------------------------ phases
    def phase(self, cache, layer: int) -> str:
        """The phase the next :meth:`select` at ``layer`` runs: ``"full"`` (dense, refreshes the
        recycled set) or ``"recycle"``. Host state only."""
        st = self.state(cache, layer)
        return "full" if st.get("step", 0) == 0 or "tokens" not in st else "recycle"

    def set_phase(self, cache, layer: int, phase: str) -> None:
        """Make the next :meth:`select` at ``layer`` run ``phase`` (a host counter write, no sync).

        ``"full"`` sets the counter to 0. ``"recycle"`` needs a recycled set (a full step or
        :meth:`on_prefill` ran) and ``stride > 1``; it keeps a counter already inside the recycle
        steps, else sets it to 1. The counter then advances as usual. For callers that capture
        each phase as its own CUDA graph (see the class docstring).
        """
        check_choice("phase", phase, PHASES)
        st = self.state(cache, layer)
        if phase == "full":
            st["step"] = 0
            return
        if "tokens" not in st:
            raise ValueError(f"layer {layer} has no recycled set yet: run a full step (or on_prefill) first")
        if self.stride == 1:
            raise ValueError("stride=1 has no recycle steps: every step is a full step")
        if st.get("step", 0) == 0:
            st["step"] = 1

    def recycle_width(self, cache, layer: int) -> int:
        """``W``: the width of the "generated since ``base``" part of this layer's next recycle
        selection (host ints only): the largest ``len - base`` of the batch rounded up to a multiple
        of ``width_quantum * ceil(stride / width_quantum)``. A captured recycle step stays valid
        while this is unchanged."""
        st = self.state(cache, layer)
        quantum = self.width_quantum * -(-self.stride // self.width_quantum)
        need = max([h - b for h, b in zip(cache.host_lengths(layer), st["base_host"])], default=0)
        return quantum * max(1, -(-need // quantum))

    # ------------------------------------------------------------------ selection
    def _select(self, q, cache, layer):
        st = self.state(cache, layer)
        if self.phase(cache, layer) == "full":
            self._refresh(q, cache, layer, st)
            st["step"] = 1 % self.stride
            return None  # the full step reads everything
        st["step"] = (st["step"] + 1) % self.stride
        return self.recycled_selection(cache, layer)

    def _refresh(self, q, cache, layer, st: dict) -> None:
        """Pick the top-``top_k`` tokens before the ``Lq`` newest from exact attention (reads all keys);
        store them in place in the layer's buffers (new buffers only when the shapes change)."""
        Lq = q.shape[2]
        score = group_scores(exact_probs(q, cache, layer), self.gqa_policy)  # [B, Hkv, N]
        N = score.shape[-1]
        base = cache.layer_lengths(layer).long() - Lq  # [B]: where the step's new tokens start
        j = torch.arange(N, device=q.device)
        candidate = j.view(1, 1, -1) < base.view(-1, 1, 1)
        neg = score.new_full((), float("-inf"))
        score = torch.where(candidate, score, neg)
        width = max(1, min(N, self.top_k))
        if use_triton_estimator(q):  # top-k + O(k) assembly; "lengths" = base: candidates [0, base), none forced
            sel = topk_token_selection(score, self.top_k, lengths=base, page_size=cache.page_size, width=width)
            counts, tokens = sel.token_counts, sel.tokens
        else:
            n = torch.full(score.shape[:2], self.top_k, dtype=torch.long, device=q.device)
            keep = rank_mask(score, n) & candidate
            counts, tokens = compact_rows(keep, j.expand(keep.shape), width)
        # Both paths leave zeros after each row's count: in range for the kernel, and the recycle
        # step's assembly relies on it.
        new = {"tokens": tokens, "counts": counts, "base": base}
        if all(name in st and st[name].shape == t.shape for name, t in new.items()):
            for name, t in new.items():  # in place: a captured recycle step reads these buffers
                st[name].copy_(t)
        else:
            st.update(new)
        st["base_host"] = [h - Lq for h in cache.host_lengths(layer)]

    def recycled_selection(self, cache, layer: int, width: Optional[int] = None) -> DecodeSelection:
        """This layer's recycle-step selection: the stored tokens plus every token since ``base``.

        Row ``(b, h)`` holds the stored set's ``counts[b, h]`` tokens (ascending, all ``< base[b]``)
        followed by ``base[b], ..., len[b] - 1``: already ascending, so the new positions are
        written at ``counts + j`` with no compaction. Shapes: ``tokens`` int32 ``[B, Hkv, Kw + W]``
        with ``W = width`` (default :meth:`recycle_width`; it must be at least the largest
        ``len - base``, else the newest tokens are dropped), ``token_counts`` int32 ``[B, Hkv]``;
        entries after a row's count are 0 (a token of every non-empty sequence). The counts come
        from the device lengths: no host read, capturable.
        """
        st = self.state(cache, layer)
        tokens, counts, base = st["tokens"], st["counts"], st["base"]
        B, H, _ = tokens.shape
        dev = tokens.device
        W = self.recycle_width(cache, layer) if width is None else width
        check_int("width", W, minimum=1)
        j = torch.arange(W, device=dev)
        n_new = (cache.layer_lengths(layer).long() - base).clamp(0, W)  # [B]: tokens since base (clamped: in bounds)
        new = torch.where(j < n_new.view(B, 1), base.view(B, 1) + j, 0).to(torch.int32)  # [B, W]
        out = torch.nn.functional.pad(tokens, (0, W))  # the stored rows, then W zeros
        out.scatter_(-1, counts.long().unsqueeze(-1) + j, new.unsqueeze(1).expand(B, H, W))
        return DecodeSelection.from_tokens(out, counts + n_new.to(torch.int32).view(B, 1), page_size=cache.page_size)
