"""The parametrized matrix every registered method joins by name (see cases.py)."""

import pytest
import torch

from sparseattn import block_sparse_attention
from sparseattn.methods import get_method, list_methods, sparse_attention

from .cases import (CASES, SHAPES, dense_causal_mask, expected_mask, make_qkv, overrides, planted_qkv,
                    shape_id)

METHODS = list(CASES)
PLANTED = [name for name in METHODS if CASES[name]["planted"] is not None]


def build(name, key, s, q, k, v, **kw):
    return get_method(name, **overrides(name, key, s)).plan(q, k, v, causal=True, **kw)


def plan_fields(plan):
    return {name: getattr(plan, name) for name in ("kv_counts", "kv_indices", "band_sink", "band_window",
                                                   "extra_counts", "extra_indices")}


def test_every_registered_method_is_in_the_matrix():
    assert set(list_methods("prefill")) == set(CASES)


@pytest.mark.parametrize("s", SHAPES, ids=shape_id)
@pytest.mark.parametrize("name", METHODS)
def test_plan_is_valid_causal_and_keeps_sink_and_self(name, s):
    q, k, v = make_qkv(s)
    plan = build(name, "small", s, q, k, v)
    plan.validate(causal=True)
    assert plan.batch in (1, s["B"]) and plan.heads in (1, s["Hkv"], s["Hq"])
    assert (plan.block_q, plan.block_k, plan.q_len, plan.k_len) == (s["block"], s["block"], s["L"], s["L"])
    # No future blocks: every kept block has a key some query of its block may see.
    nQ = plan.num_q_blocks
    first_key = torch.arange(plan.num_k_blocks) * s["block"]
    last_pos = torch.clamp((torch.arange(nQ) + 1) * s["block"], max=s["L"]) - 1
    assert not (plan.block_mask() & (first_key.view(1, -1) > last_pos.view(-1, 1))).any()
    # Forced structure every method keeps in its matrix setting: key 0 (sink) and the query itself.
    mask = plan.to_dense_mask(causal=True)
    rows = torch.arange(s["L"])
    assert mask[..., rows, rows].all(), "a query lost its own key"
    assert mask[..., :, 0].all(), "a query lost the sink key"
    # ...and the method is actually sparse there (so the matrix tests something).
    if name != "dense":
        assert plan.density() < 1.0


@pytest.mark.parametrize("s", SHAPES, ids=shape_id)
@pytest.mark.parametrize("name", METHODS)
def test_full_budget_equals_dense(name, s):
    q, k, v = make_qkv(s, seed=1)
    plan = build(name, "full", s, q, k, v)
    plan.validate(causal=True)
    mask = plan.to_dense_mask(causal=True)
    assert torch.equal(mask, dense_causal_mask(s["L"], s["L"]).expand_as(mask))
    out = block_sparse_attention(q, k, v, plan, backend="reference")
    ref = block_sparse_attention(q, k, v, None, backend="reference")
    assert torch.equal(out, ref)


@pytest.mark.parametrize("s", SHAPES, ids=shape_id)
@pytest.mark.parametrize("name", METHODS)
def test_minimal_budget_gives_exactly_the_forced_pattern(name, s):
    q, k, v = make_qkv(s, seed=2)
    plan = build(name, "minimal", s, q, k, v)
    plan.validate(causal=True)
    mask = plan.to_dense_mask(causal=True)
    want = expected_mask(CASES[name]["minimal_keep"], s, s["L"], s["L"])
    assert torch.equal(mask, want.expand_as(mask))


@pytest.mark.parametrize("s", SHAPES, ids=shape_id)
@pytest.mark.parametrize("name", METHODS)
def test_plans_are_deterministic(name, s):
    q, k, v = make_qkv(s, seed=3)
    a = plan_fields(build(name, "small", s, q, k, v))
    b = plan_fields(build(name, "small", s, q.clone(), k.clone(), v.clone()))
    for field, value in a.items():
        if value is None:
            assert b[field] is None, field
        else:
            assert torch.equal(value, b[field]), field


@pytest.mark.parametrize("name", METHODS)
def test_non_contiguous_inputs_give_the_same_plan(name):
    # Models hand attention q/k/v as transposed views of [B, L, H, D]; plans must not depend on it.
    s = SHAPES[-1]
    q, k, v = make_qkv(s, seed=5)
    qt, kt, vt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert not qt.is_contiguous()
    a = plan_fields(build(name, "small", s, q, k, v))
    b = plan_fields(build(name, "small", s, qt, kt, vt))
    for field, value in a.items():
        assert (value is None and b[field] is None) or torch.equal(value, b[field]), field


@pytest.mark.parametrize("s", SHAPES, ids=shape_id)
@pytest.mark.parametrize("name", PLANTED)
def test_estimate_finds_a_planted_key_column(name, s):
    j_star = s["L"] // 2 + 3  # away from the sink block and from the last block
    q, k, v = planted_qkv(s, j_star)
    plan = build(name, "planted", s, q, k, v)
    plan.validate(causal=True)
    mask = plan.to_dense_mask(causal=True)
    sees = mask[..., j_star:, j_star]  # every query at or after j_star
    assert sees.all(), f"{int((~sees).sum())} (batch, head, query) rows miss the planted column"
    assert plan.density() < 0.9


@pytest.mark.parametrize("name", METHODS)
def test_sparse_attention_equals_block_sparse_attention_with_the_plan(name):
    s = dict(B=1, Hq=6, Hkv=2, L=500, D=32, block=64)
    q, k, v = make_qkv(s, seed=4)
    opts = overrides(name, "small", s)
    out = sparse_attention(q, k, v, method=name, backend="reference", **opts)
    plan = get_method(name, **opts).plan(q, k, v)
    assert torch.equal(out, block_sparse_attention(q, k, v, plan, backend="reference"))


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("lq,lk", [(100, 700), (1, 333), (129, 129)])
def test_other_lengths_are_valid(name, lq, lk):
    s = dict(B=1, Hq=3, Hkv=1, L=lk, D=16, block=64)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 3, lq, 16, generator=g)
    k, v = torch.randn(2, 1, 1, lk, 16, generator=g)
    plan = build(name, "small", s, q, k, v)
    plan.validate(causal=True)
    assert (plan.q_len, plan.k_len) == (lq, lk)
    mask = plan.to_dense_mask(causal=True)
    rows = torch.arange(lq)
    assert mask[..., rows, rows + (lk - lq)].all(), "a query lost its own key"
    out = block_sparse_attention(q, k, v, plan, backend="reference")
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", METHODS)
def test_empty_inputs_give_an_empty_valid_plan(name):
    s = SHAPES[0]
    q, k, v = (torch.randn(1, 2, 0, 32) for _ in range(3))
    plan = build(name, "small", s, q, k, v)
    plan.validate(causal=True)
    assert plan.q_len == 0 and plan.k_len == 0


@pytest.mark.parametrize("name", METHODS)
def test_bad_config_raises_value_error_naming_the_field(name):
    for bad, word in CASES[name]["bad"]:
        with pytest.raises(ValueError, match=word):
            get_method(name, **bad)
    with pytest.raises(ValueError, match="valid options"):
        get_method(name, no_such_option=1)


@pytest.mark.parametrize("name", METHODS)
def test_bad_inputs_raise(name):
    m = get_method(name)
    q = torch.randn(1, 4, 64, 16)
    k = torch.randn(1, 3, 64, 16)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        m.plan(q, k, k)
    with pytest.raises(ValueError, match="one dtype"):
        m.plan(q, q.double(), q.double())
