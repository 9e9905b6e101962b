"""Test setup: without CUDA, Triton kernels run in the interpreter (TRITON_INTERPRET=1).

The variable must be set before Triton is first imported, hence here, at collection start.
"""

import os

import torch

# This machine kind advertises AMX but the sandbox faults on it: oneDNN's bf16 CPU matmuls die with
# SIGILL. Capping oneDNN below AMX (read at its first use, so setting it here is in time) avoids it.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU; the CPU twin runs the same checks "
                                   "in the Triton interpreter / reference")


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True
