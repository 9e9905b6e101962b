"""Record the q/k/v that a Hugging Face model's attention layers receive.

It works through transformers' attention registry: a recording function is registered under a
private name with ``transformers.AttentionInterface.register``, the model is switched to it for
the duration of a ``with`` block (``model.set_attn_implementation``), and the previous
implementation is restored in ``finally``. The recording function stores the tensors and then
calls the attention function the model was using (SDPA for models from
:func:`sparseattn.models.load_model`), with the same attention mask, so the forward pass is
unchanged.

Tensors are recorded exactly as the attention function receives them: ``q [B, Hq, L, D]``,
``k, v [B, Hkv, L, D]`` after RoPE and before any GQA repeat, i.e. sparseattn's canonical layout.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
from typing import Dict, Iterable, Optional, Tuple

import torch

from .interface import base_attention, temporary_attention


class _StopForward(Exception):
    """Raised by the recorder once the last requested layer is recorded (skips later layers)."""


class AttentionRecorder:
    """What :func:`recording_attention` yields: captured tensors per layer index.

    ``qkv[layer] = (q, k, v)`` and, when ``with_output=True``, ``outputs[layer]`` is the attention
    output in the canonical layout ``[B, Hq, L, D]`` (before ``o_proj``). A layer called several
    times (several forwards in one block) keeps the last call.
    """

    def __init__(self, layers: Optional[Iterable[int]], to_cpu: bool, with_output: bool, stop_after_last: bool):
        self.layers = None if layers is None else frozenset(int(i) for i in layers)
        self.to_cpu = to_cpu
        self.with_output = with_output
        self.stop_after_last = stop_after_last and self.layers is not None
        self.qkv: Dict[int, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.outputs: Dict[int, torch.Tensor] = {}
        self.calls = 0

    def wants(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return t.to("cpu") if self.to_cpu else t.clone()

    def record(self, layer: int, q, k, v) -> None:
        self.qkv[layer] = (self._keep(q), self._keep(k), self._keep(v))

    def record_output(self, layer: int, out_bthd: torch.Tensor) -> None:
        self.outputs[layer] = self._keep(out_bthd.transpose(1, 2))

    def done(self) -> bool:
        return self.stop_after_last and self.layers <= set(self.qkv) and (
            not self.with_output or self.layers <= set(self.outputs))


@contextlib.contextmanager
def recording_attention(model, *, layers: Optional[Iterable[int]] = None, to_cpu: bool = False,
                        with_output: bool = False, stop_after_last: bool = False):
    """Context manager: while inside, every attention call of ``model`` is recorded.

    Yields an :class:`AttentionRecorder`. The model computes exactly what it computed before
    (its previous attention function runs on the same inputs and mask). On exit, in ``finally``,
    the previous attention implementation is restored and the temporary registry entries are
    removed. ``stop_after_last=True`` aborts the forward pass once every requested layer is
    recorded (``capture_qkv`` uses it to skip the remaining layers; the abort is swallowed by this
    context manager).
    """
    base_name, base_fn = base_attention(model)
    recorder = AttentionRecorder(layers, to_cpu, with_output, stop_after_last)
    counter = itertools.count()
    n_layers = getattr(model.config, "num_hidden_layers", None)

    def recording_fn(module, query, key, value, attention_mask, *args, **kwargs):
        call = next(counter)
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            layer = call % n_layers if n_layers else call
        layer = int(layer)
        recorder.calls += 1
        if recorder.wants(layer):
            recorder.record(layer, query, key, value)
        out = base_fn(module, query, key, value, attention_mask, *args, **kwargs)
        if recorder.wants(layer) and recorder.with_output:
            recorder.record_output(layer, out[0])
        if recorder.done():
            raise _StopForward()
        return out

    with temporary_attention(model, recording_fn, prefix="sparseattn_capture", mask_of=base_name):
        try:
            yield recorder
        except _StopForward:
            pass


def _forward_kwargs(model) -> dict:
    kwargs = {"use_cache": False}
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return kwargs
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1  # the capture does not need the [B, L, vocab] logits
    return kwargs


@torch.no_grad()
def capture_qkv(model, input_ids: torch.Tensor, *, layers: Optional[Iterable[int]] = None,
                attention_mask: Optional[torch.Tensor] = None, to_cpu: bool = False,
                with_output: bool = False):
    """Run one forward pass and return ``{layer: (q, k, v)}`` as the attention function saw them.

    Args:
        model: a transformers causal LM whose attention goes through ``AttentionInterface``
            (Llama, Qwen2, Mistral, ...).
        input_ids: ``[B, L]`` token ids (moved to the model's device).
        layers: layer indices to record (default all). The forward stops after the last of them.
        attention_mask: optional ``[B, L]`` padding mask passed to the model.
        to_cpu: move the recorded tensors to the CPU (default: keep them on the model's device).
        with_output: also return ``{layer: out}``, the attention output ``[B, Hq, L, D]``.

    Returns:
        ``{layer: (q [B, Hq, L, D], k [B, Hkv, L, D], v [B, Hkv, L, D])}`` in the model's dtype,
        detached; with ``with_output=True`` a pair ``(qkv, outputs)``.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [B, L] tensor, got "
                         f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)}")
    n_layers = getattr(model.config, "num_hidden_layers", None)
    if layers is not None:
        layers = sorted({int(i) for i in layers})
        if n_layers is not None:
            bad = [i for i in layers if not 0 <= i < n_layers]
            if bad:
                raise ValueError(f"layers {bad} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    device = next(model.parameters()).device
    kwargs = _forward_kwargs(model)
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask.to(device)
    with recording_attention(model, layers=layers, to_cpu=to_cpu, with_output=with_output,
                             stop_after_last=layers is not None) as rec:
        model(input_ids=input_ids.to(device), **kwargs)
    if rec.calls == 0:
        raise RuntimeError(
            f"{type(model).__name__} never called the attention interface; capture_qkv needs a model whose "
            "attention dispatches through transformers.AttentionInterface")
    missing = [i for i in (layers or []) if i not in rec.qkv]
    if missing:
        raise RuntimeError(f"layers {missing} were not recorded (the model ran {rec.calls} attention calls)")
    qkv = dict(sorted(rec.qkv.items()))
    if with_output:
        return qkv, dict(sorted(rec.outputs.items()))
    return qkv


__all__ = ["capture_qkv", "recording_attention", "AttentionRecorder"]
