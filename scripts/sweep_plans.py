"""Prefill kernel tile configs on real method plans (band plans, 64-blocks), on a GPU.

    python scripts/sweep_plans.py [--length 32768] [--shape 32/8/128] [--methods moa,duo,block_topk]
        [--configs default|all|64,64,4,3,1;...] [--pair default|both|on|off] [--densities 0.1,0.3]
        [--pair-max-block 128] [--model PATH --haystack DIR --layers 3,15,24]

For each method's plan on structured synthetic q/k/v (and random 64-block plans at the given
densities): our dense kernel, then the plan under each config, with the paired block walk on
and/or off, timed with do_bench (median), next to the ideal (plan density x dense time). A
method named ``dense`` sweeps the configs of the dense kernel (no plan).

``--model``: q/k/v captured from that model on the haystack text at the given layers instead
(shape from the model); each row then sums the layers, and every config's compiled kernel
shows its shared memory (the programs an SM holds at once).
"""

import argparse

import torch
import triton.testing

import sparseattn as sa
from sparseattn import BlockPlan
from sparseattn.bench.methods import add_capture_args, captured_from_args
from sparseattn.bench.synthetic import structured_qkv
from sparseattn.kernels import prefill_triton
from sparseattn.kernels.prefill_triton import attention_triton, default_config

p = argparse.ArgumentParser()
p.add_argument("--length", type=int, default=32768)
p.add_argument("--shape", default="32/8/128")
p.add_argument("--methods", default="moa,duo,block_topk,vertical_slash")
p.add_argument("--configs", default="all",
               help="'default', 'all' or 'BM,BN,warps,stages,tma;...' ('default' allowed in the list)")
p.add_argument("--pair", default="default", choices=["default", "on", "off", "both"],
               help="the paired walk: the kernel's rule (default), forced on / off, or both forced")
p.add_argument("--densities", default="", help="random 64-block plans at these block densities")
p.add_argument("--pair-max-block", type=int, default=None, help="widest key tile the paired walk may pair")
add_capture_args(p, model=None, length=False)  # --model: captured q/k/v instead of the synthetic generator
args = p.parse_args()
if args.pair_max_block:
    prefill_triton.PAIR_MAX_BLOCK_N = args.pair_max_block
if args.model:
    layers, captured = captured_from_args(args)  # contiguous, as bench methods
    inputs = [captured[i] for i in layers]
    Hq, Hkv, D = inputs[0][0].shape[1], inputs[0][1].shape[1], inputs[0][0].shape[3]
    args.shape = f"{Hq}/{Hkv}/{D} ({args.model} layers {args.layers})"
else:
    Hq, Hkv, D = (int(x) for x in args.shape.split("/"))
    inputs = [structured_qkv(1, Hq, Hkv, args.length, D, seed=0, device="cuda", dtype=torch.bfloat16)]
ALL_CONFIGS = [(128, 128, 8, 3, True), (128, 128, 8, 2, True), (128, 64, 8, 3, True), (128, 64, 4, 3, True),
               (64, 128, 4, 3, True), (64, 64, 4, 3, True), (64, 64, 4, 4, True), (128, 128, 8, 3, False)]
if args.configs == "all":
    CONFIGS = ALL_CONFIGS
elif args.configs == "default":
    CONFIGS = [None]
else:
    CONFIGS = [None if c == "default" else tuple(int(x) for x in c.split(",")) for c in args.configs.split(";")]
    CONFIGS = [c[:4] + (bool(c[4]),) if c is not None and len(c) > 4 else c for c in CONFIGS]
PAIRS = {"default": [None], "on": [True], "off": [False], "both": [False, True]}[args.pair]


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def shared_kb() -> str:
    kern = prefill_triton.last_compiled_kernel()
    shared = getattr(getattr(kern, "metadata", None), "shared", None)
    return f"{shared / 1024:.0f} KB smem" if shared is not None else "smem ?"


dense_per_input = [bench(lambda: attention_triton(q, k, v, None)) for q, k, v in inputs]
dense_ms = sum(dense_per_input)
print(f"{args.shape} L={args.length}: dense default {default_config(D, inputs[0][0].dtype)} {dense_ms:.3f} ms"
      + (" (sum over layers)" if len(inputs) > 1 else ""))
names = [n for n in args.methods.split(",") if n]
plans = {name: [None if name == "dense" else sa.get_method(name).plan(q, k, v) for q, k, v in inputs]
         for name in names}
nB = -(-args.length // 64)
for d in (float(x) for x in args.densities.split(",") if x):
    g = torch.Generator(device="cuda").manual_seed(0)
    bm = torch.rand(1, Hq, nB, nB, generator=g, device="cuda") < d
    plans[f"random{d:g}"] = [BlockPlan.from_block_mask(bm, block_q=64, block_k=64, q_len=args.length,
                                                       k_len=args.length)] * len(inputs)
for name, layer_plans in plans.items():
    densities = [1.0 if pl is None else float(pl.density()) for pl in layer_plans]
    ideal = sum(d * t for d, t in zip(densities, dense_per_input))
    first = layer_plans[0]
    print(f"== {name}: block {'-' if first is None else first.block_q}, "
          f"band {first is not None and first.has_band}, extra {first is not None and first.has_extra}, "
          f"density {sum(densities) / len(densities):.3f}, ideal {ideal:.3f} ms")
    refs = [None] * len(inputs)
    for cfg in CONFIGS:
        for pair in PAIRS:
            try:
                t, err = 0.0, 0.0
                for i, ((q, k, v), plan) in enumerate(zip(inputs, layer_plans)):
                    out = attention_triton(q, k, v, plan, config=cfg, pair_blocks=pair)
                    if refs[i] is None:
                        refs[i] = out.float()
                    err = max(err, (out.float() - refs[i]).abs().max().item())
                    t += bench(lambda: attention_triton(q, k, v, plan, config=cfg, pair_blocks=pair))
                print(f"   {str(cfg):28s} pair={'-' if pair is None else int(pair)} {t:8.3f} ms  x{t / ideal:.2f} ideal"
                      f"  maxdiff {err:.2e}  {shared_kb()}")
            except Exception as exc:
                print(f"   {str(cfg):28s} pair={'-' if pair is None else int(pair)} failed: {type(exc).__name__}: {exc}"[:300])
