"""Which plan shapes make the D=64 sparse walk slow? Per-program fixed cost, access pattern, balance.

Session 15: the D=64 list walk on plans of one density and different shapes (random, local band,
sink + band, strided, uniform rows) and four tile configs, against our dense kernel (``plan=None``).

``PYTHONPATH=src python scripts/walk/plan_shapes.py`` (GPU).
"""
import sys, torch, triton, triton.testing
from sparseattn.plan import BlockPlan
from sparseattn.bench.kernel import random_plan_at_density
from sparseattn.kernels.prefill_triton import attention_triton

import os
dev = os.environ.get("DEV", "cuda")
Hq, Hkv, D, L, blk = 9, 3, 64, int(os.environ.get("LEN", 32768)), 128
torch.manual_seed(0)
q = torch.randn(1, Hq, L, D, device=dev, dtype=torch.bfloat16)
k = torch.randn(1, Hkv, L, D, device=dev, dtype=torch.bfloat16)
v = torch.randn(1, Hkv, L, D, device=dev, dtype=torch.bfloat16)
nQ = L // blk
vis = BlockPlan.causal_block_limits(block_q=blk, block_k=blk, q_len=L, k_len=L, device=dev).long()  # [nQ]
n = torch.arange(nQ, device=dev).view(1, -1)
def plan_from(mask):
    return BlockPlan.from_block_mask(mask.expand(1, Hq, nQ, nQ).contiguous(), block_q=blk, block_k=blk, q_len=L, k_len=L, causal=True)
visible = n < vis.view(-1, 1)
diag = n == (vis.view(-1, 1) - 1)
w25 = torch.clamp((0.25 * vis.double()).round().long(), min=1).view(-1, 1)
vv = vis.view(-1, 1)
plans = {
    "diag only": plan_from(diag),
    "random 0.19": random_plan_at_density(1, Hq, L, blk, 0.19, dev, seed=1),
    "random 0.25": random_plan_at_density(1, Hq, L, blk, 0.25, dev, seed=1),
    "local band 0.25": plan_from(visible & (n >= vv - w25)),
    "sink+band 0.25 (sink 8)": plan_from(visible & ((n < 8) | (n >= vv - torch.clamp(w25 - 8, min=1)))),
    "strided 0.25 (every 4th + diag)": plan_from(visible & ((n % 4 == 0) | diag)),
    "uniform 48 (first 47 + diag)": plan_from(visible & ((n < 47) | diag)),
    "random 0.35": random_plan_at_density(1, Hq, L, blk, 0.35, dev, seed=1),
    "random 0.45": random_plan_at_density(1, Hq, L, blk, 0.45, dev, seed=1),
    "full list": random_plan_at_density(1, Hq, L, blk, 1.0, dev, seed=1),
}
configs = {"64x128 s3 (default)": None, "64x128 s2": (64, 128, 4, 2, True), "128x64 s3": (128, 64, 4, 3, True),
           "128x128 w8 s2": (128, 128, 8, 2, True)}
def bench(fn):
    fn(); torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=150)
if dev == 'cpu':
    for pn, p in plans.items(): print(pn, round(p.density(), 3))
    sys.exit()
for rnd in range(2):
    t_dense = bench(lambda: attention_triton(q, k, v, None))
    print(f"round {rnd}: plan=None {t_dense:.3f} ms", flush=True)
    for pname, p in plans.items():
        d = p.density()
        cells = []
        for cname, cfg in configs.items():
            t = bench(lambda: attention_triton(q, k, v, p, config=cfg))
            cells.append(f"{cname} {t:.3f} ({t / (d * t_dense):.2f}x)")
        print(f"  {pname:32s} d={d:.3f} tiles/prog {d * 128.5:.1f} | " + " | ".join(cells), flush=True)
