"""Backend choice: each backend has a predicate that returns why it refuses (or None)."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import Iterator, Optional

import torch

from ..plan import BlockPlan

logger = logging.getLogger("sparseattn")

BACKENDS = ("reference", "triton")
TRITON_HEAD_DIMS = (16, 32, 64, 128, 256)


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_side_streams: dict = {}
# SPARSEATTN_CONCURRENT=0 runs both branches in order on one stream (for comparisons and debugging).
_branches_enabled = os.environ.get("SPARSEATTN_CONCURRENT", "1") != "0"


@contextlib.contextmanager
def concurrent_branch(device: torch.device) -> Iterator[contextlib.AbstractContextManager]:
    """Two branches of work on ``device`` that may run at the same time.

    ``with concurrent_branch(dev) as side:`` yields a context manager; work issued inside ``with
    side:`` goes to a second stream that starts where the current stream stands on entry, work
    issued outside it stays on the current stream, and on exit (also on an error) the current
    stream waits for the second. For an estimator whose critical path is a launch that fills few
    SMs (a selection over a handful of long rows), independent work then uses the idle ones. Also
    inside a CUDA-graph capture (the branch becomes a parallel path of the graph). No host sync.
    Off CUDA both branches run in order on the one stream.

    Memory: tensors made in one branch and read in the other are read only after the join, or
    were made before the fork; each later fork starts after everything the current stream issued
    before it, so a freed block of the second stream is never reused while the first still reads it.
    """
    if device.type != "cuda" or not _branches_enabled:
        yield contextlib.nullcontext()
        return
    main = torch.cuda.current_stream(device)
    index = main.device.index
    side = _side_streams.get(index)
    if side is None:
        side = _side_streams[index] = torch.cuda.Stream(device=main.device)
    side.wait_stream(main)
    try:
        yield torch.cuda.stream(side)
    finally:
        main.wait_stream(side)


def triton_import_error() -> Optional[str]:
    """Why Triton cannot be imported, or None when it can."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return f"triton is not importable ({type(exc).__name__}: {exc}); install it with pip install triton"
    return None


def _pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def triton_environment_reason(device: torch.device) -> Optional[str]:
    """Why the Triton kernel cannot run on this machine / device at all, or None.

    Cached per device and interpreter setting: it sits on every attention call's path.
    """
    return _environment_reason(device.type, device.index, triton_interpreting())


@functools.lru_cache(maxsize=None)
def device_capability(device_index: Optional[int]) -> tuple:
    return torch.cuda.get_device_capability(device_index)


@functools.lru_cache(maxsize=64)
def _environment_reason(device_type: str, device_index: Optional[int], interpreting: bool) -> Optional[str]:
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    reason = triton_import_error()
    if reason:
        return reason
    if device.type != "cuda" and not interpreting:
        return (f"tensors are on {device}; the Triton kernel needs CUDA tensors "
                "(or TRITON_INTERPRET=1 to run it in the interpreter on the CPU)")
    if device.type == "cuda" and device_capability(device.index) < (8, 0):
        return f"the Triton kernel needs compute capability >= 8.0, got {device_capability(device.index)}"
    return None


def dependent_launch(device: torch.device) -> bool:
    """Launch decode-step kernels with programmatic dependent launch (PDL)?

    On Hopper and later a kernel launched this way may start (be scheduled, run its prologue) while
    the kernel before it in the stream finishes; the kernel waits (``griddepcontrol.wait``) before
    it reads anything, and kernels that feed it signal early (``griddepcontrol.launch_dependents``),
    so a step of several small dependent kernels loses less time between them. CUDA graphs keep
    these edges. ``SPARSEATTN_PDL=0`` turns it off (for comparisons).
    """
    if device.type != "cuda" or triton_interpreting() or os.environ.get("SPARSEATTN_PDL", "1") == "0":
        return False
    return device_capability(device.index) >= (9, 0)


def pdl_kwargs(enabled: bool) -> dict:
    """Launch options for a kernel taking part in dependent launch (none when it does not)."""
    return {"launch_pdl": True} if enabled else {}


def triton_input_reason(q: torch.Tensor, plan: Optional[BlockPlan]) -> Optional[str]:
    """Why these (valid) inputs are not supported by the Triton kernel, or None."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the Triton kernel supports float16, bfloat16 and float32, got {q.dtype}"
    D = q.shape[-1]
    if D not in TRITON_HEAD_DIMS:
        return f"the Triton kernel supports head_dim in {TRITON_HEAD_DIMS}, got {D}"
    if plan is not None:
        for name in ("block_q", "block_k"):
            size = getattr(plan, name)
            if not (_pow2(size) and size >= 16):
                return f"the Triton kernel needs the plan's {name} to be a power of two >= 16, got {size}"
    return None


def can_run_triton(q: torch.Tensor, plan: Optional[BlockPlan]) -> Optional[str]:
    """None when the Triton prefill kernel can run these inputs, else the reason it cannot."""
    return triton_environment_reason(q.device) or triton_input_reason(q, plan)


def choose_backend(requested: str, q: torch.Tensor, plan: Optional[BlockPlan]) -> str:
    """Resolve ``backend=`` ('auto', 'reference' or 'triton') for the prefill kernel."""
    return resolve_backend(requested, q, lambda: triton_input_reason(q, plan))


def resolve_backend(requested: str, q: torch.Tensor, input_reason_fn) -> str:
    """Resolve ``backend=`` for any kernel family; ``input_reason_fn()`` says why Triton can't take
    these inputs (or None). Forced Triton raises with the reason; auto falls back with a log line."""
    if requested not in ("auto",) + BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {requested!r}")
    if requested == "reference":
        return "reference"
    env_reason = triton_environment_reason(q.device)
    input_reason = None if env_reason else input_reason_fn()
    if requested == "triton":
        if env_reason:
            raise RuntimeError(f"backend='triton' cannot run here: {env_reason}")
        if input_reason:
            raise NotImplementedError(f"backend='triton' does not support these inputs: {input_reason}; "
                                      "backend='reference' does")
        return "triton"
    # auto: Triton on CUDA tensors when it can run; the reference everywhere else.
    if q.device.type == "cuda":
        if env_reason is None and input_reason is None:
            return "triton"
        _log_fallback(env_reason or input_reason)
    return "reference"


_logged = set()


def _log_fallback(reason: str) -> None:
    if reason not in _logged:  # once per distinct reason, not once per layer and step
        _logged.add(reason)
        logger.warning("sparseattn: using the reference backend on CUDA: %s", reason)
