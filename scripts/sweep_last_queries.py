"""Last-queries profiles (FlexPrefill, vertical-slash) by tile configuration, on a GPU.

    python scripts/sweep_last_queries.py [--length 32768] [--shape 9/3/64] [--last 128,64]
        [--configs 128x128x8x16x256x4,64x128x4x16x256x4,...]

A config is ``LastQConfig`` (kernels/last_queries_triton.py): logits tile ``block_m x block_n``
with ``num_warps``, profile step ``block_p`` rows x ``block_t`` keys with ``profile_warps``. Each
setting's launches are captured in one CUDA graph and timed by replay (do_bench median, us); the
outputs are compared with the first setting's (max abs difference: the profiles are sums of
probabilities, column sums at most P).
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
p.add_argument("--configs", default="128x128x8x16x256x4,64x128x4x16x256x4,128x64x4x16x256x4,128x64x8x16x256x4,"
                                    "64x64x4x16x256x4,128x256x8x16x256x4,128x128x8x8x256x4,128x128x8x32x256x4,"
                                    "128x128x8x16x128x4,128x128x8x16x512x4,128x128x8x16x1024x8,"
                                    "128x128x8x32x512x8,128x128x8x16x256x8")
args = p.parse_args()
Hq, Hkv, D = (int(x) for x in args.shape.split("/"))
q, k, _ = structured_qkv(1, Hq, Hkv, args.length, D, seed=0, device="cuda", dtype=torch.bfloat16)
print(f"{args.shape} L={args.length}, {torch.cuda.get_device_name()}")
settings = [(c, tuple(int(x) for x in c.split("x"))) for c in args.configs.split(",") if c]
for P in (int(x) for x in args.last.split(",")):
    ref = None
    for name, config in settings:
        try:
            out = lq.last_queries_profiles_triton(q, k, P, config=config)  # compile, warm up
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = lq.last_queries_profiles_triton(q, k, P, config=config)
            graph.replay()
            torch.cuda.synchronize()
        except Exception as exc:  # a tile that does not compile (registers, shared memory) is a result too
            print(f"P={P:4d} {name:>20}: failed: {type(exc).__name__}: {str(exc)[:160]}")
            continue
        if ref is None:
            ref = [t.clone() for t in out]
        diff = max((a - b).abs().max().item() for a, b in zip(out, ref))
        us = triton.testing.do_bench(graph.replay, warmup=25, rep=200, return_mode="median") * 1e3
        print(f"P={P:4d} {name:>20}: {us:8.1f} us  max |diff| vs first {diff:.2e}")
