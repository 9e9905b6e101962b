"""TidalDecode: exact top-k tokens chosen at selection layers, reused by the layers after them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Tuple

import torch

from ..decode_api import DecodeSelection
from ..methods.base import check_choice, check_int, rank_mask, use_triton_estimator
from ..methods.registry import register
from .base import DecodeMethod, check_layers, exact_probs, topk_token_selection

GQA_POLICIES = ("group_max", "group_sum", "per_q_head")


def group_scores(probs: torch.Tensor, policy: str) -> torch.Tensor:
    """One score per (batch, KV head, token) from exact probabilities ``[B, Hkv, G, Lq, N]``.

    ``"group_max"``: max over the group's query heads and the ``Lq`` new queries;
    ``"group_sum"``: their sum; ``"first_head"``: the max over the new queries of the group's
    first query head only.
    """
    if policy == "group_max":
        return probs.amax(dim=(2, 3))
    if policy == "group_sum":
        return probs.sum(dim=(2, 3))
    if policy == "first_head":
        return probs[:, :, 0].amax(dim=2)
    raise ValueError(f"unknown GQA aggregation {policy!r}")


def step_key(cache, layer: int) -> tuple:
    """Host-side identity of the current decode step at ``layer``: the host mirror of the lengths.

    Every layer of one step holds the same tokens once the step's k/v are appended, and the
    lengths grow from one step to the next, so a selection stored at an earlier layer of this
    step carries the same key. No device read.
    """
    return tuple(cache.host_lengths(layer))


def reuse_stored(st: dict, cache, layer: int) -> Optional[DecodeSelection]:
    """The selection an earlier layer of this same step stored in ``st``, else ``None`` (dense)."""
    sel = st.get("selection")
    if sel is None or st.get("layer", layer) >= layer or st.get("key") != step_key(cache, layer):
        return None
    return sel


@register
@dataclass(kw_only=True)
class TidalDecode(DecodeMethod):
    """TidalDecode (Yang et al., arXiv 2410.05076; code DerrickYLJ/TidalDecode), spec section 3.

    Per decode step, walking the layers in ascending order:

    1. ``dense_layers`` (official: layers ``[0, sparse_layer_start)``): dense attention.
    2. A **selection layer** (``sparse_layer_start``, then the re-selection
       ``correction_layer``): attention is dense (``select`` returns ``None``); additionally the
       exact logits of the step's queries over every cached token (:func:`exact_logits`, via
       :func:`exact_probs`) pick the top ``token_budget`` tokens per KV head. The selection is
       stored in the cache's shared method state (``self.state(cache, None)``).
       Cost: this scoring reads **all keys** of the layer (a second dense pass over K; a fused
       engine would take the logits from the dense kernel, spec E5b).
    3. Every other layer returns **exactly the stored selection object** of the most recent
       selection layer of the same step ("position persistent": the same token positions in
       every layer), so it reads ``token_budget`` tokens.

    The selection is recomputed every step (no cross-step reuse). A layer that finds no
    selection of the current step (a layer before the first selection layer that is not in
    ``dense_layers``, or a step whose selection layer ran dense because of ``dense_below``)
    reads everything. The step's own new tokens (the ``Lq`` newest) are always selected and
    count toward ``token_budget``, as in the official kernel path (``InferenceController``'s
    token budget "including the last page", page size 1, the last token excluded from top-k and
    appended; ``tidal/utils/controller.py``, ``tidal/models/SearchAttention.py``); the other
    ``token_budget - Lq`` tokens are the top scores among the older tokens (ties: lower position).

    GQA (``gqa_policy``): the reference HF path (``src/tidal_build/modify_llama.py``) applies
    ``repeat_kv`` and takes ``topk`` of the logits per query head (and per query row). Here one
    token list per KV head serves the group (spec 3.4: aggregate per group): ``"group_max"``
    (default) scores a token by the max over the group's query heads and the ``Lq`` queries of
    its softmax probability, the closest single-list match to the reference union of per-head
    top-k sets; ``"group_sum"`` sums the probabilities; ``"per_q_head"`` takes each query head's
    top ``token_budget - Lq`` tokens (by probability, i.e. by logit, max over the ``Lq``
    queries) and reads their union per KV head (the reference behaviour; up to
    ``G * (token_budget - Lq) + Lq`` tokens).

    Defaults and sources:

    * ``token_budget=256``: ``enable_tidal(..., top_k=256)`` in ``src/enable_tidal.py``
      (``examples/run_tidal_llama.sh`` and the needle test use 128).
    * ``dense_layers=(0, 1)``: ``sparse_layer_start=2`` in ``src/enable_tidal.py``,
      ``examples/run_tidal_llama.sh`` and ``src/tidal_build/modify_llama.py``.
    * ``selection_layers=None`` resolves per model depth ``L`` (:meth:`selection_layers_for`):
      ``(2, 13)`` for ``L = 32`` (``sparse_layer_start=2``, ``correction_layer=13`` in
      ``src/enable_tidal.py`` and ``examples/run_tidal_llama.sh`` for
      Llama-3-8B-Instruct-Gradient-1048k, 32 layers). The official re-selection layer is picked
      per model by a sweep (9 is the ``modify_llama.py`` function default, 12 in the kernel
      layout of ``tidal/models/llama.py`` for Llama-2-7B); for another depth ``L`` our rule
      (not an official one) keeps layer 2 and moves the re-selection layer to the same relative
      depth, ``floor(13 * L / 32 + 1/2)`` (28 layers -> 11, 16 -> 7, 80 -> 33), dropping it when it
      is not after layer 2 or not below ``L``. Pass ``selection_layers=(s, r, ...)`` to set them.
    """

    name: ClassVar[str] = "tidaldecode"

    token_budget: int = 256
    dense_layers: tuple = (0, 1)
    selection_layers: Optional[Tuple[int, ...]] = None
    gqa_policy: str = "group_max"

    def __post_init__(self):
        super().__post_init__()
        check_int("token_budget", self.token_budget, minimum=1)
        if self.selection_layers is not None:
            self.selection_layers = check_layers("selection_layers", self.selection_layers)
            if not self.selection_layers:
                raise ValueError("selection_layers must hold at least one layer (or be None for the official rule)")
            both = sorted(set(self.selection_layers) & set(self.dense_layers))
            if both:
                raise ValueError(f"layers {both} are both selection_layers and dense_layers; a dense layer never "
                                 "selects")
        check_choice("gqa_policy", self.gqa_policy, GQA_POLICIES)

    def selection_layers_for(self, num_layers: int) -> Tuple[int, ...]:
        """The selection (and re-selection) layers used for a model of ``num_layers`` layers."""
        if self.selection_layers is not None:
            return tuple(x for x in self.selection_layers if x < num_layers)
        reselect = (13 * num_layers + 16) // 32  # floor(13 L / 32 + 1/2), exact in integers
        layers = [2] + ([reselect] if reselect > 2 else [])
        return tuple(x for x in layers if x < num_layers and x not in self.dense_layers)

    def _select(self, q, cache, layer):
        st = self.state(cache, None)
        if layer in self.selection_layers_for(cache.num_layers):
            st.update(selection=self.choose(q, cache, layer), key=step_key(cache, layer), layer=layer)
            return None  # the selection layer itself attends densely
        return reuse_stored(st, cache, layer)

    def choose(self, q: torch.Tensor, cache, layer: int) -> DecodeSelection:
        """The top-``token_budget`` token selection from exact attention at ``layer`` (reads all keys)."""
        Lq = q.shape[2]
        G = q.shape[1] // cache.num_kv_heads
        probs = exact_probs(q, cache, layer)  # [B, Hkv, G, Lq, N]
        N = probs.shape[-1]
        lengths = cache.layer_lengths(layer).long().view(-1, 1, 1)
        j = torch.arange(N, device=q.device).view(1, 1, -1)
        forced = (j >= lengths - Lq) & (j < lengths)  # the step's new tokens, [B, 1, N]
        candidate = j < lengths - Lq
        free = max(0, self.token_budget - Lq)
        neg = probs.new_full((), float("-inf"))
        per_head = self.gqa_policy == "per_q_head"
        if per_head:  # max over the new queries: a view at Lq = 1, not a copy of the probabilities
            s = torch.where(candidate.unsqueeze(2), probs[:, :, :, 0] if Lq == 1 else probs.amax(3), neg)
            width = min(N, Lq + G * free)  # s: [B, Hkv, G, N]
        else:
            s = torch.where(candidate, group_scores(probs, self.gqa_policy), neg)  # [B, Hkv, N], one reduction
            width = min(N, Lq + free)
        if use_triton_estimator(q):  # top-k + O(k) assembly instead of a full sort and an O(N) compaction
            return topk_token_selection(s, free, lengths=cache.layer_lengths(layer), page_size=cache.page_size,
                                        width=width, forced_last=Lq)
        n = torch.full(s.shape[:-1], free, dtype=torch.long, device=q.device)
        if per_head:
            keep = (rank_mask(s, n) & candidate.unsqueeze(2)).any(2)
        else:
            keep = rank_mask(s, n) & candidate
        return DecodeSelection.from_token_mask(keep | forced, page_size=cache.page_size, max_tokens=width)
