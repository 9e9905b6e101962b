"""Sparse decode attention over a :class:`~sparseattn.cache.PagedKVCache`.

* :class:`DecodeSelection` - the decode-side contract between selection methods (Quest, block
  top-k, StreamingLLM, ...) and the kernels: per (batch, KV head) the ascending logical pages to
  read, plus optional single tokens. One selection per KV head serves its whole GQA group.
* :func:`sparse_decode_attention` - ``q [B, Hq, Lq, D]`` against the selected pages/tokens of one
  layer of the cache, on the reference (PyTorch) or Triton backend.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from .cache import PagedKVCache
from .checks import FLOAT_DTYPES
from .kernels.decode_reference import decode_attention_reference, selected_positions
from .kernels.dispatch import TRITON_HEAD_DIMS, resolve_backend, triton_environment_reason



def _check_int_tensor(name: str, t, dims: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise ValueError(f"{name} must be int32, got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")


@dataclass(eq=False)
class DecodeSelection:
    """Which keys each (batch, KV head) reads in one decode step.

    Fields (``B`` is the batch or 1 = shared by the batch; ``H`` is Hkv or 1 = shared by all KV
    heads, the "one list per layer" policy):

    * ``page_counts`` int32 ``[B, H]`` and ``pages`` int32 ``[B, H, maxP]``: logical page indices
      (page ``i`` = tokens ``[i * page_size, (i + 1) * page_size)`` of the sequence), strictly
      ascending; entries at and after the count are ignored (keep them in range, e.g. 0).
    * ``token_counts`` / ``tokens`` ``[B, H, maxT]`` (optional): single token positions, strictly
      ascending, never inside a selected page (they would count twice).
    * ``page_size``: the cache's page size the pages refer to.
    * ``token_logits`` float32 ``[B, Hkv, G, Lq, maxT]`` (optional, with ``tokens``; ``G = Hq / Hkv``):
      the step's query logits over the token list, ``logits_scale * q . k`` per lane (what
      :func:`~sparseattn.kernels.list_logits_triton.list_logits_triton` returns), for a method that
      computed them while selecting (H2O, TOVA): the kernels then read only the listed tokens'
      values. They belong to the queries they were computed from: pass those to the attention.

    Either part may be ``None`` (not both). Parts of a partially filled last page past the
    sequence's length are never read. The ``Lq`` queries of a step see the selected keys up to
    their own position (bottom-right causal among the new tokens).
    """

    page_counts: Optional[torch.Tensor]
    pages: Optional[torch.Tensor]
    page_size: int
    token_counts: Optional[torch.Tensor] = None
    tokens: Optional[torch.Tensor] = None
    token_logits: Optional[torch.Tensor] = None
    logits_scale: Optional[float] = None

    def __post_init__(self):
        if not isinstance(self.page_size, int) or isinstance(self.page_size, bool) or self.page_size <= 0:
            raise ValueError(f"page_size must be a positive int, got {self.page_size!r}")
        if (self.page_counts is None) != (self.pages is None):
            raise ValueError("page_counts and pages must be given together (or neither)")
        if (self.token_counts is None) != (self.tokens is None):
            raise ValueError("token_counts and tokens must be given together (or neither)")
        if self.pages is None and self.tokens is None:
            raise ValueError("a DecodeSelection needs pages or tokens; use selection=None for dense attention")
        shape = None
        device = None
        for cname, iname in (("page_counts", "pages"), ("token_counts", "tokens")):
            c, i = getattr(self, cname), getattr(self, iname)
            if c is None:
                continue
            _check_int_tensor(cname, c, 2)
            _check_int_tensor(iname, i, 3)
            if tuple(i.shape[:2]) != tuple(c.shape):
                raise ValueError(f"{iname} must be [B, H, max] with [B, H] = {tuple(c.shape)} of {cname}, "
                                 f"got {tuple(i.shape)}")
            if c.device != i.device or (device is not None and c.device != device):
                raise ValueError(f"all selection tensors must be on one device, got {c.device} and "
                                 f"{i.device if c.device == i.device else device}")
            if shape is not None and tuple(c.shape) != shape:
                raise ValueError(f"page and token parts must share [B, H], got {shape} and {tuple(c.shape)}")
            shape, device = tuple(c.shape), c.device
        if self.token_logits is not None:
            lg = self.token_logits
            if self.tokens is None:
                raise ValueError("token_logits need tokens: they are logits over the token list")
            if not isinstance(lg, torch.Tensor) or lg.dtype != torch.float32 or lg.dim() != 5:
                got = (lg.dtype, tuple(lg.shape)) if isinstance(lg, torch.Tensor) else type(lg).__name__
                raise ValueError(f"token_logits must be a float32 [B, Hkv, G, Lq, maxT] tensor, got {got}")
            if lg.shape[-1] != self.tokens.shape[-1] or lg.device != self.tokens.device:
                raise ValueError(f"token_logits must have the tokens' width {self.tokens.shape[-1]} and device "
                                 f"{self.tokens.device}, got {tuple(lg.shape)} on {lg.device}")
        if self.logits_scale is not None and not (isinstance(self.logits_scale, (int, float))
                                                  and not isinstance(self.logits_scale, bool)
                                                  and self.logits_scale > 0):
            raise ValueError(f"logits_scale must be a positive number or None, got {self.logits_scale!r}")

    # ------------------------------------------------------------------ facts
    @property
    def batch(self) -> int:
        return (self.page_counts if self.page_counts is not None else self.token_counts).shape[0]

    @property
    def heads(self) -> int:
        return (self.page_counts if self.page_counts is not None else self.token_counts).shape[1]

    @property
    def device(self) -> torch.device:
        return (self.page_counts if self.page_counts is not None else self.token_counts).device

    @property
    def max_pages(self) -> int:
        return 0 if self.pages is None else self.pages.shape[-1]

    @property
    def max_tokens(self) -> int:
        return 0 if self.tokens is None else self.tokens.shape[-1]

    def __repr__(self) -> str:
        return (f"DecodeSelection(B={self.batch}, H={self.heads}, page_size={self.page_size}, "
                f"maxP={self.max_pages}, maxT={self.max_tokens}, device={self.device})")

    def to(self, device) -> "DecodeSelection":
        moved = {n: (None if getattr(self, n) is None else getattr(self, n).to(device))
                 for n in ("page_counts", "pages", "token_counts", "tokens", "token_logits")}
        return replace(self, **moved)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_pages(cls, pages: torch.Tensor, counts: Optional[torch.Tensor] = None, *, page_size: int,
                   sort: bool = False) -> "DecodeSelection":
        """From page indices ``[B, H, maxP]`` (int) and counts ``[B, H]`` (default: all columns).

        ``sort=True`` sorts the first ``count`` entries of each row (e.g. ``topk`` indices; the
        unused tail is moved after them). No host sync.
        """
        pages = pages.to(torch.int32)
        if counts is None:
            counts = torch.full(pages.shape[:2], pages.shape[-1], dtype=torch.int32, device=pages.device)
        counts = counts.to(torch.int32)
        if sort and pages.shape[-1] > 1:
            used = torch.arange(pages.shape[-1], device=pages.device) < counts.unsqueeze(-1)
            big = torch.iinfo(torch.int32).max
            pages = torch.where(used, pages, torch.full_like(pages, big)).sort(-1).values
            pages = torch.where(used, pages, torch.zeros_like(pages))
        return cls(counts, pages.contiguous(), page_size)

    @classmethod
    def from_page_mask(cls, mask: torch.Tensor, *, page_size: int, max_pages: Optional[int] = None
                       ) -> "DecodeSelection":
        """From a bool ``[B, H, nP]`` page mask (True = read the page). No host sync.

        ``max_pages`` caps the index width (default ``nP``); it must hold the largest count.
        """
        if not isinstance(mask, torch.Tensor) or mask.dim() != 3:
            raise ValueError(f"mask must be a bool [B, H, nP] tensor, got "
                             f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        counts, idx = _compact(mask.to(torch.bool), max_pages)
        return cls(counts, idx, page_size)

    @classmethod
    def from_token_mask(cls, mask: torch.Tensor, *, page_size: int, max_tokens: Optional[int] = None
                        ) -> "DecodeSelection":
        """Token-level only, from a bool ``[B, H, N]`` token mask (True = read the token). No host sync.

        ``max_tokens`` caps the index width (default ``N``); it must hold the largest count
        (a method's token budget plus its forced tokens).
        """
        if not isinstance(mask, torch.Tensor) or mask.dim() != 3:
            raise ValueError(f"mask must be a bool [B, H, N] tensor, got "
                             f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        counts, idx = _compact(mask.to(torch.bool), max_tokens)
        return cls(None, None, page_size, counts, idx)

    def with_tokens(self, tokens: torch.Tensor, counts: Optional[torch.Tensor] = None) -> "DecodeSelection":
        """The same selection plus ascending single tokens ``[B, H, maxT]`` (outside the selected pages)."""
        tokens = tokens.to(torch.int32)
        if counts is None:
            counts = torch.full(tokens.shape[:2], tokens.shape[-1], dtype=torch.int32, device=tokens.device)
        return replace(self, token_counts=counts.to(torch.int32), tokens=tokens.contiguous(), token_logits=None,
                       logits_scale=None)

    @classmethod
    def from_tokens(cls, tokens: torch.Tensor, counts: Optional[torch.Tensor] = None, *, page_size: int
                    ) -> "DecodeSelection":
        """Token-level only: ascending positions ``[B, H, maxT]`` (TokenSelect, TidalDecode, ...)."""
        tokens = tokens.to(torch.int32)
        if counts is None:
            counts = torch.full(tokens.shape[:2], tokens.shape[-1], dtype=torch.int32, device=tokens.device)
        return cls(None, None, page_size, counts.to(torch.int32), tokens.contiguous())

    # ------------------------------------------------------------------ views and checks
    def token_mask(self, lengths: torch.Tensor, k_len: Optional[int] = None) -> torch.Tensor:
        """bool ``[B, H, k_len]``: True where a token is selected and lies before its sequence's length.

        The oracle for tests (with ``cache.gather``); ``k_len`` defaults to ``max(lengths)`` (a sync).
        """
        lengths = lengths.to(self.device)
        if k_len is None:
            k_len = int(lengths.max()) if lengths.numel() else 0
        B = max(self.batch, lengths.shape[0])
        pos, valid = selected_positions(page_size=self.page_size, lengths=lengths.expand(B) if lengths.shape[0] == 1
                                        else lengths, num_kv_heads=self.heads, pages=self.pages,
                                        page_counts=self.page_counts, tokens=self.tokens,
                                        token_counts=self.token_counts)
        out = torch.zeros(B, self.heads, k_len + 1, dtype=torch.bool, device=self.device)
        out.scatter_(-1, torch.where(valid & (pos < k_len), pos, torch.full_like(pos, k_len)), True)
        return out[..., :k_len]

    def validate(self, lengths: torch.Tensor) -> "DecodeSelection":
        """Check every index against the sequence lengths ``[B]`` (reads them back: a host sync).

        Raises ``ValueError`` for counts out of ``[0, width]``, entries that are negative, not
        strictly ascending, past the sequence's last token, or tokens inside a selected page. A
        selection shared by the batch must fit every sequence.
        """
        lengths = lengths.to(self.device).long()
        B = lengths.shape[0]
        if self.batch not in (1, B):
            raise ValueError(f"selection batch must be 1 or {B}, got {self.batch}")
        H = self.heads
        n_pages = torch.div(lengths + self.page_size - 1, self.page_size, rounding_mode="floor")
        used_parts = {}
        for cname, iname, limit, unit in (("page_counts", "pages", n_pages, "pages"),
                                          ("token_counts", "tokens", lengths, "tokens")):
            c, idx = getattr(self, cname), getattr(self, iname)
            if c is None:
                continue
            width = idx.shape[-1]
            if bool(((c < 0) | (c > width)).any()):
                raise ValueError(f"{cname} must lie in [0, {width}] (the width of {iname}), got values in "
                                 f"[{int(c.min())}, {int(c.max())}]")
            c = c.long().expand(B, H)
            i = idx.long().expand(B, H, width)
            used = torch.arange(width, device=self.device).view(1, 1, -1) < c.unsqueeze(-1)
            used_parts[iname] = (i, used)
            if bool((used & (i < 0)).any()):
                raise ValueError(f"{iname} holds a negative index")
            beyond = used & (i >= limit.view(-1, 1, 1))
            if bool(beyond.any()):
                b, h, j = (int(x) for x in beyond.nonzero()[0].tolist())
                raise ValueError(f"{iname}[{b if self.batch > 1 else 0}, {h}, {j}] = {int(i[b, h, j])} lies beyond "
                                 f"sequence {b}'s {int(lengths[b])} tokens ({int(limit[b])} {unit}); select only "
                                 "what the cache holds")
            if width > 1 and bool((used[..., 1:] & (i[..., 1:] <= i[..., :-1])).any()):
                raise ValueError(f"{iname} must be strictly ascending within each row "
                                 "(DecodeSelection.from_pages(..., sort=True) sorts)")
        if len(used_parts) == 2:
            (pi, pu), (ti, tu) = used_parts["pages"], used_parts["tokens"]
            n = int(n_pages.max()) + 1  # the last column collects unused entries
            pmask = torch.zeros(B, H, n, dtype=torch.bool, device=self.device)
            pmask.scatter_(-1, torch.where(pu, pi, torch.full_like(pi, n - 1)), True)
            pmask[..., -1] = False
            tp = torch.where(tu, ti // self.page_size, torch.full_like(ti, n - 1))
            if bool(torch.gather(pmask, -1, tp).any()):
                raise ValueError("tokens must not fall inside a selected page (they would be counted twice)")
        return self


def _compact(mask: torch.Tensor, width: Optional[int]):
    """bool ``[B, H, n]`` -> (counts int32 ``[B, H]``, ascending indices int32 ``[B, H, width]``)."""
    B, H, n = mask.shape
    width = n if width is None else int(width)
    counts = mask.sum(-1, dtype=torch.int32)
    rank = torch.cumsum(mask, -1, dtype=torch.int64) - 1
    dest = torch.where(mask, rank, torch.full_like(rank, n)).clamp(max=n)
    buf = torch.zeros(B, H, n + 1, dtype=torch.int32, device=mask.device)
    buf.scatter_(-1, dest, torch.arange(n, dtype=torch.int32, device=mask.device).expand(B, H, n))
    idx = buf[..., :n]
    if width < n:
        idx = idx[..., :width]
    elif width > n:
        idx = torch.nn.functional.pad(idx, (0, width - n))
    return counts, idx.contiguous()


# ----------------------------------------------------------------------------- backend choice
def decode_triton_input_reason(q: torch.Tensor, cache: PagedKVCache) -> Optional[str]:
    """Why these (valid) inputs are not supported by the Triton decode kernel, or None."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the Triton decode kernel supports float16, bfloat16 and float32, got {q.dtype}"
    D = q.shape[-1]
    if D not in TRITON_HEAD_DIMS:
        return f"the Triton decode kernel supports head_dim in {TRITON_HEAD_DIMS}, got {D}"
    return None


def can_run_decode_triton(q: torch.Tensor, cache: PagedKVCache) -> Optional[str]:
    """None when the Triton decode kernel can run these inputs, else the reason it cannot."""
    return triton_environment_reason(q.device) or decode_triton_input_reason(q, cache)


def choose_decode_backend(requested: str, q: torch.Tensor, cache: PagedKVCache) -> str:
    """Resolve ``backend=`` ('auto', 'reference' or 'triton') for decode, like the prefill dispatch."""
    return resolve_backend(requested, q, lambda: decode_triton_input_reason(q, cache))



# ----------------------------------------------------------------------------- validation
def check_decode_inputs(q: torch.Tensor, cache: PagedKVCache, layer: int,
                        selection: Optional[DecodeSelection], scale) -> tuple:
    """Cheap checks (no device reads). Returns ``(B, Hq, Lq, D)``."""
    if not isinstance(cache, PagedKVCache):
        raise TypeError(f"cache must be a sparseattn.PagedKVCache, got {type(cache).__name__}")
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < cache.num_layers:
        raise ValueError(f"layer must be an int in [0, {cache.num_layers}), got {layer!r}")
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D [B, Hq, Lq, D] (canonical layout), got shape {tuple(q.shape)}")
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q must be one of float16/bfloat16/float32/float64, got {q.dtype}")
    if q.dtype != cache.dtype:
        raise ValueError(f"q must have the cache dtype {cache.dtype}, got {q.dtype}; cast it first")
    if q.device != cache.device:
        raise ValueError(f"q must be on the cache device {cache.device}, got {q.device}")
    B, Hq, Lq, D = q.shape
    Hkv = cache.num_kv_heads
    if D != cache.head_dim:
        raise ValueError(f"head_dim mismatch: q has D={D}, the cache has D={cache.head_dim}")
    if Hq % Hkv != 0:
        raise ValueError(f"query heads must be a multiple of KV heads (GQA), got Hq={Hq}, Hkv={Hkv}")
    if B != cache.batch:
        raise ValueError(f"q has B={B} but the cache holds {cache.batch} sequences; append the new tokens first")
    if Lq and B and min(cache.host_lengths(layer)) < Lq:
        raise ValueError(f"the Lq={Lq} queries must be the last tokens already appended to layer {layer}, but a "
                         f"sequence holds only {min(cache.host_lengths(layer))} tokens; append k, v before attending")
    if scale is not None and not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    if selection is not None:
        if not isinstance(selection, DecodeSelection):
            raise TypeError(f"selection must be a sparseattn.DecodeSelection or None (dense), got "
                            f"{type(selection).__name__}")
        hint = "; rebuild the selection for this cache"
        if selection.page_size != cache.page_size:
            raise ValueError(f"selection was built for page_size={selection.page_size}, the cache has "
                             f"page_size={cache.page_size}{hint}")
        if selection.batch not in (1, B):
            raise ValueError(f"selection batch must be 1 or {B}, got {selection.batch}{hint}")
        if selection.heads not in (1, Hkv):
            raise ValueError(f"selection heads must be 1 or Hkv={Hkv}, got {selection.heads}: one list per KV head "
                             f"serves its GQA group (aggregate per-query-head scores per group first){hint}")
        if selection.device != q.device:
            raise ValueError(f"selection is on {selection.device} but q is on {q.device}; use selection.to(device)")
        lg = selection.token_logits
        if lg is not None and tuple(lg.shape[:4]) != (B, Hkv, Hq // Hkv, Lq):
            raise ValueError(f"selection.token_logits must be [B, Hkv, G, Lq, maxT] = [{B}, {Hkv}, {Hq // Hkv}, {Lq}, "
                             f"...] for these queries, got {tuple(lg.shape)}{hint}")
    return B, Hq, Lq, D


def sparse_decode_attention(q: torch.Tensor, cache: PagedKVCache, layer: int,
                            selection: Optional[DecodeSelection] = None, *, scale: Optional[float] = None,
                            backend: str = "auto", return_lse: bool = False, validate: Optional[bool] = None):
    """Attention of the newest tokens' queries over the selected pages/tokens of one cache layer.

    Args:
        q: ``[B, Hq, Lq, D]`` queries of the last ``Lq`` tokens of each sequence, which are already
            appended to ``layer`` (``Lq = 1`` for decode, a few for speculative verification:
            query ``i`` sits at position ``len_b - Lq + i`` and sees selected keys up to it).
            ``Hq % Hkv == 0``: query head ``h`` reads KV head ``h // (Hq // Hkv)``.
        cache: a :class:`~sparseattn.cache.PagedKVCache` in q's dtype and device.
        layer: which layer of the cache.
        selection: a :class:`DecodeSelection` (per batch and KV head, or shared); ``None`` reads
            every token (dense decode, the same kernel).
        scale: softmax scale, default ``1 / sqrt(D)``.
        backend: ``"auto"`` (Triton on CUDA when it can run, else the reference),
            ``"reference"`` or ``"triton"`` (raises with the reason when it cannot run).
        return_lse: also return the float32 log-sum-exp ``[B, Hq, Lq]`` (natural log), for
            merging partial attentions.
        validate: check every selection index against the lengths. ``None``: on CPU tensors
            only (a check reads indices back, a host sync per call on the GPU); ``True``: always;
            ``False``: never. The kernels never read out of bounds either way (entries past a
            sequence's length are masked), but a wrong selection gives a wrong answer silently.

    Returns:
        ``out [B, Hq, Lq, D]`` in q's dtype (and ``lse``). Rows with nothing selected give 0 and
        lse ``-inf``, never NaN.
    """
    B, Hq, Lq, D = check_decode_inputs(q, cache, layer, selection, scale)
    if validate is None:
        validate = q.device.type == "cpu"
    lengths = cache.layer_lengths(layer)
    if selection is not None and validate:
        selection.validate(lengths)
    chosen = choose_decode_backend(backend, q, cache)
    sel = {}
    if selection is None:
        sel = dict(dense=True, dense_pages=-(-cache.max_length(layer) // cache.page_size))
    else:
        sel = dict(pages=selection.pages, page_counts=selection.page_counts, tokens=selection.tokens,
                   token_counts=selection.token_counts, token_logits=selection.token_logits,
                   logits_scale=selection.logits_scale)
    args = (q, cache.k_pages(layer), cache.v_pages(layer), cache.page_table_storage, lengths)
    if chosen == "triton":
        from .kernels.decode_triton import decode_attention_triton

        return decode_attention_triton(*args, page_size=cache.page_size, scale=scale, return_lse=return_lse, **sel)
    return decode_attention_reference(*args, page_size=cache.page_size, scale=scale, return_lse=return_lse, **sel)


__all__ = ["DecodeSelection", "sparse_decode_attention", "can_run_decode_triton", "choose_decode_backend",
           "check_decode_inputs"]
