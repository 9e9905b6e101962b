"""MInference vertical-slash: top key columns (token-level extras) plus top diagonals (blocks)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from ..plan import BlockPlan
from .base import (PerHead, PrefillMethod, _device_constant, cdiv, check_choice, check_int, check_per_head,
                   diagonal_sums, head_values, last_queries_attention, query_block_positions, rank_mask,
                   use_triton_estimator)
from .base import compact_rows as _compact
from .registry import register


@register
@dataclass(kw_only=True)
class VerticalSlash(PrefillMethod):
    """MInference's vertical-slash pattern (Jiang et al. 2024, arXiv 2407.02490), per head:

    1. ``A = softmax(q_last k^T / sqrt(D))`` for the last ``last_q`` queries (causal, fp32).
    2. Vertical score of key ``j``: ``sum_i A_ij``; the first ``sink_tokens`` keys are forced.
       Slash score of diagonal distance ``o``: the sum of ``A`` along it; distances
       ``0 .. local_diagonals - 1`` are forced. Keep the ``vertical_size`` best keys and the
       ``slash_size`` best diagonals (both budgets count the forced entries, which are always kept).
    3. Diagonals become key blocks: block ``(I, n)`` is kept when a kept diagonal passes through
       it for some query of block ``I`` (MInference's index builder turns diagonals into 64-key
       blocks the same way). Kept key columns become the plan's token-level **extra columns**:
       per query block, the kept keys at or before its last position that do not fall inside one
       of its kept blocks, strictly ascending.

    ``vertical_size`` / ``slash_size`` may be per head or per-(layer, head) tables (MInference's
    per-head JSON configs). GQA policy: ``"per_q_head"`` (MInference repeats K/V; plan
    ``H = Hq``) or ``"group_union"`` (union of the group's columns and diagonals, ``H = Hkv``).
    Differences from the official code: the official slash estimate drops the last ``last_q - 1``
    partially covered diagonals; here every diagonal is scored and the local ones are forced.

    Defaults (source: microsoft/MInference ``minference/modules/minference_forward.py``):
    ``last_q=64``, ``sink_tokens=30`` (forced vertical), ``local_diagonals=100`` (forced slash,
    kernel path), ``vertical_size=1000``, ``slash_size=6096`` (the default for a head missing from
    the config), ``block_size=64``. Causal only.
    """

    name: ClassVar[str] = "vertical_slash"
    reads_values: ClassVar[bool] = False  # the estimate reads q and k only

    block_size: int = 64
    vertical_size: PerHead = 1000
    slash_size: PerHead = 6096
    last_q: int = 64
    sink_tokens: int = 30
    local_diagonals: int = 100
    gqa_policy: str = "per_q_head"

    def __post_init__(self):
        super().__post_init__()
        self.vertical_size = check_per_head("vertical_size", self.vertical_size,
                                            lambda n, x: check_int(n, x, minimum=0))
        self.slash_size = check_per_head("slash_size", self.slash_size, lambda n, x: check_int(n, x, minimum=0))
        check_int("last_q", self.last_q, minimum=1)
        check_int("sink_tokens", self.sink_tokens, minimum=0)
        check_int("local_diagonals", self.local_diagonals, minimum=1)
        check_choice("gqa_policy", self.gqa_policy, ("per_q_head", "group_union"))

    def query_rows_read(self, q_len: int) -> int:
        return min(self.last_q, q_len)  # the last-queries profiles are all the estimate reads of q

    @staticmethod
    def _max_value(value) -> int:
        if isinstance(value, tuple):
            return max(max(row) if isinstance(row, tuple) else row for row in value)
        return value

    def _plan(self, q, k, v, *, causal, layer_idx):
        self._require_causal(causal)
        B, Hq, Lq, _ = q.shape
        Hkv, Lk = k.shape[1], k.shape[2]
        G, bs, dev = Hq // Hkv, self.block_size, q.device
        geo = dict(block_q=bs, block_k=bs, q_len=Lq, k_len=Lk)
        rows_triton = use_triton_estimator(q) and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        # The budgets are a function of the config and the shapes: on the Triton path they are
        # resolved on the host and uploaded once (no launches in the estimate).
        common = dict(heads=Hq, q_heads=Hq, kv_heads=Hkv, layer_idx=layer_idx, device="cpu" if rows_triton else dev,
                      dtype=torch.int64)
        n_v = head_values(self.vertical_size, name="vertical_size", **common)
        n_s = head_values(self.slash_size, name="slash_size", **common)
        n_v = n_v.clamp(min=min(self.sink_tokens, Lk)).view(1, Hq)
        n_s = n_s.clamp(min=min(self.local_diagonals, Lk)).view(1, Hq)

        if rows_triton:
            from ..kernels.last_queries_triton import last_queries_profiles_triton
            from ..kernels.row_select_triton import rank_mask_triton, top_n_split

            # The selection scores: both profiles (three launches, without the [B, Hq, P, Lk]
            # softmax) stacked, with the forced sink columns / local diagonals at +inf.
            scores = torch.empty(2, B, Hq, Lk, dtype=torch.float32, device=dev)
            last_queries_profiles_triton(q, k, self.last_q, sink_columns=self.sink_tokens,
                                         local_diagonals=self.local_diagonals, out=scores)
            budgets = torch.stack((n_v, n_s))  # [2, 1, Hq]
            if dev.type == "cuda":
                budgets = _device_constant(tuple(budgets.flatten().tolist()), torch.int64, str(dev)).view(2, 1, Hq)
            # Both selections in one launch (no sort over Lk); few long rows are split over programs.
            keep_both = rank_mask_triton(scores, budgets, **top_n_split(2 * B * Hq, Lk))  # [2, B, Hq, Lk]
            keep_cols, keep_diag = keep_both.unbind(0)
        else:
            a = last_queries_attention(q, k, self.last_q)  # [B, Hq, P, Lk]
            columns, slash = a.sum(-2), diagonal_sums(a)  # slash index t: diagonal at distance Lk - 1 - t
            inf = torch.full((), float("inf"), dtype=columns.dtype, device=dev)
            j = torch.arange(Lk, device=dev)
            vertical = torch.where(j < self.sink_tokens, inf, columns)  # [B, Hq, Lk]
            slash = torch.where(j >= Lk - self.local_diagonals, inf, slash)
            keep_cols = rank_mask(vertical, n_v)  # [B, Hq, Lk]
            keep_diag = rank_mask(slash, n_s)  # [B, Hq, Lk] over t
        width = min(Lk, max(self._max_value(self.vertical_size), self.sink_tokens))
        if self.gqa_policy == "group_union":
            keep_cols = keep_cols.view(B, Hkv, G, Lk).any(2)
            keep_diag = keep_diag.view(B, Hkv, G, Lk).any(2)
            width = min(Lk, width * G)

        if rows_triton:
            from ..kernels.row_select_triton import compact_rows_triton
            from ..kernels.vertical_slash_triton import vertical_slash_plan_triton

            # One pass per row: the kept columns packed (ascending) and the diagonals' prefix counts.
            if self.gqa_policy == "group_union":
                keep_both = torch.stack((keep_cols, keep_diag))
            n_cols, cols, prefix = compact_rows_triton(keep_both, None, width, prefix=True)
            # One launch from the prefix counts and the columns to the plan's blocks and extras.
            counts, indices, extra_counts, extra_indices = vertical_slash_plan_triton(
                prefix[1], cols[0], n_cols[0], block_size=bs, q_len=Lq, k_len=Lk, width=width)
            plan = BlockPlan(counts, indices, **geo)
            if width == 0:
                return plan
            return replace(plan, extra_counts=extra_counts, extra_indices=extra_indices)

        return plan_from_keeps(keep_cols, keep_diag, width, block_size=bs, q_len=Lq, k_len=Lk)


def plan_from_keeps(keep_cols: torch.Tensor, keep_diag: torch.Tensor, width: int, *, block_size: int, q_len: int,
                    k_len: int) -> BlockPlan:
    """The plan from the kept key columns and kept diagonals (both bool ``[B, H, Lk]``, diagonals
    indexed by their last-row key ``t``): PyTorch, the CPU path and the oracle of
    ``kernels/vertical_slash_triton.py``. ``width`` extra-column slots per row."""
    B, H, Lk = keep_cols.shape
    bs, Lq, dev = block_size, q_len, keep_cols.device
    geo = dict(block_q=bs, block_k=bs, q_len=Lq, k_len=Lk)
    nQ, nK = cdiv(Lq, bs), cdiv(Lk, bs)
    j = torch.arange(Lk, device=dev)
    # Diagonal distances o in [max(0, first(I) - end(n)), last(I) - start(n)] reach block n from
    # query block I; count kept ones with a prefix sum over t = Lk - 1 - o.
    first, last = query_block_positions(nQ, bs, Lq, Lk, dev)
    n = torch.arange(nK, device=dev, dtype=torch.int64)
    start, end = n * bs, torch.clamp((n + 1) * bs, max=Lk) - 1
    o_lo = (first.view(-1, 1) - end.view(1, -1)).clamp(min=0)
    o_hi = (last.view(-1, 1) - start.view(1, -1)).clamp(max=Lk - 1)
    ok = o_lo <= o_hi
    t_lo = (Lk - 1 - o_hi).clamp(0, Lk - 1)
    t_hi = (Lk - 1 - o_lo).clamp(0, Lk - 1)
    prefix = torch.nn.functional.pad(torch.cumsum(keep_diag, -1), (1, 0))  # [B, H, Lk + 1]

    def at(idx):
        return torch.gather(prefix, -1, idx.reshape(1, 1, -1).expand(B, H, -1)).view(B, H, nQ, nK)

    blocks = ((at(t_hi + 1) - at(t_lo)) > 0) & ok  # [B, H, nQ, nK]
    plan = BlockPlan.from_block_mask(blocks, **geo, causal=True)
    if width == 0:
        return plan

    # Kept columns, ascending, then per query block those visible and outside its kept blocks.
    _, cols = _compact(keep_cols, j.expand(B, H, Lk), width)  # [B, H, width]
    n_cols = keep_cols.sum(-1, keepdim=True)
    slot_ok = torch.arange(width, device=dev).view(1, 1, -1) < n_cols
    cols = cols.long()
    in_block = torch.gather(plan.block_mask(), -1, (cols // bs).unsqueeze(2).expand(B, H, nQ, width))
    cand = slot_ok.unsqueeze(2) & (cols.unsqueeze(2) <= last.view(1, 1, -1, 1)) & ~in_block
    counts, extra = _compact(cand, cols.unsqueeze(2).expand(B, H, nQ, width), width)
    return replace(plan, extra_counts=counts, extra_indices=extra)
