"""The Triton last-queries profiles (kernels/last_queries_triton.py) against the PyTorch oracle they
replace on CUDA: ``A.sum(-2)`` and ``diagonal_sums(A)`` for ``A = last_queries_attention(q, k, n)``,
and the vertical_slash / flexprefill plans built from them.

On the CPU the kernels run in the Triton interpreter (conftest.py) with its small tiles (16-row
logit tiles, 32-key tiles, 8-row reduction steps), so the shapes are small and still span several
tiles of every kind. Float32 inputs: within 1e-5 (abs and rel) of the oracle. On CUDA machines the
same tests run compiled on "cuda" tensors; the GPU twins at the end run bf16 at SmolLM2's heads.
"""

import math

import pytest
import torch

import sparseattn.methods.flexprefill as fmod
import sparseattn.methods.vertical_slash as vmod
from sparseattn.methods import get_method
from sparseattn.methods.base import diagonal_sums, last_queries_attention, pool_blocks

from ..conftest import HAS_CUDA, requires_cuda, triton_importable

pytestmark = pytest.mark.skipif(not triton_importable(), reason="triton is not importable")

DEVICE = "cuda" if HAS_CUDA else "cpu"


def _kernel():
    from sparseattn.kernels import last_queries_triton

    return last_queries_triton


def oracle(q, k, n_last):
    a = last_queries_attention(q.float(), k.float(), n_last)
    return a.sum(-2), diagonal_sums(a)


def check(B, Hq, Hkv, Lq, Lk, D, n_last, *, dtype=torch.float32, scale=1.0, seed=0, atol=1e-5, rtol=1e-5,
          config=None):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, Hq, Lq, D, generator=g) * scale).to(dtype).to(DEVICE)
    k = (torch.randn(B, Hkv, Lk, D, generator=g) * scale).to(dtype).to(DEVICE)
    col, diag = _kernel().last_queries_profiles_triton(q, k, n_last, config=config)
    # The oracle on the same (rounded) values in float32.
    ref_col, ref_diag = oracle(q, k, n_last)
    for got, want in ((col, ref_col), (diag, ref_diag)):
        assert got.dtype == torch.float32 and got.shape == (B, Hq, Lk) and got.is_contiguous()
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    return col, diag


# (B, Hq, Hkv, Lq, Lk, D, n_last)
CASES = [
    (1, 3, 1, 100, 100, 32, 1),  # P = 1, GQA group 3
    (1, 2, 2, 100, 100, 32, 16),  # P = 16, GQA group 1
    (2, 3, 1, 130, 130, 64, 64),  # P = 64 (4 logit row tiles), batch 2, Lk not a multiple of 32
    (2, 2, 2, 70, 203, 64, 64),  # Lq < Lk: bottom-right alignment
    (1, 3, 1, 20, 90, 32, 64),  # Lq < n_last: P = Lq = 20 (a partial row tile and reduction step)
    (1, 2, 1, 90, 60, 32, 64),  # P > Lk: the first 4 rows see no key (rows of 0)
    (1, 1, 1, 10, 10, 32, 64),  # one (partial) key tile
    (1, 1, 1, 45, 1, 32, 16),  # one key
    (1, 2, 1, 50, 77, 24, 40),  # D = 24: padded feature columns
]


@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,n_last", CASES)
def test_matches_oracle(B, Hq, Hkv, Lq, Lk, D, n_last):
    check(B, Hq, Hkv, Lq, Lk, D, n_last)


def test_large_logits_and_other_tiles():
    # logits ~ +-60 move the row max across key tiles (the log-sum-exp merge); then 32 x 16 tiles.
    check(1, 2, 1, 100, 150, 32, 64, scale=2.5, atol=1e-5, rtol=1e-4)
    check(1, 3, 1, 100, 150, 32, 64, config=(32, 16, 4, 16, 64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(dtype):
    # 16-bit inputs: exact products, fp32 accumulation: the oracle on the same values in float32.
    check(1, 3, 1, 80, 100, 32, 64, dtype=dtype)


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 100, 2, 32, generator=g).to(DEVICE).transpose(1, 2)  # [B, H, L, D] view of [B, L, H, D]
    k = torch.randn(1, 120, 1, 64, generator=g).to(DEVICE)[..., ::2].transpose(1, 2)
    col, diag = _kernel().last_queries_profiles_triton(q, k, 16)
    ref_col, ref_diag = oracle(q, k, 16)
    torch.testing.assert_close(col, ref_col, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(diag, ref_diag, atol=1e-5, rtol=1e-5)


def test_scratch_chunks_and_determinism(monkeypatch):
    # A scratch of 2 pairs: three launches of (batch, head) pairs; same bits as one launch.
    whole = check(2, 3, 1, 60, 70, 32, 16, seed=4)
    monkeypatch.setattr(_kernel(), "SCRATCH_ELEMENTS", 2 * 16 * 96)
    chunked = check(2, 3, 1, 60, 70, 32, 16, seed=4)
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)


@pytest.mark.parametrize("block_n,pool_block,Lk", [(32, 32, 150), (32, 32, 64), (32, 48, 150)])
def test_pooled_keys(block_n, pool_block, Lk, monkeypatch):
    """``pool_block``: the keys' block means, from the logits launch when its key tile is the block
    (a partial last block averages its real rows; scratch chunks of pairs: each key head pooled
    once), else from a pooling launch; the profiles are the same bits as without."""
    g = torch.Generator().manual_seed(Lk)
    q = torch.randn(2, 6, 80, 32, generator=g).to(DEVICE)
    k = torch.randn(2, 2, Lk, 32, generator=g).to(DEVICE)
    config = (16, block_n, 4, 8, 32)
    col, diag = _kernel().last_queries_profiles_triton(q, k, 16, config=config)
    monkeypatch.setattr(_kernel(), "SCRATCH_ELEMENTS", 2 * 16 * 160)  # pairs in chunks of 2
    col2, diag2, k_pool = _kernel().last_queries_profiles_triton(q, k, 16, config=config, pool_block=pool_block)
    assert torch.equal(col, col2) and torch.equal(diag, diag2)
    want = pool_blocks(k.cpu(), pool_block)
    assert k_pool.dtype == torch.float32 and k_pool.shape == want.shape
    torch.testing.assert_close(k_pool.cpu(), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="pool_block"):
        _kernel().last_queries_profiles_triton(q, k, 16, pool_block=0)


@pytest.mark.parametrize("Lk,sink,local", [(150, 30, 100), (150, 0, 1), (40, 64, 64)])
def test_forced_entries_and_out(Lk, sink, local):
    """``sink_columns`` / ``local_diagonals`` (vertical-slash's forced entries): +inf on the first
    ``sink`` column sums and the last ``local`` diagonal sums (none, some or all of a row), the
    rest as without; ``out`` receives both profiles stacked."""
    g = torch.Generator().manual_seed(Lk)
    q = torch.randn(2, 3, 90, 32, generator=g).to(DEVICE)
    k = torch.randn(2, 1, Lk, 32, generator=g).to(DEVICE)
    f = _kernel().last_queries_profiles_triton
    col, diag = f(q, k, 16)
    out = torch.full((2, 2, 3, Lk), float("nan"), device=DEVICE)
    got = f(q, k, 16, sink_columns=sink, local_diagonals=local, out=out)
    assert got[0].data_ptr() == out.data_ptr() and got[1].data_ptr() == out[1].data_ptr()
    j, inf = torch.arange(Lk, device=DEVICE), torch.tensor(float("inf"), device=DEVICE)
    want = torch.stack((torch.where(j < sink, inf, col), torch.where(j >= Lk - local, inf, diag)))
    assert torch.equal(out, want)
    empty = f(q[:, :, :0], k, 16, sink_columns=sink, local_diagonals=local)  # no query: zeros, forced entries
    forced_only = torch.stack((torch.where(j < sink, inf, 0.0), torch.where(j >= Lk - local, inf, 0.0)))
    assert torch.equal(torch.stack(empty), forced_only.view(2, 1, 1, Lk).expand(2, 2, 3, Lk))
    with pytest.raises(ValueError, match="out"):
        f(q, k, 16, out=out[:, :, :2])
    with pytest.raises(ValueError, match="sink_columns"):
        f(q, k, 16, sink_columns=-1)


def test_empty_and_bad_inputs():
    f = _kernel().last_queries_profiles_triton
    q, k = torch.randn(1, 2, 40, 16, device=DEVICE), torch.randn(1, 1, 40, 16, device=DEVICE)
    col, diag = f(q[:, :, :0], k, 8)
    assert col.shape == diag.shape == (1, 2, 40) and not col.any() and not diag.any()
    assert f(q, k[:, :, :0], 8)[0].shape == (1, 2, 0)
    bad = [
        (dict(q=q[0]), "4-d"),
        (dict(k=torch.randn(1, 1, 40, 8)), "head_dim"),
        (dict(k=torch.randn(1, 3, 40, 16)), "multiple of key heads"),
        (dict(q=q.double(), k=k.double()), "dtype"),
        (dict(k=k.half()), "dtype"),
        (dict(n_last=0), "n_last"),
        (dict(n_last=2.0), "n_last"),
        (dict(config=(16, 24, 4, 8, 32)), "powers of two"),
        (dict(config=(8, 16, 4, 8, 32)), "powers of two"),
    ]
    for override, match in bad:
        args = dict(q=q, k=k, n_last=8)
        args.update(override)
        with pytest.raises(ValueError, match=match):
            f(args.pop("q"), args.pop("k"), args.pop("n_last"), **args)


# ----------------------------------------------------------------------------- method plans
def planted_qkv(B, Hq, Hkv, L, D, columns, offset, *, c_col=12.0, c_diag=10.0, seed=0):
    """Every query sees key ``columns[b][hk]`` with logit ``c_col`` and key ``pos - offset`` with
    logit ``c_diag``; the other logits are ``c_diag * cos`` of random unit vectors (about
    ``N(0, (c_diag / sqrt(D))**2)``). Rows carry ~0.87 on the column and ~0.12 on the diagonal, so
    column / diagonal / background profiles are far apart (no near-ties for either path)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(B, Hkv, L, D, generator=g)
    r[..., 0] = 0  # dimension 0 belongs to the column
    r = r / r.norm(dim=-1, keepdim=True)
    k = r.clone()
    for b in range(B):
        for hk in range(Hkv):
            k[b, hk, columns[b][hk]] = 0
            k[b, hk, columns[b][hk], 0] = 1
    G = Hq // Hkv
    q = 0.05 * torch.randn(B, Hq, L, D, generator=g)
    q[..., 0] += c_col * math.sqrt(D)
    q[:, :, offset:] += c_diag * math.sqrt(D) * r.repeat_interleave(G, 1)[:, :, : L - offset]
    v = torch.randn(B, Hkv, L, D, generator=g)
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


def same_plan(a, b):
    for name in ("kv_counts", "kv_indices", "extra_counts", "extra_indices"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert torch.equal(x.cpu(), y.cpu()), name


def plans_both_paths(monkeypatch, module, method, q, k, v):
    """(torch-path plan, triton-path plan) of ``method._plan`` (no graph replay), counting kernel calls."""
    mod = _kernel()
    real, calls = mod.last_queries_profiles_triton, []
    monkeypatch.setattr(mod, "last_queries_profiles_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(module, "use_triton_estimator", lambda x: False)
    ref = method._plan(q, k, v, causal=True, layer_idx=None)
    assert calls == []
    monkeypatch.setattr(module, "use_triton_estimator", lambda x: True)
    plan = method._plan(q, k, v, causal=True, layer_idx=None)
    assert calls == [1]
    plan.validate(causal=True)
    return ref, plan


# Vertical-slash, L = 300, P = 64: the column at 110..120 is not a sink (< 30); the diagonal at
# offset 192 (6 blocks: off by one, it would reach other blocks) reaches keys 44..107 and the
# last-row index t = 107 (slash score ~7.5); the column spreads ~0.87 over each diagonal
# t = j* .. j* + 63 < 200, before the 100 forced local ones. Budgets: forced + the column + its
# 64 diagonal keys (each ~0.11, background < 0.01); forced + the planted diagonal only.
VS_COLUMNS = [[110, 114, 120], [117, 111, 113]]


@pytest.mark.parametrize("B,Hq,Hkv", [(2, 3, 1), (1, 2, 2)])
def test_vertical_slash_plan(monkeypatch, B, Hq, Hkv):
    L, D, P = 300, 32, 64
    q, k, v = planted_qkv(B, Hq, Hkv, L, D, VS_COLUMNS, 192, seed=B)
    method = get_method("vertical_slash", block_size=32, last_q=P, vertical_size=30 + 1 + P,
                        slash_size=100 + 1)
    ref, plan = plans_both_paths(monkeypatch, vmod, method, q, k, v)
    same_plan(ref, plan)
    assert plan.extra_counts is not None and int(plan.extra_counts.max()) > 30  # the planted keys are extras


# FlexPrefill, L = 256, block 32 (P = 32): column blocks 1, 2, 5, 6; the diagonal at offset 128
# reaches key block 3 on the last query block and is slash block 3; min_budget = 3 blocks, tau = 0
# (no query-aware head), gamma = 0.5 (the cover count lands far from a cumulative-sum value).
FP_COLUMNS = [[32, 64, 160], [192, 64, 32]]


@pytest.mark.parametrize("B,Hq,Hkv", [(2, 3, 1), (1, 3, 3)])
def test_flexprefill_plan(monkeypatch, B, Hq, Hkv):
    L, D, bs = 256, 32, 32
    q, k, v = planted_qkv(B, Hq, Hkv, L, D, FP_COLUMNS, 128, seed=B)
    method = get_method("flexprefill", block_size=bs, gamma=0.5, tau=0.0, min_budget=3 * bs)
    ref, plan = plans_both_paths(monkeypatch, fmod, method, q, k, v)
    same_plan(ref, plan)
    bm = plan.block_mask()
    assert bm[:, :, -1, 3].all() and bm[:, :, -1, 0].all()  # the diagonal's key block, the sink block


def test_float64_stays_on_the_torch_path(monkeypatch):
    mod = _kernel()
    monkeypatch.setattr(mod, "last_queries_profiles_triton", lambda *a, **kw: pytest.fail("kernel called"))
    monkeypatch.setattr(vmod, "use_triton_estimator", lambda x: True)
    q, k, v = planted_qkv(1, 2, 1, 300, 32, VS_COLUMNS, 192)
    get_method("vertical_slash", block_size=32)._plan(q.double(), k.double(), v.double(), causal=True,
                                                      layer_idx=None)


# ----------------------------------------------------------------------------- GPU twins
# bf16 inputs; the oracle runs on the same bf16 values in float32 (no TF32: torch's default), so
# both sum the same products in fp32 and differ in order and in exp2 / log2 rounding: profiles
# within 1e-4 abs + 1e-4 rel (column sums are at most P, probabilities at most 1).
@requires_cuda
@pytest.mark.parametrize("Hq,Hkv,Lq,Lk,D,n_last", [
    (9, 3, 8192, 8192, 64, 64),  # SmolLM2 heads at 8K, vertical_slash's P
    (9, 3, 8192, 8192, 64, 128),  # flexprefill's P
    (9, 3, 3000, 8197, 64, 128),  # Lq < Lk, ragged
    (8, 2, 4099, 4099, 128, 100),  # D = 128, P not a power of two
])
def test_cuda_bf16_matches_oracle(Hq, Hkv, Lq, Lk, D, n_last):
    check(1, Hq, Hkv, Lq, Lk, D, n_last, dtype=torch.bfloat16, atol=1e-4, rtol=1e-4)


@requires_cuda
def test_cuda_fp32_and_graph_capture():
    check(2, 4, 2, 2000, 2100, 64, 128)  # exact (ieee) fp32 dot products
    f = _kernel().last_queries_profiles_triton
    q = torch.randn(1, 9, 4096, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 3, 4096, 64, device="cuda", dtype=torch.bfloat16)
    first = f(q, k, 128)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = f(q, k, 128)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(out, first):
        assert torch.equal(a, b)


@requires_cuda
@pytest.mark.parametrize("name", ["vertical_slash", "flexprefill"])
def test_cuda_plans_equal_cpu_plans(name):
    """bf16 planted inputs at 9/3/64, L = 8192: the CUDA plan (Triton profiles) equals the CPU plan
    (PyTorch profiles) on the same values."""
    L, D = 8192, 64
    if name == "vertical_slash":
        columns, offset = [[3000, 3010, 3020]], 4032  # diagonal keys 4096..4159, t = 4159; spreads t < 3100
        method = get_method(name, vertical_size=30 + 1 + 64, slash_size=100 + 1)
    else:
        columns, offset = [[1024, 2048, 3072]], 2048  # blocks 8, 16, 24; the diagonal: key block 47
        method = get_method(name, gamma=0.5, tau=0.0, min_budget=3 * 128)
    q, k, v = planted_qkv(1, 9, 3, L, D, columns, offset, c_col=14.0, c_diag=12.0)
    q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
    assert vmod.use_triton_estimator(q)
    plan = method._plan(q, k, v, causal=True, layer_idx=None)
    ref = method._plan(q.cpu(), k.cpu(), v.cpu(), causal=True, layer_idx=None)
    same_plan(ref, plan)
