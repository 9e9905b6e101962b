"""Long inputs for evaluations: a built-in generated filler text, or a directory of .txt files.

``generated_haystack`` needs no data: it assembles plain English sentences from small word
lists with a seeded RNG, so the same ``(n_tokens, seed)`` always gives the same text. For
natural text pass a directory of ``*.txt`` files (for instance Paul Graham's essays, as in the
public needle-in-a-haystack test) to ``load_haystack_dir`` or ``haystack_ids(source=...)``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import List, Optional, Union

import torch

_SUBJECTS = [
    "the old lighthouse keeper", "a young engineer", "the village baker", "our neighbour", "the committee",
    "a tired traveller", "the river", "the small company", "my grandmother", "the new teacher", "the city council",
    "a curious student", "the gardener", "the orchestra", "the ship's captain", "a quiet librarian", "the farmer",
    "the research team", "an old friend", "the mayor", "the children", "the museum guide", "a street musician",
    "the startup", "the doctor", "the carpenter", "a local journalist", "the weather", "the mountain road",
]
_VERBS = [
    "watched", "described", "repaired", "ignored", "remembered", "painted", "measured", "carried", "discussed",
    "followed", "built", "questioned", "admired", "sold", "borrowed", "explained", "planted", "visited",
    "studied", "changed", "protected", "cleaned", "collected", "imagined", "tested", "designed", "noticed",
]
_OBJECTS = [
    "the wooden bridge", "a bright red kite", "the harbour at dawn", "an unfinished letter", "the winter market",
    "a map of the valley", "the broken clock", "a basket of apples", "the long corridor", "the first draft",
    "a stack of old newspapers", "the garden wall", "the evening train", "a simple machine", "the quiet square",
    "a box of tools", "the annual report", "the narrow staircase", "a field of sunflowers", "the school play",
    "the leaking roof", "a pair of boots", "the budget", "the north window", "a recipe for bread", "the story",
]
_PLACES = [
    "near the station", "after the storm", "in the morning", "before lunch", "at the edge of town",
    "during the festival", "on a Tuesday", "by the lake", "in the library", "behind the mill", "at the market",
    "late in the afternoon", "under the old oak", "on the third floor", "across the valley", "in early spring",
]
_ADVERBS = ["carefully", "slowly", "quietly", "happily", "patiently", "suddenly", "again", "eagerly", "twice"]
_ADJECTIVES = ["calm", "busy", "strange", "useful", "cold", "warm", "simple", "difficult", "quiet", "familiar",
               "crowded", "careful", "pleasant", "long", "ordinary", "surprising"]
_NOUNS = ["day", "plan", "idea", "week", "journey", "problem", "season", "question", "meeting", "summer",
          "decision", "result", "experiment", "conversation"]
_CONNECTORS = ["Later,", "Meanwhile,", "Afterwards,", "In the end,", "For a while,", "Still,", "Of course,",
               "At first,", "Once again,", "By then,"]
_REASONS = ["because it seemed important", "since nobody else would", "although it was raining",
            "while the others waited", "as everyone expected", "even though it took hours",
            "so that the work could continue", "before anyone noticed"]


def _sentence(rng: random.Random) -> str:
    form = rng.randrange(6)
    subj, verb, obj = rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)
    if form == 0:
        s = f"{subj} {verb} {obj} {rng.choice(_PLACES)}"
    elif form == 1:
        s = f"{rng.choice(_CONNECTORS)} {subj} {rng.choice(_ADVERBS)} {verb} {obj}"
    elif form == 2:
        s = f"{subj} {verb} {obj} {rng.choice(_REASONS)}"
    elif form == 3:
        s = f"it was a {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}, and {subj} {verb} {obj}"
    elif form == 4:
        s = f"{rng.choice(_PLACES)}, {subj} {verb} {obj} and then {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
    else:
        s = f"{subj} said that the {rng.choice(_NOUNS)} had been {rng.choice(_ADJECTIVES)}"
    return s[0].upper() + s[1:] + "."


def _paragraph(rng: random.Random) -> str:
    return " ".join(_sentence(rng) for _ in range(rng.randint(3, 7)))


def generated_text(n_words: int, seed: int = 0) -> str:
    """About ``n_words`` words of deterministic filler prose (paragraphs separated by blank lines)."""
    rng = random.Random(seed)
    paragraphs: List[str] = []
    words = 0
    while words < n_words:
        p = _paragraph(rng)
        paragraphs.append(p)
        words += len(p.split())
    return "\n\n".join(paragraphs)


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def generated_haystack(n_tokens: int, tokenizer, seed: int = 0) -> str:
    """Deterministic English filler text of at least ``n_tokens`` tokens under ``tokenizer``.

    Built from word lists with ``random.Random(seed)``; no external data. The text is grown
    until it tokenizes to ``n_tokens`` or more (cut it with :func:`haystack_ids`).
    """
    if not isinstance(n_tokens, int) or n_tokens < 0:
        raise ValueError(f"n_tokens must be a non-negative int, got {n_tokens!r}")
    words = max(16, int(n_tokens * 0.8))  # ~1.2-1.3 tokens per word for English BPE vocabularies
    while True:
        text = generated_text(words, seed)
        if _n_tokens(tokenizer, text) >= n_tokens:
            return text
        words = int(words * 1.25) + 16


def load_haystack_dir(path: Union[str, os.PathLike]) -> str:
    """The ``*.txt`` files of a directory, in sorted file-name order, joined by blank lines.

    Licence and readme files (names starting with ``LICENSE``, ``LICENCE``, ``README`` or
    ``SOURCE-LICENSE``, any case) are skipped: they are not haystack text.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"haystack directory {folder} does not exist (expected a directory of .txt files)")
    skip = ("license", "licence", "readme", "source-license")
    files = sorted(p for p in folder.glob("*.txt") if p.is_file() and not p.name.lower().startswith(skip))
    if not files:
        raise FileNotFoundError(f"haystack directory {folder} holds no .txt files (licence/readme files excluded)")
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace").strip() for p in files)


def haystack_ids(tokenizer, n_tokens: int, *, source: Optional[Union[str, os.PathLike]] = None,
                 seed: int = 0) -> torch.Tensor:
    """``LongTensor [1, n_tokens]`` of haystack token ids (no special tokens).

    ``source=None`` uses :func:`generated_haystack`; otherwise ``source`` is a directory of
    ``.txt`` files, repeated if it is shorter than ``n_tokens`` (``seed`` is unused then).
    """
    if not isinstance(n_tokens, int) or n_tokens <= 0:
        raise ValueError(f"n_tokens must be a positive int, got {n_tokens!r}")
    if source is None:
        text = generated_haystack(n_tokens, tokenizer, seed=seed)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        text = load_haystack_dir(source)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"the haystack in {source} tokenizes to no tokens")
        if len(ids) < n_tokens:
            sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
            reps = -(-n_tokens // (len(ids) + len(sep)))
            ids = (ids + sep) * reps
    return torch.tensor(ids[:n_tokens], dtype=torch.long).view(1, n_tokens)


__all__ = ["generated_haystack", "generated_text", "load_haystack_dir", "haystack_ids"]
