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
