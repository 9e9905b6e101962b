"""Run evaluation cells on a model: one cell = (method, task, length, depth, sample) -> one record.

Each cell builds its sample (:mod:`sparseattn.eval.tasks`; the same sample for every method),
runs the model inside :func:`sparseattn.integrations.hf.patch` - a prefill method with the
model's own dense decoding, or (labels ``decode:NAME``) dense prefill with a decode method on the
paged cache - scores the greedy continuation (or, for ``perplexity``, the log-likelihood) and
records the achieved density: the prefill plans' share of the causal area per layer, or for a
decode method the mean share of the cached tokens its steps read.

Results are appended to ``results.jsonl`` (one JSON object per line) as they are produced;
cells already in the file are read back and not recomputed, so an interrupted run resumes
where it stopped. ``run.json`` keeps the settings that change results (model, seed, haystack,
prompt format, dense layers, each method's resolved configuration); resuming into a directory
made with other settings raises instead of mixing results.
"""

from __future__ import annotations

import ast
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .tasks import TASKS, Sample, get_haystack, get_task, list_tasks

RESULTS_FILE = "results.jsonl"
RUN_FILE = "run.json"


# ----------------------------------------------------------------------------- specs and parsing
@dataclass(frozen=True)
class MethodSpec:
    """A method as the evaluation names it: ``label`` (e.g. ``streaming[sink=64,window=512]``, or
    ``decode:quest[token_budget=1024]`` for a decode method), the registered ``name``, its option
    overrides and its ``kind`` ("prefill" or "decode")."""

    label: str
    name: str
    options: Tuple[Tuple[str, Any], ...] = ()
    kind: str = "prefill"

    @property
    def kwargs(self) -> Dict[str, Any]:
        return dict(self.options)

    def method(self):
        from ..methods import get_method

        return get_method(self.name, kind=self.kind, **self.kwargs)

    def prefill(self, dense_layers: int = 0):
        """The ``prefill=`` argument of :func:`~sparseattn.integrations.hf.patch` (dense for a decode method)."""
        if self.kind == "decode":
            return "dense"
        m = self.method()
        if dense_layers <= 0 or self.name == "dense":
            return m
        return {"default": m, "layers": {i: "dense" for i in range(dense_layers)}}

    def decode(self):
        """The ``decode=`` argument of :func:`~sparseattn.integrations.hf.patch`: ``None`` (the model's
        own dense decoding) for a prefill method, the method object for a decode method."""
        return self.method() if self.kind == "decode" else None

    def config(self) -> Dict[str, Any]:
        extra = {"kind": "decode"} if self.kind == "decode" else {}
        return {"name": self.name, **extra, **_jsonable(self.method().config())}


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


def _split_top(text: str) -> List[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise ValueError(f"unbalanced '[' in {text!r}")
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_methods(text: str, kind: str = "prefill") -> List[MethodSpec]:
    """``"dense,streaming[sink=64,window=512],xattention[threshold=0.9]"`` -> method specs.

    Each entry is a registered method name of ``kind``, optionally with ``[option=value,...]``
    overrides (values are Python literals). Names and options are checked now; errors name
    the valid choices. Decode methods get labels ``decode:NAME[...]``.
    """
    from ..methods import get_method
    from ..methods.registry import list_methods as _list

    def list_methods():
        return _list(kind)

    specs: List[MethodSpec] = []
    for entry in _split_top(text):
        m = re.fullmatch(r"([A-Za-z0-9_]+)\s*(?:\[(.*)\])?", entry)
        if not m:
            raise ValueError(f"bad method entry {entry!r}: expected NAME or NAME[option=value,...], e.g. "
                             f"streaming[sink=64,window=512]; methods: {list_methods()}")
        name, opts_text = m.group(1), m.group(2)
        if name not in list_methods():
            raise ValueError(f"unknown method {name!r}; choose from {list_methods()}")
        options = []
        for item in _split_top(opts_text or ""):
            if "=" not in item:
                raise ValueError(f"bad option {item!r} in {entry!r}: expected option=value")
            key, val = item.split("=", 1)
            options.append((key.strip(), _value(val.strip())))
        get_method(name, kind=kind, **dict(options))  # raises listing the valid options
        label = name if not options else f"{name}[{','.join(f'{k}={v}' for k, v in options)}]"
        if kind == "decode":
            label = "decode:" + label
        spec = MethodSpec(label, name, tuple(options), kind)
        if any(s.label == label for s in specs):
            raise ValueError(f"method {label!r} is given twice")
        specs.append(spec)
    if not specs:
        raise ValueError(f"no method given; choose from {list_methods()}")
    return specs


def parse_lengths(text: str) -> List[int]:
    """``"1k,2k,4k"`` -> ``[1024, 2048, 4096]``; plain integers are token counts."""
    out = []
    for part in _split_top(text):
        m = re.fullmatch(r"(\d+(?:\.\d+)?)([kK]?)", part)
        if not m:
            raise ValueError(f"bad length {part!r}: expected a token count or a number with a k suffix "
                             "(1k = 1024), e.g. 1k,2k,4k or 1500")
        n = float(m.group(1)) * (1024 if m.group(2) else 1)
        if n != int(n) or n < 16:
            raise ValueError(f"bad length {part!r}: must be a whole number of tokens >= 16")
        if int(n) not in out:
            out.append(int(n))
    if not out:
        raise ValueError("no length given, e.g. 1k,2k,4k")
    return out


def parse_depths(text: str) -> List[float]:
    """``"0,0.25,0.5,0.75,1"`` -> floats in [0, 1] (needle positions, 0 = start of the context)."""
    out = []
    for part in _split_top(text):
        try:
            d = float(part)
        except ValueError:
            d = float("nan")
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"bad depth {part!r}: depths are fractions in [0, 1], e.g. 0,0.25,0.5,0.75,1")
        if d not in out:
            out.append(d)
    if not out:
        raise ValueError("no depth given, e.g. 0,0.5,1")
    return out


def parse_tasks(text: str) -> List[str]:
    """``"niah,passkey"`` -> task names, checked against :func:`~sparseattn.eval.tasks.list_tasks`."""
    out = []
    for part in _split_top(text):
        if part not in TASKS:
            raise ValueError(f"unknown task {part!r}; choose from {list_tasks()}")
        if part not in out:
            out.append(part)
    if not out:
        raise ValueError(f"no task given; choose from {list_tasks()}")
    return out


# ----------------------------------------------------------------------------- settings and cells
@dataclass
class EvalSettings:
    """What to evaluate: the cross product methods x tasks x lengths x depths x samples."""

    methods: List[MethodSpec]
    tasks: List[str]
    lengths: List[int]
    depths: List[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    samples: int = 5
    seed: int = 0
    haystack: Optional[str] = None
    prompt_format: str = "auto"
    dense_layers: int = 0
    backend: str = "auto"
    model: str = "smollm2"

    def __post_init__(self):
        if not isinstance(self.samples, int) or self.samples <= 0:
            raise ValueError(f"samples must be a positive int, got {self.samples!r}")
        if not isinstance(self.dense_layers, int) or self.dense_layers < 0:
            raise ValueError(f"dense_layers must be a non-negative int, got {self.dense_layers!r}")
        for t in self.tasks:
            if t not in TASKS:
                raise ValueError(f"unknown task {t!r}; choose from {list_tasks()}")

    def fingerprint(self) -> Dict[str, Any]:
        """The settings that change a cell's result (kept in ``run.json``)."""
        return {"model": self.model, "seed": self.seed,
                "haystack": None if self.haystack is None else str(Path(self.haystack).expanduser().resolve()),
                "prompt_format": self.prompt_format, "dense_layers": self.dense_layers,
                "methods": {m.label: m.config() for m in self.methods}}


@dataclass(frozen=True)
class Cell:
    method: str
    task: str
    length: int
    depth: Optional[float]
    sample: int

    @property
    def key(self) -> tuple:
        return cell_key(self.method, self.task, self.length, self.depth, self.sample)


def cell_key(method: str, task: str, length: int, depth: Optional[float], sample: int) -> tuple:
    return (method, task, int(length), None if depth is None else round(float(depth), 6), int(sample))


def record_key(rec: Dict[str, Any]) -> tuple:
    return cell_key(rec["method"], rec["task"], rec["length"], rec.get("depth"), rec["sample"])


def cells(settings: EvalSettings) -> List[Cell]:
    """Every cell, grouped so that the methods of one sample are adjacent (the sample is built once)."""
    out = []
    for task in settings.tasks:
        depths = settings.depths if TASKS[task].uses_depth else [None]
        for length in settings.lengths:
            for depth in depths:
                for i in range(settings.samples):
                    for m in settings.methods:
                        out.append(Cell(m.label, task, length, depth, i))
    return out


# ----------------------------------------------------------------------------- storage
class ResultsStore:
    """``results.jsonl`` + ``run.json`` in ``out_dir``: append-only records, read back on resume."""

    def __init__(self, out_dir):
        self.dir = Path(out_dir)
        self.path = self.dir / RESULTS_FILE
        self.run_path = self.dir / RUN_FILE

    def load(self) -> List[Dict[str, Any]]:
        """All complete records (a line cut short by an interrupted write is skipped)."""
        if not self.path.exists():
            return []
        out = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and {"method", "task", "length", "sample"} <= set(rec):
                    out.append(rec)
        return out

    def check_and_save_settings(self, settings: EvalSettings) -> None:
        """Refuse to mix results made with other settings; remember the new methods."""
        self.dir.mkdir(parents=True, exist_ok=True)
        new = settings.fingerprint()
        if self.run_path.exists():
            old = json.loads(self.run_path.read_text())
            for key in ("model", "seed", "haystack", "prompt_format", "dense_layers"):
                if old.get(key) != new[key]:
                    raise ValueError(f"{self.dir} holds results made with {key}={old.get(key)!r}, not {new[key]!r}; "
                                     "use another --out directory (or the same settings to resume)")
            for label, cfg in new["methods"].items():
                if label in old.get("methods", {}) and old["methods"][label] != cfg:
                    raise ValueError(f"{self.dir} holds results for method {label!r} with config "
                                     f"{old['methods'][label]}, not {cfg}; use another --out directory")
            merged = dict(old.get("methods", {}))
            merged.update(new["methods"])
            new["methods"] = merged
        self.run_path.write_text(json.dumps(new, indent=2) + "\n")

    def append(self, record: Dict[str, Any]) -> None:
        """Append one record (one line), flushed to disk before returning."""
        self.dir.mkdir(parents=True, exist_ok=True)
        torn = False
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, "rb") as f:  # an interrupted write leaves a line without its newline
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(("\n" if torn else "") + json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


# ----------------------------------------------------------------------------- running one cell
@torch.no_grad()
def sample_nll(model, input_ids: torch.Tensor, score_from: int, chunk: int = 512) -> Tuple[float, int]:
    """``(sum of -log p(token), count)`` over tokens ``score_from..L-1`` of ``input_ids [1, L]``.

    The hidden states come from one forward of the decoder; the vocabulary projection runs a
    chunk of positions at a time, so ``[L, vocab]`` logits never exist at once.
    """
    L = input_ids.shape[1]
    if not 1 <= score_from < L:
        raise ValueError(f"score_from must lie in [1, {L}), got {score_from}")
    base = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or base is model or head is None:  # pragma: no cover - non-standard models
        logits = model(input_ids=input_ids, use_cache=False).logits[0, score_from - 1:L - 1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, input_ids[0, score_from:].unsqueeze(-1))
        return float(-lp.sum()), L - score_from
    hidden = base(input_ids=input_ids, use_cache=False).last_hidden_state[0]
    total = 0.0
    for p0 in range(score_from - 1, L - 1, chunk):
        p1 = min(L - 1, p0 + chunk)
        logits = head(hidden[p0:p1]).float()
        targets = input_ids[0, p0 + 1:p1 + 1]
        total += float(-(torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1))).sum())
    return total, L - score_from


@torch.no_grad()
def greedy_generate(model, tokenizer, input_ids: torch.Tensor, max_new_tokens: int) -> str:
    """Greedy continuation of ``input_ids [1, L]``, decoded without special tokens."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                         max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)


def run_cell(model, tokenizer, sample: Sample, method: MethodSpec, *, dense_layers: int = 0,
             backend: str = "auto") -> Dict[str, Any]:
    """Run one sample with one method; return its JSON record."""
    from ..integrations.hf import patch

    device = next(model.parameters()).device
    ids = torch.tensor([sample.input_ids], dtype=torch.long, device=device)
    n_layers = getattr(model.config, "num_hidden_layers", None)
    t0 = time.perf_counter()
    with patch(model, prefill=method.prefill(dense_layers), decode=method.decode(), backend=backend) as ctx:
        if sample.kind == "perplexity":
            nll, count = sample_nll(model, ids, sample.meta["score_from"])
            prediction, score, metric = None, nll / count, "nll"
            extra = {"nll_sum": nll, "scored_tokens": count}
        else:
            prediction = greedy_generate(model, tokenizer, ids, sample.max_new_tokens)
            score, metric = get_task(sample.task).score(prediction, sample), "accuracy"
            extra = {}
    per_layer = ctx.stats.per_layer()
    layers = range(n_layers) if n_layers else sorted(per_layer)
    if method.kind == "decode":  # prefill is dense; what the method saves is decode reads
        density, density_of = ctx.stats.decode_density(), "decode"
    else:
        density, density_of = ctx.stats.mean_density(), "prefill"
    return {
        "method": method.label, "kind": method.kind, "task": sample.task, "length": sample.length,
        "depth": sample.depth, "sample": sample.index, "sample_seed": sample.seed, "n_tokens": sample.n_tokens,
        "metric": metric, "score": score, "prediction": prediction, "answers": sample.answers,
        "density": density, "density_of": density_of, "layer_density": [per_layer.get(i) for i in layers],
        "fallbacks": dict(ctx.stats.fallbacks), "time_s": round(time.perf_counter() - t0, 3), **extra,
    }


# ----------------------------------------------------------------------------- the loop
@dataclass
class EvalRun:
    """What :func:`run_eval` did: every record in the store, how many were computed now and skipped."""

    records: List[Dict[str, Any]]
    computed: int
    skipped: int
    wall_s: float


def run_eval(model, tokenizer, settings: EvalSettings, out_dir, *, progress: bool = True,
             on_record: Optional[Callable[[Dict[str, Any]], None]] = None) -> EvalRun:
    """Evaluate every pending cell of ``settings``, appending records to ``out_dir/results.jsonl``.

    Cells already in the file are skipped (resume). Returns an :class:`EvalRun`.
    """
    t0 = time.perf_counter()
    store = ResultsStore(out_dir)
    store.check_and_save_settings(settings)
    records = store.load()
    done = {record_key(r) for r in records}
    all_cells = cells(settings)
    pending = [c for c in all_cells if c.key not in done]
    by_label = {m.label: m for m in settings.methods}
    hay = get_haystack(tokenizer, settings.haystack, settings.seed) if pending else None
    sample_cache: Dict[tuple, Sample] = {}
    # Fail before the first cell, not hours in, when a task cannot fit a length.
    for task_name, length in dict.fromkeys((c.task, c.length) for c in pending):
        first = next(c for c in pending if (c.task, c.length) == (task_name, length))
        task = get_task(task_name, prompt_format=settings.prompt_format)
        sample_cache[(first.task, first.length, first.depth, first.sample)] = task.make(
            tokenizer, length, depth=first.depth, index=first.sample, seed=settings.seed, haystack=hay)

    bar = None
    if progress and pending:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(pending), unit="cell", desc="eval", dynamic_ncols=True)
    computed = 0
    try:
        for i, c in enumerate(pending):
            skey = (c.task, c.length, c.depth, c.sample)
            if skey not in sample_cache:
                task = get_task(c.task, prompt_format=settings.prompt_format)
                sample_cache[skey] = task.make(tokenizer, c.length, depth=c.depth, index=c.sample,
                                               seed=settings.seed, haystack=hay)
            sample = sample_cache[skey]
            nxt = pending[i + 1] if i + 1 < len(pending) else None
            if nxt is None or (nxt.task, nxt.length, nxt.depth, nxt.sample) != skey:
                sample_cache.pop(skey)  # the cells of one sample are adjacent: done with it
            rec = run_cell(model, tokenizer, sample, by_label[c.method],
                           dense_layers=settings.dense_layers, backend=settings.backend)
            store.append(rec)
            records.append(rec)
            computed += 1
            if on_record is not None:
                on_record(rec)
            if bar is not None:
                bar.set_postfix_str(f"{c.method} {c.task} {c.length}", refresh=False)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    wanted = {c.key for c in all_cells}
    return EvalRun([r for r in records if record_key(r) in wanted], computed, len(all_cells) - len(pending),
                   time.perf_counter() - t0)


__all__ = ["MethodSpec", "EvalSettings", "Cell", "EvalRun", "ResultsStore", "parse_methods", "parse_lengths",
           "parse_depths", "parse_tasks", "cells", "run_cell", "run_eval", "sample_nll", "greedy_generate",
           "RESULTS_FILE", "RUN_FILE"]
