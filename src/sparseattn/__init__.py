"""sparseattn: sparse attention for long-context LLMs on one block-sparse engine.

Canonical layout everywhere: ``q [B, Hq, Lq, D]``, ``k, v [B, Hkv, Lk, D]``, ``Hq % Hkv == 0``;
causal alignment bottom-right (query ``i`` sees keys ``j <= Lk - Lq + i``).
"""

from .api import block_sparse_attention
from .plan import BlockPlan

__version__ = "0.1.0"

__all__ = ["BlockPlan", "block_sparse_attention", "__version__"]
