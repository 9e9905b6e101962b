"""SALE on a GPU: its estimate's tile configs, and the prefill kernel on its 64 x 32 plans.

    python scripts/sweep_sale.py [--length 32768] [--shape 9/3/64] [--threshold 0.004]
        [--configs 128x64x32x4x3x0,128x64x32x4x3x1,...] [--pairs 0x2,0x3,1x2,1x3]

A config is ``SaleConfig``'s first six fields (kernels/sale_triton.py): pass-2 step ``block_m x
block_n`` (``block_n`` over 32 spans several 32-key tiles), ``split`` steps per program,
``num_warps``, ``num_stages``, ``int8_dot`` (0/1).
Each estimate is timed by ``do_bench`` (median, us) and its mask compared with the first
config's on the tiles it decides (outside the anchor: exact integer sums, so bit for bit; other
entries are don't-cares that depend on the tile shape). Then the kernel
runs the default config's plan (official 64-row blocks, 32-key tiles) as ``pair x stages``: pair
1 walks two 32-key tiles per step; outputs are compared with the first pair setting's. Inputs:
``structured_qkv`` (sinks, local bands, vertical and slash lines, needles), bf16.
"""

import argparse
import math

import torch
import triton.testing

from sparseattn.bench.synthetic import structured_qkv
from sparseattn.kernels import prefill_triton as pt
from sparseattn.kernels import sale_triton as st
from sparseattn.methods import get_method
from sparseattn.methods.base import cdiv

p = argparse.ArgumentParser()
p.add_argument("--length", type=int, default=32768)
p.add_argument("--shape", default="9/3/64")
p.add_argument("--threshold", type=float, default=0.004)
p.add_argument("--configs", default="128x32x32x4x3x1,128x64x32x4x3x1,128x64x16x4x3x1,128x128x16x4x3x1,"
                                    "128x128x8x8x3x1,128x256x8x8x3x1,256x64x16x8x3x1,256x128x8x8x3x1,"
                                    "64x128x16x4x3x1,128x128x16x4x4x1,128x64x32x4x3x0")
p.add_argument("--pairs", default="0x2,0x3,1x2,1x3")
args = p.parse_args()
Hq, Hkv, D = (int(x) for x in args.shape.split("/"))
q, k, v = structured_qkv(1, Hq, Hkv, args.length, D, seed=0, device="cuda", dtype=torch.bfloat16)
m = get_method("sale", threshold=args.threshold)
print(f"{args.shape} L={args.length}, {torch.cuda.get_device_name()}, SALE threshold {args.threshold}")

tau = torch.full((Hq,), args.threshold, device="cuda")
log_tau, dense = torch.log(tau), tau < 1e-5
geo = dict(block_q=m.block_size, block_k=m.block_k, bits=m.bits, local_blocks=cdiv(m.local_window, m.block_k),
           seg_blocks=m.block_seg // m.block_k, sink_blocks=m.sink_blocks, causal=True)
nK = cdiv(k.shape[2], m.block_k)
_, start, visible = m._anchor_tiles(q.shape[2], k.shape[2], causal=True, device=q.device)
n = torch.arange(nK, device=q.device).view(1, -1)
decided = visible & (n >= m.sink_blocks) & (n < start.view(-1, 1))  # [nQ, nK]
ref = None
for name in (c for c in args.configs.split(",") if c):
    f = [int(x) for x in name.split("x")]
    cfg = st.SaleConfig(*f[:5], int8_dot=bool(f[5]))
    try:
        mask = st.sale_estimate_triton(q, k, log_tau, dense, **geo, config=cfg)
        torch.cuda.synchronize()
    except Exception as exc:  # a tile that does not compile is a result too
        print(f"estimate {name:>18}: failed: {type(exc).__name__}: {str(exc)[:160]}")
        continue
    ref = mask.clone() if ref is None else ref
    same = bool(torch.equal(mask.bool() & decided, ref.bool() & decided))
    us = triton.testing.do_bench(lambda: st.sale_estimate_triton(q, k, log_tau, dense, **geo, config=cfg),
                                 warmup=25, rep=200, return_mode="median") * 1e3
    print(f"estimate {name:>18}: {us:9.1f} us  same mask as first: {same}")

plan = m.plan(q, k, v)
dense_us = triton.testing.do_bench(lambda: pt.attention_triton(q, k, v, None, causal=True),
                                   warmup=25, rep=200, return_mode="median") * 1e3
d = plan.density()
print(f"plan {plan.block_q} x {plan.block_k}, density {d:.3f}; dense kernel {dense_us:.1f} us, "
      f"ideal d x dense {d * dense_us:.1f} us")
out_ref = None
for name in (c for c in args.pairs.split(",") if c):
    pair, stages = (int(x) for x in name.split("x"))
    cfg = list(pt.default_config(D, q.dtype))
    cfg[3] = stages

    def run():
        return pt.attention_triton(q, k, v, plan, causal=True, config=tuple(cfg), pair_blocks=bool(pair))

    try:
        out = run()
        torch.cuda.synchronize()
    except Exception as exc:
        print(f"kernel pair={pair} stages={stages}: failed: {type(exc).__name__}: {str(exc)[:160]}")
        continue
    out_ref = out.clone() if out_ref is None else out_ref
    diff = (out.float() - out_ref.float()).abs().max().item()
    us = triton.testing.do_bench(run, warmup=25, rep=200, return_mode="median") * 1e3
    print(f"kernel pair={pair} stages={stages}: {us:9.1f} us  = {us / (d * dense_us):.2f} x ideal, "
          f"max |diff| to first {diff:.2e}" + ("" if math.isfinite(diff) else " (non-finite!)"))
