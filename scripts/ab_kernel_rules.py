"""A/B of the prefill kernel's tile rules, end to end (estimate + kernel), rounds interleaved (GPU).

    python scripts/ab_kernel_rules.py --model ~/smol/smol.gguf --haystack DIR [--length 32768]
        [--layers 3,15,24] [--methods vertical_slash] [--rule extra] [--rounds 8]

Arm "before" switches one rule of ``kernels/prefill_triton.py`` off, arm "after" keeps it:

* ``extra``: extra-column plans at D=64 with the block walk at 3 stages, the columns at 2 and no
  padding-only tile (the rules before session 17).
* ``regcap``: extra-column plans at D=64 with the columns at 1 stage and no register cap (the rule
  of session 17) against 2 stages with the registers capped (session 18).
* ``plain``: plain sparse plans on D=64's tuned 64 x 128 tile at 3 stages, uncapped (before session
  18) against ``_PLAIN_TILE_RULES`` (2 stages, registers capped).
* ``topn``: vertical-slash's top-n selections on one program per row against the split path for a
  few long rows (``row_select_triton.top_n_split``, session 19). Not a kernel rule: an estimate rule.

(Session 17 also tried 128 x 64 tiles for 128-block plans this way and dropped them: BENCHMARKS.md.)

Each round times, per arm (order alternating between rounds, so clock drift hits both arms alike)
and method, ``block_sparse_attention(q, k, v, method.plan(..., transient=True))`` on every layer
and our dense kernel on it (``do_bench`` medians), and takes sum(total) / sum(density x dense),
the issue-3 ratio. Printed: per arm the median (min-max) over rounds, and the median of the
per-round ratio after / before.
"""

import argparse
import statistics

import torch
import triton.testing

import sparseattn as sa
from sparseattn.bench.methods import add_capture_args, captured_from_args
from sparseattn.kernels import prefill_triton as pt
from sparseattn.kernels import row_select_triton as rs
from sparseattn.methods.graphs import clear_estimator_graphs

p = argparse.ArgumentParser()
add_capture_args(p)
p.add_argument("--methods", default="vertical_slash")
p.add_argument("--rule", default="extra", choices=["extra", "regcap", "plain", "topn"])
p.add_argument("--rounds", type=int, default=8)
args = p.parse_args()

NOW = (pt._SMALL_BLOCK_RULES[(64, 64)]["extra"], dict(pt._EXTRA_RULES), pt.EXTRA_PAD_TAIL,
       dict(pt._PLAIN_TILE_RULES), rs.TOP_N_SPLIT_ROWS)
AFTER = {"extra": NOW, "regcap": NOW, "plain": NOW, "topn": NOW}
BEFORE = {"extra": ((True, 3), {}, False, *NOW[3:]), "regcap": (NOW[0], {(64, 64): (1, False, None)}, *NOW[2:]),
          "plain": (*NOW[:3], {}, NOW[4]), "topn": (*NOW[:4], 0)}


def set_arm(values) -> None:
    if values[4] != rs.TOP_N_SPLIT_ROWS:
        clear_estimator_graphs()  # the captured estimates hold the other selection's launches
    pt._SMALL_BLOCK_RULES[(64, 64)]["extra"], extra_rules, pt.EXTRA_PAD_TAIL, plain_rules, split_rows = values
    rs.TOP_N_SPLIT_ROWS = split_rows
    pt._EXTRA_RULES.clear()
    pt._EXTRA_RULES.update(extra_rules)
    pt._PLAIN_TILE_RULES.clear()
    pt._PLAIN_TILE_RULES.update(plain_rules)


layers, captured = captured_from_args(args)  # contiguous, as bench methods
inputs = [captured[i] for i in layers]
print(f"{args.model}, {args.length} tokens, layers {args.layers}, rule {args.rule!r}, {torch.cuda.get_device_name()}")


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


methods = {name: sa.get_method(name) for name in args.methods.split(",")}
densities = {name: [float(m.plan(q, k, v).density()) for q, k, v in inputs] for name, m in methods.items()}
ratios = {(name, arm): [] for name in methods for arm in ("before", "after")}
for r in range(args.rounds):
    arms = [("before", BEFORE[args.rule]), ("after", AFTER[args.rule])]
    for arm, values in arms if r % 2 == 0 else arms[::-1]:
        set_arm(values)
        for name, method in methods.items():
            total = ideal = 0.0
            for (q, k, v), d in zip(inputs, densities[name]):
                dense = bench(lambda: sa.block_sparse_attention(q, k, v, None))
                total += bench(lambda: sa.block_sparse_attention(q, k, v, method.plan(q, k, v, transient=True)))
                ideal += d * dense
            ratios[(name, arm)].append(total / ideal)
set_arm(AFTER[args.rule])

for name in methods:
    line = []
    for arm in ("before", "after"):
        xs = ratios[(name, arm)]
        line.append(f"{arm} {statistics.median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})")
    per_round = [a / b for a, b in zip(ratios[(name, "after")], ratios[(name, "before")])]
    print(f"{name:<16} density {sum(densities[name]) / len(inputs):.3f}  " + "  ".join(line)
          + f"  after/before {statistics.median(per_round):.3f} ({min(per_round):.3f}-{max(per_round):.3f})")
