"""Host (Python) cost per block_sparse_attention call on a tiny input, with a profile.

At small sizes (8K, 9/3/64) the GPU finishes before the next launch is issued, so the host path
sets the time. Run on a GPU machine: python scripts/host_overhead.py
"""

import cProfile
import pstats
import time

import torch

import sparseattn as sa
from sparseattn.bench.kernel import random_plan_at_density
from sparseattn.kernels.prefill_triton import attention_triton

q = torch.randn(1, 9, 256, 64, device="cuda", dtype=torch.bfloat16)
k = torch.randn(1, 3, 256, 64, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
plan = random_plan_at_density(1, 9, 256, 128, 0.5, "cuda")


def per_call(fn, n=500):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


cases = {
    "block_sparse_attention(plan)": lambda: sa.block_sparse_attention(q, k, v, plan),
    "block_sparse_attention(None)": lambda: sa.block_sparse_attention(q, k, v),
    "attention_triton(plan)": lambda: attention_triton(q, k, v, plan),
    "attention_triton(plan, TMA forced)": lambda: attention_triton(q, k, v, plan, config=(64, 128, 4, 3, True)),
    "torch SDPA (cuDNN/flash default)": lambda: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True),
}
for rnd in range(2):  # the first round also warms clocks and caches; report both
    for name, fn in cases.items():
        print(f"round {rnd}  {name:36s} {per_call(fn):7.1f} us/call")
prof = cProfile.Profile()
prof.enable()
for _ in range(300):
    sa.block_sparse_attention(q, k, v, plan)
prof.disable()
torch.cuda.synchronize()
pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
