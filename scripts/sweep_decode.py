"""Sweep the decode kernel's tile config and split count against SDPA cuDNN (run on a GPU).

    python scripts/sweep_decode.py [--shapes 32/8/128,9/3/64] [--contexts 32768,131072] [--batches 1,8]

For dense decode and a scattered 2048-token page selection (128 random pages of 16 per
(sequence, KV head), as Quest at budget 2048 picks): every (BLOCK_N, num_warps, num_stages)
config x split count, timed through CUDA graphs, best rows first. Prints JSON lines too.
Split counts: ``--splits`` (absolute), ``--per-sm`` (programs per SM), else 0.5/1/2/4 x the rule's.
A selection case cycles through ``--draws`` random selections inside the graph (default 8 at B=1,
2 above), so a small batch's selected K/V do not sit in L2 between replays.
"""

import argparse
import itertools
import json
import math

import torch
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

from sparseattn.bench.decode import build_cache
from sparseattn.kernels import decode_triton as dt

p = argparse.ArgumentParser()
p.add_argument("--shapes", default="32/8/128,9/3/64")
p.add_argument("--contexts", default="32768,131072")
p.add_argument("--batches", default="1,8")
p.add_argument("--budget", type=int, default=2048)
p.add_argument("--top", type=int, default=4)
p.add_argument("--splits", default=None, help="comma list of split counts (default: 0.5/1/2/4 x the rule's)")
p.add_argument("--per-sm", default=None, help="comma list of programs per SM to derive split counts from")
p.add_argument("--draws", type=int, default=None, help="random selections cycled per timing (default 8 at B=1, else 2)")
p.add_argument("--configs", default=None,
               help="semicolon list of BLOCK_N,warps,stages[,prefetch] (default: a grid; prefetch 0/1/2, see "
                    "decode_triton._walk_selection)")
p.add_argument("--cases", default="dense,pages", help="dense and/or pages")
args = p.parse_args()


def bench(fn):
    return triton.testing.do_bench_cudagraph(fn, rep=30)


for shape, L, B in itertools.product(args.shapes.split(","), map(int, args.contexts.split(",")),
                                     map(int, args.batches.split(","))):
    Hq, Hkv, D = (int(x) for x in shape.split("/"))
    cache = build_cache(B, Hkv, D, L, torch.bfloat16, "cuda", 16)
    q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.bfloat16)
    kp, vp, table, lengths = cache.k_pages(1), cache.v_pages(1), cache.page_table_storage, cache.layer_lengths(1)
    kd, vd = cache.gather(1)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        sdpa = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, kd, vd, enable_gqa=True))
    del kd, vd
    n_pages = -(-L // 16)
    sel_pages = args.budget // 16
    g = torch.Generator(device="cuda").manual_seed(0)
    draws = args.draws or (8 if B == 1 else 2)
    counts = torch.full((B, Hkv), sel_pages, dtype=torch.int32, device="cuda")
    pages = [torch.rand(B, Hkv, n_pages, device="cuda", generator=g).argsort(-1)[..., :sel_pages].sort(-1).values
             .to(torch.int32).contiguous() for _ in range(draws)]
    cases = {"dense": [dict(dense=True, dense_pages=n_pages)],
             f"pages{args.budget}": [dict(pages=p, page_counts=counts) for p in pages]}
    cases = {name: sel for name, sel in cases.items() if name.rstrip("0123456789") in args.cases.split(",")}
    for case, sels in cases.items():
        width = n_pages * 16 if case == "dense" else args.budget
        rows = (Hq // Hkv)
        pairs = B * Hkv * math.ceil(rows / max(16, rows))
        wide = dt.wide_walk(case == "dense", pairs, D, q.dtype, q.device)
        auto = dt.choose_num_splits(pairs, width, q.device, sparse=case != "dense", head_dim=D, wide=wide)

        def timed(**kw):
            def fn():
                for sel in sels:
                    dt.decode_attention_triton(q, kp, vp, table, lengths, page_size=16, **sel, **kw)
            return bench(fn) / len(sels)
        results = []
        configs = ([tuple(int(x) for x in c.split(",")) for c in args.configs.split(";")] if args.configs
                   else list(itertools.product((32, 64, 128), (2, 4, 8), (2, 3))))
        if args.splits:
            split_list = [int(x) for x in args.splits.split(",")]
        elif args.per_sm:
            sms = torch.cuda.get_device_properties(q.device).multi_processor_count
            split_list = sorted({max(1, min(dt.MAX_SPLITS * 2, round(float(k) * sms / pairs), width // 32))
                                 for k in args.per_sm.split(",")})
        else:
            split_list = sorted({max(1, int(auto * m)) for m in (0.5, 1, 2, 4)})
        for config, splits in itertools.product(configs, split_list):
            try:
                t = timed(num_splits=splits, config=config)
            except Exception as exc:  # out of resources etc.
                continue
            results.append((t, *config, *([0] if len(config) == 3 else []), splits))
        default = timed()
        results.sort()
        kv_bytes = 2 * B * Hkv * width * D * 2
        print(f"== {shape} L={L} B={B} {case}: sdpa {sdpa*1e3:.1f} us, ours default {default*1e3:.1f} us "
              f"({sdpa/default:.3f}x SDPA) "
              f"(auto splits {auto}, config {dt.default_config(D, torch.bfloat16, sparse=case != 'dense', wide=wide)})")
        for t, bn, w, s, pf, sp in results[:args.top]:
            print(f"   {t*1e3:7.1f} us  {kv_bytes/(t*1e-3)/1e12:5.2f} TB/s  BLOCK_N={bn} warps={w} stages={s} "
                  f"prefetch={pf} splits={sp}")
        print(json.dumps({"shape": shape, "L": L, "B": B, "case": case, "sdpa_ms": sdpa, "default_ms": default,
                          "auto_splits": auto, "best": results[:args.top]}))
    del cache
    torch.cuda.empty_cache()
