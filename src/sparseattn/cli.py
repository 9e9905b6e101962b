"""Command line: ``sparseattn demo | eval | calibrate | bench kernel | fidelity | methods | decode``.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args)``;
modules are imported lazily so ``sparseattn --help`` stays fast and needs no optional deps.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, help); "bench" has its own sub-subcommands.
COMMANDS = {
    "demo": ("sparseattn.demo", "run dense and sparse attention on the real model and report fidelity"),
    "eval": ("sparseattn.eval_cli", "task accuracy (NIAH, passkey, RULER-style, perplexity) of sparse prefill methods"),
    "calibrate": ("sparseattn.calibrate_cli", "a method's offline calibration on a real model (sale: per-head thresholds)"),
}
BENCH_COMMANDS = {
    "kernel": ("sparseattn.bench.kernel", "prefill kernel speed vs SDPA (cuDNN, FlashAttention) and FlexAttention"),
    "fidelity": ("sparseattn.bench.fidelity", "every prefill method's density, mass recall and output error on real q/k/v"),
    "methods": ("sparseattn.bench.methods", "every prefill method's estimation + kernel time vs SDPA cuDNN dense"),
    "decode": ("sparseattn.bench.decode", "decode-step time per decode method (selection + kernel) vs SDPA dense"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparseattn", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        _add_command(sub, name, module, help_text)
    bench = sub.add_parser("bench", help="benchmarks (kernel, ...)", description="benchmarks")
    bsub = bench.add_subparsers(dest="bench_command", metavar="BENCH")
    bsub.required = True
    for name, (module, help_text) in BENCH_COMMANDS.items():
        _add_command(bsub, name, module, help_text)
    return parser


def _add_command(sub, name, module, help_text):
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.set_defaults(_module=module)
    importlib.import_module(module).add_arguments(p)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return importlib.import_module(args._module).run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
