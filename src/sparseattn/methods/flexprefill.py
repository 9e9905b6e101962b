"""FlexPrefill: per-head choice between a vertical-slash pattern and a query-aware block map."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from ..plan import BlockPlan
from .base import (PrefillMethod, cdiv, check_float, check_int, diagonal_sums, forced_blocks, last_queries_attention,
                   pool_blocks, query_block_positions, rank_mask, sum_pool_last, use_triton_estimator, visible_blocks)
from .registry import register


def _sqrt_js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    m = (p + q) / 2
    # xlogy: 0 * log(0 / m) counts as 0 (the official formula gives NaN there, which makes the
    # head vertical-slash; here an exact zero simply contributes nothing).
    kl_p = (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(-1)
    kl_q = (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(-1)
    return torch.sqrt((0.5 * kl_p + 0.5 * kl_q).clamp(min=0))


def _cover_count(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per row: 1 + how many of the largest entries have a cumulative sum <= gamma."""
    csum = torch.cumsum(torch.sort(x, dim=-1, descending=True).values, dim=-1)
    return (csum <= gamma).sum(-1) + 1


@register
@dataclass(kw_only=True)
class FlexPrefill(PrefillMethod):
    """FlexPrefill (Lai et al., ICLR 2025, arXiv 2502.20766), per query head:

    1. ``A = softmax(q_last k^T / sqrt(D))`` for the last ``block_size`` queries (causal, fp32);
       vertical profile ``v_j = mean_i A_ij``, slash profile = diagonal sums ``/ rows``.
    2. Budgets: the number of top tokens whose mass reaches ``gamma``, in blocks, clamped to
       ``[min_budget, max_budget]`` tokens (rounded up to blocks).
    3. Pattern test: ``sqrt(JSD)`` between ``softmax(mean(q_last) . mean_pool(k)^T)`` over key
       blocks and the block-pooled ``v``. Below ``tau`` the head is *query-aware*: its vertical
       and slash budgets drop to ``min_budget`` and it adds the global block map
       ``softmax(mean_pool(q) . mean_pool(k)^T)`` (block-causal, row-wise), keeping its largest
       entries while their cumulative sum stays ``<= gamma * rows``.
    4. Vertical-slash: key block 0 and the diagonal are always kept; the top vertical blocks
       ``c`` give ``(I, c)`` for every query block ``I``, the top slash blocks ``o`` give
       ``(I, diag(I) - o)``; the union is the plan.

    Falls back to the dense plan when ``Lk <= max(2 * block_size, min_budget)`` (as the official
    code does). ``Lq != Lk`` uses bottom-right alignment (an extension; the official code needs
    ``Lq == Lk``). GQA policy: per query head (the official estimate groups query heads by KV head
    and keeps one block list per query head); the plan has ``H = Hq``.

    Defaults (source: bytedance/FlexPrefill ``flex_prefill/ops/flex_prefill_attention.py`` and
    ``README.md``; microsoft/MInference ``minference/models_patch.py`` uses the same):
    ``block_size=128``, ``gamma=0.9``, ``tau=0.1``, ``min_budget=None`` (1 block),
    ``max_budget=None`` (no cap). The README example uses ``min_budget=512`` and the paper's RULER
    runs ``gamma=0.95, min_budget=1024`` (``experiments/scripts/flex_prefill/ruler.sh``).
    ``legacy_budget=True`` reproduces the official ``tokens // 128 + 1`` block count (it divides
    by 128 whatever the block size); the default rounds ``tokens / block_size`` up.
    Estimation cost: ``block_size * L * D`` plus ``(L / block_size)**2 * D`` for query-aware heads.
    """

    name: ClassVar[str] = "flexprefill"
    reads_values: ClassVar[bool] = False  # the estimate reads q and k only

    block_size: int = 128
    gamma: float = 0.9
    tau: float = 0.1
    min_budget: Optional[int] = None
    max_budget: Optional[int] = None
    legacy_budget: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_float("gamma", self.gamma, minimum=0.0, maximum=1.0)
        check_float("tau", self.tau, minimum=0.0)
        if self.min_budget is not None:
            check_int("min_budget", self.min_budget, minimum=1)
        if self.max_budget is not None:
            check_int("max_budget", self.max_budget, minimum=1)
            if self.min_budget is not None and self.max_budget < self.min_budget:
                raise ValueError(f"max_budget must be >= min_budget, got max_budget={self.max_budget}, "
                                 f"min_budget={self.min_budget}")
        if not isinstance(self.legacy_budget, bool):
            raise ValueError(f"legacy_budget must be a bool, got {self.legacy_budget!r}")

    def _plan(self, q, k, v, *, causal, layer_idx):
        self._require_causal(causal)
        B, Hq, Lq, D = q.shape
        Hkv, Lk = k.shape[1], k.shape[2]
        G, bs, dev = Hq // Hkv, self.block_size, q.device
        geo = dict(block_q=bs, block_k=bs, q_len=Lq, k_len=Lk)
        nQ, nK = cdiv(Lq, bs), cdiv(Lk, bs)
        min_blocks = 1 if self.min_budget is None else cdiv(self.min_budget, bs)
        max_blocks = nK if self.max_budget is None else min(nK, cdiv(self.max_budget, bs))
        if Lk <= max(2 * bs, min_blocks * bs):
            return BlockPlan.dense(1, 1, **geo, causal=True, device=dev)

        # 1. last-block attention and its vertical / slash profiles
        if use_triton_estimator(q) and q.dtype in (torch.float16, torch.bfloat16, torch.float32):
            from ..kernels.last_queries_triton import last_queries_profiles_triton

            # Both profiles in three launches, without the [B, Hq, P, Lk] softmax.
            P = min(bs, Lq)
            columns, diagonals = last_queries_profiles_triton(q, k, bs)
            vertical, slash = columns / P, diagonals / P
        else:
            a = last_queries_attention(q, k, bs)  # [B, Hq, P, Lk]
            P = a.shape[2]
            vertical = a.mean(-2)  # [B, Hq, Lk]
            slash = diagonal_sums(a) / P  # indexed by the key reached on the last row
        # 2. budgets in blocks
        rows_triton = use_triton_estimator(q) and vertical.dtype in (torch.float16, torch.bfloat16, torch.float32)
        if rows_triton:
            from ..kernels.row_select_triton import cover_count_triton, cumsum_mask_triton, rank_mask_triton

            # Both profiles in one launch, one program per row, no sort and no cumsum over Lk.
            tokens_v, tokens_s = cover_count_triton(torch.stack((vertical, slash)), self.gamma).unbind(0)
        else:
            tokens_v, tokens_s = _cover_count(vertical, self.gamma), _cover_count(slash, self.gamma)
        if self.legacy_budget:
            n_v, n_s = tokens_v // 128 + 1, tokens_s // 128 + 1
        else:
            n_v, n_s = (tokens_v + bs - 1) // bs, (tokens_s + bs - 1) // bs
        n_v, n_s = n_v.clamp(min_blocks, max_blocks), n_s.clamp(min_blocks, max_blocks)
        vertical_b = sum_pool_last(vertical, bs)  # [B, Hq, nK]
        slash_b = sum_pool_last(slash, bs)  # slash block t: diagonals reaching key block t on the last row
        # 3. pattern test
        dt = vertical.dtype
        k_pool = pool_blocks(k, bs).to(dt)  # [B, Hkv, nK, D]
        q_last_mean = q[:, :, Lq - P:].to(dt).mean(2)  # [B, Hq, D]
        est = torch.matmul(q_last_mean.view(B, Hkv, G, D), k_pool.transpose(-1, -2)).view(B, Hq, nK)
        est = torch.softmax(est / math.sqrt(D), dim=-1)
        query_aware = _sqrt_js_divergence(est, vertical_b) < self.tau  # [B, Hq]
        n_v = torch.where(query_aware, min_blocks, n_v)
        n_s = torch.where(query_aware, min_blocks, n_s)
        # 4. vertical-slash blocks: force vertical block 0 and the main diagonal
        inf = torch.full((), float("inf"), dtype=dt, device=dev)
        vertical_b[..., 0] = inf
        slash_b[..., nK - 1] = inf
        if rows_triton:
            keep_v, keep_s = rank_mask_triton(torch.stack((vertical_b, slash_b)), torch.stack((n_v, n_s))).unbind(0)
        else:
            keep_v = rank_mask(vertical_b, n_v)  # [B, Hq, nK]
            keep_s = rank_mask(slash_b, n_s)
        _, last = query_block_positions(nQ, bs, Lq, Lk, dev)
        diag = (last.clamp(min=0) // bs).view(-1, 1)  # [nQ, 1]
        n = torch.arange(nK, device=dev).view(1, -1)
        s_idx = n - diag + (nK - 1)  # slash block reaching key block n from query block I
        s_ok = (s_idx >= 0) & (s_idx < nK)
        from_slash = torch.gather(keep_s.unsqueeze(2).expand(B, Hq, nQ, nK), -1,
                                  s_idx.clamp(0, nK - 1).expand(B, Hq, nQ, nK)) & s_ok
        # The main diagonal is forced; when a query block straddles two key blocks (Lq != Lk), both.
        diagonal = forced_blocks(**geo, sink_blocks=1, local_blocks=0, diagonal=True, device=dev)
        mask = keep_v.unsqueeze(2) | from_slash | diagonal
        # 5. query-aware heads: global cumulative selection on the pooled block map
        visible = visible_blocks(**geo, causal=True, device=dev)
        q_pool = pool_blocks(q, bs).to(dt)  # [B, Hq, nQ, D]; the last block averages its real rows
        logits = torch.matmul(q_pool.view(B, Hkv, G * nQ, D), k_pool.transpose(-1, -2)).view(B, Hq, nQ, nK)
        probs = torch.softmax((logits / math.sqrt(D)).masked_fill(~visible, float("-inf")), dim=-1)
        probs = torch.nan_to_num(probs, nan=0.0).view(B, Hq, nQ * nK)
        rows = visible.any(-1).sum()
        if rows_triton:
            # The same prefix of the descending order, found by bisection; heads that are not
            # query-aware skip the search.
            block_map = cumsum_mask_triton(probs, self.gamma * rows, active=query_aware).view(B, Hq, nQ, nK)
        else:
            values, order = torch.sort(probs, dim=-1, descending=True, stable=True)
            keep_sorted = torch.cumsum(values, -1) <= self.gamma * rows
            block_map = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted).view(B, Hq, nQ, nK)
        mask = mask | (block_map & query_aware.view(B, Hq, 1, 1))
        return BlockPlan.from_block_mask(mask & visible, **geo, causal=True)
