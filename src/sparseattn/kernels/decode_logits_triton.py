"""Triton exact decode logits (and softmax) read straight from the paged K cache.

``paged_logits_triton`` is what :func:`sparseattn.decode_methods.base.exact_logits` and
:func:`sparseattn.decode_methods.eviction.kept_attention` run on CUDA: the scaled ``q . k`` of the
step's queries over every cached token, ``-inf`` past each length and in a query's future. The
PyTorch code there (a gathered dense copy of K and a float32 matmul) is the CPU path and the oracle.

One program owns one (batch, KV head, run of tokens, row tile) and *all* ``G * Lq`` query rows of
the GQA group (up to ``BLOCK_M``): every key is read once from its page (address through the page
table, no gathered copy) and multiplied by the whole group, so K is read exactly once per step,
in its own dtype, with fp32 accumulation. Runs of ``tokens_per_prog`` tokens give the GPU enough
programs at batch 1; tokens past a sequence's length are written as ``-inf`` without any load.

``paged_probs_triton`` adds the softmax over each row: the logits kernel also writes each row's
running max / sum-exp of its run, and ``_normalise`` folds those and rewrites the logits in place
as probabilities (one read + one write of the logits instead of softmax + ``nan_to_num``).
``_launch(..., stats_mask=)`` restricts those statistics to the tokens of a bool ``[B, N]`` mask
(TokenSelect's candidates: :mod:`sparseattn.kernels.token_votes_triton`); the logits are unchanged.

Products (``PRODUCTS``), all with fp32 accumulation, chosen from the dtypes:

* ``"dot"``: ``tl.dot`` in the inputs' 16-bit dtype, the rows padded to 16: the tensor cores do the
  multiply, and the padding costs nothing (the kernel is bound by reading K);
* ``"dot_split"``: fp32 queries on a bf16 cache (TokenSelect's mean query): ``q`` is split
  exactly into three bf16 parts, three bf16 ``tl.dot`` (each product exact in fp32) give the fp32
  product on the tensor cores;
* ``"dot_f32"``: IEEE fp32 ``tl.dot`` (fp32 caches with more than 8 rows, other mixed dtypes);
* ``"sum"``: a broadcast multiply + ``tl.sum`` on the CUDA cores (fp32 caches with at most 8
  rows: an IEEE fp32 ``tl.dot`` is itself CUDA-core FMAs, and padding 4 rows to 16 quadruples them).

Triton's interpreter (3.9) computes 16-bit dot products wrongly: there every dot runs in IEEE
fp32 (``UPCAST``), which is the same math (a 16-bit product is exact in fp32, the sum is fp32 either way).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .dispatch import triton_interpreting


@triton.jit
def _load_k(k_head, phys, slot, ok, offs_d, head_dim, stride_kp, stride_ks, stride_kd, PAD_D: tl.constexpr):
    """The tile's keys [BLOCK_N, BLOCK_D] from page ``phys``, slot ``slot`` (zeros where not ``ok``)."""
    ptrs = (k_head + phys.to(tl.int64)[:, None] * stride_kp + slot.to(tl.int64)[:, None] * stride_ks
            + offs_d[None, :] * stride_kd)
    if PAD_D:
        k = tl.load(ptrs, mask=ok[:, None] & (offs_d < head_dim)[None, :], other=0.0)
    else:
        k = tl.load(ptrs, mask=ok[:, None], other=0.0)
    return k


@triton.jit
def _qk(q, q_mid, q_lo, k, SUM: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr):
    """[BLOCK_M, BLOCK_N] fp32 products of the rows and the keys ``k`` (see ``PRODUCTS``).

    One if/elif chain, no early return: code after a constexpr-taken ``return`` is still compiled."""
    if SUM:
        qk = tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], 2)
    elif UPCAST:  # "dot_f32", and every dot in the interpreter
        kt = tl.trans(k.to(tl.float32))
        qk = tl.dot(q.to(tl.float32), kt, input_precision="ieee")
        if SPLIT:
            qk = tl.dot(q_mid.to(tl.float32), kt, qk, input_precision="ieee")
            qk = tl.dot(q_lo.to(tl.float32), kt, qk, input_precision="ieee")
    else:
        kt = tl.trans(k)
        qk = tl.dot(q, kt)
        if SPLIT:
            qk = tl.dot(q_mid, kt, qk)
            qk = tl.dot(q_lo, kt, qk)
    return qk


@triton.jit
def _group_queries(Q, b64, hk, mt, seq_len, q_len, head_dim, stride_qb, stride_qh, stride_qm, stride_qd,
                   GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PAD_D: tl.constexpr,
                   SPLIT: tl.constexpr):
    """Row tile ``mt`` of KV head ``hk``'s query rows: ``(rows, row_ok, qpos, q, q_mid, q_lo)``.

    Row r of the group: query head ``hk * GROUP + r // q_len``, new token ``r % q_len``, which sits
    at position ``seq_len - q_len + r % q_len`` (bottom-right aligned; output row r of [G, Lq]).
    With ``SPLIT`` (fp32 q on a bf16 cache) ``q = q + q_mid + q_lo`` exactly, each part bf16: three
    bf16 products (each exact in fp32) give the fp32 product on the tensor cores (:func:`_qk`).
    """
    rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP * q_len
    h64 = (hk * GROUP + rows // q_len).to(tl.int64)
    qi64 = (rows % q_len).to(tl.int64)
    qpos = seq_len - q_len + rows % q_len
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = Q + b64 * stride_qb + h64[:, None] * stride_qh + qi64[:, None] * stride_qm + offs_d[None, :] * stride_qd
    if PAD_D:
        q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d < head_dim)[None, :], other=0.0)
    else:
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    q_mid = q
    q_lo = q
    if SPLIT:
        q = q.to(tl.float32)
        q_hi = q.to(tl.bfloat16)
        rest = q - q_hi.to(tl.float32)
        q_mid = rest.to(tl.bfloat16)
        q_lo = (rest - q_mid.to(tl.float32)).to(tl.bfloat16)
        q = q_hi
    return rows, row_ok, qpos, q, q_mid, q_lo


@triton.jit
def _paged_logits(
    Q, KP, Table, Lengths, Out, Stats, StatMask,
    scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kp, stride_kh, stride_ks, stride_kd,
    stride_tb, stride_tp, stride_lb, stride_sb, stride_sn,
    num_kv_heads, q_len, n_tokens, tokens_per_prog, num_runs, head_dim,
    PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PAD_D: tl.constexpr, SUM: tl.constexpr, SPLIT: tl.constexpr,
    UPCAST: tl.constexpr, STATS: tl.constexpr, MASKED: tl.constexpr,
):
    run = tl.program_id(0)
    bh = tl.program_id(1)
    mt = tl.program_id(2)
    b64 = (bh // num_kv_heads).to(tl.int64)
    hk = bh % num_kv_heads
    seq_len = tl.load(Lengths + b64 * stride_lb).to(tl.int32)
    n_rows = GROUP * q_len

    rows, row_ok, qpos, q, q_mid, q_lo = _group_queries(
        Q, b64, hk, mt, seq_len, q_len, head_dim, stride_qb, stride_qh, stride_qm, stride_qd,
        GROUP, BLOCK_M, BLOCK_D, PAD_D, SPLIT)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)

    grow64 = (b64 * num_kv_heads + hk) * n_rows + rows  # row of the flat [B * Hkv * G * Lq, N] output
    out_rows = Out + grow64 * n_tokens
    k_head = KP + hk.to(tl.int64) * stride_kh
    table_row = Table + b64 * stride_tb
    mask_row = StatMask + b64 * stride_sb

    s0 = run * tokens_per_prog
    s1 = tl.minimum(s0 + tokens_per_prog, n_tokens)
    live = tl.minimum(s1, tl.maximum(seq_len, s0))  # [s0, live): tokens of the sequence in this run
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # The next tile's page ids are loaded one iteration ahead: no K address waits on a load
    # issued in the same iteration.
    nxt = s0 + offs_n
    phys_next = tl.load(table_row + (nxt // PAGE_SIZE).to(tl.int64) * stride_tp, mask=nxt < live, other=0)
    for s in range(s0, live, BLOCK_N):
        pos = s + offs_n
        ok = pos < live
        phys = phys_next
        nxt = pos + BLOCK_N
        phys_next = tl.load(table_row + (nxt // PAGE_SIZE).to(tl.int64) * stride_tp, mask=nxt < live, other=0)
        if MASKED:  # issued before K: the (tiny, L2-resident) mask load overlaps the key load
            in_stats = tl.load(mask_row + pos.to(tl.int64) * stride_sn, mask=ok, other=0) != 0
        k = _load_k(k_head, phys, pos % PAGE_SIZE, ok, offs_d, head_dim, stride_kp, stride_ks, stride_kd, PAD_D)
        qk = _qk(q, q_mid, q_lo, k, SUM, SPLIT, UPCAST)
        # pos <= qpos also masks pos >= seq_len (qpos < seq_len) and padding rows (qpos < 0).
        x = tl.where(pos[None, :] <= qpos[:, None], qk * scale, float("-inf"))
        tl.store(out_rows[:, None] + pos[None, :], x, mask=row_ok[:, None] & (pos < s1)[None, :])
        if STATS:
            xs = x
            if MASKED:
                xs = tl.where(in_stats[None, :], x, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(xs, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: exp(-inf) = 0
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(xs - m_safe[:, None]), 1)
            m_i = m_new

    # Tiles past the sequence's end (ragged batch, unused table columns): -inf, nothing to read.
    neg = tl.full([BLOCK_M, BLOCK_N], float("-inf"), dtype=tl.float32)
    for s in range(s0 + tl.cdiv(live - s0, BLOCK_N) * BLOCK_N, s1, BLOCK_N):
        pos = s + offs_n
        tl.store(out_rows[:, None] + pos[None, :], neg, mask=row_ok[:, None] & (pos < s1)[None, :])
    if STATS:
        st = Stats + (grow64 * num_runs + run) * 2
        tl.store(st, m_i, mask=row_ok)
        tl.store(st + 1, l_i, mask=row_ok)


@triton.jit
def _normalise(X, Stats, n_tokens, tokens_per_prog, num_runs,
               BLOCK: tl.constexpr, RUN_BLOCK: tl.constexpr):
    """One (row, run): fold the row's per-run (max, sum-exp) and rewrite its logits as probabilities."""
    row64 = tl.program_id(0).to(tl.int64)
    run = tl.program_id(1)
    st = Stats + row64 * num_runs * 2
    m = tl.full([], float("-inf"), dtype=tl.float32)
    l = tl.zeros([], dtype=tl.float32)
    for r0 in range(0, num_runs, RUN_BLOCK):
        offs = r0 + tl.arange(0, RUN_BLOCK)
        ok = offs < num_runs
        m_r = tl.load(st + offs * 2, mask=ok, other=float("-inf"))
        l_r = tl.load(st + offs * 2 + 1, mask=ok, other=0.0)
        m_new = tl.maximum(m, tl.max(m_r, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp(m - m_safe) + tl.sum(l_r * tl.exp(m_r - m_safe), 0)
        m = m_new
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    inv = tl.where(l > 0.0, 1.0 / tl.where(l > 0.0, l, 1.0), 0.0)  # a row that sees nothing: all 0
    base = X + row64 * n_tokens
    s0 = run * tokens_per_prog
    s1 = tl.minimum(s0 + tokens_per_prog, n_tokens)
    for s in range(s0, s1, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        ok = offs < s1
        x = tl.load(base + offs, mask=ok, other=float("-inf"))
        tl.store(base + offs, tl.exp(x - m_safe) * inv, mask=ok)


# ----------------------------------------------------------------------------- launch
# (BLOCK_N, num_warps, num_stages) by path and head dim. A 16-bit K tile of 64 x 128 is 16 KB:
# with 3 stages in flight and a few programs per SM that covers H100's memory latency. The
# broadcast path holds a [BLOCK_M, BLOCK_N, D] fp32 product in registers, so its tile is short.
_CONFIGS_DOT_16BIT = {16: (128, 4, 3), 32: (128, 4, 3), 64: (128, 4, 3), 128: (64, 4, 3), 256: (32, 4, 3)}
_CONFIGS_DOT_FP32 = {16: (64, 4, 2), 32: (64, 4, 2), 64: (64, 4, 2), 128: (32, 4, 2), 256: (16, 4, 2)}
BROADCAST_ELEMENTS = 8192  # BLOCK_M * BLOCK_N * BLOCK_D of the broadcast product (64 fp32 per thread)
_CONFIG_INTERPRET = (32, 4, 1)  # the interpreter: small tiles that span pages (and two runs)
MAX_BLOCK_M = 64  # query rows per program (dot path); more rows go to more programs
MAX_BROADCAST_ROWS = 8  # more rows than this always take tl.dot
# A program reads at most this many tokens: enough programs for the GPU and for ragged batches
# to balance, while each program still streams >= 256 KB of K at D = 128 in bf16.
MAX_TOKENS_PER_PROG = 4096
INTERPRET_TARGET_PROGRAMS = 16


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: Optional[int]) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def choose_product(q_dtype: torch.dtype, k_dtype: torch.dtype, rows: int, use_dot: Optional[bool] = None) -> str:
    """The product for these dtypes and ``rows = G * Lq`` (see ``PRODUCTS``); ``use_dot`` forces
    the ``tl.dot`` family (True) or the broadcast product (False)."""
    sixteen = q_dtype == k_dtype and q_dtype in (torch.float16, torch.bfloat16)
    split = q_dtype == torch.float32 and k_dtype == torch.bfloat16
    if use_dot is None:
        use_dot = sixteen or split or rows > MAX_BROADCAST_ROWS
    if not use_dot:
        return "sum"
    return "dot" if sixteen else "dot_split" if split else "dot_f32"


def default_config(head_dim: int, product: str, block_m: int) -> tuple:
    if triton_interpreting():
        return _CONFIG_INTERPRET
    block_d = max(16, _pow2_at_least(head_dim))
    if product == "sum":
        return (max(16, min(128, BROADCAST_ELEMENTS // (block_m * block_d))), 4, 2)
    table = _CONFIGS_DOT_FP32 if product == "dot_f32" else _CONFIGS_DOT_16BIT
    return table.get(block_d, (16, 4, 2))


def tokens_per_program(n_tokens: int, programs: int, block_n: int, device: torch.device) -> int:
    """Tokens each program covers (a multiple of ``block_n``): about 4 programs per SM, runs of
    at most ``MAX_TOKENS_PER_PROG``. From the shapes only: no host sync."""
    if triton_interpreting() or device.type != "cuda":
        target, cap = INTERPRET_TARGET_PROGRAMS, 2 * block_n
    else:
        target, cap = 4 * _sm_count(device.index), MAX_TOKENS_PER_PROG
    runs = max(1, -(-target // max(programs, 1)))
    per = triton.cdiv(triton.cdiv(n_tokens, runs), block_n) * block_n
    return max(block_n, min(per, max(cap, block_n)))


def _shape(t):
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def _check(q, k_pages, page_table, lengths, page_size, scale, extra=(), float64: bool = False):
    """Validate the paged-logits inputs; ``extra``: more ``(name, tensor)`` that must be on q's
    device; ``float64``: also accept float64 (the PyTorch twins). Returns ``(B, Hq, Lq, D, Hkv)``."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a 4-D tensor [B, Hq, Lq, D], got {_shape(q)}")
    if not isinstance(k_pages, torch.Tensor) or k_pages.dim() != 4:
        raise ValueError(f"k_pages must be a 4-D tensor [capacity, Hkv, page_size, D], got {_shape(k_pages)}")
    allowed = (torch.float16, torch.bfloat16, torch.float32) + ((torch.float64,) if float64 else ())
    for name, t in (("q", q), ("k_pages", k_pages)):
        if t.dtype not in allowed:
            raise ValueError(f"{name} must be one of {[str(d) for d in allowed]}"
                             f"{'' if float64 else ' (float64 takes the PyTorch path)'}, got {t.dtype}")
    B, Hq, Lq, D = q.shape
    _, Hkv, P, Dk = k_pages.shape
    if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size <= 0 or P != page_size:
        raise ValueError(f"page_size must be a positive int equal to k_pages.shape[2] = {P}, got {page_size!r}")
    if Dk != D:
        raise ValueError(f"q and k_pages must share the head dim, got {D} and {Dk}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"the query heads ({Hq}) must be a multiple of the KV heads ({Hkv})")
    if not isinstance(page_table, torch.Tensor) or page_table.dim() != 2 or page_table.shape[0] != B \
            or page_table.dtype != torch.int32:
        raise ValueError(f"page_table must be int32 [B={B}, max_pages], got "
                         f"{page_table.dtype if isinstance(page_table, torch.Tensor) else ''} {_shape(page_table)}")
    if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1 or lengths.shape[0] != B \
            or lengths.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"lengths must be int32/int64 [B={B}], got "
                         f"{lengths.dtype if isinstance(lengths, torch.Tensor) else ''} {_shape(lengths)}")
    for name, t in (("k_pages", k_pages), ("page_table", page_table), ("lengths", lengths)) + tuple(extra):
        if t.device != q.device:
            raise ValueError(f"{name} must be on {q.device} (q's device), got {t.device}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    return B, Hq, Lq, D, Hkv


def group_tiles(q, k_pages, B: int, Hkv: int, rows: int, use_dot, config) -> tuple:
    """The product and tiles of a logits launch over a GQA group's ``rows = G * Lq`` query rows:
    ``(product, block_m, row_tiles, block_d, (block_n, num_warps, num_stages))``; raises for a
    broadcast product over too many rows and for grids past the CUDA limits."""
    D = q.shape[-1]
    product = choose_product(q.dtype, k_pages.dtype, rows, use_dot)
    if product == "sum" and rows > MAX_BROADCAST_ROWS:
        raise ValueError(f"the broadcast product takes at most {MAX_BROADCAST_ROWS} rows (G * Lq), got {rows}")
    # tl.dot needs 16 rows; the broadcast product takes the group as it is (>= 2: no size-1 dims).
    block_m = max(2, _pow2_at_least(rows)) if product == "sum" else min(max(16, _pow2_at_least(rows)), MAX_BLOCK_M)
    row_tiles = triton.cdiv(rows, block_m)
    if B * Hkv > 65535 or row_tiles > 65535:
        raise ValueError(f"B * Hkv = {B * Hkv} and the row tiles ({row_tiles}) must be <= 65535 (grid limits)")
    cfg = config or default_config(D, product, block_m)
    return product, block_m, row_tiles, max(16, _pow2_at_least(D)), cfg


def _launch(q, k_pages, page_table, lengths, page_size, scale, use_dot, config, stats, stats_mask=None):
    """The logits launch; with ``stats`` also each row's per-run (max, sum-exp) ``[rows, runs, 2]``,
    over the tokens where ``stats_mask`` (bool ``[B, N]``, optional) is True, else over every token."""
    B, Hq, Lq, D, Hkv = _check(q, k_pages, page_table, lengths, page_size, scale)
    G = Hq // Hkv
    N = page_table.shape[1] * page_size
    if stats_mask is not None:
        if not stats:
            raise ValueError("stats_mask restricts the row statistics: it needs stats=True")
        if not isinstance(stats_mask, torch.Tensor) or stats_mask.dtype != torch.bool \
                or tuple(stats_mask.shape) != (B, N) or stats_mask.device != q.device:
            got = (stats_mask.dtype, tuple(stats_mask.shape), stats_mask.device) \
                if isinstance(stats_mask, torch.Tensor) else type(stats_mask).__name__
            raise ValueError(f"stats_mask must be a bool [B={B}, N={N}] tensor on {q.device}, got {got}")
    out = torch.empty((B, Hkv, G, Lq, N), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, None, 0, 1
    rows = G * Lq
    product, block_m, row_tiles, block_d, (block_n, num_warps, num_stages) = group_tiles(
        q, k_pages, B, Hkv, rows, use_dot, config)
    per = tokens_per_program(N, B * Hkv * row_tiles, block_n, q.device)
    runs = triton.cdiv(N, per)
    stats_buf = torch.empty((B * Hkv * rows, runs, 2), dtype=torch.float32, device=q.device) if stats else out
    # The mask as bytes (a free view); without one, any pointer (never read) and zero strides.
    smask = stats_mask.view(torch.uint8) if stats_mask is not None else lengths
    smask_strides = stats_mask.stride() if stats_mask is not None else (0, 0)
    _paged_logits[(runs, B * Hkv, row_tiles)](
        q, k_pages, page_table, lengths, out, stats_buf, smask,
        float(scale),
        *q.stride(), *k_pages.stride(), *page_table.stride(), lengths.stride(0), *smask_strides,
        Hkv, Lq, N, per, runs, D,
        PAGE_SIZE=page_size, GROUP=G, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PAD_D=block_d != D,
        SUM=product == "sum", SPLIT=product == "dot_split",
        UPCAST=product == "dot_f32" or triton_interpreting(), STATS=stats, MASKED=stats_mask is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, stats_buf, runs, per


def paged_logits_triton(q: torch.Tensor, k_pages: torch.Tensor, page_table: torch.Tensor, lengths: torch.Tensor,
                        *, page_size: int, scale: float, use_dot: Optional[bool] = None,
                        config: Optional[tuple] = None) -> torch.Tensor:
    """Exact scaled logits of ``q`` over every cached token, read through the page table.

    Args:
        q: ``[B, Hq, Lq, D]`` float16/bfloat16/float32 (any strides): the newest ``Lq`` tokens of
            each sequence, bottom-right aligned (row ``i`` sits at position ``len_b - Lq + i``).
        k_pages: ``[capacity, Hkv, page_size, D]`` key pool (``PagedKVCache.k_pages``), same
            device, float16/bfloat16/float32; ``Hq`` a multiple of ``Hkv``.
        page_table: int32 ``[B, max_pages]`` physical page of each logical page.
        lengths: int32/int64 ``[B]`` tokens per sequence.
        scale: multiplies the fp32 product.
        use_dot, config: override the product (True: the ``tl.dot`` family, False: broadcast +
            ``tl.sum``, at most 8 rows) and ``(BLOCK_N, num_warps, num_stages)``; default from
            the dtypes and shapes (:func:`choose_product`, :func:`default_config`).

    Returns float32 ``[B, Hkv, G, Lq, N]`` (``N = max_pages * page_size``, ``G = Hq / Hkv``):
    ``scale * q . k`` with fp32 accumulation (16-bit inputs of one dtype multiply in that dtype,
    others in fp32: the PyTorch path's math), ``-inf`` past each length and in each query's future.
    No host sync: usable in CUDA graphs.
    """
    out, _, _, _ = _launch(q, k_pages, page_table, lengths, page_size, scale, use_dot, config, stats=False)
    return out


def paged_probs_triton(q: torch.Tensor, k_pages: torch.Tensor, page_table: torch.Tensor, lengths: torch.Tensor,
                       *, page_size: int, scale: float, use_dot: Optional[bool] = None,
                       config: Optional[tuple] = None) -> torch.Tensor:
    """Softmax over the tokens of :func:`paged_logits_triton`: float32 ``[B, Hkv, G, Lq, N]``,
    0 where masked (a row that sees no token is all 0). Same arguments."""
    out, stats, runs, per = _launch(q, k_pages, page_table, lengths, page_size, scale, use_dot, config, stats=True)
    if out.numel() == 0:
        return out
    N = out.shape[-1]
    rows = out.numel() // N
    block = 32 if triton_interpreting() else 1024
    _normalise[(rows, runs)](out, stats, N, per, runs, BLOCK=block,
                             RUN_BLOCK=min(128, max(16, _pow2_at_least(runs))), num_warps=4)
    return out


PRODUCTS = ("dot", "dot_split", "dot_f32", "sum")

__all__ = ["paged_logits_triton", "paged_probs_triton", "choose_product", "PRODUCTS"]
