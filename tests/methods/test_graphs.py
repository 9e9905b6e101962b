"""CUDA-graph replay of estimators (methods/graphs.py): the replayed plan is the eager plan.

On CUDA every value-dependent method's plan through a captured graph must equal its eager plan,
follow new input values, and not change plans already returned. The CPU tests check what does
not need a GPU: graphs never apply to CPU tensors, the switch, and that the cache key separates
configs and shapes.
"""

import logging

import pytest
import torch

import sparseattn as sa
from sparseattn.methods import graphs
from sparseattn.methods.base import PrefillMethod
from sparseattn.plan import BlockPlan

from ..conftest import requires_cuda

GRAPHED = ["block_topk", "xattention", "flexprefill", "vertical_slash", "proxy", "pbs", "hip", "sale", "anchor",
           "duo"]


def plans_equal(a: BlockPlan, b: BlockPlan) -> bool:
    if (a.block_q, a.block_k, a.q_len, a.k_len) != (b.block_q, b.block_k, b.q_len, b.k_len):
        return False
    for name in ("kv_counts", "band_sink", "band_window", "extra_counts"):
        x, y = getattr(a, name), getattr(b, name)
        if (x is None) != (y is None) or (x is not None and not torch.equal(x.expand_as(y), y)):
            return False
    # Only the listed entries of each row matter (padding after the count is free).
    return torch.equal(a.block_mask(), b.block_mask()) and (
        a.extra_counts is None or torch.equal(a.to_dense_mask(), b.to_dense_mask()))


def qkv(seed, device, L=700, dtype=torch.bfloat16):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(1, 6, L, 64, generator=g).to(device, dtype)
    k = torch.randn(1, 2, L, 64, generator=g).to(device, dtype)
    v = torch.randn(1, 2, L, 64, generator=g).to(device, dtype)
    return q, k, v


@pytest.fixture
def graphs_on():
    graphs.clear_estimator_graphs()
    sa.set_estimator_graphs(True)
    yield
    sa.set_estimator_graphs(True)
    graphs.clear_estimator_graphs()


# ----------------------------------------------------------------------------- CPU
def test_graphs_never_apply_to_cpu_tensors(graphs_on):
    q, k, v = qkv(0, "cpu", L=300, dtype=torch.float32)
    method = sa.get_method("block_topk", topk=3)
    assert graphs.graphed_plan(method, q, k, v, causal=True, layer_idx=None) is None
    assert len(graphs._graphs) == 0
    plan = method.plan(q, k, v)
    assert plan.kv_counts.device.type == "cpu" and len(graphs._graphs) == 0


def test_switch_validates_and_clears(graphs_on):
    with pytest.raises(ValueError, match="must be a bool"):
        sa.set_estimator_graphs("yes")
    graphs._graphs[("x",)] = graphs._SEEN
    sa.set_estimator_graphs(False)
    assert not graphs.estimator_graphs_enabled() and len(graphs._graphs) == 0


def test_key_separates_configs_and_shapes_and_layers_only_for_tables():
    q, k, v = qkv(0, "cpu", L=300, dtype=torch.float32)
    a = graphs._key(sa.get_method("block_topk", topk=3), q, k, v, True, None)
    assert a == graphs._key(sa.get_method("block_topk", topk=3), q, k, v, True, None)
    assert a != graphs._key(sa.get_method("block_topk", topk=4), q, k, v, True, None)
    assert a != graphs._key(sa.get_method("block_topk", topk=3), q[:, :, :200], k, v, True, None)
    assert a != graphs._key(sa.get_method("block_topk", topk=3), q.double(), k.double(), v.double(), True, None)
    # the layers of one forward share a graph, unless a field is a per-(layer, head) table
    assert a == graphs._key(sa.get_method("block_topk", topk=3), q, k, v, True, 3)
    table = sa.get_method("block_topk", topk=[[2, 3], [4, 5]])
    assert graphs._key(table, q, k, v, True, 0) != graphs._key(table, q, k, v, True, 1)


def test_transient_is_checked_and_changes_nothing_off_the_graph_path(graphs_on):
    q, k, v = qkv(0, "cpu", L=300, dtype=torch.float32)
    method = sa.get_method("block_topk", topk=3)
    with pytest.raises(ValueError, match="transient must be a bool"):
        method.plan(q, k, v, transient=1)
    assert plans_equal(method.plan(q, k, v, transient=True), method.plan(q, k, v))


def test_copy_plan_is_independent():
    plan = BlockPlan.from_block_mask(torch.ones(1, 2, 3, 3, dtype=torch.bool), block_q=16, block_k=16, q_len=40,
                                     k_len=40, causal=True)
    copy = graphs._copy_plan(plan)
    assert plans_equal(plan, copy) and copy.kv_indices.data_ptr() != plan.kv_indices.data_ptr()


# ----------------------------------------------------------------------------- GPU
def two_inputs_with_eager_plans(method):
    """Two CUDA inputs and ``method``'s eager plans of them (graphs off for those, on after)."""
    x1, x2 = qkv(1, "cuda"), qkv(2, "cuda")
    sa.set_estimator_graphs(False)
    eager1, eager2 = method.plan(*x1), method.plan(*x2)
    sa.set_estimator_graphs(True)
    return x1, x2, eager1, eager2


@requires_cuda
@pytest.mark.parametrize("name", GRAPHED)
def test_graphed_plan_equals_eager_and_follows_inputs(graphs_on, name):
    method = sa.get_method(name)
    (q1, k1, v1), (q2, k2, v2), eager1, eager2 = two_inputs_with_eager_plans(method)
    first = method.plan(q1, k1, v1)  # eager (first sight of the key)
    assert list(graphs._graphs.values()) == [graphs._SEEN], name
    second = method.plan(q1, k1, v1)  # captures, replays
    assert isinstance(graphs._graphs[next(iter(graphs._graphs))], graphs._Graph), name
    kept = graphs._copy_plan(second)
    third = method.plan(q2, k2, v2)  # replays with new values
    assert plans_equal(first, eager1) and plans_equal(second, eager1), name
    assert plans_equal(third, eager2), name
    assert plans_equal(second, kept), f"{name}: a later replay changed a plan already returned"
    assert plans_equal(method.plan(q1, k1, v1), eager1), name
    # other layers of the same forward replay the same graph
    assert plans_equal(method.plan(q2, k2, v2, layer_idx=7), eager2) and len(graphs._graphs) == 1, name


@requires_cuda
@pytest.mark.parametrize("name", ["flexprefill", "block_topk", "vertical_slash"])
def test_direct_graph_reads_the_callers_addresses(graphs_on, name):
    # Inputs at the same addresses twice in a row: a direct graph (no input copies) is captured and
    # replayed; it must follow new values written at those addresses and leave other addresses to
    # the copy graph.
    method = sa.get_method(name)
    (q1, k1, v1), (q2, k2, v2), eager1, eager2 = two_inputs_with_eager_plans(method)
    plans = [method.plan(q1, k1, v1) for _ in range(3)]  # eager, copy graph, direct graph
    direct = [key for key in graphs._graphs if "direct" in key]
    assert len(direct) == 1 and graphs._graphs[direct[0]].inputs is None, name
    assert all(plans_equal(p, eager1) for p in plans), name
    kept = graphs._copy_plan(plans[2])
    q1.copy_(q2), k1.copy_(k2), v1.copy_(v2)  # new values at the same addresses
    assert plans_equal(method.plan(q1, k1, v1), eager2), name
    assert plans_equal(plans[2], kept), f"{name}: a direct replay changed a plan already returned"
    q3, k3, v3 = (x.clone() for x in qkv(1, "cuda"))  # other addresses: the copy graph
    assert plans_equal(method.plan(q3, k3, v3), eager1), name
    assert len([key for key in graphs._graphs if "direct" in key]) == 1, name
    assert plans_equal(method.plan(q1, k1, v1), eager2), name  # back at the first addresses: direct again


@requires_cuda
@pytest.mark.parametrize("name", ["flexprefill", "vertical_slash", "xattention"])
def test_transient_plans_are_the_graphs_buffers(graphs_on, name):
    # transient=True: a replayed plan is the graph's own tensors (no copy), equal to the eager plan,
    # and the graph's next replay overwrites it; without it, the caller owns a copy.
    method = sa.get_method(name)
    (q1, k1, v1), (q2, k2, v2), eager1, eager2 = two_inputs_with_eager_plans(method)
    method.plan(q1, k1, v1)  # eager
    owned = method.plan(q1, k1, v1)  # captures, replays, copies
    transient = method.plan(q1, k1, v1, transient=True)  # a direct graph now (the same addresses)
    again = method.plan(q1, k1, v1, transient=True)
    assert plans_equal(owned, eager1) and plans_equal(transient, eager1), name
    assert again.kv_indices.data_ptr() == transient.kv_indices.data_ptr(), name  # the same buffers
    assert owned.kv_indices.data_ptr() != transient.kv_indices.data_ptr(), name
    q1.copy_(q2), k1.copy_(k2), v1.copy_(v2)
    method.plan(q1, k1, v1, transient=True)  # the next replay overwrites the transient plan
    torch.cuda.synchronize()
    assert plans_equal(transient, eager2) and plans_equal(owned, eager1), name
    # what sparse_attention runs: the same output as through an owned plan
    out = sa.sparse_attention(q1, k1, v1, method=method)
    want = sa.block_sparse_attention(q1, k1, v1, eager2)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


class _SyncingMethod(PrefillMethod):
    name = "test_syncing"

    def _plan(self, q, k, v, *, causal, layer_idx):
        n = int(q.float().abs().sum() > 0)  # a host sync: the capture refuses it
        mask = torch.ones(1, 1, -(-q.shape[2] // 64), -(-k.shape[2] // 64), dtype=torch.bool, device=q.device)
        return BlockPlan.from_block_mask(mask & bool(n), block_q=64, block_k=64, q_len=q.shape[2], k_len=k.shape[2],
                                         causal=causal)


@requires_cuda
def test_uncapturable_method_falls_back_to_eager(graphs_on, caplog):
    method = _SyncingMethod()
    q, k, v = qkv(3, "cuda", L=200)
    with caplog.at_level(logging.WARNING, logger="sparseattn"):
        plan = method.plan(q, k, v)
    assert "without a CUDA graph" in caplog.text
    assert list(graphs._graphs.values()) == [graphs._EAGER]
    assert torch.equal(plan.kv_counts.cpu(), torch.tensor([[[1, 2, 3, 4]]], dtype=torch.int32))
    assert plans_equal(method.plan(q, k, v), plan)  # the next call goes straight to eager


@requires_cuda
def test_graph_count_is_bounded(graphs_on):
    method = sa.get_method("block_topk")
    for L in range(300, 300 + 64 * (graphs.MAX_GRAPHS + 3), 64):
        q, k, v = qkv(0, "cuda", L=L)
        method.plan(q, k, v)
        method.plan(q, k, v)
    captured = sum(isinstance(x, graphs._Graph) for x in graphs._graphs.values())
    assert captured == graphs.MAX_GRAPHS


@requires_cuda
def test_inputs_that_require_grad(graphs_on):
    method = sa.get_method("block_topk")
    q, k, v = qkv(4, "cuda")
    q.requires_grad_(True)  # e.g. a training forward: the plan itself needs no gradient
    plans = [method.plan(q, k, v) for _ in range(3)]  # eager, capture + replay, replay
    assert isinstance(graphs._graphs[next(iter(graphs._graphs))], graphs._Graph)
    assert all(plans_equal(p, plans[0]) for p in plans)


@pytest.mark.parametrize("name", sa.list_methods(kind="prefill"))
def test_declared_reads_are_all_the_estimate_reads(name):
    # The graph replay copies only what a method declares it reads (reads_values, query_rows_read):
    # values elsewhere must not change its plan (the PyTorch path, here on the CPU).
    method = sa.get_method(name)
    if name == "sale":  # its CPU estimate at this size takes minutes; the GPU twin covers it
        method = method.replace(block_size=64)
    q, k, v = qkv(3, "cpu", L=300, dtype=torch.float32)
    base = method.plan(q, k, v)
    rows = method.query_rows_read(q.shape[2])
    assert 1 <= rows <= q.shape[2]
    q2 = q.clone()
    q2[:, :, : q.shape[2] - rows] = torch.randn_like(q2[:, :, : q.shape[2] - rows])
    v2 = v if method.reads_values else torch.randn_like(v)
    assert plans_equal(method.plan(q2, k, v2), base), name
