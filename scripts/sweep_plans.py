"""Prefill kernel tile configs on real method plans (band plans, 64-blocks), on a GPU.

    python scripts/sweep_plans.py [--length 32768] [--shape 32/8/128] [--methods moa,duo,block_topk]

For each method's plan on structured synthetic q/k/v: our dense kernel, then the plan under the
default config and under each config of the list, timed with do_bench (median).
"""

import argparse

import torch
import triton.testing

import sparseattn as sa
from sparseattn.bench.synthetic import structured_qkv
from sparseattn.kernels.prefill_triton import attention_triton, default_config

p = argparse.ArgumentParser()
p.add_argument("--length", type=int, default=32768)
p.add_argument("--shape", default="32/8/128")
p.add_argument("--methods", default="moa,duo,block_topk,vertical_slash")
args = p.parse_args()
Hq, Hkv, D = (int(x) for x in args.shape.split("/"))
q, k, v = structured_qkv(1, Hq, Hkv, args.length, D, seed=0, device="cuda", dtype=torch.bfloat16)
CONFIGS = [(128, 128, 8, 3, True), (128, 128, 8, 2, True), (128, 64, 8, 3, True), (128, 64, 4, 3, True),
           (64, 128, 4, 3, True), (64, 64, 4, 3, True), (64, 64, 4, 4, True), (128, 128, 8, 3, False)]


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


print(f"{args.shape} L={args.length}: dense default {default_config(D, q.dtype)} "
      f"{bench(lambda: attention_triton(q, k, v, None)):.3f} ms")
for name in args.methods.split(","):
    plan = sa.get_method(name).plan(q, k, v)
    base = bench(lambda: attention_triton(q, k, v, plan))
    print(f"== {name}: block {plan.block_q}, band {plan.has_band}, extra {plan.has_extra}, default {base:.3f} ms")
    for cfg in CONFIGS:
        try:
            t = bench(lambda: attention_triton(q, k, v, plan, config=cfg))
            print(f"   {str(cfg):28s} {t:8.3f} ms")
        except Exception as exc:
            print(f"   {str(cfg):28s} failed: {type(exc).__name__}")
