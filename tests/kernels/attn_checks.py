"""Shared checks for attention kernels: the tolerance rule of CONVENTIONS.md.

``ref``: the plan's element mask, dense masked attention in float64 on the CPU;
``pt``: the same computation in the input dtype; ``out``: the kernel under test.
Pass when nothing is NaN/Inf (outside rows that must be) and
``max|out - ref| <= factor * max|pt - ref| + 1e-5``.
"""

import torch

from sparseattn.kernels.reference import attention_reference


def make_qkv(B, Hq, Hkv, Lq, Lk, D, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g)
    k = torch.randn(B, Hkv, Lk, D, generator=g)
    v = torch.randn(B, Hkv, Lk, D, generator=g)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def references(q, k, v, plan, causal=True, scale=None, ref_device="cpu"):
    """(ref out, ref lse) in float64 and pt out in the input dtype."""
    dev = torch.device(ref_device)
    p = None if plan is None else plan.to(dev)
    ref, ref_lse = attention_reference(q.to(dev, torch.float64), k.to(dev, torch.float64),
                                       v.to(dev, torch.float64), p, causal=causal, scale=scale,
                                       return_lse=True)
    pt = attention_reference(q.to(dev), k.to(dev), v.to(dev), p, causal=causal, scale=scale,
                             compute_dtype=q.dtype)
    return ref, ref_lse, pt


def assert_tolerance(out, lse, ref, ref_lse, pt, factor=2.0):
    out = out.to(ref.device, torch.float64)
    assert torch.isfinite(out).all(), "kernel output has NaN/Inf"
    err = (out - ref).abs().max().item() if out.numel() else 0.0
    base = (pt.to(torch.float64) - ref).abs().max().item() if out.numel() else 0.0
    assert err <= factor * base + 1e-5, f"max|out-ref|={err:.3e} > {factor}*max|pt-ref|={base:.3e} + 1e-5"
    if lse is not None:
        lse = lse.to(ref.device, torch.float64)
        assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "fully masked rows differ"
        fin = torch.isfinite(ref_lse)
        if fin.any():
            lerr = (lse[fin] - ref_lse[fin]).abs().max().item()
            # lse is fp32 in every implementation: its error scales with |lse| and the input rounding.
            assert lerr <= 2 * base + 1e-4 * (1 + ref_lse[fin].abs().max().item()), f"lse error {lerr:.3e}"
