"""attention_fidelity / compare_plans / oracle_plan / topk_plan against direct float64 computations."""

import math

import pytest
import torch

from sparseattn import BlockPlan
from sparseattn.eval.fidelity import (attention_fidelity, block_attention_mass, compare_plans, oracle_plan,
                                      topk_plan)


def _qkv(B=1, Hq=4, Hkv=2, Lq=96, Lk=96, D=16, seed=0, sharp=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g, dtype=torch.float64) * sharp
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64) * sharp
    v = torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _direct(q, k, v, mask, causal=True):
    """float64 by the book: per-row recall of the dense softmax mass and masked-softmax output."""
    q, k, v = q.double(), k.double(), v.double()
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    kk, vv = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
    s = q @ kk.transpose(-1, -2) / math.sqrt(D)
    pos = Lk - Lq + torch.arange(Lq).view(-1, 1)
    vis = (torch.arange(Lk).view(1, -1) <= pos) if causal else torch.ones(Lq, Lk, dtype=torch.bool)
    rows = vis.any(-1)
    p = torch.softmax(s.masked_fill(~vis, -math.inf), -1)[..., rows, :]
    recall = (p * (mask & vis)[..., rows, :]).sum(-1).mean().item()
    dense_out = torch.nan_to_num(torch.softmax(s.masked_fill(~vis, -math.inf), -1)) @ vv
    m = mask & vis
    sp = torch.softmax(s.masked_fill(~m, -math.inf), -1)
    sp = torch.where(m.any(-1, keepdim=True), sp, torch.zeros_like(sp))
    out = sp @ vv
    err = ((out - dense_out).norm() / dense_out.norm()).item()
    density = m.sum().item() / (vis.sum().item() * B * Hq)
    return {"density": density, "mass_recall": recall, "out_rel_err": err}


def _band_mask(Lq, Lk, sink, window):
    pos = Lk - Lq + torch.arange(Lq).view(-1, 1)
    j = torch.arange(Lk).view(1, -1)
    return (j < sink) | (pos - j < window)


@pytest.mark.parametrize("plan_kind", ["none", "dense"])
def test_dense_plan_keeps_everything(plan_kind):
    q, k, v = _qkv(B=2, Lq=130, Lk=130)
    plan = None if plan_kind == "none" else BlockPlan.dense(block_q=32, block_k=32, q_len=130, k_len=130)
    r = attention_fidelity(q, k, v, plan)
    assert r["density"] == 1.0
    assert r["mass_recall"] == pytest.approx(1.0, abs=1e-6)
    assert r["out_rel_err"] <= 1e-6
    assert len(r["mass_recall_heads"]) == 4


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_band_plan_matches_direct_float64(dtype, tol):
    q, k, v = _qkv(Lq=100, Lk=100, dtype=dtype, sharp=1.5)
    plan = BlockPlan.from_band(sink=8, window=24, block_q=16, block_k=16, q_len=100, k_len=100)
    want = _direct(q, k, v, _band_mask(100, 100, 8, 24).expand(1, 4, 100, 100))
    got = attention_fidelity(q, k, v, plan, q_chunk=7)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=tol, rel=tol), key
    assert 0.1 < got["mass_recall"] < 0.99 and got["out_rel_err"] > 0.01  # a case that discriminates


def test_random_block_plan_per_kv_head_with_more_queries_than_keys():
    # Lq > Lk: the first query rows see no key at all and are left out of the recall average.
    Lq, Lk, blk = 70, 50, 16
    q, k, v = _qkv(B=2, Lq=Lq, Lk=Lk, dtype=torch.float64, seed=4)
    nQ, nK = -(-Lq // blk), -(-Lk // blk)
    bm = torch.rand(2, 2, nQ, nK, generator=torch.Generator().manual_seed(1)) < 0.6  # per batch, per KV head
    plan = BlockPlan.from_block_mask(bm, block_q=blk, block_k=blk, q_len=Lq, k_len=Lk, causal=True)
    rows = torch.arange(Lq) // blk
    cols = torch.arange(Lk) // blk
    mask = bm[:, :, rows][..., cols].repeat_interleave(2, dim=1)  # [B, Hq, Lq, Lk], head h -> kv head h // 2
    want = _direct(q, k, v, mask)
    got = attention_fidelity(q, k, v, plan, q_chunk=9)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-10), key


def test_recall_increases_from_band_to_dense():
    q, k, v = _qkv(Lq=256, Lk=256, seed=2, sharp=1.3)
    plans = {f"w{w}": BlockPlan.from_band(sink=16, window=w, block_q=32, block_k=32, q_len=256, k_len=256)
             for w in (16, 48, 96, 160)}
    plans["dense"] = None
    res = compare_plans(q, k, v, plans)
    recalls = [res[name]["mass_recall"] for name in plans]
    errors = [res[name]["out_rel_err"] for name in plans]
    densities = [res[name]["density"] for name in plans]
    assert all(a < b for a, b in zip(recalls, recalls[1:])), recalls
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert all(a < b for a, b in zip(densities, densities[1:])), densities
    assert recalls[-1] == pytest.approx(1.0, abs=1e-6)


def test_chunking_does_not_change_results():
    q, k, v = _qkv(Lq=200, Lk=200, seed=3)
    plan = BlockPlan.from_band(sink=4, window=40, block_q=32, block_k=32, q_len=200, k_len=200)
    a = attention_fidelity(q, k, v, plan)
    b = attention_fidelity(q, k, v, plan, q_chunk=13)
    assert a["mass_recall"] == pytest.approx(b["mass_recall"], abs=1e-6)
    assert a["mass_recall_heads"] == pytest.approx(b["mass_recall_heads"], abs=1e-6)
    assert a["out_rel_err"] == b["out_rel_err"] and a["density"] == b["density"]


def test_block_attention_mass_matches_direct_pooling():
    Lq, Lk, bq, bk = 90, 90, 16, 32
    q, k, _ = _qkv(Lq=Lq, Lk=Lk, dtype=torch.float64, seed=5)
    got = block_attention_mass(q, k, block_q=bq, block_k=bk, q_chunk=20)  # rounded to whole blocks
    s = q @ k.repeat_interleave(2, 1).transpose(-1, -2) / 4.0
    vis = torch.arange(Lk).view(1, -1) <= torch.arange(Lq).view(-1, 1)
    p = torch.softmax(s.masked_fill(~vis, -math.inf), -1)
    want = torch.zeros_like(got)
    for m in range(got.shape[2]):
        for n in range(got.shape[3]):
            want[:, :, m, n] = p[:, :, m * bq:(m + 1) * bq, n * bk:(n + 1) * bk].sum(-1).mean(-1)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(got.sum(-1), torch.ones_like(got.sum(-1)), atol=1e-12, rtol=0)


def test_oracle_plan_reaches_the_mass_with_the_fewest_blocks():
    Lq = Lk = 512
    q, k, v = _qkv(B=1, Hq=4, Hkv=2, Lq=Lq, Lk=Lk, D=32, seed=6, sharp=2.5, dtype=torch.float64)
    for mass in (0.5, 0.9):
        plan = oracle_plan(q, k, block_q=32, block_k=32, mass=mass).validate(causal=True)
        r = attention_fidelity(q, k, v, plan)
        assert r["mass_recall"] >= mass - 1e-6
        assert r["density"] < 0.95  # it prunes
        bm = block_attention_mass(q, k, block_q=32, block_k=32).double()
        keep = plan.block_mask()
        nQ = keep.shape[2]
        diag = torch.arange(nQ)  # square, aligned: the diagonal block of query block m is m
        target = mass * bm.sum(-1)
        kept_mass = (bm * keep).sum(-1)
        assert bool((kept_mass >= target - 1e-12).all())
        assert bool(keep[:, :, diag, diag].all())
        # Fewest: the kept set is the shortest descending prefix reaching the target, plus the forced
        # diagonal block when the prefix missed it. Without its smallest block the prefix falls short.
        diag_mass = bm[:, :, diag, diag]
        diag_extra = kept_mass - diag_mass >= target  # the prefix reached the target without the diagonal
        prefix = keep.clone()
        prefix[:, :, diag, diag] &= ~diag_extra
        smallest = torch.where(prefix, bm, torch.full_like(bm, math.inf)).min(-1).values
        prefix_mass = (bm * prefix).sum(-1)
        assert bool((prefix_mass >= target - 1e-12).all())
        assert bool((prefix_mass - smallest < target + 1e-12).all())
        assert bool(prefix.sum(-1).gt(1).any())  # the check is not vacuous
    assert oracle_plan(q, k, block_q=32, block_k=32, mass=1.0).density() == 1.0


def test_oracle_plan_on_a_rectangular_grid():
    # 32-row query blocks over 16-key tiles (e.g. SALE's 64 x 32): the mass is reached per query
    # block, and each block keeps the tile of its last query.
    q, k, v = _qkv(B=1, Hq=2, Hkv=1, Lq=200, Lk=200, D=32, seed=7, sharp=2.5, dtype=torch.float64)
    plan = oracle_plan(q, k, block_q=32, block_k=16, mass=0.9).validate(causal=True)
    assert (plan.block_q, plan.block_k) == (32, 16)
    assert attention_fidelity(q, k, v, plan)["mass_recall"] >= 0.9 - 1e-6
    bm = block_attention_mass(q, k, block_q=32, block_k=16).double()
    assert bool(((bm * plan.block_mask()).sum(-1) >= 0.9 * bm.sum(-1) - 1e-12).all())
    last = torch.clamp((torch.arange(7) + 1) * 32, max=200) - 1
    assert bool(plan.block_mask()[:, :, torch.arange(7), last // 16].all())


def test_oracle_recall_on_random_inputs_gqa_batch():
    q, k, v = _qkv(B=2, Hq=6, Hkv=2, Lq=300, Lk=300, D=16, seed=7)
    plan = oracle_plan(q, k, block_q=32, block_k=32, mass=0.9)
    assert (plan.batch, plan.heads) == (2, 6)
    r = attention_fidelity(q, k, v, plan)
    assert r["mass_recall"] >= 0.9 - 1e-6
    assert min(r["mass_recall_heads"]) >= 0.9 - 1e-6


def test_topk_plan_keeps_the_best_pooled_blocks():
    L, blk = 400, 32
    q, k, v = _qkv(B=1, Hq=4, Hkv=2, Lq=L, Lk=L, D=16, seed=8, sharp=1.4, dtype=torch.float64)
    plan = topk_plan(q, k, density=0.3, block=blk).validate(causal=True)
    keep = plan.block_mask()[0]  # [Hq, nQ, nK]
    nQ = keep.shape[1]
    # direct pooled scores
    pool = lambda x: torch.stack([x[..., i:i + blk, :].mean(-2) for i in range(0, L, blk)], -2)
    sc = pool(q[0]) @ pool(k[0]).repeat_interleave(2, 0).transpose(-1, -2)
    for h in range(4):
        for m in range(nQ):
            visible = m + 1
            row = keep[h, m, :visible]
            assert bool(row[0]) and bool(row[m]), "first and diagonal blocks are kept"
            assert not bool(keep[h, m, visible:].any())
            want_n = math.ceil(0.3 * visible)
            forced = {0, m}
            chosen = set(row.nonzero().view(-1).tolist())
            ranked = sc[h, m, :visible].argsort(descending=True).tolist()
            assert chosen == set(ranked[:want_n]) | forced
    d = plan.density()
    assert 0.3 <= d < 0.6
    full = topk_plan(q, k, density=1.0, block=blk)
    assert full.density() == 1.0
    r = compare_plans(q, k, v, {"t": plan, "full": full})
    assert r["full"]["mass_recall"] == pytest.approx(1.0, abs=1e-9)
    assert r["t"]["mass_recall"] < 1.0


def test_errors():
    q, k, v = _qkv(Lq=64, Lk=64)
    wrong = BlockPlan.dense(block_q=16, block_k=16, q_len=32, k_len=32)
    with pytest.raises(ValueError, match="rebuild the plan"):
        attention_fidelity(q, k, v, wrong)
    with pytest.raises(ValueError, match="mass"):
        oracle_plan(q, k, mass=1.5)
    with pytest.raises(ValueError, match="density"):
        topk_plan(q, k, density=-0.1)
    with pytest.raises(ValueError, match="q_chunk"):
        attention_fidelity(q, k, v, None, q_chunk=0)


def test_plan_with_band_and_extra_columns_matches_direct_in_chunks():
    L, blk = 150, 16
    q, k, v = _qkv(B=1, Hq=4, Hkv=2, Lq=L, Lk=L, dtype=torch.float64, seed=9)
    nQ = -(-L // blk)
    g = torch.Generator().manual_seed(2)
    bm = torch.rand(1, 2, nQ, nQ, generator=g) < 0.4
    bm |= torch.eye(nQ, dtype=torch.bool)  # diagonal blocks
    base = BlockPlan.from_block_mask(bm, block_q=blk, block_k=blk, q_len=L, k_len=L, causal=True)
    # one extra key column per query block outside its selected blocks (when there is one)
    sel = base.block_mask()
    extra_idx = torch.zeros(1, 2, nQ, 1, dtype=torch.int32)
    extra_cnt = torch.zeros(1, 2, nQ, dtype=torch.int32)
    for h in range(2):
        for m in range(nQ):
            free = [j for j in range(0, (m + 1) * blk, 5) if j < L and not sel[0, h, m, j // blk]]
            if free:
                extra_idx[0, h, m, 0], extra_cnt[0, h, m] = free[len(free) // 2], 1
    from dataclasses import replace
    plan = replace(base, band_sink=torch.full((1, 2, nQ), 4, dtype=torch.int32),
                   band_window=torch.full((1, 2, nQ), 40, dtype=torch.int32),
                   extra_counts=extra_cnt, extra_indices=extra_idx).validate(causal=True)
    assert int(extra_cnt.sum()) > 5
    mask = plan.to_dense_mask(True).repeat_interleave(2, dim=1)
    want = _direct(q, k, v, mask)
    for chunk in (None, 16, 40):
        got = attention_fidelity(q, k, v, plan, q_chunk=chunk)
        for key in want:
            assert got[key] == pytest.approx(want[key], abs=1e-10), (chunk, key)
