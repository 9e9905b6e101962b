"""Vertical-slash's fused plan kernel (kernels/vertical_slash_triton.py) against the PyTorch path.

The kernel replaces the PyTorch code of ``VerticalSlash._plan`` after the row selections (the
diagonals' block mask, ``BlockPlan.from_block_mask``, the kept columns' block membership and the
extra columns' compaction). It is integer-only, so plans must be identical: ``kv_counts``,
``kv_indices``, ``extra_counts`` and ``extra_indices`` equal, padding included.

Without CUDA the kernels run in the Triton interpreter on CPU tensors (conftest.py), on small
shapes; with CUDA the same tests run compiled, and the ``requires_cuda`` twin checks 32K.
"""

import pytest
import torch

from sparseattn.bench.synthetic import structured_qkv
from sparseattn.methods import get_method
from sparseattn.methods import vertical_slash as vmod
from sparseattn.methods.vertical_slash import plan_from_keeps
from sparseattn.methods.base import compact_rows
from sparseattn.plan import BlockPlan

from ..conftest import requires_cuda, triton_importable
from .cases import (assert_same_plan, assert_triton_plan_equals_torch, count_launches, plan_without_sync,
                    torch_profiles)

pytestmark = pytest.mark.skipif(not triton_importable(), reason="triton is not importable")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def vk():
    from sparseattn.kernels import vertical_slash_triton

    return vertical_slash_triton


# ----------------------------------------------------------------------------- the PyTorch twin
def torch_plan(keep_cols, keep_diag, width, *, bs, Lq, Lk):
    """``VerticalSlash._plan``'s PyTorch code from the two keep masks on, on the CPU (the oracle)."""
    return plan_from_keeps(keep_cols.cpu(), keep_diag.cpu(), width, block_size=bs, q_len=Lq, k_len=Lk)


def kernel_inputs(keep_cols, keep_diag, width):
    """What the method passes: the prefix counts of the kept diagonals and the packed kept columns."""
    B, H, Lk = keep_cols.shape
    prefix = torch.nn.functional.pad(torch.cumsum(keep_diag, -1), (1, 0)).to(torch.int32)
    n_cols, cols = compact_rows(keep_cols, torch.arange(Lk, device=keep_cols.device).expand(B, H, Lk), width)
    return prefix, cols, n_cols


def random_keeps(B, Hq, G, Lk, width, seed):
    """Random column / diagonal keeps of ``Hq`` query heads, unioned over groups of ``G`` heads.

    Per head a different column count below the per-head width (``n_cols < width``; 0 for one
    head) and diagonal density; 1 to 3 local diagonals forced, as the method does (with 1, only
    distance 0 reaches the diagonal blocks: off-by-one distances show). Head 0 of the last batch
    keeps every diagonal, so every visible block is kept and none of its columns is an extra."""
    g = torch.Generator().manual_seed(seed)
    per_head = width // G
    n = torch.randint(0, per_head + 1, (B, Hq), generator=g)
    n[0, 0] = 0
    n[-1, -1] = per_head
    order = torch.rand(B, Hq, Lk, generator=g).argsort(-1)
    keep_cols = torch.zeros(B, Hq, Lk, dtype=torch.bool).scatter_(-1, order, torch.arange(Lk) < n.unsqueeze(-1))
    density = torch.rand(B, Hq, 1, generator=g) * 0.05
    keep_diag = (torch.rand(B, Hq, Lk, generator=g) < density) | (torch.arange(Lk) >= Lk - 1 - seed % 3)
    H = Hq // G
    keep_cols = keep_cols.view(B, H, G, Lk).any(2)
    keep_diag = keep_diag.view(B, H, G, Lk).any(2)
    keep_diag[-1, 0] = True
    return keep_cols, keep_diag


KERNEL_CASES = [
    # (B, Hq, G, Lq, Lk, block, width): G > 1 is group_union (plan H = Hq / G, width * G)
    (2, 3, 1, 256, 256, 16, 40),  # Lq == Lk
    (2, 6, 3, 300, 517, 32, 3 * 60),  # Lq < Lk, Lk not a multiple of the block, group_union
    (2, 3, 1, 517, 517, 64, 100),  # a partial last block of queries and keys
    (2, 2, 1, 130, 600, 64, 50),  # an offset of 470: query blocks straddle two key blocks
    (2, 2, 1, 300, 200, 32, 30),  # Lq > Lk: the first query blocks see nothing
    (2, 2, 1, 130, 600, 64, 0),  # width 0: no extras
]


@pytest.mark.parametrize("case", range(len(KERNEL_CASES)))
def test_kernel_matches_torch(case):
    B, Hq, G, Lq, Lk, bs, width = KERNEL_CASES[case]
    width = min(width, Lk)
    keep_cols, keep_diag = random_keeps(B, Hq, G, Lk, width, seed=case)
    want = torch_plan(keep_cols, keep_diag, width, bs=bs, Lq=Lq, Lk=Lk)
    prefix, cols, n_cols = kernel_inputs(keep_cols.to(DEVICE), keep_diag.to(DEVICE), width)
    for chunks in (dict(), dict(block=16, block_e=16)):  # one chunk per row, and several
        counts, indices, e_counts, e_indices = vk().vertical_slash_plan_triton(
            prefix, cols, n_cols, block_size=bs, q_len=Lq, k_len=Lk, width=width, **chunks)
        got = BlockPlan(counts, indices, bs, bs, Lq, Lk, extra_counts=e_counts, extra_indices=e_indices)
        got.validate(causal=True)
        assert_same_plan(got, want)
    assert int(want.kv_counts.sum()) > 0
    if width:
        assert int(want.extra_counts.sum()) > 0
        # the head that keeps every diagonal: every visible block kept, so none of its columns is an extra
        assert int(n_cols[-1, 0]) > 0 and int(want.extra_counts[-1, 0].sum()) == 0
        assert int(n_cols.min()) < width  # rows with fewer kept columns than slots
        if G == 1:
            assert int(n_cols.max()) == width  # and a full row

def test_kernel_int64_prefix_and_column_counts():
    """The PyTorch path's int64 prefix and [B, H, 1] column counts give the same plan."""
    keep_cols, keep_diag = random_keeps(2, 2, 1, 333, 40, seed=7)
    want = torch_plan(keep_cols, keep_diag, 40, bs=32, Lq=333, Lk=333)
    prefix, cols, n_cols = kernel_inputs(keep_cols.to(DEVICE), keep_diag.to(DEVICE), 40)
    counts, indices, e_counts, e_indices = vk().vertical_slash_plan_triton(
        prefix.long(), cols, n_cols.long().unsqueeze(-1), block_size=32, q_len=333, k_len=333)
    assert_same_plan(BlockPlan(counts, indices, 32, 32, 333, 333, extra_counts=e_counts, extra_indices=e_indices),
                     want)


def test_kernel_bad_inputs():
    prefix = torch.zeros(1, 2, 101, dtype=torch.int32, device=DEVICE)
    cols = torch.zeros(1, 2, 10, dtype=torch.int32, device=DEVICE)
    n_cols = torch.zeros(1, 2, dtype=torch.int32, device=DEVICE)
    f = vk().vertical_slash_plan_triton
    with pytest.raises(ValueError, match="prefix"):
        f(prefix, cols, n_cols, block_size=16, q_len=100, k_len=99)
    with pytest.raises(ValueError, match="prefix"):
        f(prefix.float(), cols, n_cols, block_size=16, q_len=100, k_len=100)
    with pytest.raises(ValueError, match="cols"):
        f(prefix, cols, n_cols, block_size=16, q_len=100, k_len=100, width=11)
    with pytest.raises(ValueError, match="cols"):
        f(prefix, cols.long(), n_cols, block_size=16, q_len=100, k_len=100)
    with pytest.raises(ValueError, match="block_size"):
        f(prefix, cols, n_cols, block_size=0, q_len=100, k_len=100)


# ----------------------------------------------------------------------------- whole plans
PLAN_CASES = [
    # (B, Hq, Hkv, Lq, Lk, options)
    (2, 3, 1, 300, 300, dict(block_size=32, vertical_size=40, slash_size=100)),
    (2, 4, 2, 200, 517, dict(block_size=64, vertical_size=60, slash_size=150, gqa_policy="group_union")),
    (1, 2, 2, 333, 333, dict(block_size=16, vertical_size=0, sink_tokens=0, slash_size=50)),  # width 0
    (2, 2, 1, 450, 600, dict(block_size=64, vertical_size=(35, 120), slash_size=(200, 80))),  # n_cols < width
]


@pytest.mark.parametrize("case", range(len(PLAN_CASES)))
def test_plans_equal_the_pytorch_path(case, monkeypatch):
    B, Hq, Hkv, Lq, Lk, opts = PLAN_CASES[case]
    from sparseattn.kernels import last_queries_triton

    monkeypatch.setattr(last_queries_triton, "last_queries_profiles_triton", torch_profiles)
    q, k, v = structured_qkv(B, Hq, Hkv, Lk, 32, seed=20 + case, device=DEVICE)
    q = q[:, :, Lk - Lq:]
    assert_triton_plan_equals_torch(vmod, get_method("vertical_slash", **opts), q, k, v, monkeypatch)


def test_split_selection_gives_the_same_plan(monkeypatch):
    """Few long rows take the split top-n (``row_select_triton.top_n_split``; on the GPU from 16K
    keys): forced here on 600 keys (4 slices of 3 chunks of 64), the plan is the PyTorch path's."""
    from sparseattn.kernels import last_queries_triton, row_select_triton

    monkeypatch.setattr(last_queries_triton, "last_queries_profiles_triton", torch_profiles)
    monkeypatch.setattr(row_select_triton, "TOP_N_SPLIT_MIN_LEN", 512)
    monkeypatch.setattr(row_select_triton, "TOP_N_SPLIT", (4, 64, 2))
    calls = []
    real = row_select_triton._select_split_rows
    monkeypatch.setattr(row_select_triton, "_select_split_rows", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = structured_qkv(2, 2, 1, 600, 32, seed=5, device=DEVICE)
    opts = dict(block_size=64, vertical_size=(35, 120), slash_size=(200, 80))
    assert_triton_plan_equals_torch(vmod, get_method("vertical_slash", **opts), q, k, v, monkeypatch)
    assert calls == [1]


@pytest.mark.parametrize("policy,n_torch_ops", [("per_q_head", 5), ("group_union", 8)])
def test_launches_cpu_twin(monkeypatch, policy, n_torch_ops):
    """The Triton path's launches, counted (the profiles' kernel as one launch, run by its PyTorch
    twin): the profiles with their forced +inf, the two selections (``_select_rows``), the column
    packing with the prefix counts (``_compact_rows``) and the plan (``_vertical_slash_rows``), plus
    the budgets' PyTorch ops on CPU tensors (on CUDA host work, uploaded once per value: no launch),
    the scores' buffer and group_union's three unions. Before the fused kernel: the plan cost ~60
    more PyTorch ops (gathers, the block mask, from_block_mask, block_mask(), the candidates) and a
    second ``_compact_rows``; before the forced scores moved into the profiles (session 19), a
    ``_forced_scores`` launch; before that, six more small ops."""
    from sparseattn.kernels import last_queries_triton

    monkeypatch.setattr(last_queries_triton, "last_queries_profiles_triton", torch_profiles)
    monkeypatch.setattr(vmod, "use_triton_estimator", lambda x: True)
    q, k, v = structured_qkv(1, 3, 1, 330, 32, seed=3, device=DEVICE)
    m = get_method("vertical_slash", block_size=64, vertical_size=40, slash_size=100, gqa_policy=policy)
    m._plan(q, k, v, causal=True, layer_idx=None)  # on CUDA the budgets are uploaded once, here
    plan, counter = count_launches(lambda: m._plan(q, k, v, causal=True, layer_idx=None), monkeypatch,
                                   single=((last_queries_triton, "last_queries_profiles_triton"),))
    plan.validate(causal=True)
    assert counter.triton == ["last_queries_profiles_triton", "_select_rows", "_compact_rows",
                              "_vertical_slash_rows"], counter.triton
    assert len(counter.torch_ops) == n_torch_ops, counter.torch_ops
    assert not [op for op in counter.torch_ops if any(w in op for w in ("gather", "scatter", "cumsum"))]


# ----------------------------------------------------------------------------- GPU twin
@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["per_q_head", "group_union"])
def test_cuda_plan_at_32k(monkeypatch, policy):
    """SmolLM2-like heads at 32K in bf16 (9 query heads, 3 KV heads, D = 64, block 64): no host
    sync, the same plan eagerly, at a graph capture and at a replay, few kernels, and exactly the
    PyTorch path's plan on the same profiles (the PyTorch path is fed the Triton profiles, so the
    comparison does not depend on the profiles' float rounding)."""
    from torch.profiler import ProfilerActivity, profile

    from sparseattn.kernels.last_queries_triton import last_queries_profiles_triton

    q, k, v = structured_qkv(1, 9, 3, 32768, 64, seed=0, device="cuda", dtype=torch.bfloat16)
    m = get_method("vertical_slash", gqa_policy=policy)
    plan = plan_without_sync(m, q, k, v)
    for _ in range(3):  # eager, capture, replay
        assert_same_plan(m.plan(q, k, v), plan)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        m._plan(q, k, v, causal=True, layer_idx=None)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    assert len(kernels) <= 14, kernels  # 7 Triton kernels, group_union's ~3 small PyTorch ops, the copy
    assert plan.extra_counts is not None and int(plan.extra_counts.max()) > 0

    columns, slash = last_queries_profiles_triton(q, k, m.last_q)  # deterministic: the plan's profiles
    monkeypatch.setattr(vmod, "use_triton_estimator", lambda x: False)
    monkeypatch.setattr(vmod, "last_queries_attention", lambda q_, k_, n: columns.unsqueeze(-2))  # sum(-2): columns
    monkeypatch.setattr(vmod, "diagonal_sums", lambda a: slash)
    want = m._plan(q, k, v, causal=True, layer_idx=None)
    assert_same_plan(plan, want)
