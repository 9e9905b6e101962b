"""Plain PyTorch sparse decode attention over a paged K/V cache: the CPU path and a test oracle.

It gathers the selected tokens of every (batch, KV head) from the page pool into a dense
``[B, Hkv, N, D]`` tensor (N = the selection's width in tokens), masks what lies past each
sequence's length (and, for ``Lq > 1``, the causal triangle among the new tokens), and runs a
masked softmax with float32 accumulation. All query heads of a GQA group read the same gathered
K/V by broadcast.

Same signature as :func:`sparseattn.kernels.decode_triton.decode_attention_triton`; inputs are
already validated by :func:`sparseattn.decode_api.sparse_decode_attention`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def selected_positions(*, page_size: int, lengths: torch.Tensor, num_kv_heads: int,
                       pages: Optional[torch.Tensor] = None, page_counts: Optional[torch.Tensor] = None,
                       tokens: Optional[torch.Tensor] = None, token_counts: Optional[torch.Tensor] = None,
                       dense: bool = False, dense_pages: int = 0):
    """Token positions ``[B, Hkv, N]`` (int64) and their validity (bool) for a selection.

    Page entries expand to their ``page_size`` tokens; token entries are taken as they are;
    ``dense`` lists every token of the first ``dense_pages`` pages. Entries past a row's count,
    negative, or at or past the sequence's length are invalid.
    """
    B = lengths.shape[0]
    dev = lengths.device
    parts = []
    if dense:
        n = dense_pages * page_size
        pos = torch.arange(n, device=dev).view(1, 1, n)
        parts.append((pos, torch.ones_like(pos, dtype=torch.bool)))
    if pages is not None:
        maxP = pages.shape[-1]
        used = torch.arange(maxP, device=dev).view(1, 1, -1) < page_counts.long().unsqueeze(-1)
        pos = pages.long().unsqueeze(-1) * page_size + torch.arange(page_size, device=dev)
        parts.append((pos.flatten(-2), used.unsqueeze(-1).expand(*used.shape, page_size).flatten(-2)))
    if tokens is not None:
        maxT = tokens.shape[-1]
        used = torch.arange(maxT, device=dev).view(1, 1, -1) < token_counts.long().unsqueeze(-1)
        parts.append((tokens.long(), used))
    shape = (B, num_kv_heads)
    pos = torch.cat([p.expand(*shape, p.shape[-1]) for p, _ in parts], -1) if parts else \
        torch.zeros(*shape, 0, dtype=torch.long, device=dev)
    valid = torch.cat([u.expand(*shape, u.shape[-1]) for _, u in parts], -1) if parts else \
        torch.zeros(*shape, 0, dtype=torch.bool, device=dev)
    valid = valid & (pos >= 0) & (pos < lengths.long().view(-1, 1, 1))
    return pos, valid


def decode_attention_reference(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                               page_table: torch.Tensor, lengths: torch.Tensor, *, page_size: int,
                               pages: Optional[torch.Tensor] = None, page_counts: Optional[torch.Tensor] = None,
                               tokens: Optional[torch.Tensor] = None, token_counts: Optional[torch.Tensor] = None,
                               dense: bool = False, dense_pages: int = 0, scale: Optional[float] = None,
                               return_lse: bool = False, compute_dtype: Optional[torch.dtype] = None,
                               token_logits: Optional[torch.Tensor] = None, logits_scale: Optional[float] = None):
    """Attention of ``q [B, Hq, Lq, D]`` over the selected tokens of a paged cache.

    ``k_pages, v_pages [capacity, Hkv, page_size, D]``; ``page_table`` int32 ``[B, width]``;
    ``lengths`` int32 ``[B]`` (the ``Lq`` queries are the last ``Lq`` tokens of each sequence:
    query ``i`` sits at position ``lengths[b] - Lq + i`` and sees selected keys up to it).
    Selection: ``pages`` int32 ``[B or 1, Hkv or 1, maxP]`` with ``page_counts [B or 1, Hkv or 1]``
    and/or ``tokens [.., maxT]`` with ``token_counts``; ``dense=True`` reads everything.

    ``token_logits`` float32 ``[B, Hkv, G, Lq, maxT]`` (optional, with ``tokens``): the queries'
    logits over the token list, computed with ``logits_scale`` (``scale * q . k`` per lane, as
    :func:`~sparseattn.kernels.list_logits_triton.list_logits_torch` returns them); they replace
    the products of the token part (rescaled to ``scale``), so only its values are read.

    Returns ``out [B, Hq, Lq, D]`` in q's dtype (and float32 ``lse [B, Hq, Lq]``). Rows with no
    selected key give 0 and lse ``-inf``. Accumulates in float32 (float64 for float64 inputs)
    unless ``compute_dtype`` says otherwise.
    """
    B, Hq, Lq, D = q.shape
    Hkv = k_pages.shape[1]
    G = Hq // Hkv
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if compute_dtype is None:
        compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros_like(q)
    lse = torch.full((B, Hq, Lq), float("-inf"), dtype=torch.float32, device=q.device)
    if B == 0 or Lq == 0:
        return (out, lse) if return_lse else out

    pos, valid = selected_positions(page_size=page_size, lengths=lengths, num_kv_heads=Hkv, pages=pages,
                                    page_counts=page_counts, tokens=tokens, token_counts=token_counts,
                                    dense=dense, dense_pages=dense_pages)
    N = pos.shape[-1]
    pos_c = torch.where(valid, pos, torch.zeros_like(pos))
    phys = torch.gather(page_table.long(), 1, (pos_c // page_size).view(B, -1)).view(B, Hkv, N)
    phys = torch.where(valid, phys, torch.zeros_like(phys))
    slot = pos_c % page_size
    heads = torch.arange(Hkv, device=q.device).view(1, -1, 1)
    k = k_pages[phys, heads, slot]  # [B, Hkv, N, D]
    v = v_pages[phys, heads, slot]

    kc = k.to(compute_dtype).unsqueeze(2)  # [B, Hkv, 1, N, D]: the GQA group by broadcast
    v_finite = torch.isfinite(v).all(-1)
    vc = torch.where(v_finite.unsqueeze(-1), v, torch.zeros((), dtype=v.dtype, device=v.device))
    vc = vc.to(compute_dtype).unsqueeze(2)
    v_bad = (~v_finite).to(compute_dtype).unsqueeze(2).unsqueeze(-1)  # [B, Hkv, 1, N, 1]

    qc = q.to(compute_dtype).reshape(B, Hkv, G, Lq, D)
    s = torch.matmul(qc, kc.transpose(-1, -2)) * scale  # [B, Hkv, G, Lq, N]
    if token_logits is not None and tokens is not None:  # the token part comes last in pos
        maxT = tokens.shape[-1]
        given = token_logits.to(compute_dtype) * (scale / (logits_scale if logits_scale is not None else scale))
        s = torch.cat([s[..., :N - maxT], given.expand(B, Hkv, G, Lq, maxT)], -1)
    qpos = lengths.long().view(B, 1, 1, 1, 1) - Lq + torch.arange(Lq, device=q.device).view(1, 1, 1, Lq, 1)
    mask = valid.view(B, Hkv, 1, 1, N) & (pos.view(B, Hkv, 1, 1, N) <= qpos)
    s = s.masked_fill(~mask, float("-inf"))
    row_lse = torch.logsumexp(s, dim=-1, keepdim=True)  # -inf for rows with nothing selected
    p = torch.exp(s - row_lse)
    p = torch.where(torch.isneginf(row_lse), torch.zeros_like(p), p)
    o = torch.matmul(p, vc)
    # A non-finite value makes exactly the rows that attend to it NaN, never the others.
    o = torch.where(torch.matmul(p, v_bad) > 0, torch.full_like(o, float("nan")), o)
    out = o.reshape(B, Hq, Lq, D).to(q.dtype)
    lse = row_lse.reshape(B, Hq, Lq).float()
    return (out, lse) if return_lse else out
