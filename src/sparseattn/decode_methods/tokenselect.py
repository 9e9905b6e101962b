"""TokenSelect: token-level top-k by per-head soft voting on exact logits, one list per layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F

from ..decode_api import DecodeSelection
from ..methods.base import check_float, check_int, compact_rows, rank_mask, use_triton_estimator
from ..methods.registry import register
from .base import DecodeMethod, ascending_top_positions, exact_logits, score_dtype, topk_token_selection


@register
@dataclass(kw_only=True)
class TokenSelect(DecodeMethod):
    """TokenSelect (Wu et al. 2024, arXiv 2411.02886; code pzs19/TokenSelect), decode side.

    Per layer (except ``dense_layers``), each step, for a sequence of ``N`` tokens whose newest
    ``Lq`` tokens are the step's queries:

    1. Forced: the ``n_init`` first tokens and a local window of the ``n_local`` newest tokens
       (for ``Lq > 1`` the window reaches back so that the first new query also sees ``n_local``
       tokens ending at itself: ``n_local + Lq - 1`` tokens). Candidates are the tokens between.
    2. Query fingerprint ``qbar``: the mean of the step's ``Lq`` queries per head
       (``torch.mean(query, dim=0)`` in ``retrieval_indices``).
    3. Per query head ``h``: ``s_h(j) = softmax_j(logit_h(j))`` over the candidates only, from the
       exact logits of ``qbar`` (:func:`~sparseattn.decode_methods.base.exact_logits`, which reads
       every key: a dense step's worth of key traffic). Soft vote ``S(j) = sum_h s_h(j)`` over *all*
       query heads of the layer (each head has one vote of total mass 1; ``get_topk_tokens``).
       Optional smoothing ``S <- maxpool1d(S, kernel_size)`` over the candidates.
    4. The ``top_k`` best candidates (ties: lower position; on CUDA by the radix select of
       :func:`~sparseattn.decode_methods.base.topk_token_selection`, which breaks ties the same
       way, with or without the selection cache) plus the forced tokens form one list per layer,
       shared by every head (selection ``H = 1``).
    5. Selection cache (``selection_cache=True``): per layer and sequence the fingerprint and
       top-k of the last refresh are kept in :meth:`state`; when ``cos(qbar_now, qbar_cached) >=
       similarity_threshold`` (fingerprints = all heads concatenated) the cached top-k is used,
       otherwise the fresh one, which then replaces the cache (fingerprint and top-k). To stay free
       of host syncs the similarity is computed on the device and the choice is a ``torch.where``
       between the cached and the fresh selection, **so in this form the fresh scores are still
       computed every step: the cache decides which selection is used, it does not save
       compute** (the official code skips the scoring on a hit, which needs a host branch).
       ``state(cache, layer)["reused"]`` (bool ``[B]``) tells which sequences used the cache on
       the last step. A reused top-k can overlap the window that moved since; the union then reads
       fewer than ``top_k`` selected tokens (the official code would read such tokens twice).

    GQA policy: ``shared_all_heads``: the soft vote sums over every query head of every KV group,
    so one token list serves the layer (as in the official code, where it is also all-reduced across
    tensor-parallel ranks). Query head ``h`` is scored against KV head ``h // G``; the official
    Triton scorer uses ``h % Hkv``, which the spec (2.4) judges a probable bug for standard
    Llama/Qwen grouping.

    Defaults (pzs19/TokenSelect): ``n_init=128``, ``n_local=512``, ``top_k=2048``
    (``config/llama-token-retrieval.yaml``, ``config/qwen-token-retrieval.yaml``);
    ``similarity_threshold=0.9`` (``self.similarity_threshold`` in ``patcher/token_retrieval.py``);
    ``selection_cache=False`` because the public ``patch()`` sets ``QUERY_CACHE = False`` (same
    file; the paper's selection cache is opt-in here); ``kernel_size=-1`` (no pooling:
    ``patch(kernel_size=-1)``; per-task sizes in ``benchmark/config/dataset2ks_llama.json``, e.g.
    passkey 6); ``logit_scale=1.0``: the official scorer ranks raw ``q . k`` dot products
    (``paged_matmul_kernel``, then ``torch.softmax``), not ``q . k / sqrt(D)``; ``None`` uses
    ``1 / sqrt(D)``. ``dense_layers=()``: the official patch applies the selection to every layer.

    Deviations: keys are used as cached (post-RoPE) and the query is not re-rotated; the official
    code caches pre-RoPE keys and rotates the selection query to positions from ``n_local``
    (``QUERY_ROTATE``), and attends with compressed positions (length extrapolation, spec 2.1 item
    6), which this engine does not do. The official code goes dense when
    ``n_init + top_k + n_local >= N``; here the selection then simply holds every token (same
    keys read). Batches of several sequences (ragged) are supported; the official retriever serves
    one request at a time.
    """

    name: ClassVar[str] = "tokenselect"

    n_init: int = 128
    n_local: int = 512
    top_k: int = 2048
    similarity_threshold: float = 0.9
    selection_cache: bool = False
    kernel_size: int = -1
    logit_scale: Optional[float] = 1.0

    def __post_init__(self):
        super().__post_init__()
        check_int("n_init", self.n_init, minimum=0)
        check_int("n_local", self.n_local, minimum=1)
        check_int("top_k", self.top_k, minimum=0)
        check_float("similarity_threshold", self.similarity_threshold, minimum=-1.0, maximum=1.0)
        if not isinstance(self.selection_cache, bool):
            raise ValueError(f"selection_cache must be a bool, got {self.selection_cache!r}")
        check_int("kernel_size", self.kernel_size)
        if self.kernel_size == 0 or self.kernel_size < -1:
            raise ValueError(f"kernel_size must be -1 (no pooling) or >= 1, got {self.kernel_size}")
        if self.logit_scale is not None:
            check_float("logit_scale", self.logit_scale, minimum=0.0, open_min=True)

    # ------------------------------------------------------------------ pieces
    def windows(self, cache, layer: int, Lq: int, n: int):
        """bool ``[B, n]`` (forced, candidate) token masks from the layer's lengths."""
        N = cache.layer_lengths(layer).long().view(-1, 1)
        j = torch.arange(n, device=N.device).view(1, -1)
        local_start = (N - Lq + 1 - self.n_local).clamp(min=0)
        exists = j < N
        forced = exists & ((j < self.n_init) | (j >= local_start))
        return forced, exists & ~forced

    def votes(self, qbar: torch.Tensor, cache, layer: int, candidate: torch.Tensor) -> torch.Tensor:
        """float ``[B, n]``: ``S(j) = sum_h softmax_candidates(logit_h(j))`` (maxpooled when
        ``kernel_size > 1``), ``-inf`` outside the candidates."""
        B, Hq = qbar.shape[:2]
        fused = (torch.float16, torch.bfloat16, torch.float32)
        if use_triton_estimator(qbar) and qbar.dtype in fused and cache.dtype in fused:
            # Logits + per-head candidate softmax statistics in one pass over K, then one pass over
            # the logits for the votes (instead of five PyTorch passes over [B, Hq, n]).
            from ..kernels.token_votes_triton import token_votes_triton

            scale = qbar.shape[-1] ** -0.5 if self.logit_scale is None else self.logit_scale
            s = token_votes_triton(qbar, cache.k_pages(layer), cache.page_table, cache.layer_lengths(layer),
                                   candidate, page_size=cache.page_size, scale=scale)
            neg = s.new_full((), float("-inf"))
        else:
            logits = exact_logits(qbar, cache, layer, scale=self.logit_scale).view(B, Hq, -1)  # [B, Hq, n]
            neg = logits.new_full((), float("-inf"))
            logits = torch.where(candidate.unsqueeze(1), logits, neg)
            s = torch.softmax(logits, dim=-1).nan_to_num(0.0).sum(1)  # [B, n]; rows without candidates: 0
            s = torch.where(candidate, s, neg)
        k = self.kernel_size
        if k > 1:
            left = (k - 1) // 2  # the official padding=(k-1)//2, stride 1; even k: the window leans right
            padded = F.pad(s.unsqueeze(1), (left, k - 1 - left), value=float("-inf"))
            s = torch.where(candidate, F.max_pool1d(padded, k, stride=1).squeeze(1), neg)
        return s

    def _select(self, q, cache, layer):
        B, Hq, Lq, D = q.shape
        P = cache.page_size
        dev = q.device
        n = cache.max_pages * P
        forced, candidate = self.windows(cache, layer, Lq, n)
        qbar = q.to(score_dtype(q)).mean(2, keepdim=True)  # [B, Hq, 1, D]: the query fingerprint
        score = self.votes(qbar, cache, layer, candidate)  # -inf outside the candidates
        width = max(1, min(n, self.n_init + self.top_k + self.n_local + Lq - 1))
        fast = use_triton_estimator(q)
        pooled = self.kernel_size > 1  # max-pooling spreads each peak: plateaus of equal scores, ties are common
        if fast and not self.selection_cache:  # top-k + O(top_k) assembly: no full sort, no [B, n] mask
            return topk_token_selection(score.unsqueeze(1), self.top_k, lengths=cache.layer_lengths(layer),
                                        page_size=P, width=width, sink=self.n_init,
                                        forced_last=self.n_local + Lq - 1, stable_ties=pooled)
        if fast:  # the selection cache works on masks: only the full sort is replaced (by a top-k)
            fresh = torch.zeros(B, n + 1, dtype=torch.bool, device=dev)
            if self.top_k > 0:  # dropped picks read n: the spare column
                fresh.scatter_(-1, ascending_top_positions(score, self.top_k, stable_ties=pooled).long(), True)
            fresh = fresh[:, :n]
        else:
            fresh = rank_mask(score, torch.full((B,), self.top_k, dtype=torch.long, device=dev)) & candidate
        if self.selection_cache:
            chosen = self._through_cache(qbar.reshape(B, Hq * D), fresh, cache, layer)
        else:
            chosen = fresh
        mask = (forced | chosen).unsqueeze(1)  # [B, 1, n]: one list for every head
        return DecodeSelection.from_token_mask(mask, page_size=P, max_tokens=width)

    def _through_cache(self, fp: torch.Tensor, fresh: torch.Tensor, cache, layer: int) -> torch.Tensor:
        """The top-k mask ``[B, n]`` actually used: the cached top-k where the fingerprint is similar
        enough to the cached one, else ``fresh`` (which then refreshes the cache). No host sync."""
        B, n = fresh.shape
        dev = fresh.device
        st = self.state(cache, layer)
        pos = torch.arange(n, device=dev).view(1, -1).expand(B, n)
        width = max(1, self.top_k)
        cnt, idx = compact_rows(fresh, pos, width)  # [B], [B, top_k]
        old = st.get("fp")
        if old is not None and old.shape == fp.shape and old.dtype == fp.dtype and old.device == fp.device:
            sim = F.cosine_similarity(fp, old, dim=-1)
            reuse = sim >= self.similarity_threshold
            idx = torch.where(reuse.unsqueeze(-1), st["idx"], idx)
            cnt = torch.where(reuse, st["cnt"], cnt)
            fp = torch.where(reuse.unsqueeze(-1), old, fp)
            # In place: a captured CUDA graph replays reads and writes of these same buffers.
            for key, value in (("fp", fp), ("idx", idx), ("cnt", cnt), ("reused", reuse)):
                st[key].copy_(value)
        else:  # first step for this (cache, layer): nothing cached, the fresh selection is used
            st.update(fp=fp.clone(), idx=idx.clone(), cnt=cnt.clone(),
                      reused=torch.zeros(B, dtype=torch.bool, device=dev))
        lengths = cache.layer_lengths(layer).long().view(-1, 1)
        used = (torch.arange(width, device=dev).view(1, -1) < cnt.view(-1, 1)) & (idx.long() < lengths)
        dest = torch.where(used, idx.long(), torch.full_like(idx, n, dtype=torch.long))
        out = torch.zeros(B, n + 1, dtype=torch.bool, device=dev)
        return out.scatter_(-1, dest, True)[:, :n]
