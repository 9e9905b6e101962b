"""Shared by the reports and benchmarks: the machine description and the ``--methods`` argument."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import List, Optional

import torch


def device_name(device: torch.device) -> str:
    """``cuda (NVIDIA H100 ...)`` or ``cpu (model name, N threads, M cores visible)``."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    n = torch.get_num_threads()
    return f"cpu ({cpu}, {n} thread{'s' if n != 1 else ''}, {os.cpu_count()} cores visible)"


def method_objects(text: Optional[str]) -> dict:
    """``{label: method object}`` for ``--methods`` (default: every registered prefill method at its
    defaults). ``NAME[option=value,...]`` entries measure a method with other settings next to its
    defaults; their options are checked now."""
    from ..eval.runner import parse_methods as parse_specs
    from ..methods import get_method, list_methods

    valid = list_methods()
    if text is None:
        return {name: get_method(name) for name in valid}
    if not str(text).strip(", "):
        raise SystemExit(f"--methods {text!r} names no method; valid prefill methods: {', '.join(valid)}")
    entries = []
    for raw in str(text).split(","):  # drop repeats of plain names (kept for backward compatibility)
        if raw.strip() and (raw.strip() not in entries or "[" in raw):
            entries.append(raw.strip())
    unknown = [e for e in entries if "[" not in e and "]" not in e and e not in valid]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; valid prefill methods: {', '.join(valid)}")
    try:
        specs = parse_specs(",".join(entries))
    except ValueError as exc:
        raise SystemExit(f"--methods: {exc}") from None
    return {spec.label: spec.method() for spec in specs}


def git_commit() -> str:
    """The checkout's short commit (``-dirty`` with uncommitted changes to tracked files), or
    ``unknown`` (no git, e.g. a copy on a GPU machine: set ``SPARSEATTN_COMMIT`` there)."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here,
                                timeout=10).stdout.strip()
        if not commit:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=here, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def parse_layer_list(text: str, n_layers: Optional[int] = None) -> List[int]:
    """``--layers``: a comma list of layer indices (repeats dropped, order kept); with ``n_layers``
    also ``all`` (or empty) for every layer, and indices are checked against the model's depth."""
    if n_layers is not None and str(text).strip().lower() in ("all", ""):
        return list(range(n_layers))
    expected = "'all' or a comma list of ints" if n_layers is not None else "a comma list of ints"
    layers = []
    for raw in str(text).split(","):
        s = raw.strip()
        if not s:
            continue
        try:
            i = int(s)
        except ValueError:
            raise SystemExit(f"bad layer {s!r} in --layers {text!r}: expected {expected}") from None
        if i < 0:
            raise SystemExit(f"bad layer {i} in --layers: layers are >= 0")
        if n_layers is not None and i >= n_layers:
            raise SystemExit(f"layer {i} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
        if i not in layers:
            layers.append(i)
    if not layers:
        raise SystemExit(f"--layers {text!r} names no layer")
    return layers
