"""PBS-Attn: keys permuted inside segments, block selection on the permuted keys, mapped back."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from ..plan import BlockPlan
from .base import (ESTIMATE_CHUNK_ELEMENTS, PerHead, PrefillMethod, cdiv, check_choice, check_float, check_int,
                   check_per_head, compact_rows, head_values, pool_blocks, query_block_positions, select_threshold,
                   visible_blocks)
from .registry import register


@register
@dataclass(kw_only=True)
class PBS(PrefillMethod):
    """PBS-Attn, permuted block-sparse attention (Wang et al. 2025, arXiv 2510.21270), causal.

    The official method, per query head: (1) cut the keys into segments of ``segment_size``;
    inside every complete segment sort the keys by their mean attention from the last
    ``block_size`` queries (descending), so that the important keys of a segment share a few
    blocks; the incomplete tail segment keeps its order; queries are not permuted. (2) Mean-pool
    the query blocks and the *permuted* key blocks, ``softmax(q_bar . k_bar / sqrt(D))`` over the
    causal blocks outside the query block's own (diagonal) segment, and keep per row the fewest
    blocks whose mass reaches ``threshold`` (``select_blocks``); add the permuted block holding
    original key 0. (3) Every block of the diagonal segment is computed (causal inside).

    This engine has no permutation, so the plan reproduces the *selection* in original key
    order. Reproduced exactly: the permutation (per head and segment), the permuted block scores,
    the threshold selection, the forced first-key block and the diagonal segments, hence which
    (query block, permuted key block) pairs PBS computes. ``mapping`` says how a selected
    permuted block reaches the plan:

    * ``"blocks"`` (default): every original key block holding one of its keys is kept. The plan
      covers every (query, key) pair PBS computes, and more: a permuted block usually touches
      most original blocks of its segment, so the plan is denser than PBS (with
      ``segment_size = 2 * block_size``, the official default, nearly segment-level).
    * ``"columns"``: its keys become the plan's token-level extra columns. The plan then computes
      exactly PBS's (query, key) pairs (same softmax set), gathered per key instead of read as
      contiguous permuted blocks.

    Not reproduced: the permuted K/V layout and its kernel (the speed-up itself). Inputs with
    ``Lq <= segment_size`` get the dense plan (the official code falls back to SDPA). Choices of
    this library: the permutation score masks keys after each probe query (the official one does
    not mask; only diagonal-segment order, which never matters, can differ); a partial last
    query/key block is pooled over its real rows (the official code zero-pads and divides by
    ``block_size``); ``Lq != Lk`` uses bottom-right alignment with segments on key positions (the
    official code asserts ``Lq == Lk``); ties in the sort keep the lower key index.
    GQA policy: ``"per_q_head"`` (the official code asserts expanded heads: one permutation and
    one mask per query head; plan ``H = Hq``) or ``"group_union"`` (``H = Hkv``).
    Estimation cost: ``block_size * Lk * D`` for the permutation plus ``(L / block_size)**2 * D``.

    Defaults (source: xinghaow99/pbs-attn ``pbs_attn/patch/huggingface.py``
    ``get_permuted_block_sparse_attn_fwd``): ``block_size=128``, ``segment_size=256``,
    ``threshold=0.9``, ``force_first_block=True`` (``force_select_first_block``); mean pooling of
    queries and keys (``query_pool_mode='mean'``, ``key_pool_mode='mean'``). ``threshold`` may be
    per head or per (layer, head); 1 keeps every causal block.
    """

    name: ClassVar[str] = "pbs"

    block_size: int = 128
    segment_size: int = 256
    threshold: PerHead = 0.9
    force_first_block: bool = True
    mapping: str = "blocks"
    gqa_policy: str = "per_q_head"

    def __post_init__(self):
        super().__post_init__()
        check_int("segment_size", self.segment_size, minimum=1)
        if self.segment_size % self.block_size:
            raise ValueError(f"segment_size must be a multiple of block_size, got segment_size={self.segment_size}, "
                             f"block_size={self.block_size}")
        self.threshold = check_per_head("threshold", self.threshold,
                                        lambda n, x: check_float(n, x, minimum=0.0, maximum=1.0))
        if not isinstance(self.force_first_block, bool):
            raise ValueError(f"force_first_block must be a bool, got {self.force_first_block!r}")
        check_choice("mapping", self.mapping, ("blocks", "columns"))
        check_choice("gqa_policy", self.gqa_policy, ("per_q_head", "group_union"))

    def permutation(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """int64 ``[B, Hq, nS, S]``: per head and complete segment, the segment's key offsets in
        permuted order (most attended first, from the last ``block_size`` queries)."""
        B, Hq, Lq, D = q.shape
        Hkv, Lk = k.shape[1], k.shape[2]
        G, S = Hq // Hkv, self.segment_size
        nS = Lk // S
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        P = min(self.block_size, Lq)
        qc = q[:, :, Lq - P:].to(dt).reshape(B, Hkv, G * P, D)
        logits = torch.matmul(qc, k[:, :, :nS * S].to(dt).transpose(-1, -2)).view(B, Hq, P, nS * S) / math.sqrt(D)
        pos = (Lk - P + torch.arange(P, device=q.device)).view(-1, 1)
        logits = logits.masked_fill(torch.arange(nS * S, device=q.device).view(1, -1) > pos, float("-inf"))
        score = torch.softmax(logits, dim=-1).nan_to_num_(nan=0.0).mean(2)  # [B, Hq, nS*S]
        return torch.sort(score.view(B, Hq, nS, S), dim=-1, descending=True, stable=True).indices

    def _plan(self, q, k, v, *, causal, layer_idx):
        self._require_causal(causal)
        B, Hq, Lq, D = q.shape
        Hkv, Lk = k.shape[1], k.shape[2]
        G, bs, S, dev = Hq // Hkv, self.block_size, self.segment_size, q.device
        geo = dict(block_q=bs, block_k=bs, q_len=Lq, k_len=Lk)
        nQ, nK = cdiv(Lq, bs), cdiv(Lk, bs)
        if Lq <= S:
            return BlockPlan.dense(1, 1, **geo, causal=True, device=dev)
        bps, nS = S // bs, Lk // S  # blocks per segment, complete segments
        nP = nS * bps  # permuted blocks; blocks from nP on are the unpermuted tail
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32

        # (1) permutation and the permuted, mean-pooled key blocks.
        perm = self.permutation(q, k)  # [B, Hq, nS, S]
        key_of = (perm + (torch.arange(nS, device=dev) * S).view(1, 1, -1, 1)).view(B, Hq, nS * S)
        k_perm = torch.gather(k.to(dt), 2, key_of.view(B, Hkv, G * nS * S, 1).expand(-1, -1, -1, D))
        k_bar = torch.cat([k_perm.view(B, Hq, nP, bs, D).mean(3),  # permuted blocks, per query head
                           pool_blocks(k[:, :, nS * S:], bs).to(dt).repeat_interleave(G, 1)], dim=2)  # [B, Hq, nK, D]
        del k_perm
        q_bar = pool_blocks(q, bs).to(dt)  # [B, Hq, nQ, D]

        # (2) block scores and selection outside the diagonal segments.
        first, last = query_block_positions(nQ, bs, Lq, Lk, dev)
        seg_of_block = torch.arange(nK, device=dev) // bps
        seg_lo = (first.clamp(min=0) // S).view(-1, 1)
        seg_hi = torch.where(last >= 0, last.clamp(min=0) // S, torch.full_like(last, -1)).view(-1, 1)
        visible = visible_blocks(**geo, causal=True, device=dev)
        diag_seg = (seg_of_block.view(1, -1) >= seg_lo) & (seg_of_block.view(1, -1) <= seg_hi) & visible
        cand = visible & ~diag_seg  # [nQ, nK]
        logits = torch.matmul(q_bar, k_bar.transpose(-1, -2)) / math.sqrt(D)
        probs = torch.softmax(logits.masked_fill(~cand, float("-inf")), dim=-1).nan_to_num_(nan=0.0)
        tau = head_values(self.threshold, name="threshold", heads=Hq, q_heads=Hq, kv_heads=Hkv, layer_idx=layer_idx,
                          device=dev, dtype=probs.dtype)
        sel = select_threshold(probs, cand, torch.zeros_like(cand), tau)  # [B, Hq, nQ, nK], permuted blocks
        if self.force_first_block:
            # The permuted block holding original key 0 (block 0 when segment 0 is not permuted).
            if nS > 0:
                rank0 = (perm[:, :, 0] == 0).int().argmax(-1)  # [B, Hq]
            else:
                rank0 = torch.zeros(B, Hq, dtype=torch.long, device=dev)
            first_blk = torch.arange(nK, device=dev).view(1, 1, -1) == (rank0 // bs).view(B, Hq, 1)
            sel = sel | (first_blk.unsqueeze(2) & visible)

        # (3) back to original key order.
        H = Hq
        if self.mapping == "blocks":
            # Original block of every permuted key; a selected permuted block keeps all it touches.
            touch = torch.zeros(B, Hq, nS, bps, bps, dtype=dt, device=dev)  # [.., permuted, original]
            src = (perm // bs).view(B, Hq, nS, bps, bs)
            touch.scatter_(-1, src, 1.0)
            sel_p = sel[..., :nP].to(dt).view(B, Hq, nQ, nS, bps)
            orig = torch.einsum("bhqsp,bhspn->bhqsn", sel_p, touch).reshape(B, Hq, nQ, nP) > 0
            mask = torch.cat([orig, sel[..., nP:]], dim=-1) | diag_seg
            if self.gqa_policy == "group_union":
                mask = mask.view(B, Hkv, G, nQ, nK).any(2)
            return BlockPlan.from_block_mask(mask & visible, **geo, causal=True)

        # "columns": blocks = diagonal segments (+ unpermuted tail blocks); permuted blocks -> keys.
        blocks = diag_seg | (sel & (torch.arange(nK, device=dev) >= nP))
        if self.gqa_policy == "group_union":
            blocks = blocks.view(B, Hkv, G, nQ, nK).any(2)
            sel = sel.view(B, Hkv, G, nQ, nK)
            H = Hkv
        plan = BlockPlan.from_block_mask(blocks & visible, **geo, causal=True)
        if nS == 0:
            return plan
        L = nS * S
        rank = torch.empty_like(key_of).scatter_(-1, key_of, torch.arange(L, device=dev).expand_as(key_of))
        pblock = (rank // bs).view(B, Hkv, G, 1, L) if self.gqa_policy == "group_union" else (rank // bs).unsqueeze(2)
        kept = plan.block_mask()
        j = torch.arange(L, device=dev)
        counts = torch.empty(B, H, nQ, dtype=torch.int32, device=dev)
        extra = torch.empty(B, H, nQ, L, dtype=torch.int32, device=dev)
        chunk = max(1, ESTIMATE_CHUNK_ELEMENTS // max(1, B * Hq * L))
        for m0 in range(0, nQ, chunk):  # compaction temporaries are int64: bounded chunks
            m1 = min(nQ, m0 + chunk)
            s_c = sel[..., m0:m1, :nP]
            cols = torch.gather(s_c, -1, pblock.expand(*s_c.shape[:-1], L))  # key j kept if its block is
            if self.gqa_policy == "group_union":
                cols = cols.any(2)
            cols = cols & ~kept[:, :, m0:m1, j // bs]
            counts[:, :, m0:m1], extra[:, :, m0:m1] = compact_rows(cols, j.expand_as(cols), L)
        return replace(plan, extra_counts=counts, extra_indices=extra)
