"""AnchorAttention: key stripes selected by their difference to a sink + local anchor score."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..plan import BlockPlan
from .base import (ESTIMATE_CHUNK_ELEMENTS, PrefillMethod, cdiv, check_choice, check_float, check_int, compact_rows,
                   pool_blocks, query_block_positions, visible_blocks)
from .registry import register


@register
@dataclass(kw_only=True)
class AnchorAttention(PrefillMethod):
    """AnchorAttention (Zhang et al. 2025, arXiv 2505.23520), causal. Query blocks of
    ``block_size`` rows are grouped in runs of ``step`` (a *group*, 2048 rows by default):

    1. **Anchor.** For every query row, ``x_a = max_j q . k_j / sqrt(D)`` over the *init* keys
       (the first ``init_groups * step * block_size`` positions) and the *local* keys (from the
       start of the group ``local_groups - 1`` groups back up to the query itself), computed
       exactly. Both regions are computed densely in the plan (as the official step 1 does).
    2. **Difference-aware stripes.** Per query block, ``q_bar`` = mean of its queries and
       ``a_bar`` = mean of its rows' anchors; key ``j`` before the group's first position is a
       stripe of the group when ``q_bar . k_j / sqrt(D) + theta >= a_bar`` for any query block of
       the group (the official test ``(qk + diff) >= anchors``, shared by the group).
    3. **Plan.** ``granularity="stripe"`` (default, the method's own granularity): the group's
       stripes become the plan's token-level extra key columns of each of its query blocks (those
       not already inside a kept block). ``granularity="block"`` is the block-pooled form: a key
       block is kept when any of its keys is a stripe. Query blocks of a last, incomplete group
       attend densely (``dense_tail``; the official code runs them through dense FlashAttention).

    Differences from the official code, all deliberate: the official stripe scan skips keys
    ``[0, block_size)`` and the block just before the group (``range(BLOCK_SZ, start - BLOCK_SZ)``),
    and may select init keys a second time; here every key before the group is a candidate and
    keys already inside a kept block are never extras (no double counting). ``Lq != Lk`` uses
    bottom-right alignment (an extension; the official code needs ``Lq == Lk`` and whole groups).
    GQA policy: ``"per_q_head"`` (the official code repeats K/V per query head; plan
    ``H = Hq``) or ``"group_union"`` (``H = Hkv``). Estimation cost: the anchor,
    ``Lq * (init + local) * D``, plus ``(Lq / block_size) * Lk * D`` for the stripes.
    Memory: query rows are processed in chunks of whole groups near ``ESTIMATE_CHUNK_ELEMENTS``
    scores (at least one group); extra columns take ``O(Lq * Lk / block_size)``.

    Defaults (source: yuzhouzhang9/Anchor-Attention ``anchor_attn/src/modules/patch.py``
    ``ATTENTION_CONFIG_EXAMPLE["anchor_attn"]`` and ``anchor_attn/src/ops/anchor_attn_v4.py``):
    ``block_size=128`` (``block_size_M``), ``theta=12`` (``theta``/``difference``, natural-log
    units; the kernel multiplies by log2(e)), ``step=16``, ``init_groups=1`` and
    ``local_groups=1`` (``anchor_attn_step_1(..., init_cnt=1, local_cnt=1, ...)``).
    """

    name: ClassVar[str] = "anchor"

    block_size: int = 128
    theta: float = 12.0
    step: int = 16
    init_groups: int = 1
    local_groups: int = 1
    granularity: str = "stripe"
    dense_tail: bool = True
    gqa_policy: str = "per_q_head"

    def __post_init__(self):
        super().__post_init__()
        check_float("theta", self.theta)
        check_int("step", self.step, minimum=1)
        check_int("init_groups", self.init_groups, minimum=0)
        check_int("local_groups", self.local_groups, minimum=1)
        check_choice("granularity", self.granularity, ("stripe", "block"))
        if not isinstance(self.dense_tail, bool):
            raise ValueError(f"dense_tail must be a bool, got {self.dense_tail!r}")
        check_choice("gqa_policy", self.gqa_policy, ("per_q_head", "group_union"))

    def _plan(self, q, k, v, *, causal, layer_idx):
        self._require_causal(causal)
        B, Hq, Lq, D = q.shape
        Hkv, Lk = k.shape[1], k.shape[2]
        G, bs, st, dev = Hq // Hkv, self.block_size, self.step, q.device
        geo = dict(block_q=bs, block_k=bs, q_len=Lq, k_len=Lk)
        nQ, nK = cdiv(Lq, bs), cdiv(Lk, bs)
        nG = cdiv(nQ, st)
        gl = st * bs  # rows (and keys) per group
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        scale = 1.0 / math.sqrt(D)
        off = Lk - Lq
        init_end = min(self.init_groups * gl, Lk)
        # Local region of group g: keys from the first position of group g - local_groups + 1.
        g_idx = torch.arange(nG, device=dev)
        group_start = off + g_idx * gl  # first position of each group
        local_start = (off + (g_idx - self.local_groups + 1) * gl).clamp(min=0)  # [nG]
        Wl = self.local_groups * gl  # local keys per group, at most
        first, last = query_block_positions(nQ, bs, Lq, Lk, dev)
        m_idx = torch.arange(nQ, device=dev)

        # Forced blocks: init blocks and the local run up to the diagonal; dense tail rows.
        n = torch.arange(nK, device=dev).view(1, -1)
        loc_lo = (local_start[m_idx // st] // bs).view(-1, 1)
        d_hi = torch.where(last >= 0, last.clamp(min=0) // bs, torch.full_like(last, -1)).view(-1, 1)
        forced = (n * bs < init_end) | ((n >= loc_lo) & (n <= d_hi))
        if self.dense_tail and Lq % gl:
            forced = forced | (m_idx >= (Lq // gl) * st).view(-1, 1)
        visible = visible_blocks(**geo, causal=True, device=dev)
        blocks = forced & visible  # [nQ, nK]

        # Steps 1-2 per chunk of groups: exact anchors, then the stripe test.
        qf, kf = q.to(dt), k.to(dt)
        q_bar = pool_blocks(q, bs).to(dt)  # [B, Hq, nQ, D]
        j = torch.arange(Lk, device=dev)
        per_group = B * Hq * gl * (init_end + Wl) + B * Hq * st * Lk
        chunk = max(1, ESTIMATE_CHUNK_ELEMENTS // max(1, per_group))
        stripes = []
        for g0 in range(0, nG, chunk):  # a handful of chunks, for memory only
            g1 = min(nG, g0 + chunk)
            ng, R = g1 - g0, (g1 - g0) * gl
            r = torch.arange(g0 * gl, g1 * gl, device=dev)
            row_ok = (r < Lq).view(ng, gl, 1)
            pos = (off + r).view(ng, gl, 1)
            qc = F.pad(qf[:, :, g0 * gl:g1 * gl], (0, 0, 0, R - min(R, Lq - g0 * gl))).view(B, Hkv, G, ng, gl, D)
            s_init = torch.einsum("bkgnrd,bkjd->bkgnrj", qc, kf[:, :, :init_end]) * scale
            s_init = s_init.masked_fill(~(row_ok & (j[:init_end].view(1, 1, -1) <= pos)), float("-inf"))
            x_a = s_init.amax(-1)  # [B, Hkv, G, ng, gl]
            del s_init
            idx = local_start[g0:g1].view(-1, 1) + torch.arange(Wl, device=dev).view(1, -1)  # [ng, Wl]
            idx_ok = idx < Lk
            kw = kf[:, :, idx.clamp(max=Lk - 1).reshape(-1)].view(B, Hkv, ng, Wl, D)
            s_loc = torch.einsum("bkgnrd,bknjd->bkgnrj", qc, kw) * scale
            s_loc = s_loc.masked_fill(~(row_ok & idx_ok.view(ng, 1, Wl) & (idx.view(ng, 1, Wl) <= pos)),
                                      float("-inf"))
            x_a = torch.maximum(x_a, s_loc.amax(-1)).view(B, Hq, R)
            del s_loc, kw
            # Pooled anchor of each query block: the mean over its rows that see some key.
            x_a = x_a.view(B, Hq, ng * st, bs)
            fin = torch.isfinite(x_a)
            cnt = fin.sum(-1)
            a_bar = torch.where(fin, x_a, torch.zeros_like(x_a)).sum(-1) / cnt.clamp(min=1)
            a_bar = torch.where(cnt > 0, a_bar, torch.full_like(a_bar, float("inf")))  # [B, Hq, ng*st]
            m0, m1 = g0 * st, min(nQ, g1 * st)
            qb = F.pad(q_bar[:, :, m0:m1], (0, 0, 0, ng * st - (m1 - m0)))  # [B, Hq, ng*st, D]
            s_bar = torch.matmul(qb.view(B, Hkv, G * ng * st, D), kf.transpose(-1, -2)).view(B, Hq, ng * st, Lk)
            hit = (s_bar * scale + self.theta >= a_bar.unsqueeze(-1)).view(B, Hq, ng, st, Lk).any(3)
            cand = j.view(1, -1) < group_start[g0:g1].view(-1, 1)  # keys every query of the group sees
            stripes.append(hit & cand)
            del s_bar
        stripe = torch.cat(stripes, dim=2)  # [B, Hq, nG, Lk]: each group's stripes
        tail = self.dense_tail and Lq % gl
        if tail:
            stripe = stripe & (g_idx < Lq // gl).view(-1, 1)  # the dense tail group needs none
        H = Hq
        if self.gqa_policy == "group_union":
            stripe = stripe.view(B, Hkv, G, nG, Lk).any(2)
            H = Hkv

        if self.granularity == "block":
            hit_blocks = F.pad(stripe, (0, nK * bs - Lk)).view(B, H, nG, nK, bs).any(-1)[:, :, m_idx // st]
            return BlockPlan.from_block_mask((hit_blocks | blocks) & visible, **geo, causal=True)
        plan = BlockPlan.from_block_mask(blocks.view(1, 1, nQ, nK).expand(B, H, nQ, nK), **geo, causal=True)
        width = min(Lk, max(0, off + (nG - 1) * gl))  # keys before the last group: the most a row can get
        if width == 0:
            return plan
        stripe = stripe[..., :width]
        counts = torch.empty(B, H, nQ, dtype=torch.int32, device=dev)
        extra = torch.empty(B, H, nQ, width, dtype=torch.int32, device=dev)
        chunk = max(1, ESTIMATE_CHUNK_ELEMENTS // max(1, B * H * width))
        for m0 in range(0, nQ, chunk):  # compaction temporaries are int64: bounded chunks
            m1 = min(nQ, m0 + chunk)
            cols = stripe[:, :, m_idx[m0:m1] // st] & ~blocks[m0:m1, j[:width] // bs]  # not inside kept blocks
            counts[:, :, m0:m1], extra[:, :, m0:m1] = compact_rows(cols, j[:width].expand_as(cols), width)
        return replace(plan, extra_counts=counts, extra_indices=extra)
