"""A/B of two decode-kernel modules in one run: an older ``decode_triton.py`` (path given) against
the installed one, on dense walks and 2048-token selections, next to SDPA cuDNN (run on a GPU).

    git show <rev>:src/sparseattn/kernels/decode_triton.py > /tmp/old_decode_triton.py
    python scripts/ab_decode_module.py /tmp/old_decode_triton.py    # env SHAPES, CTX, BATCHES

Selections cycle through several random draws inside one graph so B=1 reads do not sit in L2.
The copy line is a plain 2 GiB device copy (read + write bytes over time).
"""
import importlib.util, itertools, json, math, os, sys, time
import torch, triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel
from sparseattn.bench.decode import build_cache
from sparseattn.kernels import decode_triton as new

spec = importlib.util.spec_from_file_location("sparseattn.kernels._old_decode", sys.argv[1])
old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
SHAPES = os.environ.get("SHAPES", "32/8/128,9/3/64").split(",")
L = int(os.environ.get("CTX", "131072"))
BATCHES = [int(x) for x in os.environ.get("BATCHES", "1,8").split(",")]
DENSE_CFG = {128: [(128, 4, 3), (128, 4, 4), (64, 4, 3), (128, 8, 3), (256, 8, 3), (64, 4, 4)],
             64: [(128, 2, 3), (128, 4, 3), (256, 4, 3), (64, 2, 4), (128, 2, 4), (256, 8, 3)]}
SEL_CFG = {128: [(32, 4, 2, 1), (64, 4, 2, 1), (32, 8, 2, 1), (64, 8, 2, 1), (32, 4, 3, 1), (16, 4, 2, 1)],
           64: [(32, 4, 1, 1), (64, 4, 1, 1), (32, 2, 2, 1), (64, 4, 2, 1), (32, 4, 2, 1)]}
bench = lambda fn: triton.testing.do_bench_cudagraph(fn, rep=40) * 1e3  # us
rows = []
x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
copy_us = bench(lambda: y.copy_(x)); copy_tbs = 2 * x.numel() / (copy_us * 1e-6) / 1e12
print(f"copy 2 GiB: {copy_us:.0f} us = {copy_tbs:.2f} TB/s (read+write)"); del x, y
for shape, B in itertools.product(SHAPES, BATCHES):
    Hq, Hkv, D = (int(v) for v in shape.split("/"))
    cache = build_cache(B, Hkv, D, L, torch.bfloat16, "cuda", 16, layers=1)
    q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.bfloat16)
    kp, vp, table, lengths = cache.k_pages(0), cache.v_pages(0), cache.page_table_storage, cache.layer_lengths(0)
    kd, vd = cache.gather(0)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        sdpa = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, kd, vd, enable_gqa=True))
    del kd, vd; torch.cuda.empty_cache()
    n_pages = L // 16
    dense_bytes = 2 * B * Hkv * L * D * 2
    def run(mod, sels, **kw):
        def fn():
            for sel in sels:
                mod.decode_attention_triton(q, kp, vp, table, lengths, page_size=16, **sel, **kw)
        return bench(fn) / len(sels)
    dsel = [dict(dense=True, dense_pages=n_pages)]
    res = {"old": run(old, dsel), "new": run(new, dsel)}
    for cfg in DENSE_CFG[D]:
        res[f"new{cfg}"] = run(new, dsel, config=cfg)
    best = min(res, key=res.get)
    print(f"== {shape} B={B} dense: SDPA {sdpa:.1f} us ({dense_bytes/sdpa/1e6:.2f} TB/s) | " +
          " ".join(f"{k} {v:.1f}" for k, v in res.items()) + f" | best {best} {res[best]:.1f} ({sdpa/res[best]:.3f}x SDPA)", flush=True)
    rows.append(dict(shape=shape, B=B, case="dense", sdpa_us=sdpa, **{k: v for k, v in res.items()}))
    g = torch.Generator(device="cuda").manual_seed(0)
    n_draws = 8 if B == 1 else 2
    pages = [torch.rand(B, Hkv, n_pages, device="cuda", generator=g).argsort(-1)[..., :128].sort(-1).values.to(torch.int32).contiguous() for _ in range(n_draws)]
    toks = [torch.rand(B, Hkv, L - 16, device="cuda", generator=g).argsort(-1)[..., :2048].sort(-1).values.to(torch.int32).contiguous() for _ in range(n_draws)]
    pc = torch.full((B, Hkv), 128, dtype=torch.int32, device="cuda"); tc = torch.full((B, Hkv), 2048, dtype=torch.int32, device="cuda")
    sel_bytes = 2 * B * Hkv * 2048 * D * 2
    for case, sels in (("pages", [dict(pages=p, page_counts=pc) for p in pages]), ("tokens", [dict(tokens=t, token_counts=tc) for t in toks])):
        res = {"old": run(old, sels), "new": run(new, sels)}
        for cfg in SEL_CFG[D]:
            res[f"new{cfg}"] = run(new, sels, config=cfg)
        best = min(res, key=res.get)
        print(f"   {case}2048: " + " ".join(f"{k} {v:.1f}" for k, v in res.items()) +
              f" | new {sel_bytes/res['new']/1e6:.2f} TB/s = {sel_bytes/res['new']/1e6/copy_tbs*100:.0f}% of copy ; best {best} {sel_bytes/res[best]/1e6:.2f} TB/s", flush=True)
        rows.append(dict(shape=shape, B=B, case=case, **res))
    del cache; torch.cuda.empty_cache()
json.dump(dict(copy_tbs=copy_tbs, rows=rows), open(os.path.join(os.environ.get("OUT", "/tmp"), "exp_decode.json"), "w"))
