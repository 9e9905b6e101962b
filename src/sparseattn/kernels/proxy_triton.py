"""Triton estimate of ProxyAttn (methods/proxy.py, the CUDA path of ``ProxyAttn._plan``).

The PyTorch code (the CPU path and the oracle) materialises, per chunk of sampled query rows,
the ``[rows, Lk]`` softmax of every proxy head, and for the per-head budgets the
``[B, Hq, probe_q, Lk]`` attention of the last queries; both are then summed per key block. Here
neither is built. Both estimates are "softmax rows, summed per key block and per group of rows"
and share two kernels:

1. ``_block_lse``: one program per (chunk of key blocks, tile of ``BLOCK_M`` rows, (batch, set))
   where a *set* is a proxy (its query heads pooled in fp32, mean or max, in registers) or a
   single query head (the budget probe). It computes ``S = q . K^T`` on the tensor cores (fp32
   accumulation) one key block at a time and writes each row's log2-sum-exp over that key block,
   ``lse[row, kb]`` (``-inf`` where the row sees none of its keys), to a float32 scratch
   ``[sets, nK, rows]`` (rows contiguous: each key block's store is coalesced). Programs above
   the causal diagonal skip their key blocks entirely.
2. ``_reduce_rows``: one program per (group of rows, (batch, set)): first each row's total
   ``lse_r`` (merged over its ``nK`` partials), then per key block ``sum_r exp2(lse[r, kb] -
   lse_r)``: the row group's softmax mass per key block, written once. For the proxies a group is
   a query block's sampled rows (the ``[B, P, nQ, nK]`` tile sums); for the probe it is the last
   ``probe_q`` rows of a head (``[B, Hq, nK]``), plus ``gamma``'s cumulative-mass target. In
   "candidates" mode the same launch writes the selection's inputs instead of the raw sums: per
   query head the scores with ``+inf`` on the forced visible blocks and ``-inf`` on the invisible
   ones, and the head's block count ``n_forced + min(ceil(need * n_vis / nK), n_candidates)``,
   so that one ``rank_mask_triton`` row selection gives the PyTorch path's keep mask.

So each softmax entry costs its share of one GEMM pass and one ``exp2`` (no second pass over the
keys); the scratch holds one float per (row, key block), ``block_size`` times less than the
probabilities. No atomics: deterministic.

Precision. The PyTorch path computes in float32 from float32 copies of q and k. A pooled proxy
query (the mean or max of ``Hq / P`` heads) is not representable in 16 bits, and rounding it
would move logits by ~``2**-9`` relative, enough to reorder tiles whose scores differ by a few
per cent. 16-bit inputs therefore split the pooled query into three 16-bit parts
``hi + mid + lo`` (exact to ~``2**-25`` relative; fp16 parts lose only what underflows below
``2**-24``) and accumulate three tensor-core products, while the keys are exact in 16 bits.
A set of a single head (the probe, or ``proxy_heads = Hq``) is exact in one product. float32
inputs (and proxies averaging several KV heads, whose mean keys are float32) use exact ``ieee``
float32 dot products. The results then match the PyTorch path to float32 rounding (~1e-6
relative), not bit for bit: the sums run in another order.

Cost on an H100 (estimates, not measurements; SmolLM2 at 32K: B=1, Hq=9, Hkv=3, D=64, bf16,
block 128, q_stride 16, probe 128): the proxies are 3 x 2048 rows against on average 16K causal
keys, 100 M logits of 3 x 64 bf16 MACs (19 TMAC: ~40 us at the tensor-core peak) and one
``exp2`` each (~30 us of MUFU time at most, partly overlapped), so ~60-100 us; the probe 9 x 128
rows x 32K keys, one product each (~10-15 us). Scratch: 3 x 2048 x 256 + 9 x 128 x 256 floats
(7.5 MB), written once and read twice from L2. The reductions, the cover count and the top-n
selection are a few microseconds each. The PyTorch path: 6.8 ms.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..checks import check_qk_pair, is_pow2
from .dispatch import triton_interpreting

LOG2E = 1.4426950408889634
#: One launch's scratch of per-(row, key block) partials stays near this many floats (chunks of
#: whole row groups; a single group may exceed it).
SCRATCH_ELEMENTS = 1 << 25

DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# _reduce_rows modes
_RAW, _CANDIDATES, _PROBE = 0, 1, 2


# ----------------------------------------------------------------------------- row geometry
# Slots. STRIDED (the proxies): slot ``r = m * per_block + i`` is query row ``m * block_size +
# (i + 1) * q_stride - 1`` (the last row of every run of ``q_stride``), clamped to the last row; a
# slot past the end counts only when its run holds the last row (ProxyAttn.proxy_scores'
# ``slot_ok``). Otherwise (the probe) the slots are the last ``n_rows`` rows. Written out in both
# kernels: a @triton.jit helper call costs the interpreter more than the kernel's own work.


# ----------------------------------------------------------------------------- kernel 1
# Lengths of 1 are not specialised (a single key block or row): Triton 3.6's coalescing pass has
# asserted on the size-1 layouts that specialisation produces (row_select_triton.py).
@triton.jit(do_not_specialize=["nK", "n_rows", "rows_chunk"])
def _block_lse(Q, K, Part,
               stride_qb, stride_qh, stride_ql, stride_qd, stride_kb, stride_kh, stride_kl, stride_kd,
               n_sets, heads_per_set, sets_per_kv, Lq, Lk, nK, n_rows, block_size, q_stride, per_block,
               row0, rows_chunk, pair0, kb_per_prog, qk_scale,
               STRIDED: tl.constexpr, CAUSAL: tl.constexpr, POOL_MAX: tl.constexpr, SPLIT: tl.constexpr,
               HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               SUB: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    kc = tl.program_id(0)
    rt = tl.program_id(1)
    pair_local = tl.program_id(2)
    pair = pair0 + pair_local
    b = (pair // n_sets).to(tl.int64)
    s = pair % n_sets

    rl = rt * BLOCK_M + tl.arange(0, BLOCK_M)  # chunk-local slot
    row_ok = rl < rows_chunk
    r = row0 + rl
    if STRIDED:
        m = r // per_block
        row = tl.minimum(m * block_size + (r - m * per_block + 1) * q_stride - 1, Lq - 1)
    else:
        row = Lq - n_rows + r
    row = tl.where(row_ok & (row >= 0), row, Lq - 1)  # in bounds; these rows are never read back
    pos = Lk - Lq + row  # bottom-right alignment; < 0: sees nothing
    if CAUSAL:
        p_max = tl.max(tl.where(row_ok, pos, -1), 0)
        kb_lim = tl.where(p_max >= 0, tl.minimum(tl.maximum(p_max, 0) // block_size + 1, nK), 0)
    else:
        kb_lim = nK
    kb_start = kc * kb_per_prog
    kb_end = tl.minimum(kb_start + kb_per_prog, kb_lim)
    if kb_start < kb_end:  # above the causal diagonal: nothing to do (the reduction never reads it)
        offs_d = tl.arange(0, D_PAD)
        d_ok = offs_d < HEAD_DIM
        # The set's query: its heads pooled in fp32 (as the PyTorch code's .to(float32).mean / amax).
        q_ptrs = (Q + b * stride_qb + row.to(tl.int64)[:, None] * stride_ql + offs_d[None, :] * stride_qd
                  + (s * heads_per_set).to(tl.int64) * stride_qh)
        q_mask = row_ok[:, None] & d_ok[None, :]
        qp = tl.load(q_ptrs, mask=q_mask, other=0.0).to(tl.float32)
        for g in range(1, heads_per_set):
            x = tl.load(q_ptrs + g * stride_qh, mask=q_mask, other=0.0).to(tl.float32)
            if POOL_MAX:
                qp = tl.maximum(qp, x)
            else:
                qp += x
        if not POOL_MAX:
            qp = qp / heads_per_set
        # Operands of the logit GEMM (see the module docstring): 0 = fp32, 1 = one 16-bit part,
        # 3 = hi + mid + lo 16-bit parts (each difference below is exact in fp32).
        if SPLIT == 0:
            q_hi = qp
            q_mid = qp
            q_lo = qp
        else:
            q_hi = qp.to(K.dtype.element_ty)
            rest = qp - q_hi.to(tl.float32)
            q_mid = rest.to(K.dtype.element_ty)
            q_lo = (rest - q_mid.to(tl.float32)).to(K.dtype.element_ty)

        kv = (s // sets_per_kv).to(tl.int64)
        k_base = K + b * stride_kb + kv * stride_kh + offs_d[None, :] * stride_kd
        part = Part + pair_local.to(tl.int64) * nK * rows_chunk + rl  # [nK, rows] per pair: coalesced stores
        for kb in range(kb_start, kb_end):
            m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            for sub in tl.static_range(SUB):  # sub-tiles of one key block (one when BLOCK_N >= block_size)
                offs_n = sub * BLOCK_N + tl.arange(0, BLOCK_N)
                cols = kb * block_size + offs_n
                key_ok = (offs_n < block_size) & (cols < Lk)
                k = tl.load(k_base + cols.to(tl.int64)[:, None] * stride_kl, mask=key_ok[:, None] & d_ok[None, :],
                            other=0.0)
                if SPLIT == 0:
                    k = k.to(tl.float32)
                k_t = tl.trans(k)
                if UPCAST_DOT:  # the interpreter's 16-bit dot products are wrong; upcast (exact)
                    k_t = k_t.to(tl.float32)
                    acc = tl.dot(q_hi.to(tl.float32), k_t, input_precision="ieee")
                    if SPLIT == 3:
                        acc = tl.dot(q_mid.to(tl.float32), k_t, acc, input_precision="ieee")
                        acc = tl.dot(q_lo.to(tl.float32), k_t, acc, input_precision="ieee")
                else:
                    acc = tl.dot(q_hi, k_t, input_precision=DOT_PRECISION)
                    if SPLIT == 3:
                        acc = tl.dot(q_mid, k_t, acc, input_precision=DOT_PRECISION)
                        acc = tl.dot(q_lo, k_t, acc, input_precision=DOT_PRECISION)
                ok = key_ok[None, :]
                if CAUSAL:
                    ok = ok & (cols[None, :] <= pos[:, None])
                sc = tl.where(ok, acc * qk_scale, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(sc, 1))
                # A row with nothing visible yet keeps m = -inf; subtract 0 so exp2 gives 0, not NaN.
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                l_i = l_i * tl.math.exp2(m_i - m_use) + tl.sum(tl.math.exp2(sc - m_use[:, None]), 1)
                m_i = m_new
            lse = tl.where(l_i > 0.0, m_i + tl.math.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
            tl.store(part + (tl.zeros([], dtype=tl.int64) + kb) * rows_chunk, lse, mask=row_ok)


# ----------------------------------------------------------------------------- kernel 2
@triton.jit(do_not_specialize=["nK", "n_rows", "rows_per_group", "n_groups", "rows_chunk"])
def _reduce_rows(Part, RowLse, Out, NOut, Count, Target,
                 n_sets, rep, n_groups, Lq, Lk, nK, n_rows, block_size, q_stride, rows_per_group,
                 group0, rows_chunk, pair0, sink_blocks, local_blocks, gamma,
                 MODE: tl.constexpr, STRIDED: tl.constexpr, CAUSAL: tl.constexpr, DIAGONAL: tl.constexpr,
                 NEED_ALL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, REP_PAD: tl.constexpr):
    gl = tl.program_id(0)  # row group within the chunk
    pair_local = tl.program_id(1)
    pair = pair0 + pair_local
    group = group0 + gl
    base = pair_local.to(tl.int64) * rows_chunk + gl * rows_per_group  # the group's first chunk-local row
    part = Part + pair_local.to(tl.int64) * nK * rows_chunk + gl * rows_per_group  # + kb * rows_chunk + j
    row0 = group * rows_per_group  # its first slot

    # 1. each row's log2-sum-exp over its key blocks (+inf for a row that sees nothing: its
    #    probabilities then come out as exactly 0, as the PyTorch path's nan_to_num gives)
    for j0 in range(0, rows_per_group, BLOCK_R):
        j = j0 + tl.arange(0, BLOCK_R)
        in_group = j < rows_per_group
        r = row0 + j
        if STRIDED:
            raw = group * block_size + (j + 1) * q_stride - 1  # a group is one query block's slots
            ok = in_group & ((raw < Lq) | ((raw >= Lq) & (raw - q_stride < Lq - 1)))
            pos = Lk - Lq + tl.minimum(raw, Lq - 1)
        else:
            ok = in_group
            pos = Lk - n_rows + r
        m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
        m_use = tl.zeros([BLOCK_R], dtype=tl.float32)
        z = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k0 in range(0, nK, BLOCK_K):
            kb = k0 + tl.arange(0, BLOCK_K)
            seen = ok[:, None] & (kb < nK)[None, :]
            if CAUSAL:  # _block_lse wrote every block a row sees, and maybe no other
                seen = seen & (kb[None, :] * block_size <= pos[:, None])
            x = tl.load(part + kb.to(tl.int64)[None, :] * rows_chunk + j[:, None], mask=seen, other=float("-inf"))
            m_new = tl.maximum(m, tl.max(x, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            z = z * tl.math.exp2(m - m_use) + tl.sum(tl.math.exp2(x - m_use[:, None]), 1)
            m = m_new
        lse = tl.where(z > 0.0, m_use + tl.math.log2(tl.where(z > 0.0, z, 1.0)), float("inf"))
        tl.store(RowLse + base + j, lse, mask=in_group)
    tl.debug_barrier()  # the sums below read row totals that other threads wrote

    # Query block geometry (the group is query block `group` in the strided modes).
    first = Lk - Lq + group * block_size
    last = Lk - Lq + tl.minimum((group + 1) * block_size, Lq) - 1
    if CAUSAL:
        limit = tl.where(last >= 0, tl.minimum(tl.maximum(last, 0) // block_size + 1, nK), 0)
    else:
        limit = tl.zeros([], dtype=tl.int32) + nK
    d_lo = tl.maximum(first, 0) // block_size
    d_hi = tl.where(last >= 0, tl.maximum(last, 0) // block_size, -1)
    local_lo = tl.where(d_hi >= 0, d_lo - local_blocks, d_lo)  # local blocks only when a key is seen

    # 2. the group's mass per key block
    total = tl.zeros([], dtype=tl.float32)
    n_forced = tl.zeros([], dtype=tl.int32)
    g = tl.arange(0, REP_PAD)
    for k0 in range(0, nK, BLOCK_K):
        kb = k0 + tl.arange(0, BLOCK_K)
        kb_ok = kb < nK
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        for j0 in range(0, rows_per_group, BLOCK_R):
            j = j0 + tl.arange(0, BLOCK_R)
            r = row0 + j
            if STRIDED:
                raw = group * block_size + (j + 1) * q_stride - 1
                ok = (j < rows_per_group) & ((raw < Lq) | ((raw >= Lq) & (raw - q_stride < Lq - 1)))
                pos = Lk - Lq + tl.minimum(raw, Lq - 1)
            else:
                ok = j < rows_per_group
                pos = Lk - n_rows + r
            seen = ok[:, None] & kb_ok[None, :]
            if CAUSAL:
                seen = seen & (kb[None, :] * block_size <= pos[:, None])
            lse = tl.load(RowLse + base + j, mask=ok, other=float("inf"))
            x = tl.load(part + kb.to(tl.int64)[None, :] * rows_chunk + j[:, None], mask=seen, other=float("-inf"))
            acc += tl.sum(tl.math.exp2(x - lse[:, None]), 0)
        if MODE == 2:  # probe: a head's block masses, and their total
            tl.store(Out + pair.to(tl.int64) * nK + kb, acc, mask=kb_ok)
            total += tl.sum(tl.where(kb_ok, acc, 0.0), 0)
        elif MODE == 1:  # candidates: +inf forced, -inf invisible, once per query head of the proxy
            visible = kb < limit
            forced = (kb < sink_blocks) | ((kb < d_lo) & (kb >= local_lo))
            if DIAGONAL:
                forced = forced | ((kb >= d_lo) & (kb <= d_hi))
            forced = forced & visible
            n_forced += tl.sum(forced.to(tl.int32), 0)
            val = tl.where(forced, float("inf"), tl.where(visible, acc, float("-inf")))
            out = ((pair.to(tl.int64) * rep + g[:, None]) * n_groups + group) * nK + kb[None, :]
            tl.store(Out + out, val[None, :] + tl.zeros([REP_PAD, BLOCK_K], dtype=tl.float32),
                     mask=(g < rep)[:, None] & kb_ok[None, :])
        else:  # raw tile sums [B, P, nQ, nK]
            tl.store(Out + (pair.to(tl.int64) * n_groups + group) * nK + kb, acc, mask=kb_ok)

    if MODE == 2:
        # need = 1 + #(csum < gamma * total) = 1 + #(csum <= the float32 just below gamma * total)
        # (the cover count's rule); -1 marks gamma * total <= 0 (then need = 0).
        t = gamma * total
        below = (t.to(tl.int32, bitcast=True) - 1).to(tl.float32, bitcast=True)
        tl.store(Target + pair, tl.where(t > 0.0, below, -1.0))
    if MODE == 1:
        # Per query head: the forced visible blocks plus ceil(need / nK * visible) candidates
        # (integer ceil: the PyTorch path's ceil(frac * n_vis - 1e-9) equals it exactly).
        h = pair.to(tl.int64) * rep + g  # b * Hq + head
        g_ok = g < rep
        if NEED_ALL:
            need = tl.zeros([REP_PAD], dtype=tl.int64) + nK
        else:
            cnt = tl.load(Count + h, mask=g_ok, other=0).to(tl.int64)
            tgt = tl.load(Target + h, mask=g_ok, other=-1.0)
            need = tl.where(tgt >= 0.0, tl.minimum(cnt, nK), 0)
        n_vis = limit.to(tl.int64)
        n = (need * n_vis + nK - 1) // nK
        n_total = n_forced.to(tl.int64) + tl.minimum(n, n_vis - n_forced.to(tl.int64))
        tl.store(NOut + h * n_groups + group, n_total, mask=g_ok)


# ----------------------------------------------------------------------------- wrappers
class ProxyConfig(NamedTuple):
    """Tiles (powers of two) and launch settings.

    ``block_m`` x ``block_n``: the logit GEMM tile (rows x keys, at least 16 each: tl.dot; a key
    block wider than ``block_n`` takes several sub-tiles, a narrower one masks the rest);
    ``kb_per_prog`` key blocks per program (any int >= 1); ``num_warps`` / ``num_stages`` for it.
    ``block_r`` x ``block_k``: rows x key blocks per step of the reduction.
    """

    block_m: int
    block_n: int
    kb_per_prog: int
    num_warps: int
    num_stages: int
    block_r: int
    block_k: int


# 16-bit inputs on Hopper: 128 x 128 fp32 logit tiles (8 warps), one key block of 128 per step,
# 8 key blocks per program (~800 causal programs at 32K over the 3 proxies). Not yet swept on the
# H100; `config=` overrides.
_CONFIG_16BIT = ProxyConfig(128, 128, 8, 8, 2, 16, 128)
# float32 runs exact (ieee) dot products on the FMA units: smaller tiles keep them in registers.
_CONFIG_FP32 = ProxyConfig(64, 64, 8, 4, 2, 16, 128)
# The interpreter runs tiles as numpy arrays: small tiles exercise the multi-tile paths.
_CONFIG_INTERPRET = ProxyConfig(64, 64, 8, 4, 1, 64, 64)


def default_config(dtype: torch.dtype) -> ProxyConfig:
    if triton_interpreting():
        return _CONFIG_INTERPRET
    return _CONFIG_FP32 if dtype == torch.float32 else _CONFIG_16BIT


def _check_int(name: str, value, minimum: int) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_config(config) -> Optional[ProxyConfig]:
    if config is None:
        return None
    try:
        cfg = ProxyConfig(*config)
    except TypeError:
        raise ValueError(f"config must have the fields {ProxyConfig._fields}, got {config!r}") from None
    tiles = (cfg.block_m, cfg.block_n, cfg.num_warps, cfg.block_r, cfg.block_k)
    if not all(is_pow2(v) for v in tiles) or min(cfg.block_m, cfg.block_n) < 16 or \
            not all(isinstance(v, int) and v >= 1 for v in (cfg.kb_per_prog, cfg.num_stages)):
        raise ValueError(f"config tiles and num_warps must be powers of two (block_m/n >= 16), kb_per_prog "
                         f"and num_stages ints >= 1; got {cfg}")
    return cfg


def _proxy_keys(k: torch.Tensor, proxies: int) -> torch.Tensor:
    """A proxy's keys: its KV head, or the float32 mean of the KV heads it spans (the PyTorch
    code's ``k.to(float32).view(B, P, Hkv // P, Lk, D).mean(2)``, the same op)."""
    B, Hkv, Lk, D = k.shape
    if proxies >= Hkv:
        return k
    return k.to(torch.float32).view(B, proxies, Hkv // proxies, Lk, D).mean(2)


def _estimate(q, k, *, n_sets, mode, strided, n_rows, rows_per_group, n_groups, block_size, q_stride,
              pool_max, causal, out, n_out=None, count=None, target=None, rep=1, gamma=0.0, sink_blocks=0,
              local_blocks=0, diagonal=False, config=None):
    """Both kernels over chunks of (batch, set) pairs and row groups (memory only)."""
    B, Hq, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    nK = triton.cdiv(Lk, block_size)
    heads_per_set = Hq // n_sets
    cfg = config if config is not None else default_config(q.dtype)
    if k.dtype == torch.float32:  # fp32 inputs, or mean keys of several KV heads
        split, precision = 0, "ieee"
    else:
        split, precision = (1 if heads_per_set == 1 else 3), "tf32"  # the precision is moot for 16 bits
    upcast = split != 0 and triton_interpreting()
    block_n = min(cfg.block_n, max(16, triton.next_power_of_2(block_size)))
    sub = triton.cdiv(block_size, block_n)
    block_m = min(cfg.block_m, max(16, triton.next_power_of_2(rows_per_group * n_groups)))
    block_r = min(cfg.block_r, max(2, triton.next_power_of_2(rows_per_group)))
    block_k = min(cfg.block_k, max(2, triton.next_power_of_2(nK)))
    qk_scale = LOG2E / math.sqrt(D)

    pairs = B * n_sets
    per_group = rows_per_group * nK
    groups_per = max(1, min(n_groups, SCRATCH_ELEMENTS // max(1, per_group)))
    pairs_per = max(1, min(pairs, 65535, SCRATCH_ELEMENTS // (groups_per * per_group))) if groups_per == n_groups else 1
    rows_cap = groups_per * rows_per_group
    part = torch.empty(pairs_per * rows_cap * nK, dtype=torch.float32, device=q.device)
    row_lse = torch.empty(pairs_per * rows_cap, dtype=torch.float32, device=q.device)
    dummy = row_lse
    for p0 in range(0, pairs, pairs_per):  # a few chunks at most, for memory only
        npairs = min(pairs_per, pairs - p0)
        for g0 in range(0, n_groups, groups_per):
            ng = min(groups_per, n_groups - g0)
            rows_chunk = ng * rows_per_group
            _block_lse[(triton.cdiv(nK, cfg.kb_per_prog), triton.cdiv(rows_chunk, block_m), npairs)](
                q, k, part, *q.stride(), *k.stride(),
                n_sets, heads_per_set, max(1, n_sets // Hk), Lq, Lk, nK, n_rows, block_size, q_stride,
                max(1, block_size // q_stride), g0 * rows_per_group, rows_chunk, p0, cfg.kb_per_prog, qk_scale,
                STRIDED=strided, CAUSAL=causal, POOL_MAX=pool_max, SPLIT=split, HEAD_DIM=D,
                D_PAD=max(16, triton.next_power_of_2(D)), BLOCK_M=block_m, BLOCK_N=block_n, SUB=sub,
                DOT_PRECISION=precision, UPCAST_DOT=upcast, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            _reduce_rows[(ng, npairs)](
                part, row_lse, out, n_out if n_out is not None else dummy,
                count if count is not None else dummy, target if target is not None else dummy,
                n_sets, rep, n_groups, Lq, Lk, nK, n_rows, block_size, q_stride, rows_per_group, g0, rows_chunk, p0,
                sink_blocks, local_blocks, float(gamma),
                MODE=mode, STRIDED=strided, CAUSAL=causal, DIAGONAL=diagonal,
                NEED_ALL=mode == _CANDIDATES and count is None, BLOCK_R=block_r, BLOCK_K=block_k,
                REP_PAD=max(2, triton.next_power_of_2(rep)), num_warps=4)


def _check_proxy_args(q, k, proxies, head_pool, block_size, q_stride, causal):
    check_qk_pair(q, k, DTYPES)
    Hq, Hkv = q.shape[1], k.shape[1]
    proxies = _check_int("proxies", proxies, 1)
    if Hq % proxies or (proxies % Hkv and Hkv % proxies):
        raise ValueError(f"proxies={proxies} must divide Hq={Hq} and divide or be a multiple of Hkv={Hkv}")
    if head_pool not in ("mean", "max"):
        raise ValueError(f"head_pool must be 'mean' or 'max', got {head_pool!r}")
    block_size = _check_int("block_size", block_size, 1)
    q_stride = _check_int("q_stride", q_stride, 1)
    if block_size % q_stride:
        raise ValueError(f"block_size must be a multiple of q_stride, got block_size={block_size}, "
                         f"q_stride={q_stride}")
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    return proxies, block_size, q_stride


def proxy_scores_triton(q: torch.Tensor, k: torch.Tensor, *, proxies: int, head_pool: str = "mean",
                        block_size: int = 128, q_stride: int = 16, causal: bool = True,
                        config: Optional[tuple] = None) -> torch.Tensor:
    """float32 ``[B, P, nQ, nK]``: each proxy's softmax mass per (query block, key block) tile.

    The twin of ``ProxyAttn.proxy_scores`` (``P = proxies``): query heads pooled per contiguous
    group of ``Hq / P`` (``head_pool`` "mean" or "max", fp32), keys = the group's KV head (or the
    mean of the KV heads it spans), every ``q_stride``-th row (and the last row) softmaxed over its
    visible keys (bottom-right causal, or all keys), summed per tile. ``q [B, Hq, Lq, D]``,
    ``k [B, Hkv, Lk, D]`` fp16 / bf16 / fp32, any strides. Equal up to float32 rounding. No host sync.
    """
    proxies, block_size, q_stride = _check_proxy_args(q, k, proxies, head_pool, block_size, q_stride, causal)
    cfg = _check_config(config)
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    nQ, nK = triton.cdiv(Lq, block_size), triton.cdiv(Lk, block_size)
    out = torch.empty((B, proxies, nQ, nK), dtype=torch.float32, device=q.device)  # every entry is written
    if out.numel() == 0:
        return out
    per_block = block_size // q_stride
    _estimate(q, _proxy_keys(k, proxies), n_sets=proxies, mode=_RAW, strided=True, n_rows=Lq,
              rows_per_group=per_block, n_groups=nQ, block_size=block_size, q_stride=q_stride,
              pool_max=head_pool == "max", causal=causal, out=out, config=cfg)
    return out


def proxy_candidates_triton(q: torch.Tensor, k: torch.Tensor, *, proxies: int, head_pool: str = "mean",
                            block_size: int = 128, q_stride: int = 16, causal: bool = True, sink_blocks: int = 1,
                            local_blocks: int = 0, diagonal: bool = True, count: Optional[torch.Tensor] = None,
                            target: Optional[torch.Tensor] = None,
                            config: Optional[tuple] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The inputs of ProxyAttn's per-head selection, from the proxy scores in one pass.

    Returns ``(scores float32 [B, Hq, nQ, nK], n int64 [B, Hq, nQ])``: per query head its proxy's
    tile sums (:func:`proxy_scores_triton`), ``+inf`` on the forced blocks (sink, local, diagonal:
    ``methods.base.forced_blocks``) that are visible, ``-inf`` on the invisible ones; ``n`` = the
    forced visible blocks plus ``min(ceil(need * n_vis / nK), candidates)`` where ``n_vis`` is the
    row's visible blocks and ``need`` the head's block budget: ``nK`` when ``count`` is None
    (gamma = 1), else ``min(count, nK)`` where ``target >= 0`` and 0 elsewhere (``count`` from
    ``cover_count_triton(mass, target)``, both ``[B, Hq]``: :func:`probe_block_mass_triton`).
    ``rank_mask_triton(scores, n)`` is then ProxyAttn's keep mask. No host sync.
    """
    proxies, block_size, q_stride = _check_proxy_args(q, k, proxies, head_pool, block_size, q_stride, causal)
    cfg = _check_config(config)
    sink_blocks = _check_int("sink_blocks", sink_blocks, 0)
    local_blocks = _check_int("local_blocks", local_blocks, 0)
    if not isinstance(diagonal, bool):
        raise ValueError(f"diagonal must be a bool, got {diagonal!r}")
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    if (count is None) != (target is None):
        raise ValueError("count and target go together (both None: every head needs all blocks)")
    for name, x, dtypes in (("count", count, (torch.int32, torch.int64)), ("target", target, (torch.float32,))):
        if x is not None and (not isinstance(x, torch.Tensor) or tuple(x.shape) != (B, Hq) or x.dtype not in dtypes
                              or x.device != q.device):
            raise ValueError(f"{name} must be a {dtypes[0]} tensor [B, Hq] = [{B}, {Hq}] on {q.device}, got "
                             f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
    nQ, nK = triton.cdiv(Lq, block_size), triton.cdiv(Lk, block_size)
    scores = torch.empty((B, Hq, nQ, nK), dtype=torch.float32, device=q.device)
    n = torch.empty((B, Hq, nQ), dtype=torch.int64, device=q.device)
    if scores.numel() == 0:
        return scores, n.zero_()
    _estimate(q, _proxy_keys(k, proxies), n_sets=proxies, mode=_CANDIDATES, strided=True, n_rows=Lq,
              rows_per_group=block_size // q_stride, n_groups=nQ, block_size=block_size, q_stride=q_stride,
              pool_max=head_pool == "max", causal=causal, out=scores, n_out=n,
              count=None if count is None else count.contiguous(),
              target=None if target is None else target.contiguous(), rep=Hq // proxies,
              sink_blocks=sink_blocks, local_blocks=local_blocks, diagonal=diagonal, config=cfg)
    return scores, n


def probe_block_mass_triton(q: torch.Tensor, k: torch.Tensor, *, n_last: int, block_size: int, gamma: float,
                            config: Optional[tuple] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """ProxyAttn's budget probe: ``(mass float32 [B, Hq, nK], target float32 [B, Hq])``.

    ``mass`` = ``sum_pool_last(last_queries_attention(q, k, n_last).sum(-2), block_size)`` (each
    query head's last ``min(n_last, Lq)`` queries, causal, softmax over keys, summed per key
    block) up to float32 rounding; ``target`` = the largest float32 below ``float32(gamma) *
    mass.sum(-1)`` (so that ``cover_count_triton(mass, target)`` = 1 + #(prefix sums < gamma *
    total), ``head_budget_fraction``'s rule), or -1 where that product is not > 0 (need = 0).
    No host sync.
    """
    check_qk_pair(q, k, DTYPES)
    n_last = _check_int("n_last", n_last, 1)
    block_size = _check_int("block_size", block_size, 1)
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be a number in [0, 1], got {gamma!r}")
    cfg = _check_config(config)
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    nK = triton.cdiv(Lk, block_size)
    mass = torch.empty((B, Hq, nK), dtype=torch.float32, device=q.device)
    target = torch.empty((B, Hq), dtype=torch.float32, device=q.device)
    if mass.numel() == 0 or Lq == 0:
        return mass.zero_(), target.fill_(-1.0)
    P = min(n_last, Lq)
    _estimate(q, k, n_sets=Hq, mode=_PROBE, strided=False, n_rows=P, rows_per_group=P, n_groups=1,
              block_size=block_size, q_stride=1, pool_max=False, causal=True, out=mass, target=target,
              gamma=gamma, config=cfg)
    return mass, target
