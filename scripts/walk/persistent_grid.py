"""A persistent-grid variant of the prefill kernel (outer loop over (tile, head) items, heaviest first).

Session 15: a persistent-grid form of the prefill kernel (an outer loop over (query tile, head)
items, heaviest first, round-robin or snake order) made by rewriting a copy of
``kernels/prefill_triton.py``; timed interleaved against the kernel as it is. A record of an
experiment (not adopted), not a tool.

``ROUNDS=7 PYTHONPATH=src python scripts/walk/persistent_grid.py`` (GPU; ``DEV=cpu LEN=256 TRITON_INTERPRET=1``
checks the outputs on the interpreter).
"""
import os, sys, torch, triton, triton.testing

from common import inputs, kernel_source, load_module, print_errors_vs_current

SRC = kernel_source()


def make_persistent(src):
    head, rest = src.split("def _block_sparse_fwd(", 1)
    sig, body = rest.split("):\n", 1)
    body, tail = body.split("\n\n# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head_dim", 1)
    start = "    tile = num_q_tiles - 1 - tl.program_id(0)\n    bh = tl.program_id(1)\n"
    pre, main = body.split(start)
    main = "\n".join(("    " + ln) if ln.strip() else ln for ln in main.split("\n"))
    loop = ("    total = num_q_tiles * num_bh\n"
            "    nprog = tl.num_programs(0)\n"
            "    pid = tl.program_id(0)\n"
            "    for w0 in range(0, total, nprog):\n"
            "        if SNAKE:\n"
            "            w = w0 + tl.where((w0 // nprog) % 2 == 0, pid, nprog - 1 - pid)\n"
            "        else:\n"
            "            w = w0 + pid\n"
            "        w = tl.minimum(w, total - 1)  # a repeated last item in the final round (same output)\n"
            "        tile = num_q_tiles - 1 - w // num_bh\n"
            "        bh = w % num_bh\n")
    sig = sig.rstrip().rstrip(",") + ",\n    num_bh, SNAKE: tl.constexpr,\n"
    tail = tail.replace("    grid = (num_q_tiles, B * (Hkv if pack > 1 else Hq))\n",
                        "    num_bh = B * (Hkv if pack > 1 else Hq)\n"
                        "    grid = (min(num_q_tiles * num_bh, PERSIST_CTAS),)\n")
    tail = tail.replace("        num_warps=num_warps, num_stages=num_stages,\n    )",
                        "        num_warps=num_warps, num_stages=num_stages, num_bh=num_bh, SNAKE=PERSIST_SNAKE,\n    )")
    assert "PERSIST_CTAS" in tail and "num_bh=num_bh" in tail
    return head + "def _block_sparse_fwd(" + sig + "):\n" + pre + loop + main + "\n\n# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head_dim" + tail

mods = {}
load = load_module
mods["cur"] = load("cur", SRC)
PSRC = make_persistent(SRC)
dev = os.environ.get("DEV", "cuda")
nsm = torch.cuda.get_device_properties(0).multi_processor_count if dev == "cuda" else 2
for occ, snake in ((2, False), (2, True), (4, False), (4, True), (8, False), (8, True)):
    m = load(f"p{occ}{snake}", PSRC); m.PERSIST_CTAS = nsm * occ; m.PERSIST_SNAKE = snake
    mods[f"persist x{occ}{' snake' if snake else ''}"] = m

dev, q, k, v, plans = inputs()
plans[None] = None
print_errors_vs_current(mods, q, k, v, plans)
if dev == "cpu":
    sys.exit()
dens = {d: (p.density() if p is not None else 1.0) for d, p in plans.items()}
# Interleaved: each round times every variant on one plan back to back; ratios against cur of the same round.
import statistics
ratios = {(n, d): [] for n in mods for d in plans}
times = {(n, d): [] for n in mods for d in plans}
for m in mods.values():
    for p in plans.values():
        m.attention_triton(q, k, v, p)
torch.cuda.synchronize()
for rnd in range(int(os.environ.get("ROUNDS", 5))):
    for d, p in plans.items():
        t_cur = None
        for name, m in mods.items():
            t = triton.testing.do_bench(lambda: m.attention_triton(q, k, v, p), warmup=10, rep=40)
            times[(name, d)].append(t)
            if name == "cur":
                t_cur = t
            ratios[(name, d)].append(t / t_cur)
t_dense = statistics.median(times[("cur", None)])
print(f"median of rounds; plan=None (cur) {t_dense:.3f} ms")
for name in mods:
    print(f"  {name:12s} " + " | ".join(
        f"d={'None' if d is None else f'{dens[d]:.2f}'} {statistics.median(times[(name, d)]):.3f} ms "
        f"({statistics.median(times[(name, d)]) / (dens[d] * t_dense):.3f}x, vs cur {statistics.median(ratios[(name, d)]):.3f})"
        for d in plans), flush=True)
