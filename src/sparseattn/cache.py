"""PagedKVCache: per-layer K/V in fixed-size pages, per-sequence page tables, per-page metadata.

Layout (one pool per layer, shared page numbering across layers):

* ``k_pages(layer)``, ``v_pages(layer)``: ``[capacity, Hkv, page_size, D]`` in the cache dtype.
  A page holds ``page_size`` consecutive tokens of one sequence for every KV head, so one
  (page, head) is a contiguous ``page_size x D`` tile for the kernels.
* ``page_table``: int32 ``[B, max_pages]``; logical page ``i`` of sequence ``b`` (tokens
  ``[i * page_size, (i + 1) * page_size)``) lives in physical page ``page_table[b, i]``. The same
  physical page holds that token range in every layer (vLLM-style block table), so the table is
  allocated once per step, not once per layer.
* Physical page 0 is a scratch page that belongs to no sequence: unused table entries point at
  it, and padding tokens of a ragged append are written there, so no write needs a boolean-mask
  (``nonzero``) index that would sync the host.
* Page metadata (``page_meta``): named tensors ``[capacity, Hkv, ...]`` recomputed for every
  page an append touches. Built in: ``"min"`` / ``"max"`` (elementwise over the page's keys, in
  the cache dtype: exact; Quest's bounds) and ``"mean"`` (float32 mean key; block top-k). More
  can be registered with ``metadata={"name": fn}``.

Growth: the pool doubles its page capacity when it runs out (amortised O(1) per token; the old
pages are copied once per doubling, never per step) and the page table doubles its width.
``reserve()`` preallocates both.

Host syncs: the page allocator runs on the host from a host mirror of the lengths, so
``append`` never reads a device tensor back when ``seq_lens`` is ``None``, a list, or a CPU
tensor (a ragged count list goes up with one pinned, non-blocking copy). Passing ``seq_lens``
as a CUDA tensor costs one device-to-host read (a sync) per call, because allocating pages
needs the counts on the host. Growth itself allocates and copies on the device, with no sync.
"""

from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

MetaFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

SCRATCH_PAGE = 0


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------- built-in metadata
# Each function gets the keys of N pages ``[N, Hkv, P, D]`` (cache dtype) and the slot validity
# ``[N, 1, P, 1]`` (bool) and returns ``[N, Hkv, ...]``. Pages with no valid slot never reach a
# reader (they are scratch writes), so their value does not matter.
def page_min(keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Elementwise minimum of the page's keys (Quest's ``m_p``), exact in the cache dtype."""
    return torch.where(valid, keys, torch.full((), float("inf"), dtype=keys.dtype, device=keys.device)).amin(2)


def page_max(keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum of the page's keys (Quest's ``M_p``), exact in the cache dtype."""
    return torch.where(valid, keys, torch.full((), float("-inf"), dtype=keys.dtype, device=keys.device)).amax(2)


def page_mean(keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean key of the page (block top-k), accumulated and stored in float32 (float64 caches: float64)."""
    acc = torch.float64 if keys.dtype == torch.float64 else torch.float32
    k = torch.where(valid, keys, torch.zeros((), dtype=keys.dtype, device=keys.device)).to(acc)
    n = valid.sum(2, dtype=acc).clamp(min=1)
    return k.sum(2) / n


BUILTIN_METADATA: Dict[str, MetaFn] = {"min": page_min, "max": page_max, "mean": page_mean}


def _pinned_upload(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":  # pinned + non_blocking: the copy is queued, the host does not wait
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class PagedKVCache:
    """A paged K/V cache for ``num_layers`` layers, ``max_batch`` sequences of any lengths.

    Args:
        num_layers, num_kv_heads, head_dim: the model's shape (``Hkv``, ``D``).
        page_size: tokens per page (default 16, Quest's chunk size); any positive int.
        dtype, device: of the stored K/V (default: torch's default dtype, CPU).
        max_batch: number of sequence slots. The first ``append`` fixes the batch ``B``
            (``<= max_batch``); later appends must give the same ``B`` (a sequence that takes no
            token this step gets ``seq_lens[b] = 0``).
        initial_pages: initial pool capacity in pages (default: room for 256 tokens per slot).
        metadata: page metadata to maintain: names of built-ins (``"min"``, ``"max"``,
            ``"mean"``) and/or a mapping ``name -> fn(keys [N, Hkv, P, D], valid [N, 1, P, 1])
            -> [N, Hkv, ...]``. Default: all built-ins.

    Typical step, per layer ``l``: ``cache.append(l, k_new, v_new)`` then
    ``sparse_decode_attention(q, cache, l, selection)``.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, page_size: int = 16,
                 dtype: Optional[torch.dtype] = None, device=None, max_batch: int = 1,
                 initial_pages: Optional[int] = None,
                 metadata: Union[Sequence[str], Mapping[str, MetaFn]] = ("min", "max", "mean")):
        for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                            ("page_size", page_size), ("max_batch", max_batch)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.page_size = page_size
        self.dtype = dtype
        self.device = torch.device(device if device is not None else "cpu")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.max_batch = max_batch
        self._meta_fns = self._resolve_metadata(metadata)

        cap = initial_pages if initial_pages is not None else 1 + max_batch * _cdiv(256, page_size)
        if not isinstance(cap, int) or cap < 2:
            raise ValueError(f"initial_pages must be an int >= 2 (page 0 is scratch), got {initial_pages!r}")
        self._capacity = 0
        self._k: list = [None] * num_layers
        self._v: list = [None] * num_layers
        self._meta: list = [dict() for _ in range(num_layers)]
        self._meta_specs = self._probe_metadata()
        self._grow_pool(cap)
        self._table = torch.zeros(max_batch, 0, dtype=torch.int32, device=self.device)
        self._grow_table(_cdiv(256, page_size))
        self._lengths = torch.zeros(num_layers, max_batch, dtype=torch.int32, device=self.device)
        self.reset()

    # ------------------------------------------------------------------ set-up helpers
    @staticmethod
    def _resolve_metadata(metadata) -> Dict[str, MetaFn]:
        if isinstance(metadata, Mapping):
            items = dict(metadata)
        else:
            if isinstance(metadata, str):
                metadata = (metadata,)
            items = {}
            for name in metadata:
                if name not in BUILTIN_METADATA:
                    raise ValueError(f"unknown page metadata {name!r}; built-ins are {sorted(BUILTIN_METADATA)}, "
                                     "or pass a mapping name -> fn(keys, valid)")
                items[name] = BUILTIN_METADATA[name]
        for name, fn in items.items():
            if not isinstance(name, str) or not callable(fn):
                raise ValueError(f"metadata must map str names to callables, got {name!r}: {fn!r}")
        return items

    def _probe_metadata(self) -> Dict[str, Tuple[tuple, torch.dtype]]:
        """Trailing shape and dtype of each metadata tensor, from one call on a dummy page."""
        keys = torch.zeros(1, self.num_kv_heads, self.page_size, self.head_dim, dtype=self.dtype, device=self.device)
        valid = torch.ones(1, 1, self.page_size, 1, dtype=torch.bool, device=self.device)
        specs = {}
        for name, fn in self._meta_fns.items():
            out = fn(keys, valid)
            if not isinstance(out, torch.Tensor) or out.dim() < 2 or tuple(out.shape[:2]) != (1, self.num_kv_heads):
                raise ValueError(f"metadata {name!r} must return [N, Hkv, ...] = [1, {self.num_kv_heads}, ...] for "
                                 f"one page, got {tuple(out.shape) if isinstance(out, torch.Tensor) else type(out)}")
            specs[name] = (tuple(out.shape[2:]), out.dtype)
        return specs

    def _grow_pool(self, capacity: int) -> None:
        """Reallocate every layer's pool with ``capacity`` pages, keeping the allocated ones."""
        keep = getattr(self, "_next_page", 0)
        shape = (capacity, self.num_kv_heads, self.page_size, self.head_dim)
        for layer in range(self.num_layers):
            # Zero-filled: a kernel never reads unwritten slots, but NaN bits from torch.empty
            # would make any such bug look like a numerical one.
            k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            v = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if keep:
                k[:keep].copy_(self._k[layer][:keep])
                v[:keep].copy_(self._v[layer][:keep])
            self._k[layer], self._v[layer] = k, v
            for name, (tail, dt) in self._meta_specs.items():
                m = torch.zeros((capacity, self.num_kv_heads) + tail, dtype=dt, device=self.device)
                if keep:
                    m[:keep].copy_(self._meta[layer][name][:keep])
                self._meta[layer][name] = m
        self._capacity = capacity

    def _grow_table(self, width: int) -> None:
        table = torch.zeros(self.max_batch, width, dtype=torch.int32, device=self.device)  # 0 = scratch
        old = self._table.shape[1]
        if old:
            table[:, :old].copy_(self._table)
        self._table = table

    def reset(self) -> None:
        """Forget every sequence (lengths 0, no pages); keeps the allocated memory."""
        self._lengths.zero_()
        self._table.zero_()
        self._host_lengths = [[0] * self.max_batch for _ in range(self.num_layers)]
        self._host_pages = [0] * self.max_batch
        self._next_page = 1  # page 0 is the scratch page
        self.batch = 0
        # Decode methods' state (selection caches, scores, keep-sets), see DecodeMethod.state.
        self.method_state: dict = {}

    def reserve(self, tokens_per_sequence: int) -> None:
        """Preallocate pool and table room for ``tokens_per_sequence`` tokens in every slot (no growth later)."""
        pages = _cdiv(int(tokens_per_sequence), self.page_size)
        need = 1 + sum(max(0, pages - p) for p in self._host_pages) + (self._next_page - 1)
        if need > self._capacity:
            self._grow_pool(need)
        if pages > self._table.shape[1]:
            self._grow_table(pages)

    # ------------------------------------------------------------------ views
    @property
    def lengths(self) -> torch.Tensor:
        """int32 ``[B]``: tokens per sequence in layer 0 (all layers agree between model steps).

        Inside a step, where layer ``l`` may already hold the new tokens and layer ``l + 1`` not
        yet, use :meth:`layer_lengths`.
        """
        return self.layer_lengths(0)

    def layer_lengths(self, layer: int) -> torch.Tensor:
        """int32 ``[B]`` (a view): tokens per sequence in ``layer``."""
        self._check_layer(layer)
        return self._lengths[layer, : self.batch]

    def host_lengths(self, layer: int) -> list:
        """Python ints: the host mirror of ``layer_lengths(layer)`` (no device read)."""
        self._check_layer(layer)
        return list(self._host_lengths[layer][: self.batch])

    def max_length(self, layer: int) -> int:
        lens = self.host_lengths(layer)
        return max(lens) if lens else 0

    def num_pages(self, layer: int) -> torch.Tensor:
        """int32 ``[B]``: pages holding tokens of each sequence in ``layer`` (``ceil(len / page_size)``)."""
        return torch.div(self.layer_lengths(layer) + (self.page_size - 1), self.page_size, rounding_mode="floor")

    @property
    def max_pages(self) -> int:
        """Width of :attr:`page_table`: the most pages any sequence has."""
        return max(self._host_pages[: self.batch], default=0)

    @property
    def page_table(self) -> torch.Tensor:
        """int32 ``[B, max_pages]`` (a view): physical page of each logical page; 0 (scratch) where unused."""
        return self._table[: self.batch, : self.max_pages]

    @property
    def page_table_storage(self) -> torch.Tensor:
        """int32 ``[B, width]``: the page table with its spare columns (what kernels index)."""
        return self._table[: self.batch]

    @property
    def capacity(self) -> int:
        """Pages the pool holds now (page 0 included)."""
        return self._capacity

    @property
    def pages_in_use(self) -> int:
        return self._next_page - 1

    @property
    def metadata_names(self) -> tuple:
        return tuple(self._meta_fns)

    def k_pages(self, layer: int) -> torch.Tensor:
        """``[capacity, Hkv, page_size, D]``: the layer's key pool. Replaced (not resized) on growth."""
        self._check_layer(layer)
        return self._k[layer]

    def v_pages(self, layer: int) -> torch.Tensor:
        """``[capacity, Hkv, page_size, D]``: the layer's value pool. Replaced (not resized) on growth."""
        self._check_layer(layer)
        return self._v[layer]

    def page_meta_pool(self, layer: int, name: str) -> torch.Tensor:
        """``[capacity, Hkv, ...]``: metadata ``name`` indexed by physical page."""
        self._check_layer(layer)
        if name not in self._meta_fns:
            raise KeyError(f"no page metadata {name!r}; this cache keeps {list(self._meta_fns)} "
                           "(pass metadata= to PagedKVCache)")
        return self._meta[layer][name]

    def page_meta(self, layer: int, name: str) -> torch.Tensor:
        """``[B, Hkv, max_pages, ...]``: metadata ``name`` per sequence and logical page.

        Entries at and after ``num_pages(layer)[b]`` read the scratch page: meaningless, mask them.
        """
        pool = self.page_meta_pool(layer, name)
        got = pool[self.page_table.long()]  # [B, maxP, Hkv, ...]
        return got.transpose(1, 2)

    def gather(self, layer: int, *, lengths: Optional[Sequence[int]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Dense copies ``k, v [B, Hkv, max_len, D]``, zero past each sequence's length (for tests)."""
        self._check_layer(layer)
        lens = self.host_lengths(layer) if lengths is None else list(lengths)
        L = max(lens, default=0)
        B, dev = self.batch, self.device
        pos = torch.arange(L, device=dev)
        phys = self._table[:B].long()[:, pos // self.page_size] if L else torch.zeros(B, 0, dtype=torch.long,
                                                                                          device=dev)
        slot = (pos % self.page_size).view(1, -1).expand(B, L)
        valid = (pos.view(1, -1) < torch.tensor(lens, device=dev, dtype=torch.long).view(-1, 1))
        outs = []
        for pool in (self._k[layer], self._v[layer]):
            x = pool[phys, :, slot]  # [B, L, Hkv, D]
            x = torch.where(valid[:, :, None, None], x, torch.zeros((), dtype=x.dtype, device=dev))
            outs.append(x.transpose(1, 2).contiguous())
        return outs[0], outs[1]

    def __repr__(self) -> str:
        return (f"PagedKVCache(layers={self.num_layers}, Hkv={self.num_kv_heads}, D={self.head_dim}, "
                f"page_size={self.page_size}, dtype={self.dtype}, device={self.device}, batch={self.batch}/"
                f"{self.max_batch}, pages={self.pages_in_use}/{self._capacity - 1}, metadata={list(self._meta_fns)})")

    # ------------------------------------------------------------------ append
    def _check_layer(self, layer) -> None:
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")

    def _host_counts(self, seq_lens, B: int, T: int) -> Optional[list]:
        if seq_lens is None:
            return None
        if isinstance(seq_lens, torch.Tensor):
            if seq_lens.dim() != 1 or seq_lens.dtype.is_floating_point:
                raise ValueError(f"seq_lens must be an int tensor [B], got {seq_lens.dtype} {tuple(seq_lens.shape)}")
            counts = seq_lens.tolist()  # a device read (sync) when seq_lens lives on the GPU
        else:
            counts = list(seq_lens)
        if len(counts) != B:
            raise ValueError(f"seq_lens must have one count per sequence (B={B}), got {len(counts)}")
        for c in counts:
            if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c <= T:
                raise ValueError(f"seq_lens entries must be ints in [0, T={T}] (valid new tokens per sequence, "
                                 f"padding after them), got {counts}")
        return counts

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, seq_lens=None) -> None:
        """Append ``T`` new tokens per sequence to ``layer``.

        Args:
            k, v: ``[B, Hkv, T, D]`` in the cache dtype and device (prefill: ``T`` tokens, decode:
                ``T = 1``).
            seq_lens: how many of the ``T`` tokens are real for each sequence (ints in ``[0, T]``;
                the real ones come first, the rest is padding and is not stored). ``None``: all.
                A list or CPU tensor costs no sync; a CUDA tensor costs one device read.

        Updates the layer's lengths and the metadata of every page the new tokens touch.
        """
        self._check_layer(layer)
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"{name} must be a 4-D tensor [B, Hkv, T, D], got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
            if t.dtype != self.dtype:
                raise ValueError(f"{name} must be {self.dtype} (the cache dtype), got {t.dtype}; cast it first")
            if t.device != self.device:
                raise ValueError(f"{name} must be on {self.device} (the cache device), got {t.device}")
        if tuple(k.shape) != tuple(v.shape):
            raise ValueError(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        B, H, T, D = k.shape
        if H != self.num_kv_heads or D != self.head_dim:
            raise ValueError(f"expected k, v [B, Hkv={self.num_kv_heads}, T, D={self.head_dim}], got {tuple(k.shape)}")
        if not 1 <= B <= self.max_batch:
            raise ValueError(f"batch must be in [1, max_batch={self.max_batch}], got {B}")
        if self.batch and B != self.batch:
            raise ValueError(f"this cache holds B={self.batch} sequences, got an append with B={B}; pass seq_lens "
                             "with 0 for sequences that take no token (or reset() the cache)")
        counts = self._host_counts(seq_lens, B, T)
        if T == 0:
            self.batch = B
            return
        self.batch = B
        P = self.page_size
        host_len = self._host_lengths[layer]
        new_len = [host_len[b] + (T if counts is None else counts[b]) for b in range(B)]
        self._allocate(new_len)

        dev = self.device
        old = self._lengths[layer, :B].long()  # [B]
        t_idx = torch.arange(T, device=dev)
        pos = old.view(-1, 1) + t_idx.view(1, -1)  # [B, T]
        width = self._table.shape[1]
        lp = torch.clamp(pos // P, max=width - 1)
        phys = torch.gather(self._table[:B].long(), 1, lp)
        if counts is not None:
            cnt = _pinned_upload(counts, torch.int64, dev)
            phys = torch.where(t_idx.view(1, -1) < cnt.view(-1, 1), phys, torch.zeros_like(phys))  # pad -> scratch
        slot = pos % P
        # [B, T, Hkv, D] into pool[page, :, slot]: advanced indices around a slice put [B, T] first.
        self._k[layer][phys, :, slot] = k.transpose(1, 2)
        self._v[layer][phys, :, slot] = v.transpose(1, 2)
        if counts is None:
            self._lengths[layer, :B] += T
        else:
            self._lengths[layer, :B] += cnt.to(torch.int32)
        self._host_lengths[layer][:B] = new_len
        self._update_meta(layer, old, B, T)

    def _allocate(self, new_len: Sequence[int]) -> None:
        """Give every sequence pages for ``new_len`` tokens (host bookkeeping + device fills, no sync)."""
        P = self.page_size
        want = [_cdiv(n, P) for n in new_len]
        extra = sum(max(0, w - have) for w, have in zip(want, self._host_pages))
        if extra == 0:
            return
        if self._next_page + extra > self._capacity:
            self._grow_pool(max(self._next_page + extra, 2 * self._capacity))
        if max(want) > self._table.shape[1]:
            self._grow_table(max(max(want), 2 * self._table.shape[1]))
        for b, w in enumerate(want):
            have = self._host_pages[b]
            if w > have:
                n = w - have
                self._table[b, have:w] = torch.arange(self._next_page, self._next_page + n, dtype=torch.int32,
                                                      device=self.device)
                self._next_page += n
                self._host_pages[b] = w

    def _update_meta(self, layer: int, old: torch.Tensor, B: int, T: int) -> None:
        """Recompute the metadata of the pages holding the new tokens (exact, from the stored keys)."""
        if not self._meta_fns:
            return
        P, dev = self.page_size, self.device
        nt = _cdiv(T, P) + 1  # pages a run of T tokens can touch
        new = self._lengths[layer, :B].long()
        lp = (old // P).view(-1, 1) + torch.arange(nt, device=dev).view(1, -1)  # [B, nt]
        width = self._table.shape[1]
        touched = (lp * P < new.view(-1, 1)) & (lp < width)
        phys = torch.gather(self._table[:B].long(), 1, lp.clamp(max=width - 1))
        phys = torch.where(touched, phys, torch.zeros_like(phys)).flatten()  # untouched -> scratch
        keys = self._k[layer][phys]  # [B * nt, Hkv, P, D]
        slot_pos = (lp * P).view(B, nt, 1) + torch.arange(P, device=dev).view(1, 1, P)
        valid = (slot_pos < new.view(-1, 1, 1)).view(B * nt, 1, P, 1)
        for name, fn in self._meta_fns.items():
            self._meta[layer][name][phys] = fn(keys, valid).to(self._meta[layer][name].dtype)


__all__ = ["PagedKVCache", "BUILTIN_METADATA", "page_min", "page_max", "page_mean", "SCRATCH_PAGE"]
