"""Register caps and pipeline stages of the prefill kernel, on q/k/v captured from a real model (GPU).

    python scripts/sweep_register_caps.py --model ~/smol/smol.gguf --haystack DIR [--length 32768]
        [--layers 3,15,24] --set extra|plain [--methods ...] [--rounds 2]

``--set extra``: the extra-column walk (``extra_config`` = tile width, stages, pairs, padding-only
tile) with and without ``max_registers`` (vertical_slash, anchor). ``--set plain``: the block walk's
``config`` stages with and without a cap (64-block plans: block_topk; 128-block plans: flexprefill,
xattention). Per variant: the compiled kernel's registers, spills and shared memory (first layer)
and the max difference to the first variant; then per round (variant order reversed every other
round, against clock drift) the sum over layers of ``do_bench`` medians (ms). ``max_registers=0``
means no cap; ``None`` the kernel's rule. Session 18 ran both sets (BENCHMARKS.md).
"""

import argparse

import triton.testing

from sparseattn.bench.methods import add_capture_args, captured_from_args
from sparseattn.kernels.prefill_triton import attention_triton, last_compiled_kernel
from sparseattn.methods import get_method

EXTRA = [("default", None, None, None), ("s1 nocap", None, (64, 1, False, True), 0),
         ("s2 r168", None, (64, 2, False, True), 168), ("s3 r168", None, (64, 3, False, True), 168),
         ("s2 r160", None, (64, 2, False, True), 160), ("s2 r168 nopad", None, (64, 2, False, False), 168),
         ("n32 s2 r168", None, (32, 2, False, True), 168), ("n32 s3 r168", None, (32, 3, False, True), 168),
         ("pair s2 r168", None, (64, 2, True, True), 168)]
PLAIN_64 = [("default", None, None, None), ("cap168", None, None, 168), ("s3 cap168", (64, 64, 4, 3, True), None, 168),
            ("s2 nopair cap168", (64, 64, 4, 2, True), None, 168), ("cap128", None, None, 128)]
PLAIN_128 = [("default", None, None, None), ("nocap", None, None, 0), ("s3 nocap", (64, 128, 4, 3, True), None, 0),
             ("s2 nocap", (64, 128, 4, 2, True), None, 0), ("s2 cap168", (64, 128, 4, 2, True), None, 168),
             ("s3 cap168", (64, 128, 4, 3, True), None, 168)]

p = argparse.ArgumentParser()
add_capture_args(p)
p.add_argument("--set", choices=["extra", "plain"], required=True)
p.add_argument("--methods", default=None, help="default: vertical_slash,anchor (extra), "
               "block_topk,flexprefill,xattention (plain)")
p.add_argument("--rounds", type=int, default=2)
args = p.parse_args()
methods = args.methods or ("vertical_slash,anchor" if args.set == "extra" else "block_topk,flexprefill,xattention")
layers, qkv = captured_from_args(args)  # contiguous, as bench methods


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def call(q, k, v, plan, variant):
    _, config, extra, cap = variant
    return attention_triton(q, k, v, plan, config=config, extra_config=extra, max_registers=cap)


for name in methods.split(","):
    method, totals = get_method(name), {}
    for layer in layers:
        q, k, v = qkv[layer]
        plan = method.plan(q, k, v)
        variants = EXTRA if args.set == "extra" else PLAIN_64 if plan.block_k == 64 else PLAIN_128
        ref = call(q, k, v, plan, variants[0])
        for var in variants:
            out = call(q, k, v, plan, var)
            kern = last_compiled_kernel()
            if layer == layers[0]:
                print(f"  {name} {var[0]}: max|diff| {float((out.float() - ref.float()).abs().max()):.1e}, registers "
                      f"{kern.n_regs}, spills {kern.n_spills}, shared {kern.metadata.shared}")
        for r in range(args.rounds):
            for var in variants if r % 2 == 0 else variants[::-1]:
                totals.setdefault(var[0], [0.0] * args.rounds)[r] += bench(lambda: call(q, k, v, plan, var))
    print(f"{name} (block {plan.block_k}): sum over layers {args.layers} per round (ms)")
    for label, xs in totals.items():
        print(f"  {label:<18} " + " / ".join(f"{x:.3f}" for x in xs))
