"""Shared harness of the scripts in scripts/walk: copies of the prefill kernel module with parts of
its text replaced, loaded as separate modules, and the 9/3/64 inputs and random plans they run on."""

import importlib.util
import os

import torch

from sparseattn.bench.kernel import random_plan_at_density

# The sparse walk's index prefetch as committed (kernels/prefill_triton.py, _walk_blocks): the text
# the variants replace.
SPARSE_WALK = """        blk_next = tl.load(idx_row + t_begin * stride_ik, mask=t_begin < t_end, other=0)
        for t in range(t_begin, t_end):
            blk = blk_next
            blk_next = tl.load(idx_row + (t + 1) * stride_ik, mask=t + 1 < count, other=0)
"""
# The next two indices loaded ahead instead of one (a variant both experiments time).
INDEX_TWO_AHEAD = """        blk_next = tl.load(idx_row + t_begin * stride_ik, mask=t_begin < t_end, other=0)
        blk_next2 = tl.load(idx_row + (t_begin + 1) * stride_ik, mask=t_begin + 1 < count, other=0)
        for t in range(t_begin, t_end):
            blk = blk_next
            blk_next = blk_next2
            blk_next2 = tl.load(idx_row + (t + 2) * stride_ik, mask=t + 2 < count, other=0)
"""
WORK_DIR = "/tmp/sparseattn_walk"


def kernel_source() -> str:
    """The prefill kernel module's text, with absolute imports (so a copy loads outside the package)."""
    src = open("src/sparseattn/kernels/prefill_triton.py").read()
    src = src.replace("from ..plan import", "from sparseattn.plan import")
    src = src.replace("from .dispatch import", "from sparseattn.kernels.dispatch import")
    assert SPARSE_WALK in src, "the kernel's sparse walk changed: update scripts/walk/common.py"
    return src


def load_module(name: str, src: str):
    """Write ``src`` to a file and import it as module ``name`` (Triton needs a real source file)."""
    os.makedirs(WORK_DIR, exist_ok=True)
    path = f"{WORK_DIR}/{name}.py"
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def walk_variants(prefix: str, variants: dict) -> dict:
    """``{label: module}``: the kernel with ``SPARSE_WALK`` replaced by each variant's text."""
    src = kernel_source()
    return {label: load_module(f"{prefix}_{i}", src.replace(SPARSE_WALK, body))
            for i, (label, body) in enumerate(variants.items())}


def inputs(densities=(1.0, 0.45, 0.19), Hq=9, Hkv=3, D=64):
    """(dev, q, k, v, plans): ``DEV`` (default cuda) and ``LEN`` (default 32768) from the environment;
    bf16 on CUDA with 128-blocks, fp32 with 32-blocks on the CPU interpreter."""
    dev = os.environ.get("DEV", "cuda")
    L = int(os.environ.get("LEN", 32768))
    torch.manual_seed(0)
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    q = torch.randn(1, Hq, L, D, device=dev, dtype=dt)
    k = torch.randn(1, Hkv, L, D, device=dev, dtype=dt)
    v = torch.randn(1, Hkv, L, D, device=dev, dtype=dt)
    blk = 128 if dev == "cuda" else 32
    plans = {d: random_plan_at_density(1, Hq, L, blk, d, dev, seed=1) for d in densities}
    return dev, q, k, v, plans


def print_errors_vs_current(mods: dict, q, k, v, plans: dict) -> None:
    """Each variant's largest output difference to the committed kernel (``mods["cur"]``), per plan."""
    refs = {d: mods["cur"].attention_triton(q, k, v, p) for d, p in plans.items()}
    for name, m in mods.items():
        errs = [(m.attention_triton(q, k, v, p).float() - refs[d].float()).abs().max().item()
                for d, p in plans.items()]
        print(name, f"max err vs cur (plans {list(plans)}):", ["%.1e" % e for e in errs], flush=True)
