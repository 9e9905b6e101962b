"""Prefill sparse-attention methods: each builds a :class:`~sparseattn.plan.BlockPlan`.

Public API::

    list_methods(kind="prefill")            # registered names
    get_method(name, **overrides)           # method object with the official defaults
    method.plan(q, k, v, causal=True)       # -> BlockPlan
    sparse_attention(q, k, v, method="xattention", **overrides)   # plan + block_sparse_attention
    LayerMethods({"default": "xattention", "layers": {0: "dense"}})  # per-layer choice

Layout: ``q [B, Hq, Lq, D]``, ``k, v [B, Hkv, Lk, D]``, ``Hq % Hkv == 0``; causal alignment
bottom-right.
"""

from .base import PrefillMethod, ScoreBasedMethod, pool_blocks, select_threshold, select_topk
from .registry import LayerMethods, get_method, list_methods, register, sparse_attention

# One import per method; the order is list_methods()'s order.
from .dense import Dense  # noqa: E402
from .streaming import Streaming  # noqa: E402
from .tri_shape import TriShape  # noqa: E402
from .block_topk import BlockTopK  # noqa: E402
from .xattention import XAttention  # noqa: E402
from .power import Power  # noqa: E402
from .moa import MoA  # noqa: E402
from .duo import Duo  # noqa: E402
from .flexprefill import FlexPrefill  # noqa: E402
from .vertical_slash import VerticalSlash  # noqa: E402
from .proxy import ProxyAttn  # noqa: E402
from .sale import (SALE, calibrate_sale_thresholds, calibrate_sale_thresholds_from_qkv,  # noqa: E402
                   load_sale_thresholds, save_sale_thresholds)
from .hip import HiP  # noqa: E402
from .anchor import AnchorAttention  # noqa: E402
from .pbs import PBS  # noqa: E402

__all__ = [
    "PrefillMethod", "ScoreBasedMethod", "LayerMethods", "get_method", "list_methods", "register",
    "sparse_attention", "pool_blocks", "select_threshold", "select_topk",
    "Dense", "Streaming", "TriShape", "BlockTopK", "XAttention", "Power", "MoA", "Duo", "FlexPrefill", "VerticalSlash",
    "ProxyAttn", "SALE", "HiP", "AnchorAttention", "PBS",
    "calibrate_sale_thresholds", "calibrate_sale_thresholds_from_qkv", "load_sale_thresholds", "save_sale_thresholds",
]
