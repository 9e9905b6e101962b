"""The method matrix: one entry per registered method, plus input builders.

Every registered method must appear in CASES (test_matrix.py checks it). Each entry says:

* ``small``: overrides that make the method visibly sparse on these small shapes;
* ``full``: overrides whose plan must equal dense causal attention;
* ``minimal``: the smallest budget, and ``minimal_keep(i_block, j_block, pos, j)`` the exact
  element rule it must give (independent of the method's code);
* ``planted``: overrides under which the estimate must find a planted key column (dynamic
  methods only; None for static patterns);
* ``bad``: invalid overrides, each with a word the error message must contain.

Overrides may be callables of the shape dict (for per-head fields).
"""

import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode

BIG = 10 ** 6


def block_rule(blocks_fn):
    """An element rule from a rule on (query block, key block) pairs; bottom-right causal."""
    return lambda s, qb, kb, pos, j: blocks_fn(s, qb, kb) & (j <= pos)


def diag_blocks(s, qb, kb):
    return kb == qb  # Lq == Lk and block_q == block_k in the matrix


CASES = {
    "dense": dict(
        small={}, full={}, minimal={}, minimal_keep=lambda s, qb, kb, pos, j: j <= pos, planted=None,
        bad=[({"block_size": 0}, "block_size"), ({"block_size": 64.0}, "block_size")]),
    "streaming": dict(
        small={"sink": 16, "window": 100}, full={"window": BIG}, minimal={"sink": 0, "window": 1},
        minimal_keep=lambda s, qb, kb, pos, j: j == pos, planted=None,
        bad=[({"window": 0}, "window"), ({"sink": -1}, "sink"), ({"sink": 1.5}, "sink")]),
    "tri_shape": dict(
        small={"sink": 16, "window": 100, "last_q": 50}, full={"window": 1, "last_q": BIG},
        minimal={"sink": 0, "window": 1, "last_q": 0}, minimal_keep=lambda s, qb, kb, pos, j: j == pos, planted=None,
        bad=[({"last_q": -1}, "last_q"), ({"window": 0}, "window")]),
    "block_topk": dict(
        small={"topk": 3}, full={"topk": BIG}, minimal={"topk": 0},
        minimal_keep=block_rule(lambda s, qb, kb: (kb == 0) | diag_blocks(s, qb, kb)),
        planted={"topk": 3},
        bad=[({"topk": -1}, "topk"), ({"selection": "mass"}, "selection"), ({"threshold": 1.5}, "threshold"),
             ({"gqa_policy": "vote"}, "gqa_policy"), ({"topk": [1, [2]]}, "topk")]),
    "xattention": dict(
        small={"threshold": 0.8}, full={"threshold": 1.0}, minimal={"threshold": 0.0},
        minimal_keep=block_rule(lambda s, qb, kb: (kb == 0) | diag_blocks(s, qb, kb)),
        planted={"threshold": 0.9},
        bad=[({"threshold": 1.1}, "threshold"), ({"threshold": -0.1}, "threshold"), ({"stride": 0}, "stride"),
             ({"stride": 48}, "multiple of stride"), ({"norm": 0.0}, "norm"), ({"threshold": []}, "threshold")]),
    "power": dict(
        small={}, full={"local_blocks": BIG}, minimal={"sink_blocks": 0, "local_blocks": 0, "max_power": 0},
        minimal_keep=block_rule(lambda s, qb, kb: (kb == qb) | (kb == qb - 1)), planted=None,
        bad=[({"sink_blocks": -1}, "sink_blocks"), ({"max_power": -1}, "max_power")]),
    "moa": dict(
        small={"sink": 16, "betas": 0.3}, full={"betas": 1.0}, minimal={"sink": 0, "alphas": 1.0, "betas": 0.0},
        minimal_keep=lambda s, qb, kb, pos, j: j == pos, planted=None,
        bad=[({"betas": -0.5}, "betas"), ({"alphas": float("nan")}, "alphas"), ({"gqa_policy": "x"}, "gqa_policy")]),
    "duo": dict(
        small={"sink": 16, "recent": 100}, full=lambda s: {"retrieval_heads": [True] * s["Hkv"]},
        minimal=lambda s: {"retrieval_heads": [False] * s["Hkv"], "sink": 0, "recent": 1},
        minimal_keep=lambda s, qb, kb, pos, j: j == pos, planted=None,
        bad=[({"sparsity": 1.5}, "sparsity"), ({"recent": 0}, "recent"), ({"retrieval_heads": [2]}, "retrieval_heads"),
             ({"retrieval_heads": True}, "retrieval_heads")]),
    "flexprefill": dict(
        small={"gamma": 0.5}, full={"gamma": 1.0, "tau": 0.0}, minimal={"gamma": 0.0, "tau": 0.0},
        minimal_keep=block_rule(lambda s, qb, kb: (kb == 0) | diag_blocks(s, qb, kb)),
        planted=lambda s: {"tau": 0.0, "min_budget": 2 * s["block"]},
        bad=[({"gamma": 1.5}, "gamma"), ({"tau": -1.0}, "tau"), ({"min_budget": 0}, "min_budget"),
             ({"min_budget": 512, "max_budget": 256}, "max_budget")]),
    "vertical_slash": dict(
        small={"vertical_size": 40, "slash_size": 100}, full={"vertical_size": BIG},
        minimal={"vertical_size": 0, "slash_size": 0, "sink_tokens": 0, "local_diagonals": 1},
        minimal_keep=block_rule(diag_blocks),
        planted={"vertical_size": 40, "slash_size": 100},
        bad=[({"vertical_size": -1}, "vertical_size"), ({"local_diagonals": 0}, "local_diagonals"),
             ({"last_q": 0}, "last_q"), ({"gqa_policy": "group_sum"}, "gqa_policy")]),
    "proxy": dict(
        small={"gamma": 0.5}, full={"gamma": 1.0}, minimal={"gamma": 0.0},
        minimal_keep=block_rule(lambda s, qb, kb: (kb == 0) | diag_blocks(s, qb, kb)),
        planted={"gamma": 0.5},
        bad=[({"gamma": 1.5}, "gamma"), ({"q_stride": 0}, "q_stride"), ({"q_stride": 48}, "multiple of q_stride"),
             ({"head_pool": "min"}, "head_pool"), ({"proxy_heads": 0}, "proxy_heads"),
             ({"gqa_policy": "group_sum"}, "gqa_policy")]),
    # dense_len=0: the official dense fallback (Lq <= 1024) would make these short inputs dense.
    # block_k = block_size: the matrix's square blocks (test_sale.py covers the official 64 x 32);
    # one-tile segments, so the minimal anchor is exactly the sink and the diagonal.
    "sale": dict(
        small=lambda s: {"threshold": 0.2, "dense_len": 0, "block_k": s["block"], "block_seg": s["block"]},
        full=lambda s: {"threshold": 0.0, "dense_len": 0, "block_k": s["block"], "block_seg": s["block"]},
        minimal=lambda s: {"threshold": 1e9, "local_window": 0, "dense_len": 0, "block_k": s["block"],
                           "block_seg": s["block"]},
        minimal_keep=block_rule(lambda s, qb, kb: (kb == 0) | diag_blocks(s, qb, kb)),
        planted=lambda s: {"threshold": 0.1, "local_window": 64, "dense_len": 0, "block_k": s["block"],
                           "block_seg": s["block"]},
        bad=[({"threshold": -0.1}, "threshold"), ({"bits": 3}, "bits"), ({"local_window": -1}, "local_window"),
             ({"dense_len": -1}, "dense_len"), ({"gqa_policy": "group_sum"}, "gqa_policy"),
             ({"block_k": 0}, "block_k"), ({"block_seg": 100}, "block_seg")]),
    # dense_queries=0: HiP's dense-prefix heuristic makes every row of these short inputs dense.
    "hip": dict(
        small=lambda s: {"mask_k": 2 * s["block"], "dense_queries": 0}, full={"mask_k": BIG},
        minimal={"mask_k": 0, "sliding_window": 0, "dense_queries": 0},
        minimal_keep=block_rule(lambda s, qb, kb: (kb == 0) | diag_blocks(s, qb, kb)),
        # A single planted token breaks HiP's locality assumption: one sampled token per node never
        # hits it, the node mean does (test_hip.py plants a needle *block* for the default sampling).
        planted=lambda s: {"mask_k": 2 * s["block"], "sampling": "mean", "sliding_window": 0, "dense_queries": 0},
        bad=[({"mask_k": -1}, "mask_k"), ({"scale_up": 1}, "scale_up"), ({"sampling": "max"}, "sampling"),
             ({"dense_queries": -1}, "dense_queries"), ({"gqa_policy": "group_sum"}, "gqa_policy")]),
    # step=2 so that these short inputs hold several groups; init = the first group (2 blocks).
    "anchor": dict(
        small={"step": 2, "theta": 2.7, "dense_tail": False}, full={"step": 2, "theta": 1e9},
        minimal={"step": 2, "theta": -1e9, "dense_tail": False},
        minimal_keep=block_rule(lambda s, qb, kb: (kb < 2) | ((kb >= qb // 2 * 2) & (kb <= qb))),
        planted={"step": 2, "theta": 0.0, "dense_tail": False},  # noise keys far below the threshold
        bad=[({"step": 0}, "step"), ({"granularity": "pixel"}, "granularity"), ({"theta": float("nan")}, "theta"),
             ({"local_groups": 0}, "local_groups"), ({"dense_tail": 1}, "dense_tail")]),
    # "columns" where the permutation matters: with segment_size = 2 * block the "blocks" mapping is
    # nearly segment-level, i.e. dense on these short inputs (test_pbs.py checks it against a loop).
    # segment_size = block in "minimal": permuting inside a block leaves block membership alone, so
    # the forced first-key block is block 0 and the minimal plan is data-independent.
    "pbs": dict(
        small=lambda s: {"segment_size": 2 * s["block"], "threshold": 0.5, "mapping": "columns"},
        full={"threshold": 1.0},
        minimal=lambda s: {"segment_size": s["block"], "threshold": 0.0},
        minimal_keep=block_rule(lambda s, qb, kb: (kb == 0) | diag_blocks(s, qb, kb)),
        planted=lambda s: {"segment_size": 2 * s["block"], "threshold": 0.5, "mapping": "columns"},
        bad=[({"segment_size": 100}, "multiple of block_size"), ({"segment_size": 0}, "segment_size"),
             ({"threshold": 1.5}, "threshold"), ({"mapping": "perm"}, "mapping"),
             ({"force_first_block": 1}, "force_first_block")]),
}

# Lengths not multiples of the block; GQA 1 and 3; batch 1 and 2.
SHAPES = [
    dict(B=1, Hq=2, Hkv=2, L=333, D=32, block=64),
    dict(B=2, Hq=6, Hkv=2, L=1025, D=32, block=128),
]


def shape_id(s):
    return f"L{s['L']}-b{s['block']}-g{s['Hq'] // s['Hkv']}"


def overrides(name, key, s):
    value = CASES[name][key]
    value = value(s) if callable(value) else value
    return dict(value, block_size=s["block"])


def make_qkv(s, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(s["B"], s["Hq"], s["L"], s["D"], generator=g, dtype=dtype)
    k = torch.randn(s["B"], s["Hkv"], s["L"], s["D"], generator=g, dtype=dtype)
    v = torch.randn(s["B"], s["Hkv"], s["L"], s["D"], generator=g, dtype=dtype)
    return q, k, v


def planted_qkv(s, j_star, seed=0):
    """Every query aligns with one direction ``u``; key ``j_star`` is ``8 u``, the other keys are
    small noise, so every query that can see ``j_star`` puts almost all its attention there."""
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, L, D = s["B"], s["Hq"], s["Hkv"], s["L"], s["D"]
    u = torch.randn(D, generator=g)
    u = u / u.norm() * math.sqrt(D)
    q = u + 0.5 * torch.randn(B, Hq, L, D, generator=g)
    k = 0.5 * torch.randn(B, Hkv, L, D, generator=g)
    k[:, :, j_star] = 8 * u
    v = torch.randn(B, Hkv, L, D, generator=g)
    return q, k, v


def dense_causal_mask(Lq, Lk):
    pos = torch.arange(Lq).view(-1, 1) + (Lk - Lq)
    return torch.arange(Lk).view(1, -1) <= pos


def expected_mask(rule, s, Lq, Lk):
    i = torch.arange(Lq).view(-1, 1)
    j = torch.arange(Lk).view(1, -1)
    pos = i + (Lk - Lq)
    return rule(s, i // s["block"], j // s["block"], pos, j)


# ----------------------------------------------------------------------------- plan equality
def fields(plan):
    return [getattr(plan, n) for n in ("kv_counts", "kv_indices", "band_sink", "band_window", "extra_counts",
                                       "extra_indices")]


def assert_same_plan(a, b):
    for x, y in zip(fields(a), fields(b)):
        assert (x is None) == (y is None)
        if x is not None:
            assert torch.equal(x.cpu(), y.cpu())


def assert_triton_plan_equals_torch(module, method, q, k, v, monkeypatch):
    """``method``'s Triton estimate (forced on, also in the interpreter) gives the PyTorch path's plan."""
    monkeypatch.setattr(module, "use_triton_estimator", lambda x: False)
    want = method._plan(q, k, v, causal=True, layer_idx=None)  # _plan: no CUDA-graph caching between the two
    monkeypatch.setattr(module, "use_triton_estimator", lambda x: True)
    got = method._plan(q, k, v, causal=True, layer_idx=None)
    got.validate(causal=True)
    assert_same_plan(got, want)
    assert 0.0 < got.density() < 1.0


class LaunchCounter(TorchDispatchMode):
    """Counts the PyTorch ops that launch work (not views or allocations) and the Triton launches
    (inside a launch nothing is counted: the interpreter runs tensor ops of its own)."""

    FREE = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default,
            torch.ops.aten.empty_like.default, torch.ops.aten.lift_fresh.default}

    def __init__(self):
        super().__init__()
        self.torch_ops, self.triton, self.in_launch = [], [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (self.in_launch or func.is_view or func in self.FREE):
            self.torch_ops.append(str(func))
        return func(*args, **(kwargs or {}))

    def launch(self, name, run, *args, **kwargs):
        """``run(*args, **kwargs)`` counted as one launch named ``name`` (nothing inside it counts)."""
        if not self.in_launch:
            self.triton.append(name)
        self.in_launch += 1
        try:
            return run(*args, **kwargs)
        finally:
            self.in_launch -= 1


def count_launches(fn, monkeypatch, single=()):
    """``(fn(), counter)`` with every Triton launch and PyTorch op ``fn`` makes counted
    (:class:`LaunchCounter`); ``single``: ``(owner, attribute)`` pairs whose calls count as one
    launch each (e.g. a helper that launches a kernel on CUDA and runs PyTorch ops on the CPU)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    counter = LaunchCounter()
    for cls in (InterpretedFunction, JITFunction):
        def counted(self, *args, _run=cls.run, **kwargs):
            return counter.launch(getattr(self, "__name__", "?"), _run, self, *args, **kwargs)

        monkeypatch.setattr(cls, "run", counted)
    for owner, name in single:
        original = getattr(owner, name)

        def counted_call(*args, _run=original, _name=name, **kwargs):
            return counter.launch(_name, _run, *args, **kwargs)

        monkeypatch.setattr(owner, name, counted_call)
    with counter:
        out = fn()
    return out, counter


def plan_without_sync(method, q, k, v):
    """``method._plan(q, k, v)`` on CUDA after a warm-up call, with host syncs turned into errors;
    the plan, validated."""
    method._plan(q, k, v, causal=True, layer_idx=None)  # warm-up (compiles, caches)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        plan = method._plan(q, k, v, causal=True, layer_idx=None)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    plan.validate(causal=True)
    return plan


def replays_and_torch_plan(method, q, k, v, plan):
    """Checks that ``method.plan`` gives ``plan`` eagerly, at its graph capture and at a replay;
    returns the PyTorch path's plan of the same inputs (``SPARSEATTN_ESTIMATORS=torch``)."""
    import os

    for _ in range(3):  # eager, capture, replay
        assert_same_plan(method.plan(q, k, v), plan)
    os.environ["SPARSEATTN_ESTIMATORS"] = "torch"
    try:
        return method._plan(q, k, v, causal=True, layer_idx=None)
    finally:
        del os.environ["SPARSEATTN_ESTIMATORS"]


def torch_profiles(q, k, n_last, *, pool_block=None, sink_columns=0, local_diagonals=0, out=None):
    """The PyTorch twin of ``last_queries_profiles_triton`` (pooled keys, forced entries, ``out``
    included): that kernel has its own tests; in the estimators' tests it is too slow for the
    interpreter and would blur which part a difference comes from, so both paths start from the
    same profiles."""
    from sparseattn.methods.base import diagonal_sums, last_queries_attention, pool_blocks

    a = last_queries_attention(q, k, n_last)
    col, diag = a.sum(-2), diagonal_sums(a)
    col[..., :sink_columns] = float("inf")
    diag[..., max(k.shape[2] - local_diagonals, 0):] = float("inf")
    if out is not None:
        out.copy_(torch.stack((col, diag)))
        col, diag = out.unbind(0)
    return (col, diag) + ((pool_blocks(k, pool_block).float(),) if pool_block is not None else ())
