"""Recycled Attention (RefreshKV): a full step every ``stride`` steps picks the tokens the steps in
between read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..decode_api import DecodeSelection
from ..methods.base import check_choice, check_int, compact_rows, rank_mask, use_triton_estimator
from ..methods.registry import register
from .base import DecodeMethod, exact_probs, topk_token_selection
from .tidaldecode import group_scores

GQA_POLICIES = ("group_max", "group_sum", "first_head")


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
    """

    name: ClassVar[str] = "recycled"
    graph_safe: ClassVar[bool] = False  # the full/recycled choice follows a host step counter

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

    # ------------------------------------------------------------------ selection
    def _select(self, q, cache, layer):
        st = self.state(cache, layer)
        step = st.get("step", 0)
        if step == 0 or "tokens" not in st:
            self._refresh(q, cache, layer, st)
            st["step"] = 1 % self.stride
            return None  # the full step reads everything
        st["step"] = (step + 1) % self.stride
        return self.recycled_selection(cache, layer)

    def _refresh(self, q, cache, layer, st: dict) -> None:
        """Pick the top-``top_k`` tokens before the ``Lq`` newest from exact attention (reads all keys)."""
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
        st.update(tokens=tokens, counts=counts, base=base,
                  base_host=[h - Lq for h in cache.host_lengths(layer)])

    def recycled_selection(self, cache, layer: int) -> DecodeSelection:
        """This layer's recycle-step selection: the stored tokens plus every token since ``base``."""
        st = self.state(cache, layer)
        tokens, counts, base = st["tokens"], st["counts"], st["base"]
        B, H, Kw = tokens.shape
        dev = tokens.device
        W = max(1, max(h - b for h, b in zip(cache.host_lengths(layer), st["base_host"])))  # host ints
        lengths = cache.layer_lengths(layer).long()
        new = base.view(B, 1, 1) + torch.arange(W, device=dev).view(1, 1, W)  # [B, 1, W]
        new_ok = new < lengths.view(B, 1, 1)
        old_ok = torch.arange(Kw, device=dev).view(1, 1, Kw) < counts.unsqueeze(-1)
        values = torch.cat([tokens.long(), new.expand(B, H, W)], -1)  # ascending: recycled < base <= new
        ok = torch.cat([old_ok, new_ok.expand(B, H, W)], -1)
        c, packed = compact_rows(ok, values, Kw + W)
        return DecodeSelection.from_tokens(packed, c, page_size=cache.page_size)
