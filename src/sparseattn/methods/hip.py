"""HiP: hierarchical top-k tree search over key blocks with representative keys."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F

from ..plan import BlockPlan
from .base import (PrefillMethod, cdiv, check_choice, check_int, forced_blocks, query_block_positions,
                   visible_blocks)
from .registry import register

_SAMPLING = ("first", "center", "random", "mean")


@register
@dataclass(kw_only=True)
class HiP(PrefillMethod):
    """HiP attention (Lee et al., ICLR 2025, arXiv 2406.09827), v1.0 tree search with engine-sized
    leaves (spec section 11 (6)): per query block, a top-k search down a tree over its causal key
    blocks, exploiting attention locality (nearby keys score alike).

    The tree is the ``scale_up``-ary tree over key blocks (a node at level ``l`` spans
    ``scale_up**l`` blocks). Starting from the root, every kept node is split into its
    ``scale_up`` children, each child is scored by one **representative key** against the query
    block (``max`` over the block's queries of ``q . k_rep / sqrt(D)``, HiP's
    ``reduce_method='max'``), and the ``k = ceil(mask_k / block_size)`` best children survive
    (ties: lower block index). After ``ceil(log_scale_up(nK))`` levels the survivors are single
    blocks: the selection (``mask_k=0``: none). Levels with at most ``k`` candidates keep all of them, so this equals
    HiP's start from ``k`` nodes that evenly cover the causal range. Then the sink blocks and a
    sliding window (``ceil(sliding_window / block_size)`` blocks before the diagonal, plus the
    diagonal) are added, and the first ``dense_queries`` query rows attend densely (block-rounded).

    Representatives (``sampling``): ``"first"`` (first token of the child), ``"center"``,
    ``"random"`` (HiP's default; here a fixed hash of (node, level, query block) so that plans are
    deterministic and equal on every device) and ``"mean"`` (the mean key of the child: not in
    HiP v1.0; with 64-128-token leaves instead of HiP's 2-token ones a single sampled token sees
    1/64 of a leaf, the mean sees all of it). With engine-sized nodes the single-token
    representatives depend on HiP's locality assumption: a strong run of keys spanning a tree node
    is found, an isolated strong block often is not; ``"mean"`` finds both (tests/methods/
    test_hip.py). Representatives are clipped to the causal range of
    the query block; the ``"mean"`` of a child that straddles the causal edge includes its later
    keys (only its score, never the plan, sees them).

    Not reproduced: HiP's 2-token key granularity (it needs a token gather) and its 32-row query
    blocks (the plan's blocks are square), SparQ head-dim pruning for scoring
    (``enable_sparq``; an estimation speed-up), and the lower-resolution estimator.
    GQA policy: ``"per_q_head"`` (HiP repeat-interleaves KV and searches per query head; plan
    ``H = Hq``) or ``"group_union"`` (``H = Hkv``). Estimation cost:
    ``Lq * k * scale_up * log_scale_up(nK) * D`` per head (HiP's ``O(L log L)``).

    Defaults (source: DeepAuto-AI/hip-attention ``src/hip_attn/v1_0/attention1_block_gpu.py``,
    ``hip_attention()`` signature): ``mask_k=512`` tokens, ``scale_up=2``, ``sampling="random"``
    (``sampling_method='random'``), ``sliding_window=128`` (``sliding_window_size``),
    ``dense_queries=None`` = HiP's heuristic ``dense_queries_exp = int(((log2(Lk / mask_k / 2)) *
    mask_k + mask_k) * 3)``, ``dense_queries = max(0, dense_queries_exp - Lk + Lq)``.
    ``block_size=64`` replaces HiP's 32 x 2 blocks (the engine's smallest efficient square block;
    spec section 11 (6)); ``sink_blocks=1`` (HiP's ``num_sink`` defaults to one tensor-core tile).
    """

    name: ClassVar[str] = "hip"

    block_size: int = 64
    mask_k: int = 512
    scale_up: int = 2
    sampling: str = "random"
    sliding_window: int = 128
    sink_blocks: int = 1
    dense_queries: Optional[int] = None
    gqa_policy: str = "per_q_head"

    def __post_init__(self):
        super().__post_init__()
        check_int("mask_k", self.mask_k, minimum=0)
        check_int("scale_up", self.scale_up, minimum=2)
        check_choice("sampling", self.sampling, _SAMPLING)
        check_int("sliding_window", self.sliding_window, minimum=0)
        check_int("sink_blocks", self.sink_blocks, minimum=0)
        if self.dense_queries is not None:
            check_int("dense_queries", self.dense_queries, minimum=0)
        check_choice("gqa_policy", self.gqa_policy, ("per_q_head", "group_union"))

    def num_dense_queries(self, Lq: int, Lk: int) -> int:
        if self.dense_queries is not None:
            return self.dense_queries
        if Lq <= 32:  # HiP's prompt test (q.shape[1] > 32)
            return 0
        exp = int(((math.log2(Lk / self.mask_k / 2)) * self.mask_k + self.mask_k) * 3)
        return max(0, exp - Lk + Lq)

    def tree_search(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool) -> torch.Tensor:
        """bool ``[B, Hq, nQ, nK]``: the blocks the tree search keeps (no forced blocks)."""
        B, Hq, Lq, D = q.shape
        Hkv, Lk = k.shape[1], k.shape[2]
        G, bs, s, dev = Hq // Hkv, self.block_size, self.scale_up, q.device
        nQ, nK = cdiv(Lq, bs), cdiv(Lk, bs)
        K = min(cdiv(self.mask_k, bs), nK)
        if K == 0:  # no search budget: only the forced blocks
            return torch.zeros(B, Hq, nQ, nK, dtype=torch.bool, device=dev)
        levels = 0
        while s ** levels < nK:
            levels += 1
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        _, last = query_block_positions(nQ, bs, Lq, Lk, dev)
        end = (last + 1 if causal else torch.full_like(last, Lk)).clamp(0, Lk).view(1, 1, nQ, 1)  # keys < end
        qb = F.pad(q.to(dt), (0, 0, 0, nQ * bs - Lq)).view(B, Hkv, G, nQ, bs, D)
        rows = torch.arange(nQ * bs, device=dev).view(nQ, bs)
        row_pos = (Lk - Lq + rows).view(1, 1, 1, nQ, bs, 1)
        row_ok = (rows < Lq).view(1, 1, 1, nQ, bs, 1)
        kf = k.to(dt)
        if self.sampling == "mean":  # pyramid of key sums per level, over s**levels blocks
            span = s ** levels
            sums = F.pad(kf, (0, 0, 0, span * bs - Lk)).view(B, Hkv, span, bs, D).sum(3)
            cnt = (torch.arange(span * bs, device=dev) < Lk).view(span, bs).sum(1).to(dt)
            pyramid = [(sums, cnt)]
            for _ in range(levels):
                sums, cnt = sums.view(B, Hkv, -1, s, D).sum(3), cnt.view(-1, s).sum(1)
                pyramid.append((sums, cnt))
        # State: K node slots per row, sorted by node id; invalid slots hold id 0 and ok=False.
        ids = torch.zeros(B, Hq, nQ, K, dtype=torch.int64, device=dev)
        ok = torch.zeros(B, Hq, nQ, K, dtype=torch.bool, device=dev)
        ok[..., 0] = end.view(1, 1, nQ) > 0
        big = torch.iinfo(torch.int64).max
        for level in range(levels - 1, -1, -1):  # a loop over tree levels (log nK), not over blocks
            width = (s ** level) * bs  # tokens per child
            child = (ids.unsqueeze(-1) * s + torch.arange(s, device=dev)).view(B, Hq, nQ, K * s)
            c_ok = ok.unsqueeze(-1).expand(B, Hq, nQ, K, s).reshape(B, Hq, nQ, K * s)
            a = child * width
            b = torch.minimum((child + 1) * width, end)
            c_ok = c_ok & (a < b)
            if self.sampling == "mean":
                sums, cnt = pyramid[level]
                node = child.clamp(max=sums.shape[2] - 1).view(B, Hkv, G * nQ * K * s, 1).expand(-1, -1, -1, D)
                rep = torch.gather(sums, 2, node) / cnt[node[..., 0]].clamp(min=1).unsqueeze(-1)
                rep_pos = a  # the child's first key decides which rows may see it
            else:
                if self.sampling == "first":
                    r = a
                elif self.sampling == "center":
                    r = (a + b - 1) // 2
                else:
                    m_idx = torch.arange(nQ, device=dev).view(1, 1, nQ, 1)
                    h = (child * 2654435761 + level * 40503 + m_idx * 97 + 12345) % 2147483647
                    r = a + h % (b - a).clamp(min=1)
                rep_pos = r.clamp(0, max(Lk - 1, 0))
                idx = rep_pos.view(B, Hkv, G * nQ * K * s, 1).expand(-1, -1, -1, D)
                rep = torch.gather(kf, 2, idx)
            rep = rep.view(B, Hkv, G, nQ, K * s, D)
            logits = torch.einsum("bkgmrd,bkgmcd->bkgmrc", qb, rep)  # [B, Hkv, G, nQ, bs, K*s]
            see = row_ok & ((rep_pos.view(B, Hkv, G, nQ, 1, K * s) <= row_pos) | (not causal))
            score = logits.masked_fill(~see, float("-inf")).amax(4).view(B, Hq, nQ, K * s)
            score = torch.where(c_ok, score.nan_to_num(neginf=-1e30), torch.full_like(score, float("-inf")))
            order = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :K]  # candidates in id order
            ids = torch.gather(child, -1, order)
            ok = torch.gather(c_ok, -1, order)
            ids, order = torch.sort(torch.where(ok, ids, torch.full_like(ids, big)), dim=-1)  # back to id order
            ok = ids != big
            ids = torch.where(ok, ids, torch.zeros_like(ids))
        keep = torch.zeros(B, Hq, nQ, nK + 1, dtype=torch.bool, device=dev)
        keep.scatter_(-1, torch.where(ok, ids, torch.full_like(ids, nK)).clamp(max=nK), True)
        return keep[..., :nK]

    def _plan(self, q, k, v, *, causal, layer_idx):
        B, Hq, Lq, D = q.shape
        Hkv, Lk = k.shape[1], k.shape[2]
        bs, dev = self.block_size, q.device
        geo = dict(block_q=bs, block_k=bs, q_len=Lq, k_len=Lk)
        nQ, nK = cdiv(Lq, bs), cdiv(Lk, bs)
        visible = visible_blocks(**geo, causal=causal, device=dev)
        forced = forced_blocks(**geo, sink_blocks=self.sink_blocks, local_blocks=cdiv(self.sliding_window, bs),
                               diagonal=True, device=dev)
        dense_rows = (torch.arange(nQ, device=dev) * bs < self.num_dense_queries(Lq, Lk)).view(-1, 1)
        keep = self.tree_search(q, k, causal=causal) | forced | dense_rows
        keep = keep & visible
        if self.gqa_policy == "group_union":
            keep = keep.view(B, Hkv, Hq // Hkv, nQ, nK).any(2)
        return BlockPlan.from_block_mask(keep, **geo, causal=causal)
