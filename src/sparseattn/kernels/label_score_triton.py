"""Triton label scoring for Double Sparsity, read through the page table.

``label_scores_triton`` is what ``DoubleSparsity.token_scores`` (and so ``_select``) runs on CUDA:
the approximate logits ``q[C] . K_label[t] / sqrt(r)`` of every cached token, reduced over the GQA
group and the step's ``Lq`` new queries as the method's ``gqa_policy`` says, masked to the
candidates, written once as float32 ``[B, Hkv, N]`` (``[B, Hkv, G, N]`` for ``per_q_head``). The
PyTorch code in the method (every page's labels gathered and dequantized into a float32
``[B, H, N, r]`` copy, a matmul writing ``[B, Hkv, G, Lq, N]``, then mask and reduction passes) is
the CPU path and the oracle.

One program owns one (batch, KV head, run of tokens): it loads the group's ``G * Lq`` query rows
once (padded to ``BLOCK_R >= 16`` rows, kept in registers as tl.dot operands for the whole run),
then walks the run in tiles of ``BLOCK_T`` tokens: each token's physical page from the page table,
the tile's labels of each label head of the group straight from the label pool (16-bit labels in
the cache dtype, or 8-bit codes / 4-bit packed codes with their per-token ``lo`` / ``step``), one
``tl.dot`` per label head, and the reduction over queries and heads on the tile, so only the final
score is written. Labels are read exactly once; tokens that are not candidates (at and past
``len - n_forced``, unused page-table columns) are written as ``-inf`` without any load.

Products, fp32 accumulation: fp32 query labels are split exactly into three parts of the operand
dtype (bf16 for bf16 labels and for codes, which are exact in bf16; fp16 for fp16 labels) and
three tensor-core dots give the fp32 product (each partial product is exact in fp32). Codes are
multiplied as integers: ``q . label = step * (q . codes) + lo * sum(q)``. fp32 labels use an IEEE
fp32 dot. The interpreter (whose 16-bit dots are wrong) runs every dot in IEEE fp32: same math.
Padding 4 rows to 16 costs nothing that matters: the kernel is bound by reading labels (at r = 32,
bf16: 64 bytes and ~3 x 16 x 32 tensor-core MACs per token and label head).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .decode_logits_triton import tokens_per_program
from .dispatch import triton_interpreting

LABEL_BITS = (16, 8, 4)
GQA_POLICIES = ("group_max", "group_sum", "per_q_head")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Tokens per tile: the fp32 accumulator [BLOCK_R, BLOCK_T] stays at ACC_ELEMENTS (32 registers per
# thread at 4 warps) and one tile's labels (all label heads of the group) at TILE_BYTES. At 16 rows
# and r = 32, bf16: 256 tokens, 16 KB per tile; the loads are software-pipelined (cp.async, 3 stages,
# ~36 KB of shared memory, ~82 registers on sm_90 by ptxas), so ~5 programs per SM keep ~150 KB of
# labels in flight. One label cache per query head (4 tiles per step) takes 64 tokens.
ACC_ELEMENTS = 4096
TILE_BYTES = 16384
MAX_BLOCK_T = 256
_INTERPRET_BLOCK_T = 16  # the interpreter: small tiles that span pages (and several runs)


# ----------------------------------------------------------------------------- kernel
@triton.jit
def _split(q, OP: tl.constexpr):
    """fp32 ``q`` as three parts in the operand dtype with ``q = hi + mid + lo`` (exact for bf16;
    fp16 may lose the last bits of tiny values): three 16-bit dots give the fp32 product."""
    hi = q.to(OP)
    rest = q - hi.to(tl.float32)
    mid = rest.to(OP)
    lo = (rest - mid.to(tl.float32)).to(OP)
    return hi, mid, lo


@triton.jit
def _dot(q_hi, q_mid, q_lo, lab, OP: tl.constexpr, SPLIT: tl.constexpr):
    """``[BLOCK_R, BLOCK_T]`` fp32 products of the rows and the tile ``lab [BLOCK_T, BLOCK_C]``."""
    if SPLIT:  # 16-bit tensor-core dots, fp32 accumulation
        lt = tl.trans(lab.to(OP))
        acc = tl.dot(q_hi, lt)
        acc = tl.dot(q_mid, lt, acc)
        acc = tl.dot(q_lo, lt, acc)
    else:  # exact fp32 (fp32 labels, and every dot in the interpreter)
        acc = tl.dot(q_hi, tl.trans(lab.to(tl.float32)), input_precision="ieee")
    return acc


@triton.jit
def _label_scores(
    QL, Lab, Lo, Step, Table, Lengths, Out,
    scale, n_forced,
    stride_qb, stride_qh, stride_ql, stride_qc,
    stride_lp, stride_lh, stride_ls, stride_lc,
    stride_sp, stride_sh, stride_ss,
    stride_tb, stride_tp, stride_lb,
    stride_ob, stride_oh, stride_og, stride_on,
    num_kv_heads, n_tokens, tokens_per_prog, n_cols,
    PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr, LABEL_HEADS: tl.constexpr, LQ: tl.constexpr,
    ROWS_PER: tl.constexpr, BITS: tl.constexpr, POLICY: tl.constexpr, OP: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # POLICY: 0 group_max, 1 group_sum, 2 per_q_head. Row g * LQ + i of the program is query i of
    # query head hk * GROUP + g; label head hk * LABEL_HEADS + j serves the heads g in
    # [j * ROWS_PER, (j + 1) * ROWS_PER) (LABEL_HEADS = 1: one label cache per KV head; = GROUP:
    # one per query head). Every label head's tile is multiplied by all BLOCK_R rows (one padded
    # tl.dot; the rows of other label heads are dropped in the reduction).
    run = tl.program_id(0)
    bh = tl.program_id(1)
    b64 = (bh // num_kv_heads).to(tl.int64)
    hk = bh % num_kv_heads
    seq_len = tl.load(Lengths + b64 * stride_lb).to(tl.int32)
    limit = seq_len - n_forced  # candidates: positions < limit

    s0 = run * tokens_per_prog
    s1 = tl.minimum(s0 + tokens_per_prog, n_tokens)
    live = tl.minimum(s1, tl.maximum(limit, s0))  # [s0, live): the run's candidates
    offs_t = tl.arange(0, BLOCK_T)
    offs_c = tl.arange(0, BLOCK_C)
    rows = tl.arange(0, BLOCK_R)
    row_ok = rows < GROUP * LQ
    c_ok = offs_c < n_cols
    table_row = Table + b64 * stride_tb
    out_head = Out + b64 * stride_ob + hk.to(tl.int64) * stride_oh
    lab_group = Lab + (hk * LABEL_HEADS).to(tl.int64) * stride_lh
    sc_group = (hk * LABEL_HEADS).to(tl.int64) * stride_sh

    # The group's query rows, loaded once for the whole run (loop invariants: operands in registers).
    q_rows = (QL + b64 * stride_qb + (hk * GROUP + rows // LQ).to(tl.int64)[:, None] * stride_qh
              + (rows % LQ)[:, None] * stride_ql)
    q_ok = row_ok[:, None] & c_ok[None, :]
    if BITS == 4:  # byte c holds channel 2c (low nibble) and 2c + 1 (high nibble)
        qa = tl.load(q_rows + (2 * offs_c)[None, :] * stride_qc, mask=q_ok, other=0.0).to(tl.float32)
        qb = tl.load(q_rows + (2 * offs_c + 1)[None, :] * stride_qc, mask=q_ok, other=0.0).to(tl.float32)
        q_sum = tl.sum(qa, 1) + tl.sum(qb, 1)
    else:
        qa = tl.load(q_rows + offs_c[None, :] * stride_qc, mask=q_ok, other=0.0).to(tl.float32)
        qb = qa
        q_sum = tl.sum(qa, 1)
    if SPLIT:
        qa_hi, qa_mid, qa_lo = _split(qa, OP)
        qb_hi, qb_mid, qb_lo = _split(qb, OP)
    else:
        qa_hi, qa_mid, qa_lo = qa, qa, qa
        qb_hi, qb_mid, qb_lo = qb, qb, qb
    qpos = seq_len - LQ + rows % LQ  # each row's position (bottom-right aligned)

    # The next tile's page ids are loaded one iteration ahead: no label address waits on a load
    # issued in the same iteration.
    nxt = s0 + offs_t
    phys_next = tl.load(table_row + (nxt // PAGE_SIZE).to(tl.int64) * stride_tp, mask=nxt < live, other=0)
    for s in range(s0, live, BLOCK_T):
        pos = s + offs_t
        ok = pos < live
        phys = phys_next.to(tl.int64)
        slot = (pos % PAGE_SIZE).to(tl.int64)
        nxt = pos + BLOCK_T
        phys_next = tl.load(table_row + (nxt // PAGE_SIZE).to(tl.int64) * stride_tp, mask=nxt < live, other=0)
        lab_off = phys[:, None] * stride_lp + slot[:, None] * stride_ls + offs_c[None, :] * stride_lc
        lab_ok = ok[:, None] & c_ok[None, :]
        sc_off = phys * stride_sp + slot * stride_ss
        if POLICY == 1:
            score = tl.zeros([BLOCK_T], dtype=tl.float32)
        else:
            score = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
        for j in tl.static_range(LABEL_HEADS):
            x = tl.load(lab_group + j * stride_lh + lab_off, mask=lab_ok, other=0)
            if BITS == 16:
                acc = _dot(qa_hi, qa_mid, qa_lo, x, OP, SPLIT)
            else:
                # Codes are exact in bf16; a label is code * step + lo, so q . label =
                # step * (q . codes) + lo * sum(q): the dequantization costs two FMAs per row.
                if BITS == 4:
                    acc = _dot(qa_hi, qa_mid, qa_lo, x & 15, OP, SPLIT)
                    acc += _dot(qb_hi, qb_mid, qb_lo, x >> 4, OP, SPLIT)
                else:
                    acc = _dot(qa_hi, qa_mid, qa_lo, x, OP, SPLIT)
                step = tl.load(Step + sc_group + j * stride_sh + sc_off, mask=ok, other=0.0).to(tl.float32)
                lo = tl.load(Lo + sc_group + j * stride_sh + sc_off, mask=ok, other=0.0).to(tl.float32)
                acc = acc * step[None, :] + q_sum[:, None] * lo[None, :]
            # Each query's future is -inf (before the max over the queries).
            acc = tl.where(pos[None, :] <= qpos[:, None], acc * scale, float("-inf"))
            mine = row_ok & (rows >= j * ROWS_PER * LQ) & (rows < (j + 1) * ROWS_PER * LQ)  # label head j's rows
            if POLICY == 0:
                score = tl.maximum(score, tl.max(tl.where(mine[:, None], acc, float("-inf")), 0))
            elif LQ == 1 and POLICY == 1:  # one row per head: the group sum is a column sum
                score += tl.sum(tl.where(mine[:, None], acc, 0.0), 0)
            elif LQ == 1:  # per_q_head: the rows are the heads
                tl.store(out_head + rows[:, None] * stride_og + pos[None, :] * stride_on,
                         tl.where((pos < limit)[None, :], acc, float("-inf")),
                         mask=mine[:, None] & (pos < s1)[None, :])
            else:
                for gg in tl.static_range(ROWS_PER):
                    g = j * ROWS_PER + gg
                    in_g = (rows >= g * LQ) & (rows < (g + 1) * LQ)
                    best = tl.max(tl.where(in_g[:, None], acc, float("-inf")), 0)  # max over g's queries
                    if POLICY == 2:
                        tl.store(out_head + g * stride_og + pos * stride_on,
                                 tl.where(pos < limit, best, float("-inf")), mask=pos < s1)
                    else:
                        score += best
        if POLICY != 2:
            tl.store(out_head + pos * stride_on, tl.where(pos < limit, score, float("-inf")), mask=pos < s1)

    # Tiles past the candidates (ragged batch, the forced new tokens, unused table columns): -inf.
    neg = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
    for s in range(s0 + tl.cdiv(live - s0, BLOCK_T) * BLOCK_T, s1, BLOCK_T):
        pos = s + offs_t
        if POLICY == 2:
            for g in tl.static_range(GROUP):
                tl.store(out_head + g * stride_og + pos * stride_on, neg, mask=pos < s1)
        else:
            tl.store(out_head + pos * stride_on, neg, mask=pos < s1)


# ----------------------------------------------------------------------------- wrapper
def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _pow2_floor(x: int) -> int:
    return 1 << max(0, x.bit_length() - 1)


def default_config(rows: int, label_heads: int, n_cols: int, element_size: int) -> tuple:
    """(BLOCK_T, num_warps) for ``rows = G * Lq`` query rows and ``label_heads`` tiles of ``n_cols``
    columns of ``element_size`` bytes per step (see ``ACC_ELEMENTS``, ``TILE_BYTES``)."""
    if triton_interpreting():
        return _INTERPRET_BLOCK_T, 4
    block_r = max(16, _pow2_at_least(rows))
    tile_row = label_heads * max(16, _pow2_at_least(n_cols)) * element_size
    return max(16, min(MAX_BLOCK_T, ACC_ELEMENTS // block_r, _pow2_floor(max(1, TILE_BYTES // tile_row)))), 4


def label_scores_triton(qlab: torch.Tensor, labels: torch.Tensor, page_table: torch.Tensor, lengths: torch.Tensor,
                        *, page_size: int, num_kv_heads: int, label_bits: int = 16,
                        lo: Optional[torch.Tensor] = None, step: Optional[torch.Tensor] = None,
                        gqa_policy: str = "group_sum", n_forced: int = 0, scale: float = 1.0,
                        block_t: Optional[int] = None, num_warps: Optional[int] = None) -> torch.Tensor:
    """Double Sparsity's per-token ranking score, read through the page table.

    Args:
        qlab: ``[B, Hq, Lq, r]`` float32 (or float16/bfloat16) query labels: each query head's
            ``r`` label channels, already pseudo-quantized for 8/4-bit labels (any strides).
        labels: the label pool ``[capacity, H, page_size, r]`` in float16/bfloat16/float32
            (``label_bits=16``), or uint8 codes ``[capacity, H, page_size, r]`` (8) /
            ``[capacity, H, page_size, r / 2]`` (4: channel ``2c`` in the low nibble of byte
            ``c``, ``2c + 1`` in the high one). ``H`` label heads: ``Hkv`` (one per KV head) or
            ``Hq`` (one per query head); in general ``H / Hkv`` must divide ``G = Hq / Hkv``.
        page_table: int32 ``[B, max_pages]`` physical page of each logical page.
        lengths: int32/int64 ``[B]`` tokens per sequence (the step's ``Lq`` new ones included).
        page_size, num_kv_heads: the cache's page size and ``Hkv``.
        label_bits: 16, 8 or 4 (the storage format of ``labels``).
        lo, step: float16/bfloat16/float32 ``[capacity, H, page_size]`` per-token min and step of
            the codes (8/4 bits only): a label is ``code * step + lo``.
        gqa_policy: ``"group_max"`` (max over the group's heads and the queries), ``"group_sum"``
            (per head the max over the queries, summed over the heads) or ``"per_q_head"`` (per
            head the max over the queries).
        n_forced: the last ``n_forced`` tokens are forced, not candidates.
        scale: multiplies each fp32 product (the method's ``r ** -0.5``).
        block_t, num_warps: tile override (default :func:`default_config`).

    Returns:
        float32 ``[B, Hkv, N]`` (``[B, Hkv, G, N]`` for ``per_q_head``), ``N = max_pages *
        page_size``: ``scale * qlab . label`` (fp32 products and accumulation), each query masked
        to its past (query ``i`` at ``len - Lq + i``), reduced as above, ``-inf`` at and after
        ``len - n_forced``. No host sync: usable in CUDA graphs. (fp16 labels split the query
        labels into fp16 parts: query-label magnitudes must stay below 65504.)
    """
    if label_bits not in LABEL_BITS or isinstance(label_bits, bool):
        raise ValueError(f"label_bits must be one of {list(LABEL_BITS)}, got {label_bits!r}")
    if gqa_policy not in GQA_POLICIES:
        raise ValueError(f"gqa_policy must be one of {GQA_POLICIES}, got {gqa_policy!r}")
    if not isinstance(qlab, torch.Tensor) or qlab.dim() != 4 or qlab.dtype not in FLOAT_DTYPES:
        raise ValueError(f"qlab must be a float16/bfloat16/float32 [B, Hq, Lq, r] tensor, got "
                         f"{getattr(qlab, 'dtype', '')} {_shape(qlab)}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 4:
        raise ValueError(f"labels must be a 4-D [capacity, H, page_size, columns] tensor, got {_shape(labels)}")
    want = FLOAT_DTYPES if label_bits == 16 else (torch.uint8,)
    if labels.dtype not in want:
        raise ValueError(f"{label_bits}-bit labels must be {' / '.join(str(d) for d in want)}, got {labels.dtype}")
    B, Hq, Lq, r = qlab.shape
    _, H, P, n_cols = labels.shape
    if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size <= 0 or P != page_size:
        raise ValueError(f"page_size must be a positive int equal to labels.shape[2] = {P}, got {page_size!r}")
    if (2 * n_cols if label_bits == 4 else n_cols) != r:
        raise ValueError(f"qlab has r={r} channels but the {label_bits}-bit labels hold {n_cols} columns")
    if not isinstance(num_kv_heads, int) or isinstance(num_kv_heads, bool) or num_kv_heads <= 0 \
            or Hq % num_kv_heads or H % num_kv_heads or (Hq // num_kv_heads) % (H // num_kv_heads):
        raise ValueError(f"need Hq % Hkv == 0, H % Hkv == 0 and (H / Hkv) | (Hq / Hkv); got Hq={Hq}, "
                         f"label heads H={H}, Hkv={num_kv_heads!r}")
    if label_bits == 16:
        lo = step = labels  # unused by the kernel
    else:
        for name, t in (("lo", lo), ("step", step)):
            if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES or tuple(t.shape) != labels.shape[:3]:
                raise ValueError(f"{name} must be a float16/bfloat16/float32 {tuple(labels.shape[:3])} tensor for "
                                 f"{label_bits}-bit labels, got {getattr(t, 'dtype', '')} {_shape(t)}")
        if lo.stride() != step.stride():
            raise ValueError("lo and step must share strides (two pools of one label cache)")
    if not isinstance(page_table, torch.Tensor) or page_table.dtype != torch.int32 or page_table.dim() != 2 \
            or page_table.shape[0] != B:
        raise ValueError(f"page_table must be int32 [B={B}, max_pages], got {getattr(page_table, 'dtype', '')} "
                         f"{_shape(page_table)}")
    if not isinstance(lengths, torch.Tensor) or lengths.dtype not in (torch.int32, torch.int64) \
            or tuple(lengths.shape) != (B,):
        raise ValueError(f"lengths must be an int32/int64 [B={B}] tensor, got {getattr(lengths, 'dtype', '')} "
                         f"{_shape(lengths)}")
    for name, t in (("labels", labels), ("lo", lo), ("step", step), ("page_table", page_table),
                    ("lengths", lengths)):
        if t.device != qlab.device:
            raise ValueError(f"{name} is on {t.device}, qlab on {qlab.device}")
    if not isinstance(n_forced, int) or isinstance(n_forced, bool) or n_forced < 0:
        raise ValueError(f"n_forced must be an int >= 0, got {n_forced!r}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")

    Hkv = num_kv_heads
    G = Hq // Hkv
    N = page_table.shape[1] * P
    per_head = gqa_policy == "per_q_head"
    out = torch.empty((B, Hkv, G, N) if per_head else (B, Hkv, N), dtype=torch.float32, device=qlab.device)
    if out.numel() == 0:
        return out
    if Lq == 0:
        return out.fill_(float("-inf"))
    if B * Hkv > 65535:
        raise ValueError(f"B * Hkv = {B * Hkv} must be <= 65535 (grid limit)")
    cfg = default_config(G * Lq, H // Hkv, n_cols, labels.element_size())
    block_t, num_warps = block_t or cfg[0], num_warps or cfg[1]
    block_t = max(16, _pow2_at_least(block_t))
    block_c = max(16, _pow2_at_least(n_cols))  # tl.dot: every dim >= 16
    block_r = max(16, _pow2_at_least(G * Lq))
    # Operand dtype: 16-bit labels in their own dtype, codes as bf16 (exact), fp32 labels and every
    # dot in the interpreter (whose 16-bit dots are wrong) in IEEE fp32.
    split = not triton_interpreting() and labels.dtype != torch.float32
    op = tl.float16 if split and labels.dtype == torch.float16 else tl.bfloat16 if split else tl.float32
    per = tokens_per_program(N, B * Hkv, block_t, qlab.device)
    runs = triton.cdiv(N, per)
    o_strides = out.stride() if per_head else (out.stride(0), out.stride(1), 0, out.stride(2))
    _label_scores[(runs, B * Hkv)](
        qlab, labels, lo, step, page_table, lengths, out,
        float(scale), n_forced,
        *qlab.stride(), *labels.stride(), *lo.stride()[:3], *page_table.stride(), lengths.stride(0), *o_strides,
        Hkv, N, per, n_cols,
        PAGE_SIZE=P, GROUP=G, LABEL_HEADS=H // Hkv, LQ=Lq, ROWS_PER=G // (H // Hkv), BITS=label_bits,
        POLICY=GQA_POLICIES.index(gqa_policy), OP=op, SPLIT=split, BLOCK_R=block_r, BLOCK_T=block_t,
        BLOCK_C=block_c, num_warps=num_warps,
    )
    return out


__all__ = ["label_scores_triton", "default_config"]
