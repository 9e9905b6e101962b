"""``sparseattn calibrate sale | double_sparsity``: a method's offline calibration on a real model, saved as a file.

``sale``: SALE's per-(layer, head) thresholds by the official ``calib_error`` rule
(:func:`sparseattn.methods.calibrate_sale_thresholds`) on ``--samples`` KV-retrieval prompts of
``--length`` tokens; the JSON it writes is what ``get_method("sale", threshold=PATH)`` and
``--methods "sale[threshold=PATH]"`` (bench fidelity, eval) read.

``double_sparsity``: Double Sparsity's label channels
(:func:`sparseattn.decode_methods.double_sparsity.calibrate_channels`) from ``--samples`` blocks
of ``--length`` tokens of the haystack text (``--haystack DIR`` of ``.txt`` files, default the
generated haystack; official: pile-val blocks of 512); the JSON (the official layout) is what
``get_method("double_sparsity", kind="decode", channels=PATH)`` reads.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

CALIBRATORS = ("sale", "double_sparsity")


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
                   help="tokens per calibration prompt (default: sale 8192 on CUDA, 2048 on CPU; double_sparsity 512)")
    p.add_argument("--samples", type=_positive_int, default=None,
                   help="calibration prompts (default: sale 4, double_sparsity 64)")
    p.add_argument("--haystack", default=None, metavar="DIR",
                   help="double_sparsity: directory of .txt files for the calibration text (default: generated haystack)")
    p.add_argument("--r", type=_positive_int, default=32, help="double_sparsity: label channels kept per head (official: 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated prompts (default: 0)")
    p.add_argument("--error", type=_positive_float, default=0.4,
                   help="sale: per-row L1 output error each head must stay below (official: 0.4; larger = sparser)")
    p.add_argument("--start", type=_positive_float, default=0.008, help="sale: first threshold (official: 0.008)")
    p.add_argument("--out", default=None,
                   help="output JSON file (default: runs/sale_thresholds.json, runs/double_sparsity_channels.json)")


def run(args) -> int:
    from .models import load_model

    default_out = {"sale": "runs/sale_thresholds.json", "double_sparsity": "runs/double_sparsity_channels.json"}
    out = Path(args.out or default_out[args.method])
    if args.haystack is not None and not Path(args.haystack).expanduser().is_dir():
        raise SystemExit(f"--haystack {args.haystack!r} is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(args.model, device=args.device)
    if args.method == "double_sparsity":
        return _double_sparsity(args, model, tok, out)
    return _sale(args, model, tok, out)


def _double_sparsity(args, model, tok, out: Path) -> int:
    from .decode_methods.double_sparsity import calibrate_channels_from_qkv
    from .eval.haystack import haystack_ids
    from .integrations.capture import capture_qkv

    length, samples = args.length or 512, args.samples or 64
    ids = haystack_ids(tok, length * samples, source=args.haystack, seed=args.seed)
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    # one forward per block of `length` tokens (what calibrate_channels does with texts)
    blocks = (capture_qkv(model, ids[:, i * length:(i + 1) * length].to(device)) for i in range(samples))
    table = calibrate_channels_from_qkv(blocks, r=args.r, path=out)
    print(f"Double Sparsity channels for {table.shape[0]} layers x {table.shape[1]} heads, r = {table.shape[2]} "
          f"({time.perf_counter() - t0:.1f} s, {samples} blocks of {length} tokens)")
    print(f"wrote {out}; use it as get_method('double_sparsity', kind='decode', channels='{out}')")
    return 0


def _sale(args, model, tok, out: Path) -> int:
    import torch

    from .methods import calibrate_sale_thresholds

    device = next(model.parameters()).device
    length = args.length or (8192 if device.type == "cuda" else 2048)
    t0 = time.perf_counter()
    table = calibrate_sale_thresholds(model, tok, length=length, num_samples=args.samples or 4, seed=args.seed,
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
