"""Run one benchmark module without building the whole CLI: python scripts/bench_direct.py methods ARGS..."""

import argparse
import importlib
import sys

module = importlib.import_module(f"sparseattn.bench.{sys.argv[1]}")
parser = argparse.ArgumentParser(prog=f"sparseattn bench {sys.argv[1]}")
module.add_arguments(parser)
sys.exit(module.run(parser.parse_args(sys.argv[2:])) or 0)
