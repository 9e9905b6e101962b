"""Is the per-tile cost of the D=64 list walk the index load? Variants of the sparse walk + SASS.

Session 15: forms of the block-index load in the prefill kernel's sparse walk, patched into a copy
of ``kernels/prefill_triton.py`` (the text replaced must still be there: the script asserts it).
A record of an experiment (none was adopted), not a tool.

``PYTHONPATH=src python scripts/walk/index_loads.py`` (GPU; ``DEV=cpu LEN=256 TRITON_INTERPRET=1`` checks the
variants' outputs on the interpreter).
"""
import importlib.util, os, sys, torch, triton, triton.testing
from sparseattn.bench.kernel import random_plan_at_density

SRC = open("src/sparseattn/kernels/prefill_triton.py").read()
SRC = SRC.replace("from ..plan import", "from sparseattn.plan import").replace("from .dispatch import", "from sparseattn.kernels.dispatch import")
OLD = """        blk_next = tl.load(idx_row + t_begin * stride_ik, mask=t_begin < t_end, other=0)
        for t in range(t_begin, t_end):
            blk = blk_next
            blk_next = tl.load(idx_row + (t + 1) * stride_ik, mask=t + 1 < count, other=0)
"""
assert OLD in SRC
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
    "ahead2": """        blk_next = tl.load(idx_row + t_begin * stride_ik, mask=t_begin < t_end, other=0)
        blk_next2 = tl.load(idx_row + (t_begin + 1) * stride_ik, mask=t_begin + 1 < count, other=0)
        for t in range(t_begin, t_end):
            blk = blk_next
            blk_next = blk_next2
            blk_next2 = tl.load(idx_row + (t + 2) * stride_ik, mask=t + 2 < count, other=0)
""",
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
os.makedirs("/tmp/sparseattn_walk", exist_ok=True)
mods = {}
for i, (name, body) in enumerate(VARIANTS.items()):
    path = f"/tmp/sparseattn_walk/pk2_{i}.py"
    open(path, "w").write(SRC.replace(OLD, body))
    spec = importlib.util.spec_from_file_location(f"pk2_{i}", path)
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); mods[name] = m

dev = os.environ.get("DEV", "cuda")
L = int(os.environ.get("LEN", 32768))
Hq, Hkv, D = 9, 3, 64
torch.manual_seed(0)
dt = torch.bfloat16 if dev == "cuda" else torch.float32
q = torch.randn(1, Hq, L, D, device=dev, dtype=dt)
k = torch.randn(1, Hkv, L, D, device=dev, dtype=dt)
v = torch.randn(1, Hkv, L, D, device=dev, dtype=dt)
blk = 128 if dev == "cuda" else 32
plans = {d: random_plan_at_density(1, Hq, L, blk, d, dev, seed=1) for d in (1.0, 0.45, 0.19)}
refs = {d: mods["cur"].attention_triton(q, k, v, p) for d, p in plans.items()}
for name, m in mods.items():
    errs = [(m.attention_triton(q, k, v, p).float() - refs[d].float()).abs().max().item() for d, p in plans.items()]
    print(name, "max err vs cur (d=1, 0.45, 0.19):", ["%.1e" % e for e in errs], flush=True)
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
