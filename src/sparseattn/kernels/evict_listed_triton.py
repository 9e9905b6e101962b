"""The O(kept) tail of an H2O / TOVA decode step in one Triton launch (TOVA: two).

After :mod:`.list_logits_triton` has written the step's logits over each row's kept-token list
(``[B, Hkv, G, Lq, W]``, ``-inf`` where masked), the PyTorch tail of ``H2O._observe_listed`` /
``TOVA._observe_listed`` (``decode_methods/h2o.py``, ``tova.py``; the CPU path and the oracle)
runs ~40 small ops over ``[B, Hkv, G, Lq, W]`` and ``[B, Hkv, W]``: softmax, row sums, group
reduction, score gather, a stable sort for the ranking, scatters and the list compaction. Here a
single program owns a whole row and keeps it in registers. H2O: one program per (batch, KV head).
TOVA's KV heads share one decision per sequence: launch 1, per (batch, KV head), writes the head's
group mean to a small fp32 scratch; launch 2 sums the heads in order, ranks and writes, one
program per (batch, KV head) again, each redoing the cheap ranking (so no program waits on the
whole sequence's heads, one after the other):

* the probabilities: per query row a softmax over the live lanes (a row that sees nothing adds 0),
  summed over the rows, reduced over the GQA group (``BLOCK_G`` heads per pass, as a
  ``[BLOCK_G, TILE]`` tile);
* the ranking: no sort. As ``select_triton._select_row``, a bisection over the order-preserving
  int image of the fp32 scores finds the cut; candidates above it are kept, and among those equal
  to it a prefix in lane order (a cumsum): exactly ``rank_mask``'s stable order (ties -> lower lane,
  which is the lower position: the list ascends);
* the writes: the new scores (H2O) and the keep bits at the live lanes' positions, and the list
  partitioned stably in place (survivors first, then the evicted entries, as ``drop_evicted``'s
  PyTorch path leaves them) with the new count. Everything a lane needs is loaded before the
  first store (the block reductions in between order them), so the in-place rewrite is safe.

Entries past a row's count are stale and never read. The whole list width lives in one program's
registers: widths up to :data:`MAX_WIDTH` (a 8K tile); wider lists take the PyTorch tail.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .select_triton import _inclusive_count, _top_lanes

#: Widest list (entries per row) the fused tail takes: the row must fit one program's registers.
MAX_WIDTH = 8192
#: Dtypes whose logits the list-logits kernel computes (the fused tail follows it).
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_AGG = {"mean": 0, "max": 1, "sum": 2}


def fused_tail_supported(q_dtype: torch.dtype, cache_dtype: torch.dtype, width: int) -> bool:
    """Whether a decode step with these dtypes and list width can run the fused tail."""
    return q_dtype in FUSED_DTYPES and cache_dtype in FUSED_DTYPES and 0 < width <= MAX_WIDTH


@triton.jit
def _group_mass(Logits, lrow, stride_lg, stride_lq, j, live, group, q_lo, q_len,
                AGG: tl.constexpr, BLOCK_G: tl.constexpr, TILE: tl.constexpr):
    """[TILE]: the softmax probabilities of query rows [q_lo, q_len) summed, reduced over the group."""
    gs = tl.arange(0, BLOCK_G)
    out = tl.zeros([TILE], dtype=tl.float32)
    for g0 in range(0, group, BLOCK_G):
        g = g0 + gs
        ok = (g < group)[:, None] & live[None, :]
        base = Logits + lrow + g.to(tl.int64)[:, None] * stride_lg + j[None, :]
        acc = tl.zeros([BLOCK_G, TILE], dtype=tl.float32)
        for i in range(q_lo, q_len):
            x = tl.load(base + i * stride_lq, mask=ok, other=float("-inf"))
            mx = tl.max(x, 1)
            mx = tl.where(mx == float("-inf"), 0.0, mx)  # a row that sees nothing: all exp(-inf) = 0
            e = tl.exp(x - mx[:, None])
            s = tl.sum(e, 1)
            acc += e / tl.where(s > 0.0, s, 1.0)[:, None]
        if AGG == 1:  # max (rows past the group hold 0 <= every probability sum)
            out = tl.maximum(out, tl.max(acc, 0))
        else:
            out += tl.sum(acc, 0)
    if AGG == 0:
        out = out / group
    return out


@triton.jit
def _write_row(Keep, keep_row, Tokens, tok_row, j, pos, tok, live, survive, TILE: tl.constexpr):
    """Keep bits of the live lanes; the list partitioned stably (survivors first), in place."""
    tl.store(Keep + keep_row + pos, survive.to(tl.uint8), mask=live)
    a = survive.to(tl.int32)
    c = _inclusive_count(a, TILE)
    n_alive = tl.sum(a, 0)
    dest = tl.where(survive, c - 1, n_alive + j - c)
    tl.store(Tokens + tok_row + dest, tok, mask=live)
    return n_alive


@triton.jit
def _h2o_tail(Logits, Tokens, Counts, Scores, Keep, Lengths, HH, Recent,
              stride_lb, stride_lh, stride_lg, stride_lq, stride_tb, stride_th, stride_cb, stride_ch,
              stride_sb, stride_sh, stride_kb, stride_kh,
              num_heads, group, q_len, width, n_slots,
              AGG: tl.constexpr, BLOCK_G: tl.constexpr, TILE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // num_heads
    h = row % num_heads
    c_ptr = Counts + b * stride_cb + h * stride_ch
    count = tl.minimum(tl.load(c_ptr), width)
    j = tl.arange(0, TILE)
    live = j < count
    tok_row = b * stride_tb + h * stride_th
    tok = tl.load(Tokens + tok_row + j, mask=live, other=0)
    pos = tl.minimum(tl.maximum(tok, 0), n_slots - 1)  # int32: row offsets (the row bases are int64)

    mass = _group_mass(Logits, b * stride_lb + h * stride_lh, stride_lg, stride_lq, j, live, group, 0, q_len,
                       AGG, BLOCK_G, TILE)
    score_row = b * stride_sb + h * stride_sh
    new = tl.load(Scores + score_row + pos, mask=live, other=0.0) + mass
    first_recent = tl.load(Lengths + b).to(tl.int64) - tl.load(Recent + b)
    recent = live & (pos >= first_recent)  # the last `recent` tokens always stay
    cand = live & ~recent
    survive = recent | (_top_lanes(new, cand, tl.load(HH + b), TILE) & cand)

    tl.store(Scores + score_row + pos, tl.where(survive, new, 0.0), mask=live)  # evicted: score 0
    n_alive = _write_row(Keep, b * stride_kb + h * stride_kh, Tokens, tok_row, j, pos, tok, live, survive, TILE)
    tl.store(c_ptr, n_alive)


@triton.jit
def _tova_mass(Logits, Counts, Part, Count0,
               stride_lb, stride_lh, stride_lg, stride_lq, stride_cb, stride_ch,
               num_heads, group, q_len, width,
               BLOCK_G: tl.constexpr, TILE: tl.constexpr):
    # Launch 1 of 2, one program per (sequence, KV head): the group mean of the last query row's
    # probabilities over this head's live lanes -> Part[b, h, :W] (0 past the count).
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    j = tl.arange(0, TILE)
    count = tl.minimum(tl.load(Counts + b * stride_cb + h * stride_ch), width)
    mass = _group_mass(Logits, b * stride_lb + h * stride_lh, stride_lg, stride_lq, j, j < count, group,
                       q_len - 1, q_len, 0, BLOCK_G, TILE)
    tl.store(Part + (b * num_heads + h) * width + j, mass, mask=j < width)
    if h == 0:  # head 0's list decides the keep-set; launch 2 rewrites Counts, so snapshot it here
        tl.store(Count0 + b, count)


@triton.jit
def _tova_commit(Part, Count0, Tokens, Counts, Keep,
                 stride_tb, stride_th, stride_cb, stride_ch, stride_kb, stride_kh,
                 num_heads, width, n_slots, cache_size, heads_per_prog,
                 TILE: tl.constexpr):
    # Launch 2 of 2, one program per (sequence, run of heads_per_prog KV heads). Every program of a
    # sequence recomputes the same selection (same loads, same fp32 order: deterministic), then
    # writes only its own heads' rows, so no program reads what another one writes.
    b = tl.program_id(0).to(tl.int64)
    h_lo = tl.program_id(1) * heads_per_prog
    h_hi = tl.minimum(h_lo + heads_per_prog, num_heads)
    j = tl.arange(0, TILE)
    # Mean over the KV heads of the group means (= over all Hq), summed in ascending head order as
    # the one-program kernel did (the oracle's mean(2).mean(1)).
    part = Part + b * num_heads * width + j
    score = tl.zeros([TILE], dtype=tl.float32)
    for h in range(num_heads):
        score += tl.load(part + h * width, mask=j < width, other=0.0)
    score = score / num_heads
    live = j < tl.load(Count0 + b)
    top = _top_lanes(score, live, cache_size, TILE) & live
    for h in range(h_lo, h_hi):
        c_ptr = Counts + b * stride_cb + h * stride_ch
        live_h = j < tl.minimum(tl.load(c_ptr), width)
        tok_row = b * stride_tb + h * stride_th
        tok = tl.load(Tokens + tok_row + j, mask=live_h, other=0)
        pos = tl.minimum(tl.maximum(tok, 0), n_slots - 1)  # int32: row offsets (the row bases are int64)
        n_alive = _write_row(Keep, b * stride_kb + h * stride_kh, Tokens, tok_row, j, pos, tok, live_h,
                            top & live_h, TILE)
        tl.store(c_ptr, n_alive)


# ----------------------------------------------------------------------------- wrappers
def _shape(t):
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_common(logits, tokens, counts, keep):
    if not isinstance(logits, torch.Tensor) or logits.dim() != 5 or logits.dtype != torch.float32 \
            or logits.stride(-1) != 1:
        raise ValueError(f"logits must be float32 [B, Hkv, G, Lq, W] with unit last stride, got "
                         f"{getattr(logits, 'dtype', '')} {_shape(logits)}")
    B, H, G, Lq, W = logits.shape
    if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.int32 or tuple(tokens.shape) != (B, H, W) \
            or (W > 1 and tokens.stride(-1) != 1):
        raise ValueError(f"tokens must be int32 [B={B}, Hkv={H}, W={W}] with unit last stride, got "
                         f"{getattr(tokens, 'dtype', '')} {_shape(tokens)}")
    if not isinstance(counts, torch.Tensor) or counts.dtype != torch.int32 or tuple(counts.shape) != (B, H):
        raise ValueError(f"counts must be int32 [B={B}, Hkv={H}], got {getattr(counts, 'dtype', '')} {_shape(counts)}")
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.dim() != 3 \
            or tuple(keep.shape[:2]) != (B, H) or keep.shape[-1] < 1 or keep.stride(-1) != 1:
        raise ValueError(f"keep must be bool [B={B}, Hkv={H}, N] with unit last stride, got "
                         f"{getattr(keep, 'dtype', '')} {_shape(keep)}")
    if W > MAX_WIDTH:
        raise ValueError(f"the fused tail takes lists up to {MAX_WIDTH} wide, got {W} (use the PyTorch tail)")
    for name, t in (("tokens", tokens), ("counts", counts), ("keep", keep)):
        if t.device != logits.device:
            raise ValueError(f"{name} must be on {logits.device} (logits' device), got {t.device}")
    return B, H, G, Lq, W


def _config(G: int, W: int, block_g: Optional[int], num_warps: Optional[int]):
    tile = max(16, triton.next_power_of_2(W))
    if block_g is None:  # a [BLOCK_G, TILE] logits tile of at most 8K fp32 (registers)
        block_g = max(1, min(triton.next_power_of_2(G), 8192 // tile))
    if num_warps is None:  # ~8 lanes per thread
        num_warps = min(16, max(4, tile // 256))
    return tile, block_g, num_warps


def evict_listed_h2o(logits: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor, scores: torch.Tensor,
                     keep: torch.Tensor, lengths: torch.Tensor, hh: torch.Tensor, recent: torch.Tensor, *,
                     how: str = "mean", block_g: Optional[int] = None, num_warps: Optional[int] = None) -> None:
    """H2O's decode-step tail over the kept-token list, in place, one launch (no host sync).

    Args:
        logits: float32 ``[B, Hkv, G, Lq, W]`` (unit last stride): the step's scaled logits over each
            row's list (``list_logits_triton``), ``-inf`` where a query row does not see the lane.
        tokens: int32 ``[B, Hkv, W]`` (unit last stride; a view of the state's list): ascending
            positions, the first ``counts`` live, the rest stale (never read). Rewritten: the
            survivors first (ascending), then the evicted entries; entries past the old count stay.
        counts: int32 ``[B, Hkv]``, capped at ``W``; becomes the number of survivors.
        scores: float32 ``[B, Hkv, N]`` accumulated scores: a survivor's position gets its old score
            plus the step's mass (the group reduction of its probabilities summed over the rows),
            an evicted one 0.
        keep: bool ``[B, Hkv, N]`` keep mask: the evicted positions are cleared.
        lengths: int32/int64 ``[B]``; ``hh``, ``recent``: int64 ``[B]`` budgets. A live lane whose
            position is ``>= length - recent`` survives; of the others the ``hh`` with the highest
            new score do (ties -> the lower lane).
        how: the group reduction, ``"mean"``, ``"max"`` or ``"sum"``.
        block_g, num_warps: override the heads per logits tile and the warps per row program.
    """
    B, H, G, Lq, W = _check_common(logits, tokens, counts, keep)
    if how not in _AGG:
        raise ValueError(f"how must be one of {list(_AGG)}, got {how!r}")
    if not isinstance(scores, torch.Tensor) or scores.dtype != torch.float32 or tuple(scores.shape) != tuple(keep.shape) \
            or scores.stride(-1) != 1:
        raise ValueError(f"scores must be float32 {tuple(keep.shape)} (keep's shape) with unit last stride, got "
                         f"{getattr(scores, 'dtype', '')} {_shape(scores)}")
    for name, t in (("lengths", lengths), ("hh", hh), ("recent", recent)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != B \
                or t.dtype not in (torch.int32, torch.int64) or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous int32/int64 [B={B}] tensor, got "
                             f"{getattr(t, 'dtype', '')} {_shape(t)}")
    for name, t in (("scores", scores), ("lengths", lengths), ("hh", hh), ("recent", recent)):
        if t.device != logits.device:
            raise ValueError(f"{name} must be on {logits.device} (logits' device), got {t.device}")
    if B * H == 0 or W == 0:
        return
    tile, block_g, num_warps = _config(G, W, block_g, num_warps)
    _h2o_tail[(B * H,)](
        logits, tokens, counts, scores, keep.view(torch.uint8), lengths, hh.long(), recent.long(),
        logits.stride(0), logits.stride(1), logits.stride(2), logits.stride(3), tokens.stride(0), tokens.stride(1),
        counts.stride(0), counts.stride(1), scores.stride(0), scores.stride(1), keep.stride(0), keep.stride(1),
        H, G, Lq, W, keep.shape[-1],
        AGG=_AGG[how], BLOCK_G=block_g, TILE=tile, num_warps=num_warps,
    )


def evict_listed_tova(logits: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor, keep: torch.Tensor,
                      cache_size: int, *, heads_per_program: int = 1, block_g: Optional[int] = None,
                      num_warps: Optional[int] = None) -> None:
    """TOVA's decode-step tail over the kept-token list, in place, two launches (no host sync).

    ``logits``, ``tokens``, ``counts``, ``keep`` as :func:`evict_listed_h2o` (the KV heads of a
    sequence hold one list: one keep-set per sequence). Only the last query row of ``logits`` is
    read (pass ``Lq = 1`` logits of the last query). Per sequence, its probabilities averaged over
    all ``Hkv * G`` query heads lane-wise score the lanes live in head 0's list; the ``cache_size``
    best survive (ties -> the lower lane). Every head then clears the keep bits of its other live
    lanes and partitions its list (survivors first) with the new count.

    Launch 1 (grid ``(B, Hkv)``) writes each KV head's group-mean probabilities to a float32
    ``[B, Hkv, W]`` scratch (and head 0's count to an int32 ``[B]`` one); launch 2 (grid
    ``(B, ceil(Hkv / heads_per_program))``) sums them over the heads, ranks, and writes its heads.
    ``heads_per_program``: KV heads whose rows one launch-2 program writes; each program redoes the
    (cheap) ranking, so 1 is fastest while ``B * Hkv`` programs fit the GPU at once, ``Hkv`` ranks
    once per sequence. ``block_g``, ``num_warps``: as :func:`evict_listed_h2o`.
    """
    B, H, G, Lq, W = _check_common(logits, tokens, counts, keep)
    if not isinstance(cache_size, int) or isinstance(cache_size, bool) or cache_size < 0:
        raise ValueError(f"cache_size must be an int >= 0, got {cache_size!r}")
    if not isinstance(heads_per_program, int) or isinstance(heads_per_program, bool) or heads_per_program < 1:
        raise ValueError(f"heads_per_program must be an int >= 1, got {heads_per_program!r}")
    if B * H == 0 or W == 0 or Lq == 0:
        return
    tile, block_g, num_warps = _config(G, W, block_g, num_warps)
    part = torch.empty(B, H, W, dtype=torch.float32, device=logits.device)
    count0 = torch.empty(B, dtype=torch.int32, device=logits.device)
    _tova_mass[(B, H)](
        logits, counts, part, count0,
        logits.stride(0), logits.stride(1), logits.stride(2), logits.stride(3), counts.stride(0), counts.stride(1),
        H, G, Lq, W,
        BLOCK_G=block_g, TILE=tile, num_warps=num_warps,
    )
    hpp = min(heads_per_program, H)
    _tova_commit[(B, triton.cdiv(H, hpp))](
        part, count0, tokens, counts, keep.view(torch.uint8),
        tokens.stride(0), tokens.stride(1), counts.stride(0), counts.stride(1), keep.stride(0), keep.stride(1),
        H, W, keep.shape[-1], min(cache_size, 2 ** 31 - 1), hpp,
        TILE=tile, num_warps=num_warps,
    )


__all__ = ["MAX_WIDTH", "evict_listed_h2o", "evict_listed_tova", "fused_tail_supported"]
