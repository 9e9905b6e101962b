"""SALE: low-bit Q K^T estimate, blocks kept by the relative attention score against sink + local."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Dict, Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..plan import BlockPlan
from .base import (ESTIMATE_CHUNK_ELEMENTS, PerHead, PrefillMethod, cdiv, check_choice, check_float, check_int,
                   check_per_head, head_values, query_block_positions, use_triton_estimator, visible_blocks)
from .registry import register


def quantize_per_token(x: torch.Tensor, bits: int):
    """Symmetric per-token quantization: ``x ~ scale * x_int`` with ``|x_int| <= 2**(bits-1) - 1``.

    Returns ``(x_int, scale)`` as float tensors (``x_int`` holds integers), ``scale [..., 1]``.
    Round half to even, as the official ``float2int_rn``.
    """
    qmax = float(2 ** (bits - 1) - 1)
    amax = x.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    return torch.round(x / scale).clamp_(-qmax, qmax), scale


def sale_local_start(nQ: int, *, block_q: int, block_k: int, q_len: int, k_len: int, sink_blocks: int,
                     local_blocks: int, seg_blocks: int, causal: bool, device) -> torch.Tensor:
    """int64 ``[nQ]``: the first key tile of each query block's local anchor (SALE's official rule).

    The official kernel (``flash_fwd_int4_sparse_kernel_v2.h``) walks the ``n_max`` key tiles a
    query block may see (causal: up to its last query; else all): the ``sink_blocks`` first tiles
    and at least ``local_blocks`` last tiles are computed exactly (the anchor), and the tiles
    between them are tested by the low-bit estimate in whole segments of ``seg_blocks`` tiles, so
    the local part grows until what lies between is a whole number of segments: with
    ``n = n_max - sink_blocks`` tiles past the sink it tests ``max(0, (n - local_blocks) //
    seg_blocks)`` segments (the official ``n_segs - n_supplement_seg``) and the anchor starts after
    them. The tiles holding the block's own queries are always local (the official window of 128
    keys covers them; here also for smaller windows), so the estimate never meets a future key.
    """
    nK = cdiv(k_len, block_k)
    first, last = query_block_positions(nQ, block_q, q_len, k_len, device)
    if causal:
        n_max = torch.clamp(torch.div(last + 1 + block_k - 1, block_k, rounding_mode="floor"), 0, nK)
    else:
        n_max = torch.full_like(first, nK)
    segs = torch.clamp(torch.div(n_max - sink_blocks - local_blocks, seg_blocks, rounding_mode="floor"), min=0)
    start = sink_blocks + segs * seg_blocks
    if causal:
        return torch.minimum(start, first.clamp(min=0) // block_k)
    return torch.minimum(start, (n_max - 1).clamp(min=0))


@register
@dataclass(kw_only=True)
class SALE(PrefillMethod):
    """SALE (Zhao et al. 2025, arXiv 2505.24179), as a plan: two passes per query block.

    1. **Low-bit estimate.** Q and K are smoothed by their sequence means (``q - mean(q)`` per
       query head, ``k - mean(k)`` per KV head) and quantized per token to signed ``bits``-bit
       integers (``[-7, 7]`` for int4). The estimated logit of (i, j) is
       ``(sq_i sk_j <q_int_i, k_int_j> + <mean(q), k_j - mean(k)>) / sqrt(D)``, i.e. the official
       int4 product plus its ``qmk`` correction; shifting every key by ``mean(k)`` changes each row
       by a constant, so softmax ratios are unchanged. Integer products are exact in fp32.
    2. **Pass 1, anchors (full precision).** Query blocks of ``block_size`` rows, key tiles of
       ``block_k`` keys. Each query row's max ``m_i`` and sum ``l_i = sum exp(s_ij - m_i)`` over
       its anchor: the ``sink_blocks`` first key tiles and the local tiles, at least
       ``ceil(local_window / block_k)`` tiles up to the block's last query, extended (official
       rule, :func:`sale_local_start`) so that the tiles between sink and local form whole
       segments of ``block_seg`` keys (causal).
    3. **Pass 2, relative attention score.** A tile between sink and local is kept when some
       (query, key) pair in it has ``exp(est_ij - m_i) / l_i >= threshold_h``, tested as
       ``est_ij >= m_i + log(threshold_h * l_i)``. The anchor tiles are always kept. The plan has
       ``block_q = block_size`` and ``block_k`` (the official 64 x 32 tiles by default).

    ``threshold`` may be per query head (the official calibrated ``dynamic_<x>.pt`` tables) or a
    per-(layer, head) table (a path to a JSON file from :func:`calibrate_sale_thresholds` /
    :func:`save_sale_thresholds` loads one); a head whose threshold is below ``1e-5`` keeps every
    visible block (official rule, spec section 6). GQA policy: ``"per_q_head"`` (the official
    kernel reads per-query-head thresholds and records per-query-head tiles; plan ``H = Hq``) or
    ``"group_union"`` (``H = Hkv``). Inputs with ``Lq <= dense_len`` get the dense plan, as the
    official wrapper falls back to SDPA there. Not causal: the official kernel's rule with every
    key visible (the local tiles are then the last ones of the sequence).

    Not reproduced: the int4 tensor-core GEMM and the per-warp (``quant_mode=3``) scale layout,
    which depends on the MMA fragment layout; this estimate uses per-token scales (the official
    ``quant_mode=2``). The official kernel also fuses the computation pass; here the kernel runs
    the plan.

    Defaults (source: BirdChristopher/SALE ``README.md``, ``int4_flash_attn/flash_attn_int4_skip.py``
    ``flash_attn_func_int4_skip`` and its call in ``kv_retrieve_calib.py`` / the README:
    ``block_q_size=64, block_k_size=32, local_window=128, block_seg_size=128``):
    ``block_size=64`` (``block_q_size``), ``block_k=32`` (``block_k_size``), ``local_window=128``,
    ``block_seg=128``, ``threshold=0.004`` (README example for all heads), ``bits=4`` (int4),
    ``dense_len=1024`` (``if q_len <= 1024``: SDPA); ``sink_blocks=1``: the kernel's one sink tile
    (``n_blocks_wo_sink = n_block_max - 1``). Estimation cost: ``Lq * Lk * D`` low-bit
    multiply-adds per query head (the method's own cost model: an element-wise estimate over the
    causal area) plus the anchor. Memory: query rows are processed in chunks of whole blocks near
    ``ESTIMATE_CHUNK_ELEMENTS``.

    On CUDA (fp16 / bf16 / fp32 inputs) the same plan comes from Triton kernels
    (``kernels/sale_triton.py``: the low-bit products on the tensor cores, no ``[L, L]`` tensor,
    no host sync); it differs from the PyTorch code only where a pair's estimate is within float32
    rounding of its row threshold.
    """

    name: ClassVar[str] = "sale"
    reads_values: ClassVar[bool] = False  # the estimate reads q and k only

    block_size: int = 64
    block_k: int = 32
    threshold: PerHead = 0.004
    bits: int = 4
    local_window: int = 128
    block_seg: int = 128
    sink_blocks: int = 1
    dense_len: int = 1024
    gqa_policy: str = "per_q_head"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.threshold, (str, os.PathLike)):
            self.threshold = load_sale_thresholds(self.threshold)  # a calibrated table saved as JSON
        self.threshold = check_per_head("threshold", self.threshold, lambda n, x: check_float(n, x, minimum=0.0))
        if self.bits not in (4, 8) or isinstance(self.bits, bool):
            raise ValueError(f"bits must be 4 or 8, got {self.bits!r}")
        check_int("block_k", self.block_k, minimum=1)
        check_int("local_window", self.local_window, minimum=0)
        check_int("block_seg", self.block_seg, minimum=1)
        if self.block_seg % self.block_k:
            raise ValueError(f"block_seg ({self.block_seg}) must be a multiple of block_k ({self.block_k}): "
                             "segments hold whole key tiles")
        check_int("sink_blocks", self.sink_blocks, minimum=0)
        check_int("dense_len", self.dense_len, minimum=0)
        check_choice("gqa_policy", self.gqa_policy, ("per_q_head", "group_union"))

    def _geometry(self, Lq: int, Lk: int) -> dict:
        return dict(block_q=self.block_size, block_k=self.block_k, q_len=Lq, k_len=Lk)

    def _anchor_tiles(self, Lq, Lk, *, causal, device):
        """(bool ``[nQ, nK]`` anchor tiles, int64 ``[nQ]`` first local tile, bool ``[nQ, nK]`` visible)."""
        geo = self._geometry(Lq, Lk)
        nQ, nK = cdiv(Lq, self.block_size), cdiv(Lk, self.block_k)
        start = sale_local_start(nQ, **geo, sink_blocks=self.sink_blocks,
                                 local_blocks=cdiv(self.local_window, self.block_k),
                                 seg_blocks=self.block_seg // self.block_k, causal=causal, device=device)
        n = torch.arange(nK, device=device).view(1, -1)
        visible = visible_blocks(**geo, causal=causal, device=device)
        anchor = ((n < self.sink_blocks) | (n >= start.view(-1, 1))) & visible
        return anchor, start, visible

    def _plan(self, q, k, v, *, causal, layer_idx):
        B, Hq, Lq, D = q.shape
        Hkv, Lk = k.shape[1], k.shape[2]
        G, bq, bk, dev = Hq // Hkv, self.block_size, self.block_k, q.device
        geo = self._geometry(Lq, Lk)
        nQ, nK = cdiv(Lq, bq), cdiv(Lk, bk)
        if Lq <= self.dense_len:
            return BlockPlan.dense(1, 1, **geo, causal=causal, device=dev)
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        tau = head_values(self.threshold, name="threshold", heads=Hq, q_heads=Hq, kv_heads=Hkv, layer_idx=layer_idx,
                          device=dev, dtype=dt)
        log_tau = torch.log(tau).reshape(1, Hq, 1, 1)  # log(0) = -inf: everything passes
        # CUDA: the same decisions in Triton kernels (_plan_triton); below, the PyTorch code (CPU, the oracle).
        if use_triton_estimator(q) and q.dtype in (torch.float16, torch.bfloat16, torch.float32):
            return self._plan_triton(q, k, tau=tau, log_tau=log_tau.reshape(Hq), causal=causal)

        # Smoothing and per-token quantization (step 1).
        qf, kf = q.to(dt), k.to(dt)
        q_mean = qf.mean(2, keepdim=True)  # [B, Hq, 1, D]
        ks = kf - kf.mean(2, keepdim=True)  # [B, Hkv, Lk, D]
        q_int, sq = quantize_per_token(qf - q_mean, self.bits)
        k_int, sk = quantize_per_token(ks, self.bits)
        scale = 1.0 / math.sqrt(D)
        qmk = torch.matmul(q_mean.reshape(B, Hkv, G, D), ks.transpose(-1, -2)).reshape(B, Hq, 1, Lk)  # mean(q) . ks_j
        k_int_t = k_int.to(torch.float32).transpose(-1, -2)  # integer products are exact in fp32
        sk_t = sk.transpose(-1, -2).reshape(B, Hkv, 1, 1, Lk)
        ks_t = ks.transpose(-1, -2)

        anchor, _, visible = self._anchor_tiles(Lq, Lk, causal=causal, device=dev)
        j = torch.arange(Lk, device=dev)
        anchor_keys = anchor[:, j // bk]  # [nQ, Lk]: the anchor of each query block, as keys

        chunk = max(1, ESTIMATE_CHUNK_ELEMENTS // max(1, 2 * B * Hq * bq * Lk))
        keep = []
        for m0 in range(0, nQ, chunk):  # a handful of chunks, for memory only
            m1 = min(nQ, m0 + chunk)
            nm, R = m1 - m0, (m1 - m0) * bq
            r = torch.arange(m0 * bq, m1 * bq, device=dev)
            row_ok = (r < Lq).reshape(-1, 1)
            pos = (Lk - Lq + r).reshape(-1, 1)  # absolute positions of the chunk's rows
            seen = row_ok & ((j.reshape(1, -1) <= pos) | (not causal))  # [R, Lk]
            pad = R - min(R, Lq - m0 * bq)
            # Pass 1: exact anchor statistics per row.
            qc = F.pad(qf[:, :, m0 * bq:m1 * bq], (0, 0, 0, pad))  # [B, Hq, R, D]
            s = torch.matmul(qc.reshape(B, Hkv, G * R, D), ks_t).reshape(B, Hq, R, Lk) * scale
            s = s.masked_fill(~(seen & anchor_keys[m0:m1].repeat_interleave(bq, 0)), float("-inf"))
            m_i = s.amax(-1, keepdim=True)  # [B, Hq, R, 1]
            l_i = torch.exp(s - m_i.nan_to_num(neginf=0.0)).sum(-1, keepdim=True)
            del s
            # Pass 2: low-bit estimate against the per-row threshold m_i + log(tau * l_i).
            thr = m_i + log_tau + torch.log(l_i)
            thr = torch.where(torch.isfinite(m_i), thr, torch.full_like(thr, float("inf")))  # rows that see nothing
            qi = F.pad(q_int[:, :, m0 * bq:m1 * bq], (0, 0, 0, pad)).to(torch.float32)
            dots = torch.matmul(qi.reshape(B, Hkv, G * R, D), k_int_t).reshape(B, Hkv, G, R, Lk).to(dt)
            sqc = F.pad(sq[:, :, m0 * bq:m1 * bq], (0, 0, 0, pad))
            est = (dots * sk_t * sqc.reshape(B, Hkv, G, R, 1)).reshape(B, Hq, R, Lk) + qmk
            del dots
            passed = (est * scale >= thr) & seen
            del est
            passed = F.pad(passed, (0, nK * bk - Lk)).reshape(B, Hq, nm, bq, nK, bk).any(5).any(3)
            keep.append(passed)
        dense_head = (tau < 1e-5).reshape(1, Hq, 1, 1)  # official: such a head is not sparsified
        keep = (torch.cat(keep, dim=2) | anchor | dense_head) & visible
        if self.gqa_policy == "group_union":
            keep = keep.reshape(B, Hkv, G, nQ, nK).any(2)
        return BlockPlan.from_block_mask(keep, **geo, causal=causal)

    def _plan_triton(self, q, k, *, tau, log_tau, causal):
        """The CUDA path: the low-bit pass mask from ``sale_estimate_triton``, then the PyTorch
        code's union with the anchor and dense heads, clipped to the visible blocks. No host sync."""
        from ..kernels.sale_triton import sale_estimate_triton

        B, Hq, Lq, _ = q.shape
        Hkv, Lk = k.shape[1], k.shape[2]
        dense = tau < 1e-5  # official: such a head is not sparsified
        passed = sale_estimate_triton(q, k, log_tau, dense, block_q=self.block_size, block_k=self.block_k,
                                      bits=self.bits, local_blocks=cdiv(self.local_window, self.block_k),
                                      seg_blocks=self.block_seg // self.block_k, sink_blocks=self.sink_blocks,
                                      causal=causal)
        anchor, _, visible = self._anchor_tiles(Lq, Lk, causal=causal, device=q.device)
        keep = (passed.view(torch.bool) | anchor | dense.reshape(1, Hq, 1, 1)) & visible
        if self.gqa_policy == "group_union":
            keep = keep.reshape(B, Hkv, Hq // Hkv, *keep.shape[2:]).any(2)
        return BlockPlan.from_block_mask(keep, **self._geometry(Lq, Lk), causal=causal)


# ----------------------------------------------------------------------------- per-head calibration
SALE_THRESHOLDS_FORMAT = "sale_thresholds"


def _layer_errors(q, k, v, tau: torch.Tensor, ref: torch.Tensor, options: dict) -> torch.Tensor:
    """Per query head: mean over rows of the row's L1 output error (sum over D) against ``ref``."""
    from ..api import block_sparse_attention

    plan = SALE(threshold=tuple(float(t) for t in tau), **options).plan(q, k, v, causal=True)
    out = block_sparse_attention(q, k, v, plan, causal=True)
    rows = q.shape[0] * q.shape[2]
    return (out.float() - ref.float()).abs().sum(dim=(0, 2, 3)).double().cpu() / rows


def calibrate_sale_thresholds_from_qkv(captures, *, error: float = 0.4, start: float = 0.008, floor: float = 1e-4,
                                       initial: Optional[torch.Tensor] = None, progress: bool = False,
                                       **options) -> torch.Tensor:
    """SALE's per-head threshold calibration on captured ``q, k, v`` (``kv_retrieve_calib.py``, mode
    ``calib_error``, without the model run).

    Every (layer, query head) starts at ``start``; on each sample and layer, a head whose output
    error is not below ``error`` has its threshold halved (and set to 0, i.e. dense, once it is
    ``<= floor``) until it passes; thresholds carry over from one sample to the next, so they only
    go down. The error of a head is the mean over query rows of ``sum_d |out - ref|``, ``out`` our
    kernel on SALE's plan and ``ref`` our kernel dense on the same inputs (the official: the
    absolute error summed over the head's output below ``error * q_len``, with FlashAttention as the
    reference, one sequence per sample). All heads of a layer are tested in one plan (per-query-head
    plans are independent per head, so this gives the official result).

    Defaults (source: BirdChristopher/SALE ``kv_retrieve_calib.py`` / ``int4_flash_attn/patch/
    llama31_sparse_patch_4_51.py``, ``LlamaAttentionPatch_kv_retrieve_calibration``): thresholds start
    at ``0.008``, halve while the error is not below ``error``, become 0 at ``<= 1e-4``;
    ``run_kv_calib.sh <model> 0.4`` (README: ``error=0.4`` gives the ``dynamic_0.4.pt`` table of
    its evaluations).

    Args:
        captures: ``{layer: (q, k, v, ...)}`` (:func:`~sparseattn.integrations.capture.capture_qkv`)
            for one sample, or an iterable of them; layers ``0 .. L-1``.
        error: the per-row L1 error a head must stay below.
        start, floor: first threshold; thresholds at or below ``floor`` become 0 (dense).
        initial: a ``[L, Hq]`` table to continue from (e.g. an earlier run's result) instead of ``start``.
        progress: a progress bar over (sample, layer) steps.
        **options: other :class:`SALE` fields (``block_size``, ``bits``, ``local_window``, ...);
            ``gqa_policy`` must stay ``"per_q_head"``.

    Returns:
        float64 ``[L, Hq]`` thresholds, usable as ``SALE(threshold=table)`` (plans then need ``layer_idx``).
    """
    from ..api import block_sparse_attention

    check_float("error", error, minimum=0.0, open_min=True)
    check_float("start", start, minimum=0.0, open_min=True)
    check_float("floor", floor, minimum=0.0)
    if options.get("gqa_policy", "per_q_head") != "per_q_head":
        raise ValueError("the calibration tests each query head on its own plan: gqa_policy must be 'per_q_head'")
    if "threshold" in options:
        raise ValueError("threshold is what the calibration finds; give start= (or initial=) instead")
    SALE(**options)  # validate the options once, before any work
    if isinstance(captures, Mapping):
        captures = [captures]
    table: Dict[int, torch.Tensor] = {}
    if initial is not None:
        init = torch.as_tensor(initial, dtype=torch.float64).cpu()
        if init.dim() != 2 or not bool(torch.isfinite(init).all()) or bool((init < 0).any()):
            raise ValueError(f"initial must be a [layers, heads] table of finite thresholds >= 0, got "
                             f"shape {tuple(init.shape)}")
        table = {i: init[i].clone() for i in range(init.shape[0])}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="SALE calibration", unit="layer", dynamic_ncols=True)
    n = 0
    for sample in captures:
        if not isinstance(sample, Mapping) or not sample:
            raise ValueError("captures must be a {layer: (q, k, v, ...)} dict or an iterable of them")
        n += 1
        for layer in sorted(sample):
            q, k, v = sample[layer][:3]
            Hq = q.shape[1]
            tau = table.get(int(layer))
            if tau is None:
                tau = torch.full((Hq,), float(start), dtype=torch.float64)
            elif tau.numel() != Hq:
                raise ValueError(f"layer {layer} has {Hq} query heads but its thresholds have {tau.numel()}")
            ref = block_sparse_attention(q, k, v, None, causal=True)
            while True:
                err = _layer_errors(q, k, v, tau, ref, options)
                failing = (err >= error) & (tau > 0)
                if not bool(failing.any()):
                    break
                tau = torch.where(failing, tau / 2, tau)
                tau = torch.where(failing & (tau <= floor), torch.zeros_like(tau), tau)
            table[int(layer)] = tau
            if bar is not None:
                bar.update(1)
                bar.set_postfix(sample=n, layer=int(layer), dense_heads=int((tau == 0).sum()))
    if bar is not None:
        bar.close()
    if not n:
        raise ValueError("no calibration sample given")
    layers = sorted(table)
    if layers != list(range(len(layers))):
        raise ValueError(f"captured layers must be 0 .. L-1, got {layers}")
    return torch.stack([table[i] for i in layers])


def calibrate_sale_thresholds(model, tokenizer, *, samples: Optional[Iterable[Union[str, Sequence[int]]]] = None,
                              length: int = 8192, num_samples: int = 4, seed: int = 0, error: float = 0.4,
                              start: float = 0.008, floor: float = 1e-4, path: Union[str, os.PathLike, None] = None,
                              progress: bool = True, **options) -> torch.Tensor:
    """SALE's per-head calibration on a Hugging Face causal LM (``bash run_kv_calib.sh <model> 0.4``).

    Each sample runs through the model once (dense attention, as in the official calibration,
    where the model goes on with the dense output) and :func:`calibrate_sale_thresholds_from_qkv`
    tests every layer's captured ``q, k, v``. ``samples``: texts or token-id lists; default
    ``num_samples`` prompts of the ``kv_retrieval`` task (:mod:`sparseattn.eval.tasks`) of
    ``length`` tokens, the key at evenly spread depths (official: ``calib_samples/
    kv_retrieval_calibration_llama.jsonl``, the same kind of prompt). ``path`` also saves the table as
    JSON (:func:`save_sale_thresholds`); ``SALE(threshold=path)`` loads it.

    Returns the float64 ``[layers, Hq]`` table.
    """
    from ..integrations.capture import capture_qkv

    check_int("length", length, minimum=1)
    check_int("num_samples", num_samples, minimum=1)
    if samples is None:
        from ..eval.tasks import get_task

        task = get_task("kv_retrieval")
        depths = [i / max(1, num_samples - 1) for i in range(num_samples)]
        samples = [task.make(tokenizer, length, depth=d, index=i, seed=seed).input_ids for i, d in enumerate(depths)]
    device = next(model.parameters()).device

    def captures():  # one forward at a time: only one sample's q/k/v is alive
        for sample in samples:
            ids = tokenizer(sample, add_special_tokens=True)["input_ids"] if isinstance(sample, str) else list(sample)
            if not ids:
                raise ValueError("a calibration sample has no token")
            yield capture_qkv(model, torch.tensor([ids], dtype=torch.long, device=device))

    table = calibrate_sale_thresholds_from_qkv(captures(), error=error, start=start, floor=floor, progress=progress,
                                               **options)
    if path is not None:
        save_sale_thresholds(table, path, meta={"error": error, "start": start, "floor": floor, "options": options,
                                                "model": getattr(getattr(model, "config", None), "_name_or_path", None)})
    return table


def save_sale_thresholds(table, path: Union[str, os.PathLike], *, meta: Optional[Dict[str, Any]] = None) -> None:
    """Write a ``[layers, heads]`` threshold table as JSON (``{"format", "thresholds", "meta"}``)."""
    t = torch.as_tensor(table, dtype=torch.float64).cpu()
    if t.dim() != 2 or t.numel() == 0:
        raise ValueError(f"table must be a non-empty [layers, heads] tensor, got shape {tuple(t.shape)}")
    data = {"format": SALE_THRESHOLDS_FORMAT, "version": 1, "thresholds": t.tolist(), "meta": meta or {}}
    Path(path).write_text(json.dumps(data, indent=1, default=str))


def load_sale_thresholds(path: Union[str, os.PathLike]) -> tuple:
    """The per-(layer, head) table of a file written by :func:`save_sale_thresholds` (tuples of floats)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"SALE threshold file {str(p)!r} does not exist (calibrate_sale_thresholds(..., path=) writes one)")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(p)!r} is not a JSON file: {e}") from None
    if not isinstance(data, dict) or data.get("format") != SALE_THRESHOLDS_FORMAT:
        raise ValueError(f"{str(p)!r} is not a SALE threshold file (expected \"format\": \"{SALE_THRESHOLDS_FORMAT}\")")
    rows = data.get("thresholds")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and r for r in rows):
        raise ValueError(f"{str(p)!r} has no [layers, heads] \"thresholds\" table")
    return tuple(tuple(float(x) for x in row) for row in rows)
