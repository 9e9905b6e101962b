"""BlockPlan: which key blocks each query block attends to.

The plan is the one contract between the methods (which make plans) and the kernels (which
execute them). Layout, per (batch, head, query block):

* ``kv_counts``  int32 ``[B, H, nQ]``: how many key blocks this query block attends to;
* ``kv_indices`` int32 ``[B, H, nQ, maxK]``: those key blocks, strictly ascending; entries at and
  after ``count`` are ignored (``from_block_mask`` fills them with 0 so that any stray read stays
  in bounds).

``B`` is the batch or 1 (shared across the batch); ``H`` is the number of query heads, the
number of KV heads (one plan per GQA group) or 1 (shared by all heads). Query block ``m`` covers
query rows ``[m * block_q, (m + 1) * block_q)``; key block ``n`` covers keys
``[n * block_k, (n + 1) * block_k)``; the last block of each may be partial.

Token-level extras (optional, all ``[B, H, nQ]``-shaped leading dims):

* band (``band_sink``, ``band_window``, int32 ``[B, H, nQ]``): inside the selected blocks, query
  at absolute position ``p`` keeps key ``j`` only if ``j < band_sink`` or ``p - j < band_window``.
  This gives exact sink/local edges (StreamingLLM, DuoAttention streaming heads) inside boundary
  blocks. A window of ``2**31 - 1`` means "no band" for that query block.
* extra columns (``extra_counts`` int32 ``[B, H, nQ]``, ``extra_indices`` int32
  ``[B, H, nQ, maxE]``): single key tokens attended by every query of the block in addition to
  the blocks (vertical lines). Strictly ascending, never inside a selected block of that query
  block, and not subject to the band.

Causal alignment is bottom-right: query ``i`` sits at absolute position ``p = k_len - q_len + i``
and, under ``causal=True``, sees keys ``j <= p``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Optional

import torch

NO_WINDOW = 2**31 - 1


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_block_size(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_len(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


@dataclass(eq=False)
class BlockPlan:
    """Per (batch, head, query block): the sorted key blocks to attend to, plus token extras.

    See the module docstring for the exact semantics of every field.
    """

    kv_counts: torch.Tensor
    kv_indices: torch.Tensor
    block_q: int
    block_k: int
    q_len: int
    k_len: int
    band_sink: Optional[torch.Tensor] = None
    band_window: Optional[torch.Tensor] = None
    extra_counts: Optional[torch.Tensor] = None
    extra_indices: Optional[torch.Tensor] = None

    def __post_init__(self):
        _check_block_size("block_q", self.block_q)
        _check_block_size("block_k", self.block_k)
        _check_len("q_len", self.q_len)
        _check_len("k_len", self.k_len)
        if (self.band_sink is None) != (self.band_window is None):
            raise ValueError("band_sink and band_window must be given together (or neither)")
        if (self.extra_counts is None) != (self.extra_indices is None):
            raise ValueError("extra_counts and extra_indices must be given together (or neither)")
        # Cheap structural checks always run; value checks live in validate() (they sync).
        for name in ("kv_counts", "kv_indices", "band_sink", "band_window", "extra_counts", "extra_indices"):
            t = getattr(self, name)
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != torch.int32:
                raise ValueError(f"{name} must be int32, got {t.dtype}")
            if t.device != self.kv_counts.device:
                raise ValueError(f"{name} is on {t.device} but kv_counts is on {self.kv_counts.device}")
        want = 3
        if self.kv_counts.dim() != want:
            raise ValueError(f"kv_counts must be [B, H, nQ], got shape {tuple(self.kv_counts.shape)}")
        B, H, nQ = self.kv_counts.shape
        if nQ != self.num_q_blocks:
            raise ValueError(
                f"kv_counts has {nQ} query blocks but q_len={self.q_len}, block_q={self.block_q} "
                f"needs {self.num_q_blocks}")
        if self.kv_indices.dim() != 4 or tuple(self.kv_indices.shape[:3]) != (B, H, nQ):
            raise ValueError(
                f"kv_indices must be [B, H, nQ, maxK] = [{B}, {H}, {nQ}, maxK], got {tuple(self.kv_indices.shape)}")
        for name in ("band_sink", "band_window", "extra_counts"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (B, H, nQ):
                raise ValueError(f"{name} must have shape {(B, H, nQ)}, got {tuple(t.shape)}")
        if self.extra_indices is not None and (
                self.extra_indices.dim() != 4 or tuple(self.extra_indices.shape[:3]) != (B, H, nQ)):
            raise ValueError(
                f"extra_indices must be [B, H, nQ, maxE] = [{B}, {H}, {nQ}, maxE], got {tuple(self.extra_indices.shape)}")

    # ------------------------------------------------------------------ shape facts
    @property
    def num_q_blocks(self) -> int:
        return _cdiv(self.q_len, self.block_q)

    @property
    def num_k_blocks(self) -> int:
        return _cdiv(self.k_len, self.block_k)

    @property
    def batch(self) -> int:
        return self.kv_counts.shape[0]

    @property
    def heads(self) -> int:
        return self.kv_counts.shape[1]

    @property
    def max_blocks(self) -> int:
        return self.kv_indices.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.kv_counts.device

    @property
    def has_band(self) -> bool:
        return self.band_sink is not None

    @property
    def has_extra(self) -> bool:
        return self.extra_counts is not None

    def __repr__(self) -> str:
        extras = []
        if self.has_band:
            extras.append("band")
        if self.has_extra:
            extras.append(f"extra_cols<={self.extra_indices.shape[-1]}")
        return (f"BlockPlan(B={self.batch}, H={self.heads}, q_len={self.q_len}, k_len={self.k_len}, "
                f"block_q={self.block_q}, block_k={self.block_k}, maxK={self.max_blocks}"
                + (", " + ", ".join(extras) if extras else "") + f", device={self.device})")

    def to(self, device) -> "BlockPlan":
        """The same plan with every tensor on ``device``."""
        moved = {}
        for name in ("kv_counts", "kv_indices", "band_sink", "band_window", "extra_counts", "extra_indices"):
            t = getattr(self, name)
            moved[name] = None if t is None else t.to(device)
        return replace(self, **moved)

    # ------------------------------------------------------------------ constructors
    @staticmethod
    def causal_block_limits(*, block_q: int, block_k: int, q_len: int, k_len: int,
                            causal: bool = True, device=None) -> torch.Tensor:
        """int32 ``[nQ]``: the number of key blocks each query block can see at all.

        Cached per shape and device (plans are rebuilt every layer and step); do not modify it.
        """
        return _causal_block_limits(block_q, block_k, q_len, k_len, causal, torch.device(device or "cpu"))

    @classmethod
    def dense(cls, batch: int = 1, heads: int = 1, *, block_q: int = 128, block_k: int = 128,
              q_len: int, k_len: int, causal: bool = True, device=None) -> "BlockPlan":
        """All key blocks each query block can see (all blocks when ``causal=False``).

        Costs no memory per block: the index rows are a broadcast ``arange``.
        """
        _check_block_size("block_q", block_q)
        _check_block_size("block_k", block_k)
        nQ, nK = _cdiv(q_len, block_q), _cdiv(k_len, block_k)
        counts = cls.causal_block_limits(block_q=block_q, block_k=block_k, q_len=q_len, k_len=k_len,
                                         causal=causal, device=device)
        counts = counts.view(1, 1, nQ).expand(batch, heads, nQ)
        indices = torch.arange(max(nK, 1), dtype=torch.int32, device=device).view(1, 1, 1, -1)
        indices = indices.expand(batch, heads, nQ, max(nK, 1))
        return cls(counts, indices, block_q, block_k, q_len, k_len)

    @classmethod
    def from_block_mask(cls, block_mask: torch.Tensor, *, block_q: int, block_k: int, q_len: int,
                        k_len: int, causal: bool = False, max_blocks: Optional[int] = None) -> "BlockPlan":
        """Build a plan from a bool ``[B, H, nQ, nK]`` block mask (True = compute the block).

        Runs on the mask's device with no host sync. ``causal=True`` drops blocks that no query
        of their query block can see. ``max_blocks`` caps the index width (default ``nK``); it
        must be at least the largest count, which ``validate()`` checks.
        """
        if not isinstance(block_mask, torch.Tensor) or block_mask.dim() != 4:
            raise ValueError(f"block_mask must be a [B, H, nQ, nK] tensor, got "
                             f"{tuple(block_mask.shape) if isinstance(block_mask, torch.Tensor) else type(block_mask)}")
        _check_block_size("block_q", block_q)
        _check_block_size("block_k", block_k)
        nQ, nK = _cdiv(q_len, block_q), _cdiv(k_len, block_k)
        if tuple(block_mask.shape[2:]) != (nQ, nK):
            raise ValueError(
                f"block_mask must have (nQ, nK) = ({nQ}, {nK}) for q_len={q_len}, k_len={k_len}, "
                f"block_q={block_q}, block_k={block_k}; got {tuple(block_mask.shape[2:])}")
        mask = block_mask.to(torch.bool)
        width = nK if max_blocks is None else int(max_blocks)
        limits = None
        if causal:
            limits = cls.causal_block_limits(block_q=block_q, block_k=block_k, q_len=q_len, k_len=k_len,
                                             device=mask.device)
        if mask.is_cuda and _triton_compaction_available():
            from .kernels.plan_triton import compact_block_mask

            counts, indices = compact_block_mask(mask, limits, width)
            return cls(counts, indices, block_q, block_k, q_len, k_len)
        if limits is not None:
            mask = mask & (torch.arange(nK, device=mask.device).view(1, -1) < limits.view(-1, 1))
        B, H = mask.shape[:2]
        counts = mask.sum(-1, dtype=torch.int32)
        # Scatter each selected block to its rank among the selected ones; unselected blocks go to
        # a trash column past the end that is cut off afterwards.
        rank = torch.cumsum(mask, -1, dtype=torch.int32) - 1
        dest = torch.where(mask, rank, torch.full_like(rank, nK)).to(torch.int64)
        dest = torch.clamp(dest, max=nK)
        buf = torch.zeros(B, H, nQ, nK + 1, dtype=torch.int32, device=mask.device)
        src = torch.arange(nK, dtype=torch.int32, device=mask.device).expand(B, H, nQ, nK)
        buf.scatter_(-1, dest, src)
        indices = buf[..., :nK]
        if width < nK:
            indices = indices[..., :width]
        elif width > nK:
            indices = torch.nn.functional.pad(indices, (0, width - nK))
        return cls(counts, indices.contiguous(), block_q, block_k, q_len, k_len)

    @classmethod
    def from_band(cls, batch: int = 1, heads: int = 1, *, sink: int, window: int, block_q: int = 128,
                  block_k: int = 128, q_len: int, k_len: int, device=None) -> "BlockPlan":
        """Causal sink + sliding window with exact token edges (StreamingLLM's A-shape).

        Query at position ``p`` keeps keys ``j <= p`` with ``j < sink`` or ``p - j < window``.
        """
        if sink < 0 or window < 0:
            raise ValueError(f"sink and window must be >= 0, got sink={sink}, window={window}")
        nQ, nK = _cdiv(q_len, block_q), _cdiv(k_len, block_k)
        dev = device
        m = torch.arange(nQ, device=dev, dtype=torch.int64)
        first_pos = k_len - q_len + m * block_q
        last_pos = k_len - q_len + torch.clamp((m + 1) * block_q, max=q_len) - 1
        n = torch.arange(nK, device=dev, dtype=torch.int64)
        start, end = n * block_k, torch.clamp((n + 1) * block_k, max=k_len) - 1  # key range of block
        in_sink = (start < sink).view(1, -1)
        # Some query of the block sees some key of the block inside the window:
        # the window of rows [first_pos, last_pos] covers keys (first_pos - window, last_pos].
        in_window = (end.view(1, -1) > (first_pos - window).view(-1, 1)) & (window > 0)
        causal_ok = start.view(1, -1) <= last_pos.view(-1, 1)
        block_mask = (in_sink | in_window) & causal_ok
        block_mask = block_mask.view(1, 1, nQ, nK).expand(batch, heads, nQ, nK)
        plan = cls.from_block_mask(block_mask, block_q=block_q, block_k=block_k, q_len=q_len, k_len=k_len)
        shape = (batch, heads, nQ)
        return replace(plan, band_sink=torch.full(shape, sink, dtype=torch.int32, device=dev),
                       band_window=torch.full(shape, window, dtype=torch.int32, device=dev))

    # ------------------------------------------------------------------ views
    def block_mask(self) -> torch.Tensor:
        """bool ``[B, H, nQ, nK]``: True where a key block is in the plan."""
        B, H, nQ = self.kv_counts.shape
        nK = self.num_k_blocks
        valid = torch.arange(self.max_blocks, device=self.device).view(1, 1, 1, -1) < self.kv_counts.unsqueeze(-1)
        idx = torch.where(valid, self.kv_indices.long(), torch.full_like(self.kv_indices, nK, dtype=torch.long))
        out = torch.zeros(B, H, nQ, nK + 1, dtype=torch.bool, device=self.device)
        out.scatter_(-1, idx.clamp(0, nK), True)
        return out[..., :nK]

    def to_dense_mask(self, causal: bool = True, *, q_start: int = 0, q_end: Optional[int] = None) -> torch.Tensor:
        """bool ``[B, H, q_end - q_start, k_len]``: the exact element mask this plan computes.

        The oracle for tests and plots. ``q_start``/``q_end`` select a range of query rows so
        that long sequences can be processed in chunks.
        """
        q_end = self.q_len if q_end is None else q_end
        if not 0 <= q_start <= q_end <= self.q_len:
            raise ValueError(f"need 0 <= q_start <= q_end <= q_len={self.q_len}, got {q_start}, {q_end}")
        dev = self.device
        rows = torch.arange(q_start, q_end, device=dev)
        qblock = rows // self.block_q  # [R]
        keys = torch.arange(self.k_len, device=dev)
        bm = self.block_mask()  # [B, H, nQ, nK]
        bm_rows = bm[:, :, qblock]  # [B, H, R, nK]
        mask = bm_rows[..., keys // self.block_k] if self.k_len else bm_rows[..., :0]  # [B, H, R, Lk]
        pos = (self.k_len - self.q_len + rows).view(-1, 1)  # [R, 1]
        if self.has_band:
            sink = self.band_sink[:, :, qblock].unsqueeze(-1).long()  # [B, H, R, 1]
            window = self.band_window[:, :, qblock].unsqueeze(-1).long()
            mask = mask & ((keys.view(1, 1, 1, -1) < sink) | ((pos - keys.view(1, -1)).unsqueeze(0).unsqueeze(0) < window))
        if self.has_extra:
            maxE = self.extra_indices.shape[-1]
            ev = torch.arange(maxE, device=dev).view(1, 1, 1, -1) < self.extra_counts.unsqueeze(-1)
            eidx = torch.where(ev, self.extra_indices.long(), torch.full_like(self.extra_indices, self.k_len, dtype=torch.long))
            cols = torch.zeros(*self.extra_counts.shape, self.k_len + 1, dtype=torch.bool, device=dev)
            cols.scatter_(-1, eidx.clamp(0, self.k_len), True)
            mask = mask | cols[..., : self.k_len][:, :, qblock]
        if causal:
            mask = mask & (keys.view(1, -1) <= pos).view(1, 1, len(rows), self.k_len)
        return mask

    def density(self, causal: bool = True) -> float:
        """Fraction of the causal-visible (or full, when ``causal=False``) area this plan computes.

        Averaged over batch and heads of the plan. Exact: counts elements, not blocks.
        """
        total = self._visible_area(causal)
        if total == 0:
            return 0.0
        if self.has_band or self.has_extra:
            kept = 0
            step = max(1, (1 << 24) // max(1, self.k_len * self.batch * self.heads))
            for r0 in range(0, self.q_len, step):
                kept += int(self.to_dense_mask(causal, q_start=r0, q_end=min(self.q_len, r0 + step)).sum())
        else:
            kept = float(self._selected_area(causal).sum())
        return kept / (total * self.batch * self.heads)

    def _visible_area(self, causal: bool) -> int:
        if not causal:
            return self.q_len * self.k_len
        # Row i sees clamp(k_len - q_len + i + 1, 0, k_len) keys.
        pos = torch.arange(self.q_len, dtype=torch.int64) + (self.k_len - self.q_len + 1)
        return int(pos.clamp(0, self.k_len).sum())

    def _selected_area(self, causal: bool) -> torch.Tensor:
        """float64 ``[B, H]``: visible elements inside the selected blocks, in closed form."""
        dev = self.device
        valid = torch.arange(self.max_blocks, device=dev).view(1, 1, 1, -1) < self.kv_counts.unsqueeze(-1)
        n = self.kv_indices.long()
        m = torch.arange(self.num_q_blocks, device=dev).view(1, 1, -1, 1)
        row0 = m * self.block_q
        row1 = torch.clamp(row0 + self.block_q, max=self.q_len)  # exclusive
        start = n * self.block_k
        width = torch.clamp(self.k_len - start, min=0).clamp(max=self.block_k)
        if not causal:
            area = (row1 - row0) * width
        else:
            # Row at position p sees clamp(p + 1 - start, 0, width) keys of the block.
            off = self.k_len - self.q_len
            lo = row0 + off + 1 - start
            hi = row1 - 1 + off + 1 - start

            def ramp_sum(x):  # sum_{t <= x} clamp(t, 0, width), t integer
                xc = torch.clamp(x, min=0)
                inside = torch.clamp(xc, max=width)
                return inside * (inside + 1) // 2 + torch.clamp(xc - width, min=0) * width

            area = ramp_sum(hi) - ramp_sum(lo - 1)
        area = torch.where(valid, area, torch.zeros_like(area))
        return area.sum(dim=(-1, -2)).double()

    # ------------------------------------------------------------------ checks
    def validate(self, causal: Optional[bool] = None) -> "BlockPlan":
        """Check every value (host sync); raise ``ValueError`` saying what is wrong. Returns self.

        With ``causal=True`` also rejects blocks that no query of their block can see.
        """
        nK = self.num_k_blocks
        counts = self.kv_counts.long()
        if bool((counts < 0).any()) or bool((counts > self.max_blocks).any()):
            raise ValueError(f"kv_counts must lie in [0, maxK={self.max_blocks}]; got min "
                             f"{int(counts.min())}, max {int(counts.max())}")
        if bool((counts > nK).any()):
            raise ValueError(f"kv_counts exceed the number of key blocks nK={nK}: max {int(counts.max())}")
        valid = torch.arange(self.max_blocks, device=self.device).view(1, 1, 1, -1) < counts.unsqueeze(-1)
        idx = self.kv_indices.long()
        bad = valid & ((idx < 0) | (idx >= nK))
        if bool(bad.any()):
            where = tuple(int(x) for x in bad.nonzero()[0].tolist())
            raise ValueError(f"kv_indices out of range [0, {nK}) at [b, h, m, t]={where}: "
                             f"{int(idx[where])} (q_len={self.q_len}, k_len={self.k_len}, block_k={self.block_k})")
        if self.max_blocks > 1:
            pair_valid = valid[..., 1:]
            unsorted = pair_valid & (idx[..., 1:] <= idx[..., :-1])
            if bool(unsorted.any()):
                where = tuple(int(x) for x in unsorted.nonzero()[0].tolist())
                raise ValueError(f"kv_indices must be strictly ascending (sorted, no duplicates) within each "
                                 f"row; row [b, h, m]={where[:3]} has {int(idx[where[:3]][where[3]])} then "
                                 f"{int(idx[where[:3]][where[3] + 1])}")
        if causal:
            limits = self.causal_block_limits(block_q=self.block_q, block_k=self.block_k, q_len=self.q_len,
                                              k_len=self.k_len, device=self.device).long().view(1, 1, -1, 1)
            future = valid & (idx >= limits)
            if bool(future.any()):
                where = tuple(int(x) for x in future.nonzero()[0].tolist())
                raise ValueError(f"plan holds a key block beyond the causal limit: row [b, h, m]={where[:3]} "
                                 f"attends block {int(idx[where])} but sees only blocks < {int(limits.flatten()[where[2]])}"
                                 " (build with causal=True or drop future blocks)")
        if self.has_band and bool((self.band_sink < 0).any() or (self.band_window < 0).any()):
            raise ValueError("band_sink and band_window must be >= 0")
        if self.has_extra:
            maxE = self.extra_indices.shape[-1]
            ec = self.extra_counts.long()
            if bool((ec < 0).any()) or bool((ec > maxE).any()):
                raise ValueError(f"extra_counts must lie in [0, maxE={maxE}]")
            ev = torch.arange(maxE, device=self.device).view(1, 1, 1, -1) < ec.unsqueeze(-1)
            eidx = self.extra_indices.long()
            if bool((ev & ((eidx < 0) | (eidx >= self.k_len))).any()):
                raise ValueError(f"extra_indices out of range [0, k_len={self.k_len})")
            if maxE > 1 and bool((ev[..., 1:] & (eidx[..., 1:] <= eidx[..., :-1])).any()):
                raise ValueError("extra_indices must be strictly ascending within each row")
            blk = torch.where(ev, eidx // self.block_k, torch.full_like(eidx, nK))
            inside = torch.gather(torch.nn.functional.pad(self.block_mask(), (0, 1)), -1, blk) & ev
            if bool(inside.any()):
                raise ValueError("extra_indices must not fall inside a selected key block of the same query "
                                 "block (they would be counted twice)")
        return self

    def check_compatible(self, *, batch: int, q_heads: int, kv_heads: int, q_len: int, k_len: int,
                         device: torch.device) -> None:
        """Raise ``ValueError`` (with a hint) if this plan was built for another problem shape."""
        hint = "; rebuild the plan for these inputs"
        if self.q_len != q_len or self.k_len != k_len:
            raise ValueError(f"plan was built for q_len={self.q_len}, k_len={self.k_len}, got q_len={q_len}, "
                             f"k_len={k_len}{hint}")
        if self.batch not in (1, batch):
            raise ValueError(f"plan batch must be 1 or {batch}, got {self.batch}{hint}")
        if self.heads not in (1, kv_heads, q_heads):
            raise ValueError(f"plan heads must be 1, Hkv={kv_heads} or Hq={q_heads}, got {self.heads}{hint}")
        if self.device != device and not (self.device.type == device.type == "cuda" and device.index is None):
            raise ValueError(f"plan is on {self.device} but the inputs are on {device}; use plan.to(device)")

    def head_divisor(self, q_heads: int) -> int:
        """Query head ``h`` reads plan head ``h // head_divisor``."""
        return q_heads // self.heads

    def expand_heads(self, q_heads: int) -> "BlockPlan":
        """The plan with one row per query head (a view; no copy)."""
        div = self.head_divisor(q_heads)
        if div == 1:
            return self
        src = torch.arange(q_heads, device=self.device) // div

        def pick(t):
            return None if t is None else t[:, src]

        return replace(self, kv_counts=pick(self.kv_counts), kv_indices=pick(self.kv_indices),
                       band_sink=pick(self.band_sink), band_window=pick(self.band_window),
                       extra_counts=pick(self.extra_counts), extra_indices=pick(self.extra_indices))


@functools.lru_cache(maxsize=256)
def _causal_block_limits(block_q: int, block_k: int, q_len: int, k_len: int, causal: bool,
                         device: torch.device) -> torch.Tensor:
    nQ, nK = _cdiv(q_len, block_q), _cdiv(k_len, block_k)
    if not causal:
        return torch.full((nQ,), nK, dtype=torch.int32, device=device)
    m = torch.arange(nQ, device=device, dtype=torch.int64)
    last_row = torch.clamp((m + 1) * block_q, max=q_len) - 1
    last_pos = k_len - q_len + last_row  # absolute position of the block's last query
    # floor division on non-negative values only; negative positions see nothing.
    vis = torch.where(last_pos >= 0, last_pos.clamp(min=0) // block_k + 1, torch.zeros_like(last_pos))
    return vis.clamp(max=nK).to(torch.int32)


def _triton_compaction_available() -> bool:
    from .kernels.dispatch import triton_import_error

    return triton_import_error() is None


def block_count(length: int, block: int) -> int:
    """Number of blocks of size ``block`` covering ``length`` items."""
    return _cdiv(length, block)


__all__ = ["BlockPlan", "NO_WINDOW", "block_count"]
