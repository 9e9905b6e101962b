"""GPU twins of the matrix: plans built on CUDA equal the CPU plans, without a host sync."""

import pytest
import torch

from sparseattn.methods import get_method

from ..conftest import requires_cuda
from .cases import CASES, SHAPES, fields, overrides, planted_qkv


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_plan_equals_cpu_plan_and_never_syncs(name):
    s = SHAPES[1]
    key = "planted" if CASES[name]["planted"] is not None else "small"
    q, k, v = planted_qkv(s, j_star=s["L"] // 2 + 3)  # clear-cut scores: no near-ties to flip
    m = get_method(name, **overrides(name, key, s))
    if name == "xattention":  # also exercise the per-head upload
        m = m.replace(threshold=[0.9, 0.8, 0.9, 0.8, 0.9, 0.8])
    cpu = m.plan(q, k, v)
    qc, kc, vc = q.cuda(), k.cuda(), v.cuda()
    m.plan(qc, kc, vc)  # warm-up (lazy CUDA init may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu = m.plan(qc, kc, vc)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert gpu.device.type == "cuda"
    gpu.validate(causal=True)
    for a, b in zip(fields(cpu), fields(gpu)):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b.cpu())
