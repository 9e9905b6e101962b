"""`sparseattn bench kernel`: prefill kernel speed on one plan against PyTorch's best.

For each shape (Hq, Hkv, D), length and causal density, in one run:
* ours: ``block_sparse_attention`` with the plan (and ``plan=None`` for dense);
* SDPA dense causal with the cuDNN and the FlashAttention backends (the baselines);
* FlexAttention with a ``BlockMask`` built from the same plan (full blocks and diagonal blocks
  split, its best case), compiled;
* plan metadata cost: ``BlockPlan.from_block_mask`` on the GPU (what a method pays to turn a
  block mask into a plan).

Plans are random block masks at a target causal density (the diagonal block always kept), so
the figures measure the engine, not a method. Times are medians of ``triton.testing.do_bench``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from pathlib import Path

import torch

from ..plan import BlockPlan
from ._env import git_commit

SHAPES = {"32/8/128": (32, 8, 128), "9/3/64": (9, 3, 64)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lengths", default="8k,32k,128k", help="comma list of sequence lengths (k = 1024)")
    p.add_argument("--shapes", default="32/8/128,9/3/64", help="comma list of Hq/Hkv/D shapes")
    p.add_argument("--densities", default="0.05,0.1,0.25,0.5,1.0", help="target causal densities of the plans")
    p.add_argument("--block", type=int, default=128, help="plan block size (block_q = block_k)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"], help="input dtype")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (it compiles per shape)")
    p.add_argument("--plan-heads", default="q", choices=["q", "kv", "both"],
                   help="plans per query head (q), shared by each GQA group (kv: our kernel may pack the "
                        "group into one program), or both")
    p.add_argument("--sweep", action="store_true",
                   help="instead of the table, time kernel tile configs (BLOCK_M, BLOCK_N, warps, stages)")
    p.add_argument("--out", default="runs/bench_kernel.json", help="where to write the JSON results")
    p.add_argument("--rep-ms", type=int, default=300, help="do_bench time budget per measurement (ms)")


def _parse_len(s: str) -> int:
    s = s.strip().lower()
    return int(float(s[:-1]) * 1024) if s.endswith("k") else int(s)


def random_plan_at_density(B, H, L, block, density, device, seed=0) -> BlockPlan:
    """Random causal block mask keeping about ``density`` of each row's visible blocks.

    The diagonal block is always kept (every query must see itself).
    """
    nQ = nK = math.ceil(L / block)
    g = torch.Generator(device=device).manual_seed(seed)
    vis = BlockPlan.causal_block_limits(block_q=block, block_k=block, q_len=L, k_len=L, device=device).long()
    n = torch.arange(nK, device=device).view(1, -1)
    keys = torch.rand(B, H, nQ, nK, generator=g, device=device)
    keys = torch.where(n == (vis.view(-1, 1) - 1), torch.full_like(keys, 2.0), keys)  # force diagonal
    keys = torch.where(n < vis.view(-1, 1), keys, torch.full_like(keys, -1.0))
    want = torch.clamp(torch.round(density * vis.double()).long(), min=1).view(1, 1, -1, 1)
    rank = keys.argsort(-1, descending=True).argsort(-1)
    mask = rank < want
    return BlockPlan.from_block_mask(mask, block_q=block, block_k=block, q_len=L, k_len=L, causal=True)


def flex_block_mask(plan: BlockPlan, B: int, H: int):
    """FlexAttention BlockMask with the same blocks: full blocks unmasked, diagonal ones masked."""
    from torch.nn.attention.flex_attention import BlockMask

    L = plan.q_len
    bm = plan.block_mask().expand(B, H, -1, -1)
    nQ, nK = bm.shape[-2:]
    m = torch.arange(nQ, device=bm.device).view(-1, 1)
    n = torch.arange(nK, device=bm.device).view(1, -1)
    # Full: every query of block m sees every key of block n (block ends before the q block starts).
    fully_visible = ((n + 1) * plan.block_k - 1 <= m * plan.block_q) & ((n + 1) * plan.block_k <= L)
    full = bm & fully_visible
    partial = bm & ~fully_visible

    def to_idx(mask):
        counts = mask.sum(-1, dtype=torch.int32)
        idx = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return counts, idx

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    pc, pi = to_idx(partial)
    fc, fi = to_idx(full)
    return BlockMask.from_kv_blocks(pc, pi, fc, fi, BLOCK_SIZE=(plan.block_q, plan.block_k), mask_mod=causal,
                                    seq_lengths=(L, L))


def _sdpa_fn(q, k, v, backend_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend_name]
    G = q.shape[1] // k.shape[1]

    def gqa_call():
        with sdpa_kernel([backend]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    try:
        gqa_call()
        torch.cuda.synchronize()
        return gqa_call, "gqa"
    except Exception:  # a backend without native GQA: give it repeated K/V (built outside the timing)
        kr, vr = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)

        def rep_call():
            with sdpa_kernel([backend]):
                return torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True)

        rep_call()
        torch.cuda.synchronize()
        return rep_call, "repeated-kv"


def _causal_flops(Hq, L, D):
    return 4.0 * Hq * D * L * (L + 1) / 2  # QK^T and PV over the causal triangle


def environment() -> dict:
    import triton

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"device": dev, "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(), "commit": os.environ.get("SPARSEATTN_COMMIT") or git_commit(),
            "command": "sparseattn " + " ".join(sys.argv[1:])}


# (BLOCK_M, BLOCK_N, num_warps, num_stages, use_tma)
SWEEP_CONFIGS = {
    128: [(128, 128, 8, 3, True), (128, 128, 8, 2, True), (128, 64, 8, 3, True), (64, 128, 4, 3, True),
          (64, 64, 4, 3, True), (128, 128, 8, 3, False), (64, 128, 4, 2, True)],
    64: [(64, 128, 4, 3, True), (128, 64, 4, 3, True), (64, 64, 4, 3, True), (128, 128, 8, 3, True),
         (64, 128, 4, 2, True), (128, 128, 4, 3, True), (64, 128, 4, 3, False)],
}
SWEEP_DENSITIES = (0.05, 0.1, 0.25)


def run_sweep(args, bench) -> list:
    """Time tile configs on dense and on sparse plans of a few densities at one length."""
    from ..kernels.prefill_triton import attention_triton

    rows = []
    dtype = getattr(torch, args.dtype)
    L = _parse_len(args.lengths.split(",")[0]) if args.lengths != "8k,32k,128k" else 32768
    for shape_name in args.shapes.split(","):
        Hq, Hkv, D = SHAPES[shape_name]
        q = torch.randn(1, Hq, L, D, device="cuda", dtype=dtype)
        k = torch.randn(1, Hkv, L, D, device="cuda", dtype=dtype)
        v = torch.randn(1, Hkv, L, D, device="cuda", dtype=dtype)
        plans = {d: random_plan_at_density(1, Hq, L, args.block, d, "cuda") for d in SWEEP_DENSITIES}
        ref = attention_triton(q, k, v, None, config=(64, 64, 4, 2, False)).float()
        for cfg in SWEEP_CONFIGS[D]:
            try:
                out = attention_triton(q, k, v, None, config=cfg).float()
                err = ((out - ref).norm() / ref.norm()).item()
                row = {"shape": shape_name, "L": L, "config": cfg, "rel_err_vs_small_tiles": err,
                       "dense_ms": bench(lambda: attention_triton(q, k, v, None, config=cfg))}
                for d, plan in plans.items():
                    row[f"sparse{int(100 * d)}_ms"] = bench(lambda: attention_triton(q, k, v, plan, config=cfg))
            except Exception as exc:  # a config that does not compile (shared memory) is reported
                rows.append({"shape": shape_name, "L": L, "config": cfg, "error": f"{type(exc).__name__}: {exc}"[:200]})
                print(f"{shape_name:>9} {str(cfg):>26}  failed: {type(exc).__name__}")
                continue
            row["dense_tflops"] = _causal_flops(Hq, L, D) / row["dense_ms"] / 1e9
            rows.append(row)
            sparse = "  ".join(f"{int(100 * d)}% {row[f'sparse{int(100 * d)}_ms']:7.3f}" for d in SWEEP_DENSITIES)
            print(f"{shape_name:>9} {str(cfg):>26}  dense {row['dense_ms']:8.3f} ms ({row['dense_tflops']:4.0f} TF)  "
                  f"{sparse}  err {err:.1e}", flush=True)
    return rows


def run(args) -> int:
    if not torch.cuda.is_available():
        print("sparseattn bench kernel needs a CUDA GPU (it times GPU kernels); none is visible.", file=sys.stderr)
        return 2
    import triton.testing

    from ..api import block_sparse_attention

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=args.rep_ms, return_mode="median")

    env = environment()
    from ..kernels.prefill_triton import default_config

    env["kernel_configs"] = {f"D={d} {args.dtype}": default_config(d, getattr(torch, args.dtype)) for d in (64, 128)}
    if args.sweep:
        rows = run_sweep(args, bench)
        _write(args.out, {"env": env, "sweep": rows})
        return 0

    dtype = getattr(torch, args.dtype)
    lengths = [_parse_len(x) for x in args.lengths.split(",")]
    densities = [float(x) for x in args.densities.split(",")]
    flex = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
    results = []
    header = (f"{'shape':>9} {'L':>7} {'plan':>4} {'target':>6} {'density':>7} {'ours ms':>9} {'TFLOP/s':>7} {'flex ms':>9} "
              f"{'ours/flex':>9} {'cuDNN ms':>9} {'FA ms':>8} {'vs cuDNN':>8} {'scaling':>7} {'plan ms':>8} {'plan %':>6} {'packed':>7} {'unpack':>7}")
    print(header)
    for shape_name in args.shapes.split(","):
        Hq, Hkv, D = SHAPES[shape_name]
        for L in lengths:
            torch.manual_seed(0)
            q = torch.randn(1, Hq, L, D, device="cuda", dtype=dtype)
            k = torch.randn(1, Hkv, L, D, device="cuda", dtype=dtype)
            v = torch.randn(1, Hkv, L, D, device="cuda", dtype=dtype)
            base = {}
            for name in ("cudnn", "flash"):
                try:
                    fn, mode = _sdpa_fn(q, k, v, name)
                    base[name] = bench(fn)
                    base[name + "_mode"] = mode
                except Exception as exc:
                    base[name] = None
                    base[name + "_error"] = f"{type(exc).__name__}: {exc}"[:200]
            t_dense = bench(lambda: block_sparse_attention(q, k, v, None))
            flops = _causal_flops(Hq, L, D)
            modes = ["q", "kv"] if args.plan_heads == "both" else [args.plan_heads]
            for d, mode in [(d, m) for d in densities for m in modes]:
                plan_h = Hq if mode == "q" else Hkv
                if d >= 1.0:
                    plan = BlockPlan.dense(1, plan_h, block_q=args.block, block_k=args.block, q_len=L, k_len=L,
                                           device="cuda")
                    mask_for_build = None
                else:
                    plan = random_plan_at_density(1, plan_h, L, args.block, d, "cuda")
                    mask_for_build = plan.block_mask()
                density = plan.density()
                t_ours = bench(lambda: block_sparse_attention(q, k, v, plan))
                t_plan = None
                if mask_for_build is not None:
                    t_plan = bench(lambda: BlockPlan.from_block_mask(mask_for_build, block_q=args.block,
                                                                     block_k=args.block, q_len=L, k_len=L))
                t_flex = flex_err = None
                if flex is not None:
                    try:
                        bmask = flex_block_mask(plan.expand_heads(Hq), 1, Hq)
                        ref = flex(q, k, v, block_mask=bmask, enable_gqa=True).float()
                        ours = block_sparse_attention(q, k, v, plan).float()
                        flex_err = ((ours - ref).norm() / ref.norm()).item()  # same plan, same function
                        del ref, ours
                        t_flex = bench(lambda: flex(q, k, v, block_mask=bmask, enable_gqa=True))
                        del bmask
                    except Exception as exc:
                        print(f"FlexAttention failed at {shape_name} L={L} d={d}: {type(exc).__name__}: {exc}"[:300])
                t_packed = t_unpacked = None
                if mode == "kv" and Hq > Hkv:  # the same plan with and without packing the group
                    from ..kernels.prefill_triton import attention_triton

                    t_packed = bench(lambda: attention_triton(q, k, v, plan, pack_gqa=True))
                    t_unpacked = bench(lambda: attention_triton(q, k, v, plan, pack_gqa=False))
                row = {"shape": shape_name, "Hq": Hq, "Hkv": Hkv, "D": D, "L": L, "target_density": d,
                       "plan_heads": mode, "ours_packed_ms": t_packed, "ours_unpacked_ms": t_unpacked,
                       "density": density, "ours_ms": t_ours, "ours_dense_ms": t_dense, "flex_ms": t_flex,
                       "sdpa_cudnn_ms": base.get("cudnn"), "sdpa_flash_ms": base.get("flash"),
                       "plan_build_ms": t_plan, "ours_vs_flex_rel_err": flex_err, "sdpa_modes": {k_: v_ for k_, v_ in base.items() if not
                                                              isinstance(v_, float)}}
                row["ours_tflops_effective"] = flops * density / t_ours / 1e9
                row["scaling_ratio"] = t_ours / (density * t_dense)  # target: <= 1.25
                if t_flex:
                    row["speedup_vs_flex"] = t_flex / t_ours  # target: >= 1.15 at d <= 25 %
                if base.get("cudnn"):
                    row["speedup_vs_cudnn"] = base["cudnn"] / t_ours
                results.append(row)
                _write(args.out, {"env": env, "results": results}, quiet=True)  # nothing lost if stopped
                fmt = lambda x, w, p=3: f"{x:{w}.{p}f}" if x is not None else f"{'-':>{w}}"  # noqa: E731
                print(f"{shape_name:>9} {L:>7} {mode:>4} {d:>6.2f} {density:>7.3f} {fmt(t_ours, 9)} "
                      f"{row['ours_tflops_effective']:>7.0f} {fmt(t_flex, 9)} {fmt(row.get('speedup_vs_flex'), 9, 2)} "
                      f"{fmt(base.get('cudnn'), 9)} {fmt(base.get('flash'), 8)} {fmt(row.get('speedup_vs_cudnn'), 8, 2)} "
                      f"{row['scaling_ratio']:>7.2f} {fmt(t_plan, 8)} "
                      f"{fmt(100 * t_plan / t_ours if t_plan else None, 6, 1)} {fmt(t_packed, 7)} {fmt(t_unpacked, 7)}",
                      flush=True)
                del plan
            del q, k, v
            torch.cuda.empty_cache()
    _write(args.out, {"env": env, "results": results})
    return 0


def _write(path, payload, quiet=False):
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1))
    if not quiet:
        print(f"wrote {out}")


def markdown_table(results: list) -> str:
    """The results as a Markdown table (used for BENCHMARKS.md)."""
    lines = ["| Hq/Hkv/D | L | plan per | density | ours ms | FlexAttention ms | ours vs Flex | cuDNN dense ms | FA2 dense ms "
             "| ours vs cuDNN | scaling t/(d*t_dense) | plan build ms (% of kernel) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        f = lambda x, p=3: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
        plan = "-" if r["plan_build_ms"] is None else f"{r['plan_build_ms']:.3f} ({100 * r['plan_build_ms'] / r['ours_ms']:.1f} %)"
        per = {"q": "q head", "kv": "KV group"}[r.get("plan_heads", "q")]
        lines.append(f"| {r['shape']} | {r['L'] // 1024}K | {per} | {r['density']:.3f} | {f(r['ours_ms'])} | {f(r['flex_ms'])} | "
                     f"{f(r.get('speedup_vs_flex'), 2)}x | {f(r['sdpa_cudnn_ms'])} | {f(r['sdpa_flash_ms'])} | "
                     f"{f(r.get('speedup_vs_cudnn'), 2)}x | {r['scaling_ratio']:.2f} | {plan} |")
    return "\n".join(lines)
