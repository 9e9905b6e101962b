"""FlexPrefill: per-head choice between a vertical-slash pattern and a query-aware block map."""

from __future__ import annotations

import math
import struct
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


def _float32(x: float) -> float:
    """``x`` rounded to the nearest float32."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _visible_rows(q_len: int, k_len: int, block: int) -> int:
    """How many query blocks see at least one key (``visible_blocks(...).any(-1).sum()``): all but
    those whose last query sits before key 0 (bottom-right alignment, ``q_len > k_len``)."""
    return cdiv(q_len, block) - max(0, cdiv(q_len - k_len + 1, block) - 1)


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

        # CUDA: the same steps in 11 launches (_plan_triton); below, the PyTorch code (CPU, the oracle).
        if use_triton_estimator(q) and q.dtype in (torch.float16, torch.bfloat16, torch.float32):
            return self._plan_triton(q, k, nK=nK, min_blocks=min_blocks, max_blocks=max_blocks)
        # 1. last-block attention and its vertical / slash profiles
        a = last_queries_attention(q, k, bs)  # [B, Hq, P, Lk]
        P = a.shape[2]
        vertical = a.mean(-2)  # [B, Hq, Lk]
        slash = diagonal_sums(a) / P  # indexed by the key reached on the last row
        # 2. budgets in blocks
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
        values, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        keep_sorted = torch.cumsum(values, -1) <= self.gamma * rows
        block_map = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted).view(B, Hq, nQ, nK)
        mask = mask | (block_map & query_aware.view(B, Hq, 1, 1))
        return BlockPlan.from_block_mask(mask & visible, **geo, causal=True)

    def _plan_triton(self, q, k, *, nK, min_blocks, max_blocks):
        """The CUDA path: the PyTorch code's plan in 11 launches, no host sync, in two branches.

        Launches: the profiles (3; the logits launch also pools k, or one more launch where its key
        tile is not the block size); their scaling, stacking and block sums (1); then, side by
        side, the cover counts (1: one program per long row, few SMs busy) and, on a second stream,
        the per-head pattern test (1), the ranks of the vertical / slash blocks (1), and for
        query-aware heads only the pooled q (1), the block map's softmax (1) and its cumulative
        selection (1); after the join the plan rows (1), which turn the token counts into budgets
        and keep the blocks ranked below them.
        """
        from ..kernels.dispatch import concurrent_branch
        from ..kernels.flexprefill_triton import (block_ranks_triton, flexprefill_plan_triton, flexprefill_test_triton,
                                                  pool_blocks_triton, pooled_probs_triton, profile_blocks_triton)
        from ..kernels.last_queries_triton import last_queries_profiles_triton
        from ..kernels.row_select_triton import cover_count_triton, cumsum_mask_triton

        B, Hq, Lq, _ = q.shape
        Lk, bs = k.shape[2], self.block_size
        geo = dict(block_q=bs, block_k=bs, q_len=Lq, k_len=Lk)
        nQ = cdiv(Lq, bs)
        # 1. profiles without the [B, Hq, P, Lk] softmax, then [2, B, Hq, Lk] = (vertical, slash) / P
        columns, diagonals, k_pool = last_queries_profiles_triton(q, k, bs, pool_block=bs)  # k_pool: [B, Hkv, nK, D]
        profiles, blocks, gammas, extremes = profile_blocks_triton(columns, diagonals, min(bs, Lq), bs, self.gamma)
        # The PyTorch code's target gamma * rows is a float32 product (rows: the query blocks that
        # see a key block, a function of the shapes: no sync); rounded here the same way.
        target = _float32(_float32(self.gamma) * _visible_rows(Lq, Lk, bs))
        limits = BlockPlan.causal_block_limits(**geo, causal=True, device=q.device)
        with concurrent_branch(q.device) as side:
            # 2. token counts: one program per row, no sort (the critical path)
            tokens = cover_count_triton(profiles, gammas, extremes=extremes)  # [2, B, Hq]
            with side:
                # 3. pattern test (it forces the +inf blocks after reading them); 4. the blocks'
                # ranks, for any budget; 5. the block map of query-aware heads (the others skip
                # the work of its three launches)
                query_aware, targets = flexprefill_test_triton(blocks, q, k_pool, block_size=bs, tau=self.tau,
                                                               target=target)
                ranks = block_ranks_triton(blocks)  # [2, B, Hq, nK]
                q_pool = pool_blocks_triton(q, bs, active=query_aware)
                probs = pooled_probs_triton(q_pool, k_pool, limits, active=query_aware)
                block_map = cumsum_mask_triton(probs.view(B, Hq, nQ * nK), targets, active=query_aware)
        # 2-5. budgets, the union, clipped to the visible blocks and compacted into the plan's rows
        counts, indices = flexprefill_plan_triton(ranks, tokens, block_map, query_aware, limits, block_size=bs,
                                                  q_len=Lq, k_len=Lk, min_blocks=min_blocks, max_blocks=max_blocks,
                                                  legacy_budget=self.legacy_budget)
        return BlockPlan(counts, indices, **geo)
