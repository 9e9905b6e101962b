"""Per-program fixed cost vs masked / unmasked tile cost of the D=64 sparse walk (+ IR dump).

Session 15 (BENCHMARKS.md, prefill kernel): per-program fixed cost vs tile cost of the D=64 list walk.

Run from the repository root on a GPU: ``PYTHONPATH=src python scripts/walk/fixed_costs.py``
(``DEV=cpu LEN=2048`` only builds the plans and prints their densities).
"""
import os, sys, torch, triton, triton.testing
from sparseattn.plan import BlockPlan
from sparseattn.kernels.prefill_triton import attention_triton

dev = os.environ.get("DEV", "cuda")
Hq, Hkv, D, L, blk = 9, 3, 64, int(os.environ.get("LEN", 32768)), 128
q = torch.randn(1, Hq, L, D, device=dev, dtype=torch.bfloat16)
k = torch.randn(1, Hkv, L, D, device=dev, dtype=torch.bfloat16)
v = torch.randn(1, Hkv, L, D, device=dev, dtype=torch.bfloat16)
nQ = L // blk
vis = BlockPlan.causal_block_limits(block_q=blk, block_k=blk, q_len=L, k_len=L, device=dev).long().view(-1, 1)
n = torch.arange(nQ, device=dev).view(1, -1)
def plan_from(mask):
    return BlockPlan.from_block_mask(mask.expand(1, Hq, nQ, nQ).contiguous(), block_q=blk, block_k=blk, q_len=L, k_len=L, causal=True)
visible = n < vis
diag = n == vis - 1
plans = {
    "empty": plan_from(torch.zeros_like(diag)),
    "sink only (1 unmasked tile)": plan_from((n == 0) & (vis > 1)),
    "diag only (1 masked tile)": plan_from(diag),
    "sink+diag": plan_from(((n == 0) | diag)),
    "first 8 unmasked": plan_from((n < 8) & (n < vis - 1)),
    "first 8 + diag": plan_from(((n < 8) & visible) | diag),
    "first 32 + diag": plan_from(((n < 32) & visible) | diag),
    "full list": plan_from(visible),
}
if dev == "cpu":
    for pn, p in plans.items(): print(pn, p.density())
    sys.exit()
def bench(fn):
    fn(); torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=150)
for rnd in range(2):
    t_dense = bench(lambda: attention_triton(q, k, v, None))
    print(f"round {rnd}: plan=None {t_dense:.3f} ms", flush=True)
    for pname, p in plans.items():
        t = bench(lambda: attention_triton(q, k, v, p))
        tiles = int(p.kv_counts.sum()) * 2  # two 64-row programs per 128-row plan row
        print(f"  {pname:30s} {t * 1e3:8.1f} us  tiles {tiles:7d}  programs {nQ * 2 * Hq}", flush=True)
