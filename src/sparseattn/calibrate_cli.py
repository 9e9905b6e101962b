"""``sparseattn calibrate sale``: a method's offline calibration on a real model, saved as a file.

``sale``: SALE's per-(layer, head) thresholds by the official ``calib_error`` rule
(:func:`sparseattn.methods.calibrate_sale_thresholds`) on ``--samples`` KV-retrieval prompts of
``--length`` tokens; the JSON it writes is what ``get_method("sale", threshold=PATH)`` and
``--methods "sale[threshold=PATH]"`` (bench fidelity, eval) read.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

CALIBRATORS = ("sale",)


def _positive_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not x > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return x


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return n


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("method", choices=CALIBRATORS, help="the method to calibrate")
    p.add_argument("--model", default="smollm2",
                   help="'smollm2', a .gguf file or a local Hugging Face model directory (default: smollm2)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--length", type=_positive_int, default=None,
                   help="tokens per calibration prompt (default: 8192 on CUDA, 2048 on CPU)")
    p.add_argument("--samples", type=_positive_int, default=4, help="calibration prompts (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated prompts (default: 0)")
    p.add_argument("--error", type=_positive_float, default=0.4,
                   help="sale: per-row L1 output error each head must stay below (official: 0.4; larger = sparser)")
    p.add_argument("--start", type=_positive_float, default=0.008, help="sale: first threshold (official: 0.008)")
    p.add_argument("--out", default=None, help="output JSON file (default: runs/<method>_thresholds.json)")


def run(args) -> int:
    import torch

    from .methods import calibrate_sale_thresholds
    from .models import load_model

    out = Path(args.out or f"runs/{args.method}_thresholds.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(args.model, device=args.device)
    device = next(model.parameters()).device
    length = args.length or (8192 if device.type == "cuda" else 2048)
    t0 = time.perf_counter()
    table = calibrate_sale_thresholds(model, tok, length=length, num_samples=args.samples, seed=args.seed,
                                      error=args.error, start=args.start, path=out, progress=True)
    secs = time.perf_counter() - t0
    dense = int((table == 0).sum())
    kept = int((table == args.start).sum())
    print(f"SALE thresholds for {table.shape[0]} layers x {table.shape[1]} heads ({secs:.1f} s): mean "
          f"{table.mean().item():.5f}, {kept} heads kept the start value {args.start}, {dense} dense (0)")
    for v, n in zip(*(x.tolist() for x in torch.unique(table, return_counts=True))):
        print(f"  threshold {v:.6g}: {n} heads")
    print(f"wrote {out}; use it as get_method('sale', threshold='{out}') or --methods \"sale[threshold='{out}']\"")
    return 0
