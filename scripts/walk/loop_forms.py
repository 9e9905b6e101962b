"""Variants of the prefill kernel's sparse block walk: where does the plan-list overhead at D=64 come from?

Session 15: loop forms of the sparse walk (index in the loop, two ahead, ``warp_specialize``,
4 stages) and tile configs, patched into a copy of ``kernels/prefill_triton.py``, at 9/3/64 and
32/8/128, 32K. A record of an experiment (none adopted), not a tool.

``PYTHONPATH=src python scripts/walk/loop_forms.py`` (GPU).
"""
import torch, triton, triton.testing

from common import INDEX_TWO_AHEAD, SPARSE_WALK as OLD, walk_variants
from sparseattn.bench.kernel import random_plan_at_density

VARIANTS = {
    "cur": OLD,
    "inloop": """        for t in range(t_begin, t_end):
            blk = tl.load(idx_row + t * stride_ik)
""",
    "ahead2": INDEX_TWO_AHEAD,
    "ws": """        for t in tl.range(t_begin, t_end, warp_specialize=True):
            blk = tl.load(idx_row + t * stride_ik)
""",
    "cur_ws": OLD.replace("for t in range(t_begin, t_end):", "for t in tl.range(t_begin, t_end, warp_specialize=True):"),
    "inloop_s4": """        for t in tl.range(t_begin, t_end, num_stages=4):
            blk = tl.load(idx_row + t * stride_ik)
""",
}
mods = walk_variants("pk", VARIANTS)

dev = "cuda"
torch.manual_seed(0)
def bench(fn):
    fn(); torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=200)

for (Hq, Hkv, D, L) in ((9, 3, 64, 32768), (32, 8, 128, 32768)):
    q = torch.randn(1, Hq, L, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, Hkv, L, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, Hkv, L, D, device=dev, dtype=torch.bfloat16)
    plans = {d: random_plan_at_density(1, Hq, L, 128, d, dev, seed=1) for d in (1.0, 0.45, 0.25)}
    dens = {d: p.density() for d, p in plans.items()}
    base = mods["cur"]
    t_dense = bench(lambda: base.attention_triton(q, k, v, None))
    print(f"== {Hq}/{Hkv}/{D} L={L}: plan=None {t_dense:.3f} ms", flush=True)
    refs = {d: base.attention_triton(q, k, v, p) for d, p in plans.items()}
    configs = [None]
    if D == 64:
        configs += [(64, 128, 4, 2, True), (128, 128, 8, 3, True), (128, 64, 4, 3, True)]
    for name, m in mods.items():
        for cfg in configs:
            if cfg is not None and name not in ("cur", "inloop"):
                continue
            row = []
            for d, p in plans.items():
                try:
                    out = m.attention_triton(q, k, v, p, config=cfg)
                    err = (out.float() - refs[d].float()).abs().max().item()
                    t = bench(lambda: m.attention_triton(q, k, v, p, config=cfg))
                    row.append(f"d={d:.2f} {t:7.3f} ms ({t / (dens[d] * t_dense):.3f}x) err {err:.1e}")
                except Exception as e:
                    row.append(f"d={d:.2f} FAILED {type(e).__name__}: {str(e)[:120]}")
            print(f"{name:10s} {str(cfg):24s} " + " | ".join(row), flush=True)
    q = k = v = plans = refs = None  # free before the next shape
    torch.cuda.empty_cache()
