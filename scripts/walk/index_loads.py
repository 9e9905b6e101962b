"""Is the per-tile cost of the D=64 list walk the index load? Variants of the sparse walk + SASS.

Session 15: forms of the block-index load in the prefill kernel's sparse walk, patched into a copy
of ``kernels/prefill_triton.py`` (the text replaced must still be there: the script asserts it).
A record of an experiment (none was adopted), not a tool.

``PYTHONPATH=src python scripts/walk/index_loads.py`` (GPU; ``DEV=cpu LEN=256 TRITON_INTERPRET=1`` checks the
variants' outputs on the interpreter).
"""
import sys, torch, triton, triton.testing

from common import INDEX_TWO_AHEAD, SPARSE_WALK as OLD, inputs, print_errors_vs_current, walk_variants

VARIANTS = {
    "cur": OLD,
    "arith (full list only)": """        for t in range(t_begin, t_end):
            blk = t
""",
    "clamp": """        last = tl.maximum(count - 1, 0)
        blk_next = tl.load(idx_row + tl.minimum(t_begin, last) * stride_ik)
        for t in range(t_begin, t_end):
            blk = blk_next
            blk_next = tl.load(idx_row + tl.minimum(t + 1, last) * stride_ik)
""",
    "ahead2": INDEX_TWO_AHEAD,
    "vec8": """        offs8 = tl.arange(0, 8)
        for t in range(t_begin, t_end):
            c8 = tl.load(idx_row + ((t // 8) * 8 + offs8) * stride_ik, mask=(t // 8) * 8 + offs8 < count, other=0)
            blk = tl.sum(tl.where(offs8 == t % 8, c8, 0))
""",
    "vol": """        blk_next = tl.load(idx_row + t_begin * stride_ik, mask=t_begin < t_end, other=0)
        for t in range(t_begin, t_end):
            blk = blk_next
            blk_next = tl.load(idx_row + (t + 1) * stride_ik, mask=t + 1 < count, other=0, cache_modifier=".ca")
""",
}
mods = walk_variants("pk2", VARIANTS)
dev, q, k, v, plans = inputs()
print_errors_vs_current(mods, q, k, v, plans)
if dev == "cpu":
    sys.exit()
def bench(fn):
    fn(); torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=150)
dens = {d: p.density() for d, p in plans.items()}
for rnd in range(2):
    t_dense = bench(lambda: mods["cur"].attention_triton(q, k, v, None))
    print(f"round {rnd}: plan=None {t_dense:.3f} ms", flush=True)
    for name, m in mods.items():
        cells = []
        for d, p in plans.items():
            t = bench(lambda: m.attention_triton(q, k, v, p))
            cells.append(f"d={dens[d]:.2f} {t:.3f} ({t / (dens[d] * t_dense):.3f}x)")
        print(f"  {name:24s} " + " | ".join(cells), flush=True)
