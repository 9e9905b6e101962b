"""Tiles of the last-queries row log-sum-exp merge (``last_queries_triton._row_lse``) alone, timed
in a CUDA graph, on random partials shaped as SmolLM2 at 32K (9 pairs, 256 key tiles, P = 128 / 64).

    python scripts/sweep_row_lse.py
"""

import torch
import triton
import triton.testing

from sparseattn.kernels import last_queries_triton as lq

CONFIGS = ((32, 64, 4), (16, 256, 4), (16, 256, 8), (8, 256, 4), (32, 256, 8), (16, 128, 4), (8, 128, 4),
           (4, 256, 4))  # (rows per program, tiles per step, warps)

for P in (128, 64):
    pairs, tiles = 9, 256
    pm = torch.randn(pairs * tiles * P, device="cuda") * 3
    pl = torch.rand_like(pm) * 100 + 1
    want = None
    for br, bt, w in CONFIGS:
        lse = torch.empty(pairs * P, device="cuda")

        def run(br=br, bt=bt, w=w, lse=lse):
            lq._row_lse[(triton.cdiv(P, br), pairs)](pm, pl, lse, P, tiles, BLOCK_R=br, BLOCK_TILES=bt, num_warps=w)

        run()
        torch.cuda.synchronize()
        want = lse.clone() if want is None else want
        same = torch.allclose(lse, want, rtol=1e-6, atol=1e-6)
        us = triton.testing.do_bench_cudagraph(run, rep=50) * 1e3
        print(f"P={P} rows={br} tiles={bt} warps={w}: {us:.2f} us, equal to the first: {same}", flush=True)
