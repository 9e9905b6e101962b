"""Marginal cost of the decode kernel's split merge: the full call against the split kernel alone
(the merge launch made a no-op, so its output is wrong: timing only), and one split (run on a GPU).

    python scripts/decode_merge_cost.py
"""
import itertools, os
import torch, triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel
from sparseattn.bench.decode import build_cache
from sparseattn.kernels import decode_triton as dt

class NoLaunch:
    def __getitem__(self, grid):
        return lambda *a, **k: None
bench = lambda fn: triton.testing.do_bench_cudagraph(fn, rep=40) * 1e3
real_merge = dt._merge_splits
for shape, L, B in itertools.product(("32/8/128", "9/3/64"), (32768, 131072), (1, 8)):
    Hq, Hkv, D = (int(v) for v in shape.split("/"))
    cache = build_cache(B, Hkv, D, L, torch.bfloat16, "cuda", 16, layers=1)
    q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.bfloat16)
    args = (q, cache.k_pages(0), cache.v_pages(0), cache.page_table_storage, cache.layer_lengths(0))
    kd, vd = cache.gather(0)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        sdpa = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, kd, vd, enable_gqa=True))
    del kd, vd
    n_pages = L // 16
    g = torch.Generator(device="cuda").manual_seed(0)
    pages = torch.rand(B, Hkv, n_pages, device="cuda", generator=g).argsort(-1)[..., :128].sort(-1).values.to(torch.int32).contiguous()
    pc = torch.full((B, Hkv), 128, dtype=torch.int32, device="cuda")
    out = []
    for case, sel in (("dense", dict(dense=True, dense_pages=n_pages)), ("pages", dict(pages=pages, page_counts=pc))):
        dt._merge_splits = real_merge
        full = bench(lambda: dt.decode_attention_triton(*args, page_size=16, **sel))
        one = bench(lambda: dt.decode_attention_triton(*args, page_size=16, num_splits=1, **sel))
        dt._merge_splits = NoLaunch()
        nomerge = bench(lambda: dt.decode_attention_triton(*args, page_size=16, **sel))
        dt._merge_splits = real_merge
        out.append(f"{case}: full {full:.1f} split-kernel-only {nomerge:.1f} (merge +{full-nomerge:.1f}) one-split {one:.1f}")
    print(f"== {shape} L={L} B={B}: SDPA {sdpa:.1f} | " + " | ".join(out), flush=True)
    del cache; torch.cuda.empty_cache()
