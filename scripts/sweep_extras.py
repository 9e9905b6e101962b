"""Sweep how the prefill kernel walks a plan's extra key columns, on q/k/v captured from a real model (GPU).

    python scripts/sweep_extras.py --model ~/smol/smol.gguf --haystack DIR [--length 32768]
        [--layers 3,15,24] [--methods vertical_slash] [--widths 32,64,128]
        [--stages 1,2,3] [--main-stages 2,3] [--rounds 2] [--probe]

Per layer and method the kernel runs on the method's plan with every pipeline depth of the
block walk (``--main-stages``) and ``extra_config`` = (EXTRA_N tile width, pipeline stages, two
tiles per unmasked step, padding-only masks on the partial tile) of the grid, and once
without the extra columns ("blocks only": the floor the columns add to). Timings are ``do_bench``
medians in ms; ``rounds`` repeats the whole grid so drift shows. Each variant's output is
checked against the first variant's (max abs difference).
The last table sums the layers per variant: the kernel's extra-column time is
``plan - blocks only``, and "x share" compares it with the columns' share of the ideal time
(density of the columns x dense time).

``--probe`` first times, per layer, the kernel compiled for extra columns but given none (the
cost of the compiled variant itself) and given each row's count of columns at the contiguous keys
``0 .. count - 1`` (timing only: that plan counts some keys twice), and prints each compiled
kernel's registers, spills, shared memory and how many asynchronous copies / tensor-core ops
its TTGIR holds.
"""

import argparse
import dataclasses
import itertools

import torch
import triton.testing

from sparseattn.bench.methods import add_capture_args, captured_from_args
from sparseattn.kernels.prefill_triton import (
    attention_triton,
    default_config,
    last_compiled_kernel,
)
from sparseattn.methods import get_method

p = argparse.ArgumentParser()
add_capture_args(p)
p.add_argument("--methods", default="vertical_slash")
p.add_argument("--widths", default="32,64,128")
p.add_argument("--stages", default="1,2,3")
p.add_argument("--rounds", type=int, default=2)
p.add_argument("--probe", action="store_true")
p.add_argument("--main-stages", default="2,3", help="pipeline stages of the block walk (the kernel's num_stages)")
args = p.parse_args()

layers, qkv = captured_from_args(args)  # contiguous, as bench methods
print(f"{args.model}, {args.length} tokens, {torch.cuda.get_device_name()}")

variants = [(None, None)]  # the kernel's defaults
for ms_, n, s_, pair, pad in itertools.product([int(x) for x in args.main_stages.split(",")],
                                               [int(x) for x in args.widths.split(",")],
                                               [int(x) for x in args.stages.split(",")], (False, True), (False, True)):
    if pair and n > 64:  # two 128-wide gathered tiles need twice the registers of the tuned tile
        continue
    variants.append((ms_, (n, s_, pair, pad)))


def label(var):
    main, extra = var
    if main is None and extra is None:
        return "default"
    return "main s{} | n{} s{} pair{:d} pad{:d}".format(main, *extra)


def run(q, k, v, plan, var):
    main, extra = var
    config = None
    if main is not None:
        config = (*default_config(q.shape[-1], q.dtype)[:3], main, True)
    return attention_triton(q, k, v, plan, causal=True, config=config, extra_config=extra)


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def kernel_facts() -> str:
    kern = last_compiled_kernel()
    ir = getattr(kern, "asm", {}).get("ttgir", "")
    ops = {"async copies": ir.count("async_copy_global_to_local"), "tma loads": ir.count("async_tma_copy"),
           "wgmma": ir.count("warp_group_dot ")}
    shared = getattr(getattr(kern, "metadata", None), "shared", "?")
    return (f"regs {getattr(kern, 'n_regs', '?')}, spills {getattr(kern, 'n_spills', '?')}, shared {shared}; "
            + ", ".join(f"{k} {v}" for k, v in ops.items()))


def probe(q, k, v, plan, blocks, facts):
    """The compiled extra-column variant with no columns, and with contiguous columns."""
    attention_triton(q, k, v, blocks, causal=True)
    print(f"  probe: blocks only: {kernel_facts()}")
    none = dataclasses.replace(plan, extra_counts=torch.zeros_like(plan.extra_counts))
    ms = bench(lambda: attention_triton(q, k, v, none, causal=True))
    print(f"  probe: extras compiled, none: {ms:.3f} ms; {kernel_facts()}")
    ms = bench(lambda: run(q, k, v, none, (2, None)))
    print(f"  probe: extras compiled, none, main s2: {ms:.3f} ms; {kernel_facts()}")
    width = plan.extra_indices.shape[-1]
    contiguous = torch.arange(width, device=q.device, dtype=plan.extra_indices.dtype).expand_as(plan.extra_indices)
    contig = dataclasses.replace(plan, extra_indices=contiguous.contiguous())
    ms = bench(lambda: attention_triton(q, k, v, contig, causal=True))
    print(f"  probe: same counts at keys 0..count-1 (timing only): {ms:.3f} ms")
    for var in variants if facts else ():  # the compiled kernels do not depend on the layer
        run(q, k, v, plan, var)
        print(f"  probe: {label(var)}: {kernel_facts()}")


totals = {}  # (method, variant label) -> [sum of ms per round]
floors = {}  # method -> sum of blocks-only ms
shares = {}  # method -> sum of the columns' ideal ms
for name in args.methods.split(","):
    method = get_method(name)
    for layer in layers:
        q, k, v = qkv[layer]
        plan = method.plan(q, k, v)
        if not plan.has_extra:
            print(f"{name} layer {layer}: no extra columns")
            continue
        blocks = dataclasses.replace(plan, extra_counts=None, extra_indices=None)
        dense_ms = bench(lambda: attention_triton(q, k, v, None, causal=True))
        floor_ms = bench(lambda: attention_triton(q, k, v, blocks, causal=True))
        col_density = plan.density() - blocks.density()
        floors[name] = floors.get(name, 0.0) + floor_ms
        shares[name] = shares.get(name, 0.0) + col_density * dense_ms
        print(f"{name} layer {layer}: dense {dense_ms:.3f} ms, blocks only {floor_ms:.3f} ms "
              f"(density {blocks.density():.3f}); {float(plan.extra_counts.float().mean()):.0f} columns per row "
              f"(density {col_density:.4f}, ideal {col_density * dense_ms:.3f} ms)")
        if args.probe:
            probe(q, k, v, plan, blocks, facts=layer == layers[0])
        ref = attention_triton(q, k, v, plan, causal=True)
        for r in range(args.rounds):
            for var in variants:
                out = run(q, k, v, plan, var)
                diff = float((out.float() - ref.float()).abs().max())
                ms = bench(lambda: run(q, k, v, plan, var))
                totals.setdefault((name, label(var)), [0.0] * args.rounds)[r] += ms
                if r == 0:
                    print(f"  {label(var):<32} {ms:.3f} ms  columns {ms - floor_ms:.3f} ms  max|diff| {diff:.2e}")

print("\nsum over layers (ms per round; columns = plan - blocks only; x share = columns / their ideal time)")
for name in floors:
    print(f"{name}: blocks only {floors[name]:.3f} ms, columns' ideal {shares[name]:.3f} ms")
    rows = sorted(((min(v), lab, v) for (m, lab), v in totals.items() if m == name))
    for best, lab, v in rows:
        cols = best - floors[name]
        print(f"  {lab:<32} {' / '.join(f'{x:.3f}' for x in v)}  columns {cols:.3f} ms = "
              f"{cols / shares[name]:.2f} x share")
