"""Double Sparsity: calibrated label channels, a low-bit label cache, token top-k (and its calibration).

* :class:`DoubleSparsity` (``get_method("double_sparsity", kind="decode")``): the decode method.
* :func:`calibrate_channels` (a Hugging Face model + texts) and :func:`calibrate_channels_from_qkv`
  (captured ``q, k`` tensors): the offline channel calibration of ``config/offline_calibration.py``.
* :func:`channel_importance`, :func:`channels_from_importance`: the two halves of it.
* :func:`save_channels` / :func:`load_channels`: the channel table as JSON, in the official
  config layout (``{"model.layers.<i>.self_attn.<type>_proj": [[channel, ...] per head]}``), so
  the official configs (``config/<org>/<model>.json``) load too and our files feed SGLang's
  ``--ds-channel-config-path``.

A channel table is an int64 tensor ``[layers, H, n]``: per layer and head, channels in descending
importance (``n = head_dim`` for a full permutation as the official configs store it; the method
uses the first ``r``). ``H`` is the number of query heads (``"q"``/``"qk"`` calibration, the
official layout, one label cache per query head) or of KV heads (``"k"`` calibration, or
``heads="kv"``: one label cache per KV head).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..decode_api import DecodeSelection
from ..methods.base import check_choice, check_int, rank_mask, use_triton_estimator
from ..methods.registry import register
from .base import DecodeMethod, gather_keys, score_dtype, topk_token_selection

CHANNEL_TYPES = ("q", "k", "qk")
HEAD_LAYOUTS = ("query", "kv")
GQA_POLICIES = ("group_sum", "group_max", "per_q_head")
LABEL_BITS = (16, 8, 4)

_KEY_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.(q|k|qk)_proj$")
_META_KEY = "sparseattn"


# ----------------------------------------------------------------------------- calibration
def _check_type_heads(channel_type: str, heads: str) -> None:
    check_choice("channel_type", channel_type, CHANNEL_TYPES)
    check_choice("heads", heads, HEAD_LAYOUTS)


def channel_importance(q: torch.Tensor, k: torch.Tensor, *, channel_type: str = "qk", heads: str = "query",
                       valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-head channel importance of one batch of tokens, the official calibration statistic.

    Args:
        q: ``[B, Hq, L, D]`` queries, k: ``[B, Hkv, L, D]`` keys of the same ``L`` tokens (post-RoPE,
            before any GQA repeat: what :func:`sparseattn.integrations.capture.capture_qkv` records).
        channel_type: ``"q"``: mean ``|q_c|``; ``"k"``: mean ``|k_c|``; ``"qk"``: mean
            ``|q_c * k_c|`` with each query head times its group's key of the *same* token (the
            token attends to itself only: "Method 1" of ``get_qk_hook``).
        heads: ``"query"`` (official: ``q``/``qk`` per query head after ``repeat_kv``) or ``"kv"``
            (``q``/``qk`` importance summed over each GQA group: one channel list per KV head).
            ``"k"`` importance is per KV head either way.
        valid: optional bool ``[B, L]``; tokens where it is False (padding) are left out.

    Returns:
        float32 (float64 for float64 inputs) ``[H, D]``: the mean over the valid tokens.
    """
    _check_type_heads(channel_type, heads)
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] \
            or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1]:
        raise ValueError(f"expected q [B, Hq, L, D] and k [B, Hkv, L, D] with Hq % Hkv == 0, got {tuple(q.shape)} "
                         f"and {tuple(k.shape)}")
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    w = torch.ones(B, L, dtype=dt, device=q.device) if valid is None else valid.to(q.device, dt)
    count = w.sum().clamp(min=1)
    w = w.view(B, 1, L, 1)
    if channel_type == "k":
        return (k.to(dt).abs() * w).sum((0, 2)) / count
    x = q.to(dt).abs() if channel_type == "q" else (q.to(dt) * k.to(dt).repeat_interleave(G, 1)).abs()
    imp = (x * w).sum((0, 2)) / count  # [Hq, D]
    return imp.view(Hkv, G, D).sum(1) if heads == "kv" else imp


def channels_from_importance(importance: torch.Tensor, r: Optional[int] = None) -> torch.Tensor:
    """int64 ``[..., r]``: channels by descending importance (``[..., D]`` a full permutation when
    ``r`` is None). Ties go to the lower channel (stable sort)."""
    order = torch.sort(importance, dim=-1, descending=True, stable=True).indices
    if r is not None:
        check_int("r", r, minimum=1, maximum=importance.shape[-1])
        order = order[..., :r]
    return order.contiguous()


def calibrate_channels_from_qkv(captures, *, r: Optional[int] = 32, channel_type: str = "qk", heads: str = "query",
                                path: Union[str, os.PathLike, None] = None, return_importance: bool = False):
    """The channel table from captured ``q, k`` (``offline_calibration.py`` without the model run).

    Args:
        captures: ``{layer: (q, k, ...)}`` (what :func:`~sparseattn.integrations.capture.capture_qkv`
            returns) for one calibration sample, or an iterable of such dicts (one per sample);
            layers must be ``0 .. L-1`` in every sample.
        r: channels kept per head (``None``: the full permutation, as the official JSON stores).
        channel_type, heads: see :func:`channel_importance`.
        path: also write the table as JSON (:func:`save_channels`).
        return_importance: also return the float ``[L, H, D]`` importance.

    Like the official hooks, each sample's per-token mean is *summed* over samples (the ranking
    equals that of the mean over samples).
    """
    _check_type_heads(channel_type, heads)
    if isinstance(captures, Mapping):
        captures = [captures]
    total: Dict[int, torch.Tensor] = {}
    n = 0
    for sample in captures:
        if not isinstance(sample, Mapping) or not sample:
            raise ValueError("captures must be a {layer: (q, k, ...)} dict or an iterable of them")
        n += 1
        for layer, qkv in sample.items():
            imp = channel_importance(qkv[0], qkv[1], channel_type=channel_type, heads=heads).cpu()
            total[int(layer)] = imp if int(layer) not in total else total[int(layer)] + imp
    if not n:
        raise ValueError("no calibration sample given")
    layers = sorted(total)
    if layers != list(range(len(layers))):
        raise ValueError(f"captured layers must be 0 .. L-1, got {layers}")
    importance = torch.stack([total[i] for i in layers])  # [L, H, D]
    table = channels_from_importance(importance, r)
    if path is not None:
        save_channels(table, path, channel_type=channel_type, heads=heads)
    return (table, importance) if return_importance else table


def calibrate_channels(model, tokenizer, texts: Union[str, Sequence[str]], *, r: Optional[int] = 32,
                       channel_type: str = "qk", heads: str = "query", block_size: int = 512,
                       path: Union[str, os.PathLike, None] = None, return_importance: bool = False):
    """Offline calibration on a Hugging Face causal LM (``config/offline_calibration.py``).

    The texts are tokenized (``tokenizer.encode``, special tokens as the tokenizer adds them),
    concatenated and cut into blocks of ``block_size`` tokens (official: 256 pile-val samples,
    blocks of 512); unlike the official script the last, partial block is kept (so one short
    text works) and long texts are not skipped. Each block runs through the model once with
    :func:`~sparseattn.integrations.capture.capture_qkv` (post-RoPE ``q, k``, the layout the
    cache stores), and :func:`calibrate_channels_from_qkv` turns the statistics into the table.

    Deviation: the official ``"q"`` and ``"k"`` statistics hook ``q_proj`` / ``k_proj`` outputs
    (pre-RoPE); here all three use the post-RoPE tensors the attention receives (the labels are
    taken from post-RoPE cached keys, so this ranks the channels the labels actually hold).
    ``"qk"`` (the default, SGLang's ``ds_heavy_channel_type``) is post-RoPE in both.
    Channel indices are in the Hugging Face (rotate-half) layout, as the official JSON configs;
    no ``permute_channel_config`` (that maps them to gpt-fast's interleaved layout) is needed.

    Returns the int64 table ``[layers, Hq or Hkv, r]`` (and the importance with
    ``return_importance=True``); ``path`` also saves it as JSON.
    """
    from ..integrations.capture import capture_qkv

    _check_type_heads(channel_type, heads)
    check_int("block_size", block_size, minimum=1)
    if isinstance(texts, str):
        texts = [texts]
    ids: List[int] = []
    for text in texts:
        ids.extend(int(t) for t in tokenizer.encode(text))
    if not ids:
        raise ValueError("the calibration texts tokenize to no token")
    device = next(model.parameters()).device
    all_ids = torch.tensor(ids, dtype=torch.long)

    def samples():  # one forward at a time: only one block's q/k is alive
        for start in range(0, all_ids.numel(), block_size):
            yield capture_qkv(model, all_ids[start:start + block_size].view(1, -1).to(device))

    return calibrate_channels_from_qkv(samples(), r=r, channel_type=channel_type, heads=heads, path=path,
                                       return_importance=return_importance)


def save_channels(table: torch.Tensor, path: Union[str, os.PathLike], *, channel_type: str = "qk",
                  heads: Optional[str] = None, prefix: str = "model.layers") -> None:
    """Write ``table [L, H, n]`` as JSON in the official layout:
    ``{"<prefix>.<i>.self_attn.<channel_type>_proj": [[c, ...] per head], "sparseattn": {...}}``."""
    check_choice("channel_type", channel_type, CHANNEL_TYPES)
    table = _as_table(table)
    data: Dict[str, Any] = {f"{prefix}.{i}.self_attn.{channel_type}_proj": table[i].tolist()
                            for i in range(table.shape[0])}
    data[_META_KEY] = {"format": "double_sparsity_channels", "version": 1, "channel_type": channel_type,
                       "heads": heads, "shape": list(table.shape)}
    with open(path, "w") as f:
        json.dump(data, f)


def load_channels(source: Union[str, os.PathLike, Mapping], *, channel_type: str = "qk") -> torch.Tensor:
    """The int64 table ``[L, H, n]`` of ``channel_type`` from a JSON file (or its loaded dict) in the
    official layout (our :func:`save_channels` files and the official ``config/<org>/<model>.json``)."""
    check_choice("channel_type", channel_type, CHANNEL_TYPES)
    if isinstance(source, Mapping):
        data = source
    else:
        with open(source) as f:
            data = json.load(f)
    found: Dict[int, Any] = {}
    types = set()
    for key, value in data.items():
        m = _KEY_RE.search(str(key))
        if m is None:
            continue
        types.add(m.group(2))
        if m.group(2) == channel_type:
            found[int(m.group(1))] = value
    if not found:
        where = "the mapping" if isinstance(source, Mapping) else source
        raise ValueError(f"no '{channel_type}_proj' channel lists in {where} (it holds {sorted(types) or 'none'}); "
                         "pass channel_type= one of those")
    layers = sorted(found)
    if layers != list(range(len(layers))):
        raise ValueError(f"channel lists must cover layers 0 .. L-1, got layers {layers}")
    return _as_table([found[i] for i in layers])


def _as_table(value) -> torch.Tensor:
    try:
        t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"a channel table must be a [layers, heads, channels] array of ints: {exc}") from None
    if t.dim() != 3 or t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex or 0 in t.shape:
        raise ValueError(f"a channel table must be a non-empty [layers, heads, channels] int tensor, got "
                         f"{t.dtype} {tuple(t.shape)}")
    t = t.detach().to("cpu", torch.long).contiguous()
    if bool((t < 0).any()):
        raise ValueError("channel indices must be >= 0")
    return t


# ----------------------------------------------------------------------------- label quantization
def pseudo_quantize(x: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row asymmetric min/max quantization over the last dim (the official ``pseudo_quantize``
    of ``evaluation/modify_llama.py``): ``(codes uint8, lo, step)`` with ``x ~ codes * step + lo``."""
    maxq = 2 ** bits - 1
    lo = x.amin(-1, keepdim=True)
    rng = x.amax(-1, keepdim=True) - lo
    rng = torch.where(rng == 0, torch.ones_like(rng), rng)
    scale = maxq / rng
    codes = torch.round((x - lo) * scale).clamp(0, maxq)
    return codes.to(torch.uint8), lo.squeeze(-1), (1.0 / scale).squeeze(-1)


def _dequantize(codes: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, bits: int, dt) -> torch.Tensor:
    if bits == 4:  # two channels per byte: channel 2i in the low nibble, 2i + 1 in the high one
        codes = torch.stack((codes & 15, codes >> 4), -1).flatten(-2)
    return codes.to(dt) * step.to(dt).unsqueeze(-1) + lo.to(dt).unsqueeze(-1)


# ----------------------------------------------------------------------------- the method
@register
@dataclass(kw_only=True, eq=False)
class DoubleSparsity(DecodeMethod):
    """Double Sparsity (Yang et al. 2024, arXiv 2408.07092; code andy-yang-1/DoubleSparse).

    Per layer (except ``dense_layers``) and label head, a calibrated set ``C`` of ``r`` "label"
    channels (outlier channels that dominate ``q . k``). For every cached token the *label* ``K[t,
    C]`` is kept in a label cache; each step the approximate logits ``q[C] . K_label[t] / sqrt(r)``
    (causal) rank the tokens, the top ``token_budget`` tokens per KV head are read exactly.

    **Label cache.** ``self.state(cache, layer)`` holds a pool indexed by *physical page*
    ``[capacity, H_label, page_size, r]`` (the cache's page numbering, grown with
    ``cache.capacity``). Each call (``on_prefill``, ``select``, ``on_dense_step``) labels only the
    pages the tokens appended since the previous call touched (worked out from the
    ``cache.host_lengths`` recorded in the state), never the whole cache.

    **Label bits** (``label_bits``): ``16`` (default) stores labels unquantized in the cache
    dtype (fp16/bf16 on a GPU), as the official fast path does (``models/model.py``: ``k_label``
    in the KV cache dtype; SGLang's label buffer likewise); the label ranking is then exact for
    those channels. ``8`` / ``4`` store uint8 codes (4 bits: two per byte) with a per-token min
    and step (in the cache dtype) by the official per-token min/max ``pseudo_quantize``
    (``evaluation/modify_llama.py``, ``label_bits=4`` default of
    ``convert_kvcache_llama_heavy_recent``); the query label is pseudo-quantized too, as there.

    **Channels** (``channels``): a JSON path (:func:`load_channels`, the ``channel_type`` entry),
    a mapping loaded from one, a nested list or an int tensor ``[layers, H, >= r]`` (first ``r``
    columns used), ``H`` = query heads (one label cache per query head: the official layout,
    labels x G) or KV heads (one per KV head). Make one with :func:`calibrate_channels`.
    Fallback when ``channels`` is None: ``on_prefill`` computes the ``channel_type`` importance
    (:func:`channel_importance`, ``heads=label_heads``) from the prompt's own queries and their
    keys (query ``i`` of ``Lq`` at position ``len - Lq + i``); without a prefill, the first
    labelling call uses the ``"k"`` rule (mean ``|K_c|`` per KV head) over the keys cached then.
    Either way the channels of a (cache, layer) are then fixed.

    **GQA** (``gqa_policy``): one token list per KV head. ``"group_sum"`` (default; spec 4.4:
    group-summed label scores) sums the approximate logits of the group's query heads;
    ``"group_max"`` takes their max; ``"per_q_head"`` selects top ``token_budget`` per query head
    (the official eval path, MHA/``repeat_kv``) and reads the union (up to ``G * token_budget``).
    With ``Lq > 1`` new queries the per-token score is the max over them (each masked causally).

    **Forced tokens.** The official code forces none (the current token competes in the top-k).
    ``force_new_tokens=True`` (default, a deviation) always keeps the step's ``Lq`` new tokens
    (counted in the budget), so each query sees at least its own key; ``False`` is the official
    behaviour. Selected per (batch, KV head): ``min(len, max(token_budget, forced))`` tokens.
    No sink or recent window (the method has none); a sequence shorter than the budget reads all
    its tokens (SGLang instead goes dense for the whole batch then).

    Cost per step and layer: the label scan reads ``N * H_label * r`` label elements (plus, for
    8/4 bits, a min and a step per token) and gathers ``token_budget`` tokens; this reference
    implementation materialises the scores ``[B, Hq, Lq, N]`` in float32 (float64 for float64).
    Channel indices are in the layout of the cached keys (Hugging Face rotate-half, as the
    official JSON configs; gpt-fast's ``permute_channel_config`` is not needed). The official
    ``1/sqrt(r)`` score scale is kept; it does not change the ranking. No host syncs per step.

    Defaults (andy-yang-1/DoubleSparse unless said): ``token_budget=256`` (``heavy_const: int =
    256`` in ``models/model.py``; SGLang ``ds_heavy_token_num=256``), ``r=32``
    (``heavy_channel_num: int = 32`` in ``models/model.py``; SGLang ``ds_heavy_channel_num=32``;
    the eval uses ``r = head_dim / group_factor``), ``channel_type="qk"`` (SGLang
    ``ds_heavy_channel_type='qk'``; ``evaluation/perplexity_eval.py --channel`` default ``qk``),
    ``dense_layers=(0, 1)`` (``layer_idx < 2`` in ``evaluation/modify_llama.py``),
    ``dense_below=4096`` (SGLang ``ds_sparse_decode_threshold=4096``: dense decoding while the
    longest sequence is shorter). ``label_heads="kv"`` (spec 4.4 (a), the bandwidth-friendly
    layout) only applies to the prompt-derived fallback.
    """

    name: ClassVar[str] = "double_sparsity"

    token_budget: int = 256
    r: int = 32
    channels: Any = None
    channel_type: str = "qk"
    label_bits: int = 16
    label_heads: str = "kv"
    gqa_policy: str = "group_sum"
    force_new_tokens: bool = True
    dense_layers: tuple = (0, 1)
    dense_below: int = 4096

    def __post_init__(self):
        super().__post_init__()
        check_int("token_budget", self.token_budget, minimum=1)
        check_int("r", self.r, minimum=1)
        check_choice("channel_type", self.channel_type, CHANNEL_TYPES)
        check_choice("label_heads", self.label_heads, HEAD_LAYOUTS)
        check_choice("gqa_policy", self.gqa_policy, GQA_POLICIES)
        if self.label_bits not in LABEL_BITS or isinstance(self.label_bits, bool):
            raise ValueError(f"label_bits must be one of {list(LABEL_BITS)}, got {self.label_bits!r}")
        if self.label_bits == 4 and self.r % 2:
            raise ValueError(f"label_bits=4 packs two channels per byte: r must be even, got {self.r}")
        if not isinstance(self.force_new_tokens, bool):
            raise ValueError(f"force_new_tokens must be a bool, got {self.force_new_tokens!r}")
        self._table = self._parse_channels(self.channels)
        # DecodeMethod.state is keyed by id(self); a dead method's id can be reused by a new one, whose
        # channels differ. The state records this object's token (kept alive by the state, so its id
        # is never reused while it is stored) and a mismatch clears it.
        self._owner = object()

    def _own_state(self, cache, layer: int) -> dict:
        st = self.state(cache, layer)
        if st.get("owner") is not self._owner:
            st.clear()
            st["owner"] = self._owner
        return st

    def _parse_channels(self, value) -> Optional[torch.Tensor]:
        if value is None:
            return None
        if isinstance(value, (str, os.PathLike, Mapping)):
            table = load_channels(value, channel_type=self.channel_type)
        elif isinstance(value, (torch.Tensor, list, tuple)):
            table = _as_table(value)
        else:
            raise ValueError(f"channels must be None, a JSON path, a mapping, a nested list or a tensor "
                             f"[layers, heads, >= r], got {type(value).__name__}")
        if table.shape[2] < self.r:
            raise ValueError(f"the channel table has {table.shape[2]} channels per head, fewer than r={self.r}")
        table = table[:, :, : self.r].contiguous()
        if self.r > 1 and bool((table.sort(-1).values.diff(dim=-1) == 0).any()):
            raise ValueError("each head's first r channels must be distinct")
        return table

    # ------------------------------------------------------------------ hooks
    def on_prefill(self, q, cache, layer):
        if layer not in self.dense_layers:
            self._update_labels(q, cache, layer, prompt=True)

    def on_dense_step(self, q, cache, layer):
        if layer not in self.dense_layers:
            self._update_labels(q, cache, layer, prompt=False)

    # ------------------------------------------------------------------ channels
    def _resolve_channels(self, q, cache, layer: int, prompt: bool) -> torch.Tensor:
        """``[H_label, r]`` int64 on the cache device for this layer (table, prompt or cached keys)."""
        Hq, Hkv, D = q.shape[1], cache.num_kv_heads, cache.head_dim
        if self.r > D:
            raise ValueError(f"r={self.r} label channels exceed head_dim={D}")
        if self._table is not None:
            L, H, _ = self._table.shape
            if layer >= L:
                raise ValueError(f"the channel table has {L} layers, no entry for layer {layer}")
            if H not in (Hq, Hkv):
                raise ValueError(f"the channel table has {H} heads per layer; expected Hq={Hq} (per query head) or "
                                 f"Hkv={Hkv} (per KV head)")
            if int(self._table[layer].max()) >= D:  # host tensor: no device read
                raise ValueError(f"channel indices must be < head_dim={D}; layer {layer} has "
                                 f"{int(self._table[layer].max())}")
            return self._table[layer].to(cache.device)
        lengths = cache.layer_lengths(layer).long()
        keys = gather_keys(cache, layer)  # [B, Hkv, N, D], read once per (cache, layer)
        N = keys.shape[2]
        if prompt:  # the prompt's queries and their own keys (bottom-right aligned)
            Lq = q.shape[2]
            pos = lengths.view(-1, 1) - Lq + torch.arange(Lq, device=q.device).view(1, -1)  # [B, Lq]
            valid = pos >= 0
            idx = pos.clamp(min=0, max=max(N - 1, 0))
            k = torch.gather(keys, 2, idx.view(-1, 1, Lq, 1).expand(-1, Hkv, Lq, D))
            imp = channel_importance(q, k, channel_type=self.channel_type, heads=self.label_heads, valid=valid)
        else:  # no prompt seen: mean |K_c| per KV head over the cached keys
            valid = torch.arange(N, device=q.device).view(1, -1) < lengths.view(-1, 1)
            imp = channel_importance(keys, keys, channel_type="k", valid=valid)
        return channels_from_importance(imp, self.r)

    # ------------------------------------------------------------------ label cache
    def _update_labels(self, q, cache, layer: int, prompt: bool) -> dict:
        """Label the pages touched since the last call; returns the layer's state."""
        st = self._own_state(cache, layer)
        if "channels" not in st:
            ch = self._resolve_channels(q, cache, layer, prompt)
            H = ch.shape[0]
            st["channels"] = ch
            st["kv_of"] = torch.arange(H, device=cache.device) // (H // cache.num_kv_heads)  # label head -> KV head
            st["pool"] = {}
            st["capacity"] = 0
        H, r = st["channels"].shape
        if st["capacity"] < cache.capacity:
            self._grow(st, cache, H, r)
        now = cache.host_lengths(layer)
        old = st.get("labeled")
        if old is None or len(old) != len(now) or any(o > n for o, n in zip(old, now)):
            old = [0] * len(now)
            old_dev = torch.zeros(len(now), dtype=torch.long, device=cache.device)
        else:
            old_dev = st["labeled_dev"]
        P = cache.page_size
        nt = max([(n - 1) // P - o // P + 1 if n > o else 0 for o, n in zip(old, now)], default=0)
        if nt:
            new_dev = cache.layer_lengths(layer).long()
            table = cache.page_table_storage.long()
            width = table.shape[1]
            lp = (old_dev // P).view(-1, 1) + torch.arange(nt, device=cache.device).view(1, -1)  # [B, nt]
            touched = (lp * P < new_dev.view(-1, 1)) & (lp < width) & (new_dev > old_dev).view(-1, 1)
            phys = torch.gather(table, 1, lp.clamp(max=width - 1))
            phys = torch.where(touched, phys, torch.zeros_like(phys)).flatten()  # untouched -> scratch page 0
            self._write(st, cache.k_pages(layer)[phys], phys)
            st["labeled_dev"] = new_dev.clone()
        elif "labeled_dev" not in st:
            st["labeled_dev"] = old_dev
        st["labeled"] = now
        return st

    def _grow(self, st: dict, cache, H: int, r: int) -> None:
        cap, dev, P = cache.capacity, cache.device, cache.page_size
        if self.label_bits == 16:
            shapes = {"labels": ((cap, H, P, r), cache.dtype)}
        else:
            shapes = {"codes": ((cap, H, P, r // 2 if self.label_bits == 4 else r), torch.uint8),
                      "lo": ((cap, H, P), cache.dtype), "step": ((cap, H, P), cache.dtype)}
        keep = st["capacity"]
        for name, (shape, dtype) in shapes.items():
            t = torch.zeros(shape, dtype=dtype, device=dev)
            if keep:
                t[:keep].copy_(st["pool"][name][:keep])
            st["pool"][name] = t
        st["capacity"] = cap

    def _write(self, st: dict, keys: torch.Tensor, phys: torch.Tensor) -> None:
        """Labels of whole pages ``keys [M, Hkv, P, D]`` into pool rows ``phys [M]``."""
        ch, kv_of = st["channels"], st["kv_of"]
        M, _, P, _ = keys.shape
        H, r = ch.shape
        lab = torch.gather(keys.index_select(1, kv_of), -1, ch.view(1, H, 1, r).expand(M, H, P, r))
        pool = st["pool"]
        if self.label_bits == 16:
            pool["labels"][phys] = lab
            return
        codes, lo, step = pseudo_quantize(lab.to(score_dtype(lab)), self.label_bits)
        if self.label_bits == 4:
            codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
        pool["codes"][phys] = codes
        pool["lo"][phys] = lo.to(pool["lo"].dtype)
        pool["step"][phys] = step.to(pool["step"].dtype)

    def label_keys(self, cache, layer: int, dtype=torch.float32) -> torch.Tensor:
        """``[B, H_label, max_pages * page_size, r]``: the (dequantized) labels of every sequence in
        logical order (slots past a sequence's length hold garbage). Call after a labelling hook."""
        st = self._own_state(cache, layer)
        if "channels" not in st:
            raise ValueError(f"layer {layer} has no label cache yet (call on_prefill or select first)")
        idx = cache.page_table.long()  # [B, maxP]
        pool = st["pool"]
        if self.label_bits == 16:
            lab = pool["labels"][idx].to(dtype)  # [B, maxP, H, P, r]
        else:
            lab = _dequantize(pool["codes"][idx], pool["lo"][idx], pool["step"][idx], self.label_bits, dtype)
        B, nP, H, P, r = lab.shape
        return lab.permute(0, 2, 1, 3, 4).reshape(B, H, nP * P, r)

    # ------------------------------------------------------------------ scoring and selection
    def label_scores(self, q, cache, layer: int) -> torch.Tensor:
        """Approximate logits ``[B, Hkv, G, Lq, N]`` (``N = max_pages * page_size``):
        ``q[C] . K_label[t] / sqrt(r)``, ``-inf`` past each length and in each query's future.
        Updates the label cache first."""
        st = self._update_labels(q, cache, layer, prompt=False)
        B, Hq, Lq, D = q.shape
        Hkv = cache.num_kv_heads
        ch = st["channels"]
        H, r = ch.shape
        dt = score_dtype(q)
        klab = self.label_keys(cache, layer, dt)  # [B, H, N, r]
        N = klab.shape[2]
        qlab = self._query_labels(q, ch, dt)  # [B, H, R * Lq, r]
        s = torch.matmul(qlab, klab.transpose(-1, -2)).view(B, Hkv, Hq // Hkv, Lq, N) * (r ** -0.5)
        lengths = cache.layer_lengths(layer).long().view(B, 1, 1, 1, 1)
        pos = torch.arange(N, device=q.device).view(1, 1, 1, 1, N)
        qpos = lengths - Lq + torch.arange(Lq, device=q.device).view(1, 1, 1, Lq, 1)
        return s.masked_fill(pos > qpos, float("-inf"))

    def _query_labels(self, q, ch: torch.Tensor, dt) -> torch.Tensor:
        """``[B, H, R * Lq, r]`` (``R = Hq / H``): each query head's label channels ``ch [H, r]`` in
        ``dt``, pseudo-quantized like the labels for 8/4 bits (tiny: no pass over the cache)."""
        B, Hq, Lq, D = q.shape
        H, r = ch.shape
        R = Hq // H
        qlab = torch.gather(q.to(dt).reshape(B, H, R * Lq, D), -1, ch.view(1, H, 1, r).expand(B, H, R * Lq, r))
        if self.label_bits < 16:
            codes, lo, step = pseudo_quantize(qlab, self.label_bits)
            qlab = codes.to(dt) * step.unsqueeze(-1) + lo.unsqueeze(-1)
        return qlab

    def token_scores(self, q, cache, layer: int) -> torch.Tensor:
        """The ranking score of every token: float ``[B, Hkv, N]`` (``[B, Hkv, G, N]`` for
        ``per_q_head``), :meth:`label_scores` reduced over the new queries (max) and the group's heads
        (``gqa_policy``), ``-inf`` outside the candidates (``pos < len - forced``). Updates the
        label cache first. With :func:`use_triton_estimator` one Triton kernel reads the label pool
        through the page table and writes only this (float32); otherwise the PyTorch path."""
        B, Hq, Lq, _ = q.shape
        n_forced = Lq if self.force_new_tokens else 0
        fused = (torch.float16, torch.bfloat16, torch.float32)
        if q.dtype in fused and cache.dtype in fused and use_triton_estimator(q):
            from ..kernels.label_score_triton import label_scores_triton

            st = self._update_labels(q, cache, layer, prompt=False)
            ch, pool = st["channels"], st["pool"]
            qlab = self._query_labels(q, ch, torch.float32).view(B, Hq, Lq, ch.shape[1])
            return label_scores_triton(qlab, pool["labels" if self.label_bits == 16 else "codes"], cache.page_table,
                                       cache.layer_lengths(layer), page_size=cache.page_size,
                                       num_kv_heads=cache.num_kv_heads, label_bits=self.label_bits,
                                       lo=pool.get("lo"), step=pool.get("step"), gqa_policy=self.gqa_policy,
                                       n_forced=n_forced, scale=ch.shape[1] ** -0.5)
        s5 = self.label_scores(q, cache, layer)  # [B, Hkv, G, Lq, N]
        N = s5.shape[-1]
        lengths = cache.layer_lengths(layer).long().view(B, 1, 1)
        candidate = torch.arange(N, device=q.device).view(1, 1, N) < lengths - n_forced  # [B, 1, N]
        neg = s5.new_full((), float("-inf"))
        if self.gqa_policy == "group_max":  # max over heads and new queries in one pass
            return torch.where(candidate, s5.amax(dim=(2, 3)), neg)
        s = s5[:, :, :, 0] if Lq == 1 else s5.amax(3)  # [B, Hkv, G, N]: max over the new queries (a view at Lq = 1)
        if self.gqa_policy == "per_q_head":
            return torch.where(candidate.unsqueeze(2), s, neg)
        return torch.where(candidate, s.sum(2), neg)

    def _select(self, q, cache, layer):
        B, Hq, Lq, _ = q.shape
        G = Hq // cache.num_kv_heads
        score = self.token_scores(q, cache, layer)  # [B, Hkv, N] or [B, Hkv, G, N]
        N = score.shape[-1]
        dev = q.device
        n_forced = Lq if self.force_new_tokens else 0
        free = max(self.token_budget - n_forced, 0)
        per_head = self.gqa_policy == "per_q_head"
        width = max(G * free + n_forced, n_forced) if per_head else free + n_forced
        width = max(1, min(N, width))
        if use_triton_estimator(q):  # top-k + O(k) assembly instead of a full sort and an O(N) compaction
            return topk_token_selection(score, free, lengths=cache.layer_lengths(layer), page_size=cache.page_size,
                                        width=width, forced_last=n_forced)
        lengths = cache.layer_lengths(layer).long().view(B, 1, 1)
        pos = torch.arange(N, device=dev).view(1, 1, N)
        candidate = pos < lengths - n_forced  # [B, 1, N]
        forced = (pos >= lengths - n_forced) & (pos < lengths)
        n = torch.full(score.shape[:-1], free, dtype=torch.long, device=dev)
        keep = rank_mask(score, n) & (candidate.unsqueeze(2) if per_head else candidate)
        if per_head:
            keep = keep.any(2)
        return DecodeSelection.from_token_mask(keep | forced, page_size=cache.page_size, max_tokens=width)


__all__ = ["DoubleSparsity", "calibrate_channels", "calibrate_channels_from_qkv", "channel_importance",
           "channels_from_importance", "save_channels", "load_channels", "pseudo_quantize"]
