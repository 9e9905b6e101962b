"""Issue 3 on a GPU: ours vs the official XAttention and FlexPrefill, same q/k/v, same run.

Issue 3 asks ours to be >= 3x faster than the official implementations at equal or better
attention-mass recall, on q/k/v captured from SmolLM2-135M at 32K on an H100. This script
measures both sides on the same tensors (needs CUDA and an extracted MInference 0.1.6.0 sdist,
see ``sparseattn.bench.official.FETCH_HINT``):

    python scripts/official_compare.py --official-src /tmp/mdl/minference-0.1.6.0 \\
        --out runs/official_compare_32k.json

Per ``--layers`` layer of ``--model`` reading ``--length`` tokens of ``--haystack``, one call of
:func:`sparseattn.bench.methods.run_case` over four methods:

* ``xattention``, ``flexprefill``: ours at defaults (``--ours`` takes ``NAME[option=value]`` too);
* ``official_xattention``, ``official_flexprefill``: the adapters of
  :mod:`sparseattn.bench.official` (the official estimate builds the plan);

so every row has the estimate time, our kernel on the plan, the total (both in one call), the
density of the causal area (``plan_density``, elements), the sampled mass recall and output error
(``--recall-windows`` windows of 128 query rows). Added here:

* ``square_density``: kept blocks / all n x n blocks (what FlexPrefill's
  ``return_computational_ratio`` reports) and ``causal_block_density`` (kept / causal blocks, the
  denominator of MInference's XAttention print), from one more untimed ``plan`` call;
* on the official rows, ``official_e2e_ms``: the official attention end to end: FlexPrefill's
  ``flex_prefill_attention`` (selection + its Triton kernel, in its [B, L, H, D] layout, copies
  made outside the timing) and XAttention's estimate + FlexAttention on its mask (its
  block_sparse_attn CUDA kernel is not available); checks: ``e2e_vs_our_kernel_rel_err`` (the
  official output against our kernel on the official plan: about 1e-2 or less in bf16 when the
  plan conversion is right) and, for FlexPrefill, ``plan_matches_contiguous`` (selection on
  transposed views == on the contiguous copies);
* on our rows: ``speedup_vs_official_e2e`` = official e2e ms / our total ms of the same method,
  ``recall_ge_official`` and ``issue3_ok`` (speedup >= 3 and recall >= the official's).

The JSON (``--out``, rewritten after every row) holds every row plus the environment; a
Markdown table per layer and one over the layers are printed (``--table-from`` reprints them from
a JSON file, no GPU needed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

try:
    import sparseattn  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch

from sparseattn.bench import methods as bm
from sparseattn.bench import official as of
from sparseattn.bench._env import method_objects, parse_layer_list
from sparseattn.plan import BlockPlan

SCHEMA = 1
TARGET_SPEEDUP = 3.0
DEFAULT_OUT = "runs/official_compare.json"
OFFICIAL_OF = {"xattention": "official_xattention", "flexprefill": "official_flexprefill"}


# ----------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official-src", metavar="DIR", default=None,
                   help="extracted MInference 0.1.6.0 sdist (the directory holding minference/); required unless "
                        "--table-from")
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (SmolLM2-135M-Instruct), a .gguf file or a Hugging Face model directory "
                        "(default: smollm2)")
    p.add_argument("--haystack", default=None, metavar="DIR",
                   help="directory of .txt files read as input, repeated if shorter than --length (default: the "
                        "built-in generated haystack)")
    p.add_argument("--length", default="32768", help="tokens fed to the model, k = 1024 (default: 32768)")
    p.add_argument("--layers", default="3,15,24", help="comma list of layers to capture (default: 3,15,24)")
    p.add_argument("--ours", default="xattention,flexprefill",
                   help="our methods, NAME or NAME[option=value,...], each paired with the official method of its "
                        "NAME (xattention or flexprefill; default: both at their defaults)")
    p.add_argument("--xattn-stride", type=int, default=16, help="official XAttention stride (default: 16)")
    p.add_argument("--xattn-threshold", type=float, default=0.9, help="official XAttention threshold (default: 0.9)")
    p.add_argument("--xattn-chunk-size", type=int, default=None,
                   help="official XAttention query chunk (default: as Xattention_prefill computes it, 8192 at 32K)")
    p.add_argument("--gamma", type=float, default=0.9, help="official FlexPrefill gamma (default: 0.9)")
    p.add_argument("--tau", type=float, default=0.1, help="official FlexPrefill tau (default: 0.1)")
    p.add_argument("--recall-windows", type=int, default=32,
                   help="query windows of 128 rows, spread evenly, on which recall is measured (default: 32; 0 = "
                        "every row)")
    p.add_argument("--no-e2e", action="store_true", help="skip the official end-to-end timings")
    p.add_argument("--warmup-ms", type=int, default=25, help="do_bench warm-up budget per measurement (default: 25)")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench time budget per measurement (default: 100)")
    p.add_argument("--slow-ms", type=float, default=2000.0,
                   help="a call slower than this (ms) is timed alone with CUDA events (default: 2000)")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"JSON results, rewritten after every row (default: {DEFAULT_OUT})")
    p.add_argument("--table-from", default=None, metavar="JSON",
                   help="print the tables of a results file written earlier and exit (no GPU needed)")
    return p


def pair_ours(labels: Sequence[str]) -> Dict[str, str]:
    """``{our label: official method name}``; a label whose NAME has no official twin exits."""
    pairs = {}
    for label in labels:
        base = label.split("[", 1)[0].strip()
        if base not in OFFICIAL_OF:
            raise SystemExit(f"--ours: {label!r} has no official counterpart here; use {' or '.join(OFFICIAL_OF)} "
                             "(optionally with [option=value,...])")
        pairs[label] = OFFICIAL_OF[base]
    return pairs


# "Equal recall" up to this much (absolute): two plans of the same algorithm differ in a few
# near-tie blocks where the two codes round profile sums differently (see plan_agreement).
RECALL_TOLERANCE = 1e-3


# ----------------------------------------------------------------------------- one layer
def plan_agreement(ours: torch.Tensor, official: torch.Tensor, heads: int) -> dict:
    """Block-level agreement of two ``[B, H, nQ, nK]`` block masks (a mask shared by a group of
    heads is expanded to ``heads``): Jaccard index and the blocks only one of them keeps."""
    a, b = (m.expand(m.shape[0], heads, *m.shape[2:]) if m.shape[1] == 1 else
            m.repeat_interleave(heads // m.shape[1], 1) for m in (ours, official))
    both, either = int((a & b).sum()), int((a | b).sum())
    return {"plan_jaccard_vs_official": both / either if either else 1.0,
            "blocks_only_ours": int((a & ~b).sum()), "blocks_only_official": int((~a & b).sum()),
            "blocks_ours": int(a.sum())}


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


E2E_MAKERS: Dict[str, Callable] = {
    "official_xattention": of.official_xattention_attention_fn,
    "official_flexprefill": of.official_flexprefill_attention_fn,
}


def compare_layer(q, k, v, ours: Mapping[str, object], official: Mapping[str, object], timer, *,
                  case: dict, layer_idx: Optional[int], recall_windows: int, pairs: Mapping[str, str],
                  e2e_makers: Optional[Mapping[str, Callable]] = E2E_MAKERS,
                  on_row: Optional[Callable[[dict], None]] = None) -> List[dict]:
    """The rows of one layer: :func:`run_case` over ours and the official adapters, then block
    densities, the official end-to-end timings (``e2e_makers``: ``{name: maker(method, q, k, v) ->
    fn}``, None = skip) and the pairing of each of ours with its official twin."""
    from sparseattn.api import block_sparse_attention

    methods = {**ours, **official}
    rows = bm.run_case(q, k, v, methods, timer, case=case, layer_idx=layer_idx, oracle_mass=None,
                       recall_windows_n=recall_windows, on_row=on_row)
    by_name = {r["method"]: r for r in rows}
    L = q.shape[2]
    dense = of.plan_block_densities(BlockPlan.dense(1, 1, q_len=L, k_len=L, device=q.device))
    for r in rows:
        if r.get("kind") == "baseline":
            r.update(dense)
    masks = {}
    for name, method in methods.items():  # one more plan, untimed, for the block counts
        r = by_name.get(name)
        if r is None or r.get("error"):
            continue
        try:
            plan = method.plan(q, k, v, causal=True, layer_idx=layer_idx)
            r.update(of.plan_block_densities(plan))
            masks[name] = plan.block_mask()
        except Exception as exc:
            r["block_density_error"] = bm._error_text(exc)
    for name, make in (e2e_makers or {}).items():
        r, method = by_name.get(name), official.get(name)
        if r is None or method is None:
            continue
        r["official_e2e_ms"] = None
        try:
            fn = make(method, q, k, v)
            out = fn()  # also the first warm-up
            ref = block_sparse_attention(q, k, v, method.plan(q, k, v, causal=True))
            r["e2e_vs_our_kernel_rel_err"] = _rel_err(out, ref)
            del out, ref
            inputs = getattr(fn, "inputs_blhd", None)
            if inputs is not None and hasattr(method, "block_mask_blhd"):
                r["plan_matches_contiguous"] = bool(torch.equal(method.block_mask_blhd(*inputs),
                                                                method.block_mask(q, k, v)))
            r["official_e2e_ms"] = timer(fn)
            r.setdefault("timing", {})["official_e2e"] = dict(getattr(timer, "last", {}))
            del fn
        except Exception as exc:  # the other measurements stay
            r["official_e2e_error"] = bm._error_text(exc)
        bm._cleanup(q.device)
    for label, off_name in pairs.items():
        r, off = by_name.get(label), by_name.get(off_name)
        if r is None or off is None:
            continue
        r["official_method"] = off_name
        t_off, t_ours = off.get("official_e2e_ms"), r.get("total_ms")
        r["speedup_vs_official_e2e"] = t_off / t_ours if (t_off and t_ours) else None
        if label in masks and off_name in masks:
            r.update(plan_agreement(masks[label], masks[off_name], q.shape[1]))
        rec, rec_off = r.get("mass_recall"), off.get("mass_recall")
        r["official_mass_recall"] = rec_off
        r["recall_ge_official"] = ((rec >= rec_off - RECALL_TOLERANCE) if (rec is not None and rec_off is not None)
                                   else None)
        s = r["speedup_vs_official_e2e"]
        r["issue3_ok"] = (s >= TARGET_SPEEDUP and r["recall_ge_official"]) if s is not None and \
            r["recall_ge_official"] is not None else None
    return rows


# ----------------------------------------------------------------------------- tables
COLUMNS = ("method", "density (causal)", "official-square density", "recall", "out rel. err", "est ms", "kernel ms",
           "total ms", "official e2e ms", "speedup vs official e2e", "recall ours >= official?",
           "blocks: Jaccard vs official (only ours / only official)")


def _f(x, p=3) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{p}f}"


def _yes_no(x) -> str:
    return "-" if x is None else ("yes" if x else "no")


def _cells(r: dict) -> List[str]:
    if r.get("error"):
        return [r["method"], f"error: {r['error']}"] + [""] * (len(COLUMNS) - 2)
    e2e = _f(r.get("official_e2e_ms"))
    if r.get("official_e2e_error"):
        e2e = "error (see JSON)"
    speed = r.get("speedup_vs_official_e2e")
    return [r["method"], _f(r.get("density")), _f(r.get("square_density")), _f(r.get("mass_recall"), 4),
            _f(r.get("out_rel_err_sampled")), _f(r.get("estimation_ms")), _f(r.get("kernel_ms")),
            _f(r.get("total_ms")) + ("*" if r.get("total_is_sum") else ""), e2e,
            "-" if speed is None else f"{speed:.2f}x vs {r.get('official_method')}",
            _yes_no(r.get("recall_ge_official")),
            "-" if r.get("plan_jaccard_vs_official") is None else
            f"{r['plan_jaccard_vs_official']:.4f} ({r['blocks_only_ours']} / {r['blocks_only_official']})"]


def markdown_table(rows: Sequence[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(c.replace("|", "/") for c in _cells(r)) + " |")
    return "\n".join(lines)


def verdicts(rows: Sequence[dict]) -> List[str]:
    """One line per of our methods: issue 3's two conditions and the verdict."""
    out = []
    for r in rows:
        if "official_method" not in r:
            continue
        s, ok = r.get("speedup_vs_official_e2e"), r.get("issue3_ok")
        why = []
        if s is not None and s < TARGET_SPEEDUP:
            why.append("speed")
        if r.get("recall_ge_official") is False:
            why.append("recall")
        out.append(f"issue 3, {r['method']} vs {r['official_method']}: "
                   f"{'-' if s is None else f'{s:.2f}x'} faster end to end (target >= {TARGET_SPEEDUP:g}x), recall "
                   f"{_f(r.get('mass_recall'), 4)} vs {_f(r.get('official_mass_recall'), 4)}: "
                   + ("met" if ok else "not measured" if ok is None else f"NOT met ({', '.join(why)})"))
    return out


def summary_rows(rows: Sequence[dict]) -> List[dict]:
    """Per method over the layers: means, and the speedup as a ratio of sums (layers where both
    figures exist); ``recall_ge_official`` is true when it held on every such layer."""
    order, groups = [], {}
    for r in rows:
        if r["method"] not in groups:
            order.append(r["method"])
            groups[r["method"]] = []
        groups[r["method"]].append(r)
    out = []
    for name in order:
        rs = groups[name]
        ok = [r for r in rs if not r.get("error")]
        agg = {"method": name + (f" ({len(ok)}/{len(rs)} layers)" if len(ok) < len(rs) else ""),
               "error": None if ok else rs[0].get("error")}
        for fld in ("density", "square_density", "mass_recall", "out_rel_err_sampled", "estimation_ms", "kernel_ms",
                    "total_ms", "official_e2e_ms", "official_mass_recall", "plan_jaccard_vs_official"):
            vals = [r[fld] for r in ok if r.get(fld) is not None]
            agg[fld] = sum(vals) / len(vals) if vals else None
        agg["total_is_sum"] = any(r.get("total_is_sum") for r in ok)
        for fld in ("blocks_only_ours", "blocks_only_official"):
            vals = [r[fld] for r in ok if r.get(fld) is not None]
            agg[fld] = sum(vals) if vals else None
        both = [r for r in ok if r.get("speedup_vs_official_e2e") is not None]
        if any("official_method" in r for r in ok):
            agg["official_method"] = next(r["official_method"] for r in ok if "official_method" in r)
            by_layer = {(x.get("layer"), x["method"]): x for x in rows}
            off_t = [by_layer[(r.get("layer"), r["official_method"])]["official_e2e_ms"] for r in both]
            agg["speedup_vs_official_e2e"] = sum(off_t) / sum(r["total_ms"] for r in both) if both else None
            flags = [r.get("recall_ge_official") for r in ok if r.get("recall_ge_official") is not None]
            agg["recall_ge_official"] = all(flags) if flags else None
            s = agg["speedup_vs_official_e2e"]
            agg["issue3_ok"] = (s >= TARGET_SPEEDUP and agg["recall_ge_official"]) if s is not None and \
                agg["recall_ge_official"] is not None else None
        out.append(agg)
    return out


TABLE_NOTE = ("density (causal) = share of the causal area the plan computes (elements, plan_density); "
              "official-square density = kept blocks / all n x n blocks (FlexPrefill's return_computational_ratio); "
              "recall = dense softmax mass inside the plan (sampled windows); out rel. err = our kernel on the plan vs "
              "dense (sampled); est = method.plan; kernel = our block_sparse_attention on that plan; total = both in "
              "one call (* = est + kernel, a slow estimator); official e2e = FlexPrefill's flex_prefill_attention "
              "(its Triton kernel) / XAttention's estimate + FlexAttention on its mask; speedup = official e2e of "
              "the same method / our total; recall ours >= official: up to %g absolute; blocks: Jaccard index of the "
              "two plans' blocks (kept by both / by either; over layers: mean, and the sums)." % RECALL_TOLERANCE)


def print_tables(res: dict, *, per_layer: bool = True, note: bool = True) -> None:
    """A table per layer (``per_layer``), one over the layers when there are several, the note."""
    rows = res.get("rows", [])
    layers = []
    for r in rows:
        if r.get("layer") not in layers:
            layers.append(r.get("layer"))
    for layer in layers if per_layer else []:
        rs = [r for r in rows if r.get("layer") == layer]
        print(f"\n### {rs[0].get('case', f'layer {layer}')} (Hq/Hkv/D {rs[0].get('Hq')}/{rs[0].get('Hkv')}/"
              f"{rs[0].get('D')}, L {rs[0].get('L')}, {rs[0].get('dtype')})\n")
        print(markdown_table(rs))
        print("\n" + "\n".join(verdicts(rs)))
    if len(layers) > 1:
        summ = summary_rows(rows)
        print(f"\n### Over layers {', '.join(map(str, layers))} (means; speedup = sum of official e2e / sum of ours)\n")
        print(markdown_table(summ))
        print("\n" + "\n".join(verdicts(summ)))
    if note:
        env = res.get("env", {})
        print(f"\n{TABLE_NOTE}\n{env.get('device')}, {env.get('date')}, commit {env.get('commit')}, "
              f"`{env.get('command')}`")


# ----------------------------------------------------------------------------- results file
def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    os.replace(tmp, path)  # atomic: an interrupted write leaves the previous file intact


# ----------------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.table_from:
        p = Path(args.table_from)
        if not p.is_file():
            raise SystemExit(f"--table-from: {p} does not exist")
        print_tables(json.loads(p.read_text()))
        return 0
    if not args.official_src:
        raise SystemExit(f"--official-src DIR is required (an extracted MInference 0.1.6.0 sdist).\n{of.FETCH_HINT}")
    length = bm.parse_length(args.length, "--length")
    layers = parse_layer_list(args.layers)
    if args.recall_windows < 0:
        raise SystemExit(f"--recall-windows must be >= 0, got {args.recall_windows}")
    for flag, value in (("--warmup-ms", args.warmup_ms), ("--rep-ms", args.rep_ms), ("--slow-ms", args.slow_ms)):
        if value <= 0:
            raise SystemExit(f"{flag} must be positive, got {value}")
    ours = method_objects(args.ours)
    pairs = pair_ours(list(ours))
    try:
        official = {
            "official_xattention": of.OfficialXAttention(src=None, stride=args.xattn_stride,
                                                         threshold=args.xattn_threshold,
                                                         chunk_size=args.xattn_chunk_size),
            "official_flexprefill": of.OfficialFlexPrefill(src=None, gamma=args.gamma, tau=args.tau),
        }
    except ValueError as exc:
        raise SystemExit(f"official method settings: {exc}") from None
    try:
        code = of.load_official(args.official_src)
    except (FileNotFoundError, ImportError) as exc:
        raise SystemExit(str(exc)) from None
    for m in official.values():
        m.src = code
    if not torch.cuda.is_available():
        print("scripts/official_compare.py needs a CUDA GPU: the official code calls .to('cuda') and "
              "torch.cuda.get_device_properties, and the timings are GPU timings; none is visible.", file=sys.stderr)
        return 2
    from sparseattn.bench.timing import BenchTimer

    device = torch.device("cuda")
    timer = BenchTimer("cuda", warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, slow_ms=args.slow_ms)
    env = bm.environment(device)
    env["command"] = "python scripts/official_compare.py " + " ".join(sys.argv[1:] if argv is None else argv)
    gpu_name = torch.cuda.get_device_properties(torch.cuda.current_device()).name
    out = Path(args.out)
    res = {"schema": SCHEMA, "env": env,
           "config": {k: v for k, v in vars(args).items() if k != "table_from"} | {"length": length, "layers": layers},
           "official": {**code.describe(),
                        "xattn_estimate_triton_path": "100" in gpu_name,  # xattn_estimate's own rule
                        "configs": {n: m.config() for n, m in official.items()},
                        "defaults_source": {"official_xattention": of.XATTN_DEFAULTS_SOURCE,
                                            "official_flexprefill": of.FLEX_DEFAULTS_SOURCE}},
           "ours": {label: m.config() for label, m in ours.items()}, "cases": [], "rows": []}
    write_json(out, res)

    def on_row(row):
        res["rows"].append(row)
        write_json(out, res)
        if row.get("error"):
            print(f"  {row['method']:<22} error: {row['error']}", flush=True)
        else:
            print(f"  {row['method']:<22} est {_f(row.get('estimation_ms')):>8} ms  kernel "
                  f"{_f(row.get('kernel_ms')):>7} ms  total {_f(row.get('total_ms')):>8} ms  density "
                  f"{_f(row.get('density'))}  recall {_f(row.get('mass_recall'), 4)}", flush=True)

    cfg = bm.Config(cases=["real"], methods=[], model=args.model, haystack=args.haystack, length=length,
                    layers=layers, recall_windows=args.recall_windows, out=str(out))
    qkv, info = bm._real_inputs(cfg, device)
    name = Path(str(args.model)).name
    klen = f"{length // 1024}K" if length % 1024 == 0 else str(length)
    res["cases"].append({"case": "real", **info, "layers": layers})
    for layer in layers:
        q, k, v = (t.contiguous() for t in qkv.pop(layer))
        case = {"group": f"{name} {klen}", "case": f"{name} {klen} layer {layer}", "source": "real", "layer": layer}
        print(f"{case['case']}: q {tuple(q.shape)}, k {tuple(k.shape)}, {q.dtype}", flush=True)
        t0 = time.perf_counter()
        rows = compare_layer(q, k, v, ours, official, timer, case=case, layer_idx=layer,
                             recall_windows=args.recall_windows, pairs=pairs,
                             e2e_makers=None if args.no_e2e else E2E_MAKERS, on_row=on_row)
        for r in rows:
            if r.get("official_e2e_ms") is not None or r.get("official_e2e_error"):
                print(f"  {r['method']:<22} official e2e {_f(r.get('official_e2e_ms'))} ms"
                      + (f" error: {r['official_e2e_error']}" if r.get("official_e2e_error") else
                         f"  (vs our kernel on its plan: rel. err {_f(r.get('e2e_vs_our_kernel_rel_err'), 4)}"
                         + (f", plan on views == on copies: {r['plan_matches_contiguous']}"
                            if "plan_matches_contiguous" in r else "") + ")"), flush=True)
        res["cases"][-1].setdefault("layer_s", {})[str(layer)] = round(time.perf_counter() - t0, 1)
        write_json(out, res)  # the post-processed rows
        print_tables({"rows": rows, "env": env}, note=False)
        del q, k, v
        bm._cleanup(device)
    del qkv
    write_json(out, res)
    print_tables(res, per_layer=False)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
