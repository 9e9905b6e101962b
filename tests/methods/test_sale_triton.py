"""SALE's Triton estimate (kernels/sale_triton.py, ``SALE._plan_triton``) against the PyTorch path.

Each kernel is checked against an independent PyTorch formulation of the step it replaces, and
whole plans against the PyTorch path (the oracle). The quantization and the pass-2 decisions
must agree bit for bit (pass 2's test puts every row threshold exactly on one pair's value, so a
rounding in another order would show). Pass 1 sums in another order than PyTorch, so its row
thresholds agree to float32 rounding only; the whole-plan tests therefore first check, with the
PyTorch path at thresholds scaled by ``exp(+-DELTA)``, that no block's decision rests on a pair
within ``DELTA`` of its threshold, and then require the same plan.

Without CUDA the kernels run in the Triton interpreter on CPU tensors (conftest.py); with CUDA the
same tests run compiled, and the ``requires_cuda`` test checks syncs, graphs and the plan at 32K.
"""

import math

import pytest
import torch

from sparseattn.bench.synthetic import structured_qkv
from sparseattn.methods import get_method
from sparseattn.methods import sale as sm
from sparseattn.methods.base import visible_blocks
from sparseattn.methods.sale import quantize_per_token

from ..conftest import requires_cuda, triton_importable
from .cases import assert_same_plan, plan_without_sync

pytestmark = pytest.mark.skipif(not triton_importable(), reason="triton is not importable")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DELTA = 1e-4  # log-space margin: far above float32 rounding of the thresholds (~1e-6)


def sk_():
    from sparseattn.kernels import sale_triton

    return sale_triton


# ----------------------------------------------------------------------------- quantization
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [4, 8])
def test_smooth_quantize_matches_torch(dtype, bits):
    """Bit for bit: a non-contiguous input, D = 40 (padded lanes), L not a multiple of the rows."""
    g = torch.Generator().manual_seed(bits)
    x = (torch.randn(2, 70, 3, 40, generator=g) * 3).to(dtype).to(DEVICE).transpose(1, 2)  # [B, H, L, D]
    mean = x.to(torch.float32).mean(2, keepdim=True)
    want_i, want_s = quantize_per_token(x.float() - mean, bits)
    for out_dtype in (torch.float16, torch.int8):
        xi, s, xs = sk_().smooth_quantize_triton(x, mean, bits, out_dtype=out_dtype, keep_smoothed=True, rows=16)
        assert xi.dtype == out_dtype and xi.is_contiguous()
        assert torch.equal(xi.float(), want_i) and torch.equal(s, want_s.squeeze(-1))
        assert torch.equal(xs, x.float() - mean)


def test_quantize_rounds_half_to_even():
    """Halves land exactly on .5 (amax = qmax: scale 1; the mean is exactly 0): torch.round's ties."""
    row = torch.tensor([7.0, 2.5, -3.5, 0.5, -0.5, 1.5, -6.5, 5.5] * 2)
    x = torch.stack([row, -row, row.flip(0), -row.flip(0)]).view(1, 1, 4, 16).to(DEVICE)
    mean = x.mean(2, keepdim=True)
    assert bool((mean == 0).all())
    xi, s, _ = sk_().smooth_quantize_triton(x, mean, 4)
    assert torch.equal(s, torch.ones_like(s))
    assert torch.equal(xi[0, 0, 0, :8].float().cpu(), torch.tensor([7.0, 2, -4, 0, 0, 2, -6, 6]))
    assert torch.equal(xi.float(), quantize_per_token(x - mean, 4)[0])


# ----------------------------------------------------------------------------- pass 1
def anchor_keys(*, bq, bk, Lq, Lk, sink, lb, seg, causal):
    """bool [Lq, Lk]: key j is an anchor key of row i in query block I when its tile is a sink
    tile or at or after I's first local tile (``sale_local_start``, tested against a literal port
    of the official counting in test_sale.py); keys past the row's position are dropped when causal."""
    nQ = math.ceil(Lq / bq)
    start = sm.sale_local_start(nQ, block_q=bq, block_k=bk, q_len=Lq, k_len=Lk, sink_blocks=sink, local_blocks=lb,
                                seg_blocks=seg, causal=causal, device="cpu")
    i = torch.arange(Lq).view(-1, 1)
    tile = torch.arange(Lk).view(1, -1) // bk
    ok = (tile < sink) | (tile >= start[i // bq])
    if causal:
        ok = ok & (torch.arange(Lk).view(1, -1) <= Lk - Lq + i)
    return ok


def anchor_thresholds_ref(q, ks, tau, **geo):
    """Row thresholds in float64 over the explicit anchor mask."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = ks.shape[1], ks.shape[2]
    ok = anchor_keys(Lq=Lq, Lk=Lk, **geo)
    kk = ks.double().repeat_interleave(Hq // Hkv, 1)
    s = (q.double() @ kk.transpose(-1, -2)) / math.sqrt(D)
    s = s.masked_fill(~ok.to(s.device), float("-inf"))
    m = s.amax(-1, keepdim=True)
    l = torch.exp(s - m.nan_to_num(neginf=0.0)).sum(-1, keepdim=True)
    thr = m + torch.log(tau.double()).view(1, Hq, 1, 1) + torch.log(l)
    return torch.where(torch.isfinite(m), thr, torch.full_like(thr, float("inf"))).squeeze(-1)


@pytest.mark.parametrize("Lq,Lk,bq,bk,sink,lb,seg,causal,block_m,block_n", [
    (200, 200, 32, 16, 1, 2, 2, True, 32, 64),
    (70, 150, 32, 32, 1, 1, 1, True, 16, 16),  # Lq < Lk; two row tiles per query block, two chunks per tile
    (150, 90, 32, 16, 1, 2, 4, True, 32, 32),  # Lq > Lk: rows that see nothing (+inf)
    (130, 130, 48, 32, 2, 1, 2, True, 64, 32),  # a block of 48 in 64 slots: chunks straddle tiles
    (100, 160, 16, 16, 0, 0, 1, True, 16, 64),  # no sink, no window: the block's own tiles only
    (120, 120, 32, 16, 1, 2, 2, False, 32, 64),  # not causal: the last tiles are local
])
def test_anchor_thresholds_match_reference(Lq, Lk, bq, bk, sink, lb, seg, causal, block_m, block_n):
    g = torch.Generator().manual_seed(Lq + Lk)
    B, Hq, Hkv, D = 2, 4, 2, 32
    q = (torch.randn(B, Hq, Lq, D, generator=g) * 2).to(DEVICE)
    ks = torch.randn(B, Hkv, Lk, D, generator=g).to(DEVICE)
    tau = torch.tensor([0.01, 0.3, 1e-6, 0.05], device=DEVICE)
    dense = tau < 1e-5
    geo = dict(sink_blocks=sink, local_blocks=lb, seg_blocks=seg, causal=causal)
    want = anchor_thresholds_ref(q.cpu(), ks.cpu(), tau.cpu(), bq=bq, bk=bk, sink=sink, lb=lb, seg=seg, causal=causal)
    got = sk_().anchor_thresholds_triton(q, ks, torch.log(tau), dense, block_q=bq, block_k=bk, **geo,
                                         block_m=block_m, block_n=block_n).cpu()
    live = ~dense.cpu()  # dense heads are not written
    assert torch.equal(torch.isinf(got[:, live]), torch.isinf(want[:, live]))
    torch.testing.assert_close(got[:, live], want[:, live].float(), rtol=1e-5, atol=3e-5)  # 3xTF32 on the GPU
    if Lq > Lk:
        assert bool(torch.isinf(got[:, live, :Lq - Lk]).all())


# ----------------------------------------------------------------------------- pass 2
def needed_blocks(*, bq, bk, Lq, Lk, sink, lb, seg, causal):
    """bool [nQ, nK]: the tiles the estimate decides (visible, outside the anchor)."""
    geo = dict(block_q=bq, block_k=bk, q_len=Lq, k_len=Lk)
    visible = visible_blocks(**geo, causal=causal, device="cpu")
    start = sm.sale_local_start(math.ceil(Lq / bq), **geo, sink_blocks=sink, local_blocks=lb, seg_blocks=seg,
                                causal=causal, device="cpu")
    n = torch.arange(math.ceil(Lk / bk)).view(1, -1)
    return visible & (n >= sink) & (n < start.view(-1, 1))


PASS2_CASES = [
    # (Lq, Lk, bq, bk, sink, lb, seg, causal, (block_m, block_n, split, num_warps, num_stages, int8_dot))
    (300, 300, 32, 32, 1, 1, 1, True, (32, 32, 4, 4, 1, False)),
    (300, 300, 32, 16, 1, 2, 2, True, (64, 16, 2, 4, 1, True)),  # two query blocks per tile, 16-key tiles
    (200, 330, 48, 32, 2, 1, 2, True, (32, 16, 2, 4, 1, False)),  # Lq < Lk, 48 in 64 slots, two steps per tile
    (400, 230, 64, 32, 1, 0, 4, True, (32, 64, 4, 4, 1, True)),  # Lq > Lk: query blocks that see nothing
    (200, 200, 16, 16, 0, 2, 2, True, (64, 16, 2, 4, 1, False)),  # four query blocks per tile, no sink
    (200, 260, 32, 16, 1, 2, 2, False, (32, 32, 2, 4, 1, False)),  # not causal: the last tiles are local
]


@pytest.mark.parametrize("case", range(len(PASS2_CASES)))
def test_estimate_block_mask_matches_reference(case):
    """Every needed block's decision, bit for bit. Each row threshold is set exactly to the value
    of one of its pairs (a tie, which passes), so an arithmetic order other than PyTorch's
    ``(dots * sk) * sq + qmk`` then ``* scale`` would flip some of them."""
    Lq, Lk, bq, bk, sink, lb, seg, causal, cfg = PASS2_CASES[case]
    g = torch.Generator().manual_seed(case)
    B, Hq, Hkv, D = 2, 3, 1, 32
    bits = 8 if cfg[-1] else 4
    qmax = 2 ** (bits - 1) - 1
    q_int = torch.randint(-qmax, qmax + 1, (B, Hq, Lq, D), generator=g).float()
    k_int = torch.randint(-qmax, qmax + 1, (B, Hkv, Lk, D), generator=g).float()
    sq = torch.rand(B, Hq, Lq, generator=g) * 0.1 + 0.01
    sk = torch.rand(B, Hkv, Lk, generator=g) * 0.1 + 0.01
    qmk = torch.randn(B, Hq, Lk, generator=g)
    scale = 1.0 / math.sqrt(D)
    dots = q_int @ k_int.transpose(-1, -2)  # integers: exact
    est = (dots * sk.view(B, Hkv, 1, Lk) * sq.unsqueeze(-1) + qmk.unsqueeze(2)) * scale  # PyTorch's order
    need = needed_blocks(bq=bq, bk=bk, Lq=Lq, Lk=Lk, sink=sink, lb=lb, seg=seg, causal=causal)
    nQ, nK = need.shape
    need_el = need.repeat_interleave(bq, 0).repeat_interleave(bk, 1)[:Lq, :Lk]  # element view
    # Row thresholds: on 5 % of the rows the value of one of the row's 3 largest needed pairs (ties
    # pass), +inf elsewhere, so some needed blocks pass and most do not.
    vals = est.masked_fill(~need_el, float("-inf"))
    k_th = torch.randint(1, 4, (B, Hq, Lq, 1), generator=g)
    thr = torch.gather(vals.sort(-1, descending=True).values, -1, k_th - 1).squeeze(-1)
    live_row = torch.rand(B, Hq, Lq, generator=g) < 0.05
    thr = torch.where(torch.isfinite(thr) & live_row, thr, torch.full_like(thr, float("inf")))
    passed = (est >= thr.unsqueeze(-1)) & need_el
    want = torch.nn.functional.pad(passed, (0, nK * bk - Lk, 0, nQ * bq - Lq))
    want = want.view(B, Hq, nQ, bq, nK, bk).any(5).any(3)
    dense = torch.tensor([False, True, False])
    int_dtype = torch.int8 if cfg[-1] else torch.float16
    got = sk_().estimate_block_mask_triton(
        q_int.to(int_dtype).to(DEVICE), sq.to(DEVICE), k_int.to(int_dtype).to(DEVICE), sk.to(DEVICE), qmk.to(DEVICE),
        thr.to(DEVICE), dense.to(DEVICE), block_q=bq, block_k=bk, sink_blocks=sink, local_blocks=lb, seg_blocks=seg,
        causal=causal, config=cfg).cpu()
    assert got.dtype == torch.uint8 and got.shape == (B, Hq, nQ, nK)
    assert torch.equal(got[:, 1], torch.zeros_like(got[:, 1]))  # a dense head is skipped
    live = [0, 2]
    assert torch.equal(got[:, live].bool() & need, want[:, live])
    assert 0 < int(want[:, live].sum()) < int(need.sum()) * B * 2  # a real mix of kept and dropped blocks


def test_argument_checks():
    m = sk_()
    GEO = dict(block_q=16, block_k=16, sink_blocks=1, local_blocks=1, seg_blocks=1, causal=True)
    q = torch.zeros(1, 2, 40, 16, device=DEVICE)
    with pytest.raises(ValueError, match="bits"):
        m.smooth_quantize_triton(q, q.mean(2, keepdim=True), 3)
    with pytest.raises(ValueError, match="mean"):
        m.smooth_quantize_triton(q, q.mean(2), 4)
    with pytest.raises(ValueError, match="ks"):
        m.anchor_thresholds_triton(q, q.half(), torch.zeros(2, device=DEVICE), torch.zeros(2, dtype=torch.bool,
                                   device=DEVICE), **GEO)
    with pytest.raises(ValueError, match="log_tau"):
        m.anchor_thresholds_triton(q, q, torch.zeros(3, device=DEVICE), torch.zeros(2, dtype=torch.bool,
                                   device=DEVICE), **GEO)
    with pytest.raises(ValueError, match="seg_blocks"):
        m.anchor_thresholds_triton(q, q, torch.zeros(2, device=DEVICE), torch.zeros(2, dtype=torch.bool,
                                   device=DEVICE), **dict(GEO, seg_blocks=0))
    with pytest.raises(ValueError, match="config"):
        m.sale_estimate_triton(q, q, torch.zeros(2, device=DEVICE), torch.zeros(2, dtype=torch.bool, device=DEVICE),
                               bits=4, **GEO, config=(48, 32, 4, 4, 1))
    with pytest.raises(ValueError, match="int8_dot"):
        z = torch.zeros(1, 2, 40, device=DEVICE)
        m.estimate_block_mask_triton(q.half(), z, q.half(), z, z, z, torch.zeros(2, dtype=torch.bool, device=DEVICE),
                                     **GEO, config=(32, 32, 4, 4, 1, True))


# ----------------------------------------------------------------------------- whole plans
def scaled(threshold, factor):
    if isinstance(threshold, tuple):
        return tuple(scaled(t, factor) for t in threshold)
    return threshold * factor


def torch_plan(m, q, k, v, monkeypatch, **kw):
    monkeypatch.setattr(sm, "use_triton_estimator", lambda x: False)
    return m._plan(q, k, v, **kw)  # _plan: no CUDA-graph caching between the paths


def assert_sale_plan_equals_torch(m, q, k, v, monkeypatch, *, causal=True, layer_idx=None):
    kw = dict(causal=causal, layer_idx=layer_idx)
    want = torch_plan(m, q, k, v, monkeypatch, **kw)
    lo = torch_plan(m.replace(threshold=scaled(m.threshold, math.exp(DELTA))), q, k, v, monkeypatch, **kw)
    hi = torch_plan(m.replace(threshold=scaled(m.threshold, math.exp(-DELTA))), q, k, v, monkeypatch, **kw)
    assert_same_plan(lo, hi)  # no decision rests on a pair within DELTA of its threshold
    anchor_only = torch_plan(m.replace(threshold=1e9), q, k, v, monkeypatch, **kw)
    assert anchor_only.density(causal) < want.density(causal) < 1.0  # the estimate keeps some blocks, drops some
    monkeypatch.setattr(sm, "use_triton_estimator", lambda x: True)
    got = m._plan(q, k, v, **kw)
    got.validate(causal=causal)
    assert_same_plan(got, want)


PLAN_CASES = [
    # (B, Hq, Hkv, Lq, Lk, D, dtype, options, causal, layer_idx)
    (1, 2, 2, 333, 333, 32, torch.float32, dict(block_size=32, block_k=16, block_seg=32, threshold=0.2), True,
     None),  # G = 1, 32 x 16 tiles, 2-tile segments
    (2, 3, 1, 250, 400, 32, torch.bfloat16, dict(block_size=48, threshold=0.1), True, None),  # B = 2, G = 3, Lq < Lk
    (1, 4, 1, 420, 300, 32, torch.float16, dict(block_size=32, bits=8, threshold=[0.2, 0.0, 1e-6, 0.05]), True,
     None),  # G = 4, Lq > Lk, dense heads (threshold 0 and < 1e-5)
    (1, 6, 2, 320, 320, 32, torch.bfloat16, dict(block_size=32, threshold=[[0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
                                                                         [0.3, 0.1, 0.2, 0.15, 0.05, 0.4]],
                                                 gqa_policy="group_union", sink_blocks=2, local_window=40,
                                                 block_k=16, block_seg=48), True, 1),
    (1, 3, 3, 300, 300, 32, torch.float32, dict(block_size=32, block_k=16, threshold=0.1), False, None),  # not causal
    (1, 2, 1, 300, 300, 64, torch.float16, dict(block_size=64, block_k=64, threshold=0.3, sink_blocks=0,
                                                local_window=0), True, None),
]


@pytest.mark.parametrize("case", range(len(PLAN_CASES)))
def test_plans_equal_the_pytorch_path(case, monkeypatch):
    B, Hq, Hkv, Lq, Lk, D, dtype, opts, causal, layer_idx = PLAN_CASES[case]
    q, k, v = structured_qkv(B, Hq, Hkv, Lk, D, seed=20 + case, device=DEVICE, dtype=dtype)
    q = q[:, :, Lk - Lq:] if Lq <= Lk else torch.cat([q, q[:, :, :Lq - Lk]], 2)
    m = get_method("sale", dense_len=0, **opts)
    assert_sale_plan_equals_torch(m, q, k, v, monkeypatch, causal=causal, layer_idx=layer_idx)


def test_official_dense_fallback_and_gate(monkeypatch):
    """Lq <= dense_len stays dense without any kernel; float64 inputs keep the PyTorch path."""
    q, k, v = structured_qkv(1, 2, 1, 200, 32, seed=1, device=DEVICE)
    monkeypatch.setattr(sm, "use_triton_estimator", lambda x: True)
    assert get_method("sale")._plan(q, k, v, causal=True, layer_idx=None).density() == 1.0
    called = []
    from sparseattn.kernels import sale_triton

    monkeypatch.setattr(sale_triton, "sale_estimate_triton", lambda *a, **kw: called.append(1))
    get_method("sale", dense_len=0)._plan(q.double(), k.double(), v.double(), causal=True, layer_idx=None)
    assert not called


# ----------------------------------------------------------------------------- launches
def test_launches_cpu_twin(monkeypatch):
    """Four Triton kernels (two quantizations, two passes); the CUDA twin checks syncs at 32K."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    names = []
    for cls in (InterpretedFunction, JITFunction):
        def counted(self, *args, _run=cls.run, **kwargs):
            names.append(getattr(self, "__name__", "?"))
            return _run(self, *args, **kwargs)

        monkeypatch.setattr(cls, "run", counted)
    q, k, v = structured_qkv(1, 2, 1, 200, 32, seed=3, device=DEVICE)
    monkeypatch.setattr(sm, "use_triton_estimator", lambda x: True)
    plan = get_method("sale", dense_len=0, block_size=32, threshold=0.1)._plan(q, k, v, causal=True, layer_idx=None)
    plan.validate(causal=True)
    kernels = [n for n in names if n != "_compact_rows"]  # from_block_mask's compaction on CUDA
    assert kernels == ["_smooth_quantize", "_smooth_quantize", "_anchor_thresholds", "_estimate_blocks"], names


@requires_cuda
@pytest.mark.gpu
def test_cuda_plan_at_32k():
    """SmolLM2-like heads at 32K in bf16, the official defaults: no host sync, the same plan
    through a CUDA graph, and the PyTorch path's plan wherever no pair sits within DELTA of its
    threshold (the PyTorch path at thresholds scaled by exp(+-DELTA) brackets it)."""
    import os

    q, k, v = structured_qkv(1, 9, 3, 32768, 64, seed=0, device="cuda", dtype=torch.bfloat16)
    for opts in ({}, {"bits": 8, "threshold": 0.02}):
        m = get_method("sale", **opts)
        plan = plan_without_sync(m, q, k, v)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            m._plan(q, k, v, causal=True, layer_idx=None)
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / 5
        print(f"SALE Triton estimate at 32K {opts}: {ms:.2f} ms per plan, density {plan.density():.3f}")
        assert ms < 50.0  # the PyTorch path: ~310 ms
        for _ in range(3):  # eager, capture, replay
            assert_same_plan(m.plan(q, k, v), plan)
        os.environ["SPARSEATTN_ESTIMATORS"] = "torch"
        try:
            want = m._plan(q, k, v, causal=True, layer_idx=None).block_mask()
            lo = m.replace(threshold=m.threshold * math.exp(DELTA))._plan(q, k, v, causal=True, layer_idx=None)
            hi = m.replace(threshold=m.threshold * math.exp(-DELTA))._plan(q, k, v, causal=True, layer_idx=None)
        finally:
            del os.environ["SPARSEATTN_ESTIMATORS"]
        got, lo, hi = plan.block_mask(), lo.block_mask(), hi.block_mask()
        assert not bool((lo & ~got).any()) and not bool((got & ~hi).any()), opts
        assert int((got != want).sum()) <= int((hi != lo).sum()), opts
        assert 0.0 < plan.density() < 1.0
