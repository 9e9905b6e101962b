"""Prefill kernel tile configs on real method plans (band plans, 64-blocks), on a GPU.

    python scripts/sweep_plans.py [--length 32768] [--shape 32/8/128] [--methods moa,duo,block_topk]
        [--configs default|all|64,64,4,3,1;...] [--pair default|both|on|off] [--densities 0.1,0.3]
        [--pair-max-block 128]

For each method's plan on structured synthetic q/k/v (and random 64-block plans at the given
densities): our dense kernel, then the plan under each config, with the paired block walk on
and/or off, timed with do_bench (median), next to the ideal (plan density x dense time).
"""

import argparse

import torch
import triton.testing

import sparseattn as sa
from sparseattn import BlockPlan
from sparseattn.bench.synthetic import structured_qkv
from sparseattn.kernels import prefill_triton
from sparseattn.kernels.prefill_triton import attention_triton, default_config

p = argparse.ArgumentParser()
p.add_argument("--length", type=int, default=32768)
p.add_argument("--shape", default="32/8/128")
p.add_argument("--methods", default="moa,duo,block_topk,vertical_slash")
p.add_argument("--configs", default="all", help="'default', 'all' or 'BM,BN,warps,stages,tma;...'")
p.add_argument("--pair", default="default", choices=["default", "on", "off", "both"],
               help="the paired walk: the kernel's rule (default), forced on / off, or both forced")
p.add_argument("--densities", default="", help="random 64-block plans at these block densities")
p.add_argument("--pair-max-block", type=int, default=None, help="widest key tile the paired walk may pair")
args = p.parse_args()
if args.pair_max_block:
    prefill_triton.PAIR_MAX_BLOCK_N = args.pair_max_block
Hq, Hkv, D = (int(x) for x in args.shape.split("/"))
q, k, v = structured_qkv(1, Hq, Hkv, args.length, D, seed=0, device="cuda", dtype=torch.bfloat16)
ALL_CONFIGS = [(128, 128, 8, 3, True), (128, 128, 8, 2, True), (128, 64, 8, 3, True), (128, 64, 4, 3, True),
               (64, 128, 4, 3, True), (64, 64, 4, 3, True), (64, 64, 4, 4, True), (128, 128, 8, 3, False)]
if args.configs == "all":
    CONFIGS = ALL_CONFIGS
elif args.configs == "default":
    CONFIGS = [None]
else:
    CONFIGS = [tuple(int(x) for x in c.split(",")) for c in args.configs.split(";")]
    CONFIGS = [c[:4] + (bool(c[4]),) if len(c) > 4 else c for c in CONFIGS]
PAIRS = {"default": [None], "on": [True], "off": [False], "both": [False, True]}[args.pair]


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


dense_ms = bench(lambda: attention_triton(q, k, v, None))
print(f"{args.shape} L={args.length}: dense default {default_config(D, q.dtype)} {dense_ms:.3f} ms")
plans = [(name, sa.get_method(name).plan(q, k, v)) for name in args.methods.split(",") if name]
nB = -(-args.length // 64)
for d in (float(x) for x in args.densities.split(",") if x):
    g = torch.Generator(device="cuda").manual_seed(0)
    bm = torch.rand(1, Hq, nB, nB, generator=g, device="cuda") < d
    plans.append((f"random{d:g}", BlockPlan.from_block_mask(bm, block_q=64, block_k=64, q_len=args.length,
                                                            k_len=args.length)))
for name, plan in plans:
    density = float(plan.density())
    print(f"== {name}: block {plan.block_q}, band {plan.has_band}, extra {plan.has_extra}, density {density:.3f}, "
          f"ideal {density * dense_ms:.3f} ms")
    ref = None
    for cfg in CONFIGS:
        for pair in PAIRS:
            try:
                out = attention_triton(q, k, v, plan, config=cfg, pair_blocks=pair)
                if ref is None:
                    ref = out.float()
                err = (out.float() - ref).abs().max().item()
                t = bench(lambda: attention_triton(q, k, v, plan, config=cfg, pair_blocks=pair))
                print(f"   {str(cfg):28s} pair={'-' if pair is None else int(pair)} {t:8.3f} ms  x{t / (density * dense_ms):.2f} ideal"
                      f"  maxdiff {err:.2e}")
            except Exception as exc:
                print(f"   {str(cfg):28s} pair={'-' if pair is None else int(pair)} failed: {type(exc).__name__}: {exc}"[:300])
