"""block_sparse_attention: both backends against float64 masked attention (tolerance rule).

On a CPU machine the Triton kernel runs in the interpreter (conftest sets TRITON_INTERPRET=1);
on a GPU the same tests run the compiled kernel. Larger GPU-only shapes are at the end.
"""

import math
import os
import subprocess
import sys

import pytest
import torch

from sparseattn import BlockPlan, block_sparse_attention
from sparseattn.kernels.reference import attention_reference

from ..conftest import HAS_CUDA, requires_cuda, triton_importable
from .attn_checks import assert_tolerance, make_qkv, references
from .plans import make_plan, random_plan

DEVICE = "cuda" if HAS_CUDA else "cpu"
needs_triton = pytest.mark.skipif(not triton_importable(), reason="triton is not installed (pip install triton)")
BACKENDS = ["reference", pytest.param("triton", marks=needs_triton)]
LOW_PRECISION = torch.bfloat16


def run_case(backend, B, Hq, Hkv, Lq, Lk, D, *, dtype=LOW_PRECISION, plan_kind="random", plan_heads=None,
             plan_batch=None, bq=64, bk=64, causal=True, seed=0, scale=None):
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, D, dtype, DEVICE, seed=seed)
    plan = make_plan(plan_kind, plan_batch or B, plan_heads or Hq, Lq, Lk, bq, bk, device=DEVICE, seed=seed,
                     causal=causal)
    out, lse = block_sparse_attention(q, k, v, plan, causal=causal, backend=backend, return_lse=True, scale=scale)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (B, Hq, Lq)
    ref, ref_lse, pt = references(q, k, v, plan, causal=causal, scale=scale)
    assert_tolerance(out, lse, ref, ref_lse, pt)
    return out, lse


LENGTHS = [(1, 1), (63, 63), (127, 129), (129, 127), (333, 444), (444, 333), (1, 200), (200, 1)]
LENGTH_CASES = [(lq, lk, kind) for lq, lk in LENGTHS for kind in ("none", "random", "band", "extra")]
LENGTH_CASES.append((1025, 1025, "random"))  # the longest CPU case once: the interpreter is slow


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Lq,Lk,plan_kind", LENGTH_CASES)
def test_lengths_not_multiple_of_block(backend, Lq, Lk, plan_kind):
    run_case(backend, 1, 2, 1, Lq, Lk, 32, plan_kind=plan_kind)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("plan_heads", ["q", "kv", "one"])
def test_gqa_and_plan_head_sharing(backend, group, plan_heads):
    Hkv = 2 if group <= 3 else 1
    Hq = Hkv * group
    H = {"q": Hq, "kv": Hkv, "one": 1}[plan_heads]
    run_case(backend, 2, Hq, Hkv, 150, 190, 16, plan_heads=H, plan_kind="random", plan_batch=2)


@needs_triton
@pytest.mark.parametrize("group", [2, 3, 8])
@pytest.mark.parametrize("plan_kind,plan_heads", [("none", "q"), ("random", "kv"), ("band", "one"), ("extra", "kv")])
def test_gqa_packed_programs_match_unpacked(group, plan_kind, plan_heads):
    # Packing the heads of a group into one program computes the same function: both pass the
    # tolerance rule. In the interpreter they also agree to about the last bit (numpy's matmul may
    # round a packed tile's dot products differently from the per-head ones: seen with numpy 2.4:
    # 1 fp32 ulp of the LSE, 1 bf16 ulp of a few outputs); on a GPU the packed tile puts rows in
    # other MMA lanes, which may change the last bits of the fp32 accumulators.
    from sparseattn.kernels.prefill_triton import attention_triton

    Hkv = 2 if group <= 3 else 1
    Hq = Hkv * group
    q, k, v = make_qkv(2, Hq, Hkv, 100, 120, 32, LOW_PRECISION, DEVICE, seed=group)
    H = {"q": Hq, "kv": Hkv, "one": 1}[plan_heads]
    plan = make_plan(plan_kind, 2, H, 100, 120, 64, 64, device=DEVICE, seed=group)
    packed = attention_triton(q, k, v, plan, pack_gqa=True, return_lse=True)
    plain = attention_triton(q, k, v, plan, pack_gqa=False, return_lse=True)
    ref, ref_lse, pt = references(q, k, v, plan)
    assert_tolerance(packed[0], packed[1], ref, ref_lse, pt)
    assert_tolerance(plain[0], plain[1], ref, ref_lse, pt)
    if not HAS_CUDA:
        torch.testing.assert_close(packed[1], plain[1], rtol=4e-6, atol=0.0)  # a few fp32 ulps
        torch.testing.assert_close(packed[0].float(), plain[0].float(), rtol=2.0**-7, atol=1e-6)  # one bf16 ulp


PAIRED_CASES = [(kind, True, LOW_PRECISION, False) for kind in ("random", "all", "band", "extra")]
PAIRED_CASES += [("random", False, LOW_PRECISION, False), ("extra", False, LOW_PRECISION, False),
                 ("random", True, torch.float16, False), ("random", True, LOW_PRECISION, True),
                 ("band", True, LOW_PRECISION, True)]


@needs_triton
@pytest.mark.parametrize("plan_kind,causal,dtype,packed", PAIRED_CASES)
def test_paired_block_walk_matches_single_blocks(plan_kind, causal, dtype, packed):
    # Plans whose blocks are one key tile wide walk their unmasked blocks two per step; both walks
    # pass the tolerance rule and agree closely (the paired step rescales once per two tiles).
    # Random plans give rows with odd and even counts, and rows with one or no unmasked block.
    # ``packed``: a plan shared by each GQA group, its heads packed into one program.
    from sparseattn.kernels.prefill_triton import attention_triton, default_config

    D = 32
    bk = default_config(D, dtype)[1]
    q, k, v = make_qkv(2, 4, 2, 3 * bk + 7, 4 * bk + 3, D, dtype, DEVICE, seed=11)
    plan = make_plan(plan_kind, 2, 2 if packed else 4, q.shape[2], k.shape[2], bk, bk, device=DEVICE, seed=3,
                     causal=causal)
    paired = attention_triton(q, k, v, plan, causal=causal, pair_blocks=True, return_lse=True, pack_gqa=packed)
    single = attention_triton(q, k, v, plan, causal=causal, pair_blocks=False, return_lse=True, pack_gqa=packed)
    ref, ref_lse, pt = references(q, k, v, plan, causal=causal)
    assert_tolerance(paired[0], paired[1], ref, ref_lse, pt)
    assert_tolerance(single[0], single[1], ref, ref_lse, pt)
    torch.testing.assert_close(paired[1], single[1], rtol=1e-5, atol=1e-5)
    # p is rounded to bf16 against a different running max: a few bf16 ulps of the output apart.
    torch.testing.assert_close(paired[0].float(), single[0].float(), rtol=2.0**-6, atol=2.0**-6)


@needs_triton
@pytest.mark.parametrize("plan_kind", ["random", "all"])
def test_paired_walk_on_64_by_32_plans(plan_kind):
    # SALE's official tiles: 64-row blocks over 32-key tiles, walked in pairs by default at D=64 on
    # the GPU (_SMALL_BLOCK_RULES); both walks pass the tolerance rule and agree closely.
    from sparseattn.kernels.prefill_triton import attention_triton

    q, k, v = make_qkv(1, 4, 2, 200, 230, 64, LOW_PRECISION, DEVICE, seed=5)
    plan = make_plan(plan_kind, 1, 4, 200, 230, 64, 32, device=DEVICE, seed=6)
    paired = attention_triton(q, k, v, plan, pair_blocks=True, return_lse=True)
    single = attention_triton(q, k, v, plan, pair_blocks=False, return_lse=True)
    default = attention_triton(q, k, v, plan, return_lse=True)
    ref, ref_lse, pt = references(q, k, v, plan)
    for out, lse in (paired, single, default):
        assert_tolerance(out, lse, ref, ref_lse, pt)
    torch.testing.assert_close(paired[1], single[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(paired[0].float(), single[0].float(), rtol=2.0**-6, atol=2.0**-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_shared_across_batch(backend):
    run_case(backend, 3, 2, 1, 130, 130, 32, plan_batch=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [16, 64, 128])
def test_head_dims(backend, D):
    run_case(backend, 1, 2, 1, 100, 140, D)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("causal", [True, False])
def test_dtypes_and_causality(backend, dtype, causal):
    run_case(backend, 1, 2, 1, 96, 150, 32, dtype=dtype, causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bq,bk", [(16, 16), (32, 128), (128, 32), (64, 64)])
def test_block_sizes(backend, bq, bk):
    run_case(backend, 1, 2, 1, 200, 230, 32, bq=bq, bk=bk)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_scale(backend):
    run_case(backend, 1, 2, 2, 70, 70, 32, scale=0.3)


def test_float64_reference_and_triton_refuses_it():
    q, k, v = make_qkv(1, 2, 1, 50, 60, 32, torch.float64, "cpu")
    plan = random_plan(1, 2, 50, 60, 16, 16)
    out = block_sparse_attention(q, k, v, plan, backend="reference")
    mask = plan.to_dense_mask(True).expand(1, 2, 50, 60)
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) / math.sqrt(32)
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    torch.testing.assert_close(out, p @ v.repeat_interleave(2, 1), rtol=1e-12, atol=1e-12)
    if triton_importable():
        with pytest.raises(NotImplementedError, match="float16, bfloat16 and float32"):
            block_sparse_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), plan.to(DEVICE), backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_blocks_plan_equals_dense(backend):
    q, k, v = make_qkv(1, 2, 1, 200, 200, 32, LOW_PRECISION, DEVICE)
    dense = block_sparse_attention(q, k, v, None, backend=backend)
    allp = BlockPlan.dense(block_q=64, block_k=64, q_len=200, k_len=200, device=DEVICE)
    full = block_sparse_attention(q, k, v, allp, backend=backend)
    ref, _, pt = references(q, k, v, None)
    assert_tolerance(full, None, ref, None, pt)
    assert_tolerance(dense, None, ref, None, pt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_are_zero(backend):
    # Lq > Lk: the first Lq - Lk rows sit before position 0 and see nothing; an empty plan
    # masks everything.
    q, k, v = make_qkv(1, 2, 1, 90, 40, 32, LOW_PRECISION, DEVICE)
    out, lse = block_sparse_attention(q, k, v, None, backend=backend, return_lse=True)
    assert torch.equal(out[:, :, :50], torch.zeros_like(out[:, :, :50]))
    assert torch.isneginf(lse[:, :, :50]).all() and torch.isfinite(lse[:, :, 50:]).all()
    empty = make_plan("empty", 1, 2, 90, 40, 32, 32, device=DEVICE)
    out, lse = block_sparse_attention(q, k, v, empty, backend=backend, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_key_with_very_negative_logit_gets_weight_one(backend):
    # Query 0 (causal, Lq == Lk) sees only key 0; its logit is hugely negative. A finite mask
    # sentinel would give that key a weight below 1.
    q, k, v = make_qkv(1, 1, 1, 64, 64, 32, torch.float32, DEVICE)
    q[0, 0, 0] = -30.0 * k[0, 0, 0] / k[0, 0, 0].norm()
    k = k * 10
    out = block_sparse_attention(q, k, v, None, backend=backend)
    assert torch.equal(out[0, 0, 0], v[0, 0, 0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Lq,Lk", [(300, 300), (200, 331)])
def test_many_extra_columns(backend, Lq, Lk):
    # Up to 90 extra columns per row: several whole tiles of columns every row of the tile sees
    # (the kernel's unmasked extra steps), then a partial tile and columns cut by the causal edge
    # or in the future (its masked steps).
    from .plans import with_extra_columns

    B, Hq, Hkv, D = 1, 4, 2, 32
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, D, LOW_PRECISION, DEVICE, seed=5)
    plan = with_extra_columns(random_plan(B, Hkv, Lq, Lk, 32, 32, density=0.2, seed=5, device=DEVICE), n_cols=90,
                              seed=5)
    assert int(plan.extra_counts.max()) == 90
    out, lse = block_sparse_attention(q, k, v, plan, backend=backend, return_lse=True)
    ref, ref_lse, pt = references(q, k, v, plan, causal=True)
    assert_tolerance(out, lse, ref, ref_lse, pt)


EXTRA_VARIANTS = [(16, 1, False, False), (16, 2, True, True), (32, 2, True, False), (32, 1, False, True),
                  (64, 2, True, True)]


@needs_triton
@pytest.mark.parametrize("extra_config", EXTRA_VARIANTS, ids=lambda c: "n{}-s{}-pair{:d}-pad{:d}".format(*c))
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("seen_by_all", [False, True])
def test_extra_column_walk_variants(extra_config, packed, seen_by_all):
    # Every way of walking the extra columns (tile width, stages, two tiles per step, the partial
    # tile with padding-only masks) computes the same function: each passes the tolerance rule and
    # all agree closely. Rows hold 0 to 90 columns: several whole tiles, a partial one, and either
    # columns cut by the causal edge and past it, or (seen_by_all) only columns every query of the
    # block sees, where the partial tile takes the padding-only path.
    from sparseattn.kernels.prefill_triton import attention_triton

    from .plans import with_extra_columns

    B, Hq, Hkv, D, Lq, Lk = 1, 4, 2, 32, 200, 331
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, D, LOW_PRECISION, DEVICE, seed=8)
    plan = with_extra_columns(random_plan(B, Hkv, Lq, Lk, 32, 32, density=0.2, seed=8, device=DEVICE), n_cols=90,
                              seed=8, seen_by_all=seen_by_all)
    out, lse = attention_triton(q, k, v, plan, return_lse=True, pack_gqa=packed, extra_config=extra_config)
    base, base_lse = attention_triton(q, k, v, plan, return_lse=True, pack_gqa=packed,
                                      extra_config=(32, 1, False, False))
    ref, ref_lse, pt = references(q, k, v, plan, causal=True)
    assert_tolerance(out, lse, ref, ref_lse, pt)
    torch.testing.assert_close(lse, base_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.float(), base.float(), rtol=2.0**-6, atol=2.0**-6)


@needs_triton
def test_extra_column_tile_width_is_checked():
    from sparseattn.kernels.prefill_triton import attention_triton

    from .plans import with_extra_columns

    q, k, v = make_qkv(1, 2, 1, 40, 40, 32, LOW_PRECISION, DEVICE)
    plan = with_extra_columns(random_plan(1, 1, 40, 40, 32, 32, seed=1, device=DEVICE), n_cols=4)
    with pytest.raises(ValueError, match="EXTRA_N must be a power of two"):
        attention_triton(q, k, v, plan, extra_config=(48, 2, False, True))


@needs_triton
def test_register_cap_keeps_the_result():
    # The register cap (max_registers; on CUDA the launch's maxnreg, which the extra-column rule at
    # D=64 sets) changes how the compiler allocates, not what is computed: same bits with and
    # without it, and the compiled kernel stays within the cap.
    from sparseattn.kernels.prefill_triton import attention_triton, last_compiled_kernel

    from .plans import with_extra_columns

    B, Hq, Hkv, D, Lq, Lk = 1, 2, 1, 64, 160, 260
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, D, LOW_PRECISION, DEVICE, seed=4)
    plan = with_extra_columns(random_plan(B, Hkv, Lq, Lk, 64, 64, density=0.3, seed=4, device=DEVICE), n_cols=70,
                              seed=4)
    free, free_lse = attention_triton(q, k, v, plan, return_lse=True, max_registers=0,
                                      extra_config=(64, 2, False, True))
    capped, capped_lse = attention_triton(q, k, v, plan, return_lse=True, max_registers=128,
                                          extra_config=(64, 2, False, True))
    if DEVICE == "cuda":
        assert last_compiled_kernel().n_regs <= 128
    assert torch.equal(capped, free) and torch.equal(capped_lse, free_lse)
    ref, ref_lse, pt = references(q, k, v, plan, causal=True)
    assert_tolerance(capped, capped_lse, ref, ref_lse, pt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    B, L, Hq, Hkv, D = 1, 140, 4, 2, 32
    g = torch.Generator().manual_seed(3)
    packed = torch.randn(B, L, Hq + 2 * Hkv, D, generator=g).to(DEVICE, LOW_PRECISION)  # [B, L, heads, D]
    q = packed[:, :, :Hq].transpose(1, 2)
    k = packed[:, :, Hq:Hq + Hkv].transpose(1, 2)
    v = packed[:, :, Hq + Hkv:].transpose(1, 2)
    assert not q.is_contiguous()
    plan = random_plan(1, Hq, L, L, 64, 64, device=DEVICE)
    out = block_sparse_attention(q, k, v, plan, backend=backend)
    out_c = block_sparse_attention(q.contiguous(), k.contiguous(), v.contiguous(), plan, backend=backend)
    assert torch.equal(out, out_c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    q, k, v = make_qkv(2, 3, 1, 170, 170, 32, LOW_PRECISION, DEVICE)
    plan = make_plan("extra", 2, 3, 170, 170, 64, 64, device=DEVICE)
    a = block_sparse_attention(q, k, v, plan, backend=backend, return_lse=True)
    b = block_sparse_attention(q, k, v, plan, backend=backend, return_lse=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_stays_in_affected_rows(backend, where):
    # Poison one token; rows that attend it (and only those) may be non-finite.
    Lq = Lk = 130
    q, k, v = make_qkv(1, 2, 1, Lq, Lk, 32, LOW_PRECISION, DEVICE)
    pos = 70
    {"q": q, "k": k, "v": v}[where][0, 0, pos, 3] = float("nan")
    plan = make_plan("random", 1, 2, Lq, Lk, 32, 32, device=DEVICE)
    out = block_sparse_attention(q, k, v, plan, backend=backend)
    ref = attention_reference(q.double().cpu(), k.double().cpu(), v.double().cpu(), plan.to("cpu"))
    bad_rows = ~torch.isfinite(out.cpu()).all(-1)
    ref_bad = ~torch.isfinite(ref).all(-1)
    assert torch.equal(bad_rows, ref_bad)
    if where == "q":
        assert bad_rows.sum() == 1 and bad_rows[0, 0, pos]
    else:
        attending = plan.to_dense_mask(True).cpu()[..., pos].expand(1, 2, Lq)
        assert torch.equal(bad_rows, attending) and 0 < attending.sum() < 2 * Lq
    good = ~bad_rows
    pt = attention_reference(q.cpu(), k.cpu(), v.cpu(), plan.to("cpu"), compute_dtype=q.dtype)
    err = (out.cpu().double() - ref)[good].abs().max()
    base = (pt.double() - ref)[good].abs().max()
    assert err <= 2 * base + 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_lengths(backend):
    for shape_q, shape_k in [((0, 2, 10, 32), (0, 1, 10, 32)), ((1, 2, 0, 32), (1, 1, 10, 32))]:
        q = torch.randn(shape_q, device=DEVICE, dtype=LOW_PRECISION)
        k = torch.randn(shape_k, device=DEVICE, dtype=LOW_PRECISION)
        out, lse = block_sparse_attention(q, k, k.clone(), backend=backend, return_lse=True)
        assert out.shape == q.shape and lse.shape == q.shape[:3]
    # No keys at all: every row is fully masked.
    q = torch.randn(1, 2, 5, 32, device=DEVICE, dtype=LOW_PRECISION)
    k = torch.randn(1, 1, 0, 32, device=DEVICE, dtype=LOW_PRECISION)
    out, lse = block_sparse_attention(q, k, k.clone(), backend=backend, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Lq,Lk", [(400, 400), (333, 465)])
def test_wide_band_plans_with_interior_blocks(backend, Lq, Lk):
    """Per-head bands wide enough that whole blocks lie inside the sink or inside every row's
    window (the kernel runs those without element masks), plus dense rows (no window)."""
    from sparseattn.methods.base import band_plan

    B, Hq, Hkv, D = 2, 4, 2, 32
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, D, LOW_PRECISION, DEVICE, seed=3)
    sink = torch.tensor([[64, 0, 100, 128], [32, 64, 0, 7]], device=DEVICE)
    window = torch.tensor([[200, 130, 64, 1], [96, 256, 500, 33]], device=DEVICE)
    nQ = -(-Lq // 32)
    dense_rows = (torch.arange(nQ, device=DEVICE) % 5 == 2).view(1, 1, nQ) & (torch.arange(Hq, device=DEVICE) == 1).view(1, Hq, 1)
    plan = band_plan(sink, window, block_size=32, q_len=Lq, k_len=Lk, dense_rows=dense_rows)
    out, lse = block_sparse_attention(q, k, v, plan, backend=backend, return_lse=True)
    ref, ref_lse, pt = references(q, k, v, plan)
    assert_tolerance(out, lse, ref, ref_lse, pt)


@needs_triton
def test_kernel_writes_every_element():
    from sparseattn.kernels.prefill_triton import attention_triton

    q, k, v = make_qkv(1, 2, 1, 150, 150, 32, LOW_PRECISION, DEVICE)
    plan = make_plan("band", 1, 2, 150, 150, 64, 64, device=DEVICE)
    poisoned = torch.full_like(q, float("nan"))
    out = attention_triton(q, k, v, plan, out=poisoned)
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------- bad inputs
def test_validation_messages():
    q, k, v = make_qkv(1, 4, 2, 64, 64, 32, torch.float32, "cpu")
    with pytest.raises(ValueError, match="multiple of KV heads"):
        block_sparse_attention(q, k[:, :1].expand(1, 3, 64, 32), v[:, :1].expand(1, 3, 64, 32))
    with pytest.raises(ValueError, match="head_dim mismatch"):
        block_sparse_attention(q, k[..., :16], v[..., :16])
    with pytest.raises(ValueError, match="share one dtype"):
        block_sparse_attention(q, k.half(), v.half())
    with pytest.raises(ValueError, match="one device"):
        block_sparse_attention(q, k.to("meta"), v.to("meta"))
    with pytest.raises(ValueError, match="4-D"):
        block_sparse_attention(q[0], k, v)
    with pytest.raises(ValueError, match="backend must be one of"):
        block_sparse_attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="scale must be"):
        block_sparse_attention(q, k, v, scale=-1.0)


def test_plan_for_another_shape_raises_with_hint():
    q, k, v = make_qkv(2, 4, 2, 64, 64, 32, torch.float32, "cpu")
    with pytest.raises(ValueError, match="q_len=100.*rebuild"):
        block_sparse_attention(q, k, v, random_plan(1, 4, 100, 64, 32, 32))
    with pytest.raises(ValueError, match="batch must be 1 or 2"):
        block_sparse_attention(q, k, v, random_plan(3, 4, 64, 64, 32, 32))
    with pytest.raises(ValueError, match="heads must be 1, Hkv=2 or Hq=4"):
        block_sparse_attention(q, k, v, random_plan(2, 3, 64, 64, 32, 32))
    with pytest.raises(TypeError, match="BlockPlan"):
        block_sparse_attention(q, k, v, "dense")


def test_auto_uses_reference_on_cpu(monkeypatch):
    from sparseattn.kernels.dispatch import choose_backend

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert choose_backend("auto", torch.randn(1, 1, 8, 32), None) == "reference"


@needs_triton
def test_forced_triton_says_why(monkeypatch):
    q = torch.randn(1, 1, 8, 32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        block_sparse_attention(q, q, q, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(1, 1, 8, 48, device=DEVICE)
    with pytest.raises(NotImplementedError, match="head_dim in"):
        block_sparse_attention(x, x, x, backend="triton")
    with pytest.raises(NotImplementedError, match="power of two"):
        block_sparse_attention(x[..., :32], x[..., :32], x[..., :32], random_plan(1, 1, 8, 8, 24, 24, device=DEVICE),
                               backend="triton")
    # auto on CPU never picks the interpreter: it is a test tool, not a fast path.
    assert block_sparse_attention(x, x, x).shape == x.shape


def test_import_and_cpu_path_without_triton(tmp_path):
    # A fresh interpreter where importing triton fails: sparseattn imports, the CPU path runs,
    # and forcing the Triton backend says why.
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, sparseattn\n"
        "q = torch.randn(1, 2, 16, 32)\n"
        "out = sparseattn.block_sparse_attention(q, q, q)\n"
        "assert torch.isfinite(out).all()\n"
        "try:\n"
        "    sparseattn.block_sparse_attention(q, q, q, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'triton is not importable' in str(e), e\n"
        "    print('ok')\n"
    )
    env = dict(os.environ)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


# ----------------------------------------------------------------------------- GPU-only, larger
@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("plan_kind", ["none", "random", "band", "extra"])
def test_gpu_medium_shapes(D, dtype, plan_kind):
    B, Hq, Hkv, Lq, Lk = 2, 8, 2, 2048 + 77, 2048 + 77
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, D, dtype, "cuda")
    bq = bk = 128
    plan = make_plan(plan_kind if plan_kind != "extra" else "random", B, Hq, Lq, Lk, bq, bk, device="cuda")
    if plan_kind == "extra":
        from .plans import with_extra_columns
        plan = with_extra_columns(random_plan(B, Hkv, Lq, Lk, bq, bk, density=0.2, device="cuda"), n_cols=40)
    out, lse = block_sparse_attention(q, k, v, plan, return_lse=True)
    ref, ref_lse, pt = references(q, k, v, plan, ref_device="cuda")
    assert_tolerance(out, lse, ref, ref_lse, pt)


def _rows_reference(q, k, v, plan, rows, causal=True):
    """float64 reference and input-dtype pt for a range of query rows (on the GPU)."""
    r0, r1 = rows
    Hq, Hkv = q.shape[1], k.shape[1]
    mask = (plan.to_dense_mask(causal, q_start=r0, q_end=r1) if plan is not None else
            BlockPlan.dense(block_q=128, block_k=128, q_len=q.shape[2], k_len=k.shape[2],
                            device=q.device).to_dense_mask(causal, q_start=r0, q_end=r1))
    if mask.shape[1] != Hq:
        mask = mask.repeat_interleave(Hq // mask.shape[1], 1)
    outs = []
    for dt in (torch.float64, q.dtype):
        kk = k.to(dt).repeat_interleave(Hq // Hkv, 1)
        vv = v.to(dt).repeat_interleave(Hq // Hkv, 1)
        s = (q[:, :, r0:r1].to(dt) @ kk.transpose(-1, -2)).float().to(dt) / math.sqrt(q.shape[-1])
        s = s.masked_fill(~mask, float("-inf"))
        p = torch.softmax(s.double() if dt == torch.float64 else s.float(), -1).nan_to_num(0.0).to(dt)
        outs.append((p @ vv).double())
    return outs


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("L", [32768, 131072 + 129])
def test_gpu_long_sequences(L):
    B, Hq, Hkv, D = 1, 4, 1, 128
    q, k, v = make_qkv(B, Hq, Hkv, L, L, D, torch.bfloat16, "cuda")
    plan = random_plan(B, Hq, L, L, 128, 128, density=0.1, device="cuda")
    for p in (None, plan):
        out = block_sparse_attention(q, k, v, p)
        for rows in ((0, 256), (L - 300, L)):
            ref, pt = _rows_reference(q, k, v, p, rows)
            got = out[:, :, rows[0]:rows[1]].double()
            assert torch.isfinite(got).all()
            err, base = (got - ref).abs().max().item(), (pt - ref).abs().max().item()
            assert err <= 2 * base + 1e-5, (L, rows, err, base)


@requires_cuda
@pytest.mark.gpu
def test_gpu_offsets_beyond_int32():
    # q holds more than 2**31 elements, so a 32-bit element offset would wrap for the last heads.
    B, Hq, Hkv, L, D = 2, 64, 8, 131072 + 1000, 128
    assert B * Hq * L * D > 2**31
    q = torch.randn(B, Hq, L, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16)
    plan = BlockPlan.from_band(sink=128, window=1024, q_len=L, k_len=L, device="cuda")
    out = block_sparse_attention(q, k, v, plan)
    for b, h in ((1, Hq - 1), (0, 0)):
        ref, pt = _rows_reference(q[b:b + 1, h:h + 1], k[b:b + 1, h // 8:h // 8 + 1], v[b:b + 1, h // 8:h // 8 + 1],
                                  plan, (L - 200, L))
        got = out[b:b + 1, h:h + 1, L - 200:].double()
        err, base = (got - ref).abs().max().item(), (pt - ref).abs().max().item()
        assert torch.isfinite(got).all() and err <= 2 * base + 1e-5, (b, h, err, base)


@requires_cuda
@pytest.mark.gpu
def test_gpu_deterministic_long():
    q, k, v = make_qkv(1, 8, 2, 16384, 16384, 128, torch.bfloat16, "cuda")
    plan = random_plan(1, 8, 16384, 16384, 128, 128, density=0.2, device="cuda")
    a = block_sparse_attention(q, k, v, plan)
    b = block_sparse_attention(q, k, v, plan)
    assert torch.equal(a, b)

