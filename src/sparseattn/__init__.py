"""sparseattn: sparse attention for long-context LLMs on one block-sparse engine.

Canonical layout everywhere: ``q [B, Hq, Lq, D]``, ``k, v [B, Hkv, Lk, D]``, ``Hq % Hkv == 0``;
causal alignment bottom-right (query ``i`` sees keys ``j <= Lk - Lq + i``).

Layers: ``plan`` (BlockPlan, the contract) <- ``kernels`` (reference + Triton, executing plans)
<- ``methods`` (estimators making plans) <- ``integrations`` / ``eval`` / ``bench`` / ``cli``.
"""

from .api import block_sparse_attention
from .cache import PagedKVCache
from .decode_api import DecodeSelection, sparse_decode_attention
from .methods import LayerMethods, get_method, list_methods, sparse_attention
from .methods.graphs import set_estimator_graphs
from .plan import BlockPlan

__version__ = "0.1.0"


def load_model(name_or_path, *, device=None, dtype=None):
    """Load a causal LM and its tokenizer (``"smollm2"``, a local HF folder or a GGUF file).

    See :func:`sparseattn.models.load_model`; imported lazily so that ``import sparseattn``
    needs neither transformers nor gguf.
    """
    from .models import load_model as _load

    return _load(name_or_path, device=device, dtype=dtype)


def patch(model, prefill="xattention", decode="dense", **overrides):
    """Context manager running ``model``'s prefill attention through a sparse method.

    See :func:`sparseattn.integrations.hf.patch`; imported lazily (it needs transformers).
    """
    from .integrations.hf import patch as _patch

    return _patch(model, prefill=prefill, decode=decode, **overrides)


__all__ = ["BlockPlan", "DecodeSelection", "LayerMethods", "PagedKVCache", "block_sparse_attention", "get_method",
           "list_methods", "load_model", "patch", "set_estimator_graphs", "sparse_attention",
           "sparse_decode_attention", "__version__"]
