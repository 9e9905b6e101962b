"""Last-queries profiles (FlexPrefill, vertical-slash) by scratch chunk size, on a GPU.

    python scripts/sweep_last_queries.py [--length 32768] [--shape 9/3/64] [--last 128,64]
        [--scratch 26,24,23,22,21]

The logits go through a float32 scratch buffer of up to 2**s floats per launch chunk of
(batch, head) pairs: a chunk small enough to stay in L2 is read back from there. Each setting's
three launches per chunk are captured in one CUDA graph and timed by replay (do_bench median, us);
outputs must equal the first setting's bit for bit.
"""

import argparse

import torch
import triton.testing

from sparseattn.bench.synthetic import structured_qkv
from sparseattn.kernels import last_queries_triton as lq

p = argparse.ArgumentParser()
p.add_argument("--length", type=int, default=32768)
p.add_argument("--shape", default="9/3/64")
p.add_argument("--last", default="128,64")
p.add_argument("--scratch", default="26,24,23,22,21", help="log2 of the scratch floats per chunk")
args = p.parse_args()
Hq, Hkv, D = (int(x) for x in args.shape.split("/"))
q, k, _ = structured_qkv(1, Hq, Hkv, args.length, D, seed=0, device="cuda", dtype=torch.bfloat16)
print(f"{args.shape} L={args.length}, {torch.cuda.get_device_name()}")
for P in (int(x) for x in args.last.split(",")):
    ref = None
    for s in (int(x) for x in args.scratch.split(",")):
        lq.SCRATCH_ELEMENTS = 1 << s
        out = lq.last_queries_profiles_triton(q, k, P)  # compile, warm up
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = lq.last_queries_profiles_triton(q, k, P)
        graph.replay()
        torch.cuda.synchronize()
        if ref is None:
            ref = [t.clone() for t in out]
        same = all(torch.equal(a, b) for a, b in zip(out, ref))
        us = triton.testing.do_bench(graph.replay, warmup=25, rep=200, return_mode="median") * 1e3
        chunk = max(1, min(Hq, (1 << s) // (P * args.length)))
        print(f"P={P:4d} scratch 2**{s} ({4 * (1 << s) / 2**20:.0f} MB, {chunk} head(s) per chunk): {us:8.1f} us"
              f"  equal={same}")
