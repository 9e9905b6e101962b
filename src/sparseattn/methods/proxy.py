"""ProxyAttn: token-level block scores from pooled proxy heads, per-head dynamic block budgets."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from ..plan import BlockPlan
from .base import (ESTIMATE_CHUNK_ELEMENTS, PrefillMethod, cdiv, check_choice, check_float, check_int, forced_blocks,
                   last_queries_attention, sum_pool_last, use_triton_estimator, visible_blocks)
from .registry import register


@register
@dataclass(kw_only=True)
class ProxyAttn(PrefillMethod):
    """ProxyAttn (Wang et al., ICLR 2026, arXiv 2509.24745): heads of a long context attend to
    largely the same tokens but with different sparsity, so one *proxy* head per group of query
    heads scores the blocks for the whole group, and every head gets its own budget. Per call:

    1. **Proxy scores.** The Hq query heads are cut into ``proxy_heads`` contiguous groups; each
       group's queries are pooled over its heads (``head_pool``), its keys are the group's KV head
       (or the mean of its KV heads when a group spans several). For every ``q_stride``-th query
       row (and the last row) the proxy computes token-level ``softmax(q k^T / sqrt(D))`` over the
       causal keys; the probabilities are summed over each (query block, key block) tile. Token-
       level scoring keeps a single strong key visible, which sequence pooling would dilute.
    2. **Per-head budgets.** Each query head's own attention of its last ``probe_q`` queries
       (always causal, fp32) is summed per key block; ``k_h`` = the fewest blocks whose mass reaches
       ``gamma`` of it. The head's budget in every query block is the same fraction
       ``k_h / nK`` of that row's visible blocks (rounded up), on top of the forced blocks.
    3. **Selection.** Each head keeps, per query block, the forced sink / local / diagonal blocks
       and its budget of other visible blocks ranked by its group's proxy score (ties: lower
       block index).

    GQA policy: ``"per_q_head"`` (plan ``H = Hq``: shared proxy ranking, per-head budgets, as the
    method describes) or ``"group_union"`` (union over each KV group, ``H = Hkv``). Proxy groups
    never straddle a KV head when ``proxy_heads`` is a multiple of Hkv; ``proxy_heads`` must
    divide Hq and either divide Hkv or be a multiple of it (checked at plan time).
    Estimation cost: ``proxy_heads * (Lq / q_stride) * Lk * D`` for the proxies plus
    ``Hq * probe_q * Lk * D`` for the budget probe. Memory: proxy rows are processed in chunks of
    whole query blocks of about ``ESTIMATE_CHUNK_ELEMENTS`` scores.
    On CUDA (fp16 / bf16 / fp32) the same plan comes from Triton kernels (``_plan_triton``,
    kernels/proxy_triton.py): flash-style softmax block sums that never build the probabilities,
    a sort-free cover count and top-n row selection, no host sync; equal up to float32 rounding
    (a near-tie of two tile scores at a cut, or a budget's mass within rounding of ``gamma``).

    Defaults, all **[unverified]**: the official code (github.com/wyxstriker/ProxyAttn) is not in
    the reference store and the spec (/work/shared/specs/prefill-methods.md section 5) lists every
    hyperparameter as TODO. Choices of this library: ``proxy_heads=None`` (one proxy per KV head,
    the spec's "natural" alignment), ``head_pool="mean"``, ``q_stride=16``, ``gamma=0.9`` and
    ``block_size=128`` (the values FlexPrefill / XAttention use for the same roles),
    ``probe_q=None`` (= ``block_size``: the last query block, as FlexPrefill's probe), forced
    ``sink_blocks=1`` and the diagonal (the convention of every other dynamic method here). The
    budget rule of step 2 (a per-head fraction of each row's visible blocks) is this library's
    reading of "block-aware dynamic budget"; ``gamma=1`` keeps every visible block.
    """

    name: ClassVar[str] = "proxy"
    reads_values: ClassVar[bool] = False  # the estimate reads q and k only

    block_size: int = 128
    proxy_heads: Optional[int] = None
    head_pool: str = "mean"
    q_stride: int = 16
    gamma: float = 0.9
    probe_q: Optional[int] = None
    sink_blocks: int = 1
    local_blocks: int = 0
    keep_diagonal: bool = True
    gqa_policy: str = "per_q_head"

    def __post_init__(self):
        super().__post_init__()
        if self.proxy_heads is not None:
            check_int("proxy_heads", self.proxy_heads, minimum=1)
        check_choice("head_pool", self.head_pool, ("mean", "max"))
        check_int("q_stride", self.q_stride, minimum=1)
        if self.block_size % self.q_stride:
            raise ValueError(f"block_size must be a multiple of q_stride, got block_size={self.block_size}, "
                             f"q_stride={self.q_stride}")
        check_float("gamma", self.gamma, minimum=0.0, maximum=1.0)
        if self.probe_q is not None:
            check_int("probe_q", self.probe_q, minimum=1)
        check_int("sink_blocks", self.sink_blocks, minimum=0)
        check_int("local_blocks", self.local_blocks, minimum=0)
        if not isinstance(self.keep_diagonal, bool):
            raise ValueError(f"keep_diagonal must be a bool, got {self.keep_diagonal!r}")
        check_choice("gqa_policy", self.gqa_policy, ("per_q_head", "group_union"))

    # ------------------------------------------------------------------ step 1
    def _num_proxies(self, Hq: int, Hkv: int) -> int:
        P = Hkv if self.proxy_heads is None else self.proxy_heads
        if Hq % P or (P % Hkv and Hkv % P):
            raise ValueError(f"proxy_heads={P} must divide Hq={Hq} and divide or be a multiple of Hkv={Hkv}; "
                             f"pick e.g. proxy_heads={Hkv}")
        return P

    def proxy_scores(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool) -> torch.Tensor:
        """float ``[B, P, nQ, nK]``: each proxy's attention mass per tile, summed over its sampled
        query rows (each sampled row with a visible key contributes 1 in total)."""
        B, Hq, Lq, D = q.shape
        Hkv, Lk = k.shape[1], k.shape[2]
        P = self._num_proxies(Hq, Hkv)
        bs, S, dev = self.block_size, self.q_stride, q.device
        nQ, nK = cdiv(Lq, bs), cdiv(Lk, bs)
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        # Sampled rows: the last row of every run of S rows, plus the last row of a partial run,
        # laid out regularly as [nQ, per_block] slots (invalid slots are masked).
        per_block = bs // S
        raw = (torch.arange(nQ, device=dev).view(-1, 1) * bs
               + (torch.arange(per_block, device=dev).view(1, -1) + 1) * S - 1)
        slot_ok = (raw < Lq) | ((raw - S < Lq - 1) & (raw >= Lq))
        rows = raw.clamp(max=Lq - 1)  # [nQ, per_block]
        # Keys of each proxy: its KV head, or the mean over the KV heads it spans.
        if P >= Hkv:
            kp = k.to(dt)  # proxies of one KV head share it
        else:
            kp = k.to(dt).view(B, P, Hkv // P, Lk, D).mean(2)
        kv_heads = kp.shape[1]
        scale = 1.0 / math.sqrt(D)
        j = torch.arange(Lk, device=dev)
        chunk = max(1, ESTIMATE_CHUNK_ELEMENTS // max(1, B * P * per_block * Lk))
        out = []
        for m0 in range(0, nQ, chunk):  # a handful of chunks, for memory only
            m1 = min(nQ, m0 + chunk)
            r = rows[m0:m1].reshape(-1)  # [R]
            qs = q[:, :, r].to(dt)  # [B, Hq, R, D]
            qs = qs.view(B, P, Hq // P, -1, D)
            qs = qs.mean(2) if self.head_pool == "mean" else qs.amax(2)  # [B, P, R, D]
            R = qs.shape[2]
            logits = torch.matmul(qs.reshape(B, kv_heads, -1, D), kp.transpose(-1, -2)).view(B, P, R, Lk)
            allowed = slot_ok[m0:m1].reshape(-1, 1)
            if causal:
                allowed = allowed & (j.view(1, -1) <= (Lk - Lq + r).view(-1, 1))
            probs = torch.softmax((logits * scale).masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num_(nan=0.0)
            del logits
            tiles = sum_pool_last(probs, bs).view(B, P, m1 - m0, per_block, nK).sum(3)
            out.append(tiles)
        return torch.cat(out, dim=2)

    # ------------------------------------------------------------------ step 2
    def head_budget_fraction(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """float ``[B, Hq]``: the fraction of key blocks each head needs to reach ``gamma`` of
        its last queries' attention mass."""
        Lk, bs = k.shape[2], self.block_size
        nK = cdiv(Lk, bs)
        if self.gamma >= 1.0:
            return torch.ones(q.shape[0], q.shape[1], device=q.device, dtype=torch.float64)
        probe = bs if self.probe_q is None else self.probe_q
        a = last_queries_attention(q, k, probe)  # [B, Hq, P, Lk], rows sum to 1 (or 0 if blind)
        mass = sum_pool_last(a.sum(-2), bs)  # [B, Hq, nK]
        total = mass.sum(-1, keepdim=True)
        csum = torch.cumsum(torch.sort(mass, dim=-1, descending=True).values, dim=-1)
        # The fewest blocks whose mass reaches gamma of the total (0 blocks for gamma = 0).
        need = torch.where(self.gamma * total > 0, (csum < self.gamma * total).sum(-1, keepdim=True) + 1,
                           torch.zeros_like(total, dtype=torch.long)).squeeze(-1).clamp(max=nK)
        return need.double() / nK

    # ------------------------------------------------------------------ plan
    def _plan(self, q, k, v, *, causal, layer_idx):
        B, Hq, Lq, D = q.shape
        Hkv, Lk = k.shape[1], k.shape[2]
        bs, dev = self.block_size, q.device
        geo = dict(block_q=bs, block_k=bs, q_len=Lq, k_len=Lk)
        nQ, nK = cdiv(Lq, bs), cdiv(Lk, bs)
        P = self._num_proxies(Hq, Hkv)
        # CUDA: the same steps in 7 launches (_plan_triton; 4 for gamma = 1); below, the PyTorch
        # code (CPU, the oracle).
        if use_triton_estimator(q) and q.dtype in (torch.float16, torch.bfloat16, torch.float32):
            return self._plan_triton(q, k, causal=causal)
        proxy = self.proxy_scores(q, k, causal=causal)  # [B, P, nQ, nK]
        visible = visible_blocks(**geo, causal=causal, device=dev)  # [nQ, nK]
        forced = forced_blocks(**geo, sink_blocks=self.sink_blocks, local_blocks=self.local_blocks,
                               diagonal=self.keep_diagonal, device=dev) & visible
        # Per-(head, row) budget: the head's fraction of the row's visible blocks, beyond the forced.
        frac = self.head_budget_fraction(q, k)  # [B, Hq]
        n_vis = visible.sum(-1).double()  # [nQ]
        n = torch.ceil(frac.unsqueeze(-1) * n_vis - 1e-9).long()  # [B, Hq, nQ]
        cand = visible & ~forced
        # One ranking per proxy (ties: lower block index), cut at each head's own budget.
        order = torch.sort(proxy.masked_fill(~cand, float("-inf")), dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(nK, device=dev).expand_as(order))
        keep = (rank.unsqueeze(2) < n.view(B, P, Hq // P, nQ, 1)).view(B, Hq, nQ, nK)
        keep = (keep & cand) | forced
        if self.gqa_policy == "group_union":
            keep = keep.view(B, Hkv, Hq // Hkv, nQ, nK).any(2)
        return BlockPlan.from_block_mask(keep, **geo, causal=causal)

    def _plan_triton(self, q, k, *, causal):
        """The CUDA path: the PyTorch code's plan without its [rows, Lk] softmaxes, sorts or host syncs.

        Launches: the probe's block masses and gamma targets (2: ``probe_block_mass_triton``;
        skipped for ``gamma = 1``), their cover counts (1: ``cover_count_triton``: the fewest
        blocks reaching the target), the proxy scores written per query head as the selection's
        input with the forced blocks at ``+inf`` and each (head, row)'s block count (2:
        ``proxy_candidates_triton``), the top-n per row (1: ``rank_mask_triton``, ties to the
        lower index as the stable sort), then ``any`` over KV groups for ``group_union`` and the
        plan rows (``BlockPlan.from_block_mask``).
        """
        from ..kernels.proxy_triton import probe_block_mass_triton, proxy_candidates_triton
        from ..kernels.row_select_triton import cover_count_triton, rank_mask_triton

        B, Hq, Lq, _ = q.shape
        Hkv, Lk = k.shape[1], k.shape[2]
        bs = self.block_size
        geo = dict(block_q=bs, block_k=bs, q_len=Lq, k_len=Lk)
        P = self._num_proxies(Hq, Hkv)
        count = target = None  # gamma = 1: every head needs every block
        if self.gamma < 1.0:
            probe = bs if self.probe_q is None else self.probe_q
            mass, target = probe_block_mass_triton(q, k, n_last=probe, block_size=bs, gamma=self.gamma)
            count = cover_count_triton(mass, target)  # [B, Hq]: 1 + #(prefix sums < gamma * total)
        scores, n = proxy_candidates_triton(q, k, proxies=P, head_pool=self.head_pool, block_size=bs,
                                            q_stride=self.q_stride, causal=causal, sink_blocks=self.sink_blocks,
                                            local_blocks=self.local_blocks, diagonal=self.keep_diagonal,
                                            count=count, target=target)
        keep = rank_mask_triton(scores, n)  # [B, Hq, nQ, nK]: forced visible + top candidates
        if self.gqa_policy == "group_union":
            keep = keep.view(B, Hkv, Hq // Hkv, *keep.shape[2:]).any(2)
        return BlockPlan.from_block_mask(keep, **geo, causal=causal)
