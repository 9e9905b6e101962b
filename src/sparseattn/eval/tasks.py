"""Long-context evaluation tasks: seeded sample generators and scorers.

Registry (:data:`TASKS`, :func:`get_task`, :func:`list_tasks`):

* ``passkey`` - the pass-key retrieval test (Mohtashami & Jaggi 2023, "Landmark Attention"): a
  5-digit key hidden at a given depth of the haystack.
* ``niah`` - needle in a haystack, RULER's ``niah_single`` (Hsieh et al. 2024, NVIDIA/RULER):
  "One of the special magic numbers for {key} is: {value}." with a 7-digit value.
* ``niah_multikey`` - RULER ``niah_multikey_1``: the needle plus 3 distractor needles with other
  keys at random depths.
* ``niah_multivalue`` - RULER ``niah_multivalue``: 4 needles with the same key and different
  values; the score is the share of values recalled.
* ``variable_tracking`` - RULER ``vt``: one chain of 4 hops ``VAR B = VAR A`` hidden in the
  haystack; name every variable that holds the value.
* ``common_words`` - RULER ``cwe``: a numbered word list in which 10 words appear much more often
  than the others; name those 10.
* ``frequent_words`` - RULER ``fwe``: coded words drawn from a Zipf distribution (alpha 2);
  name the three most frequent ones (ignoring the dots).
* ``kv_retrieval`` - InfiniteBench ``kv_retrieval`` / LongEval lines (Zhang et al. 2024): a JSON
  object of random UUID keys and values; give the value of the key at a depth of the object (no
  haystack text). SALE calibrates its per-head thresholds on this kind of prompt.
* ``perplexity`` - perplexity of the model on ``length`` tokens of the haystack text, measured
  on the second half of the window (the tokens that have a long context); nothing is generated.

Every sample has at most ``length`` tokens: the haystack tasks fill the budget with a window
of haystack text that starts after a sentence end and is cut back to its last full sentence
(a few tokens short of ``length``); the list tasks (``common_words``, ``frequent_words``) grow
their lists as long as they fit; ``perplexity`` uses exactly ``length`` tokens. Depth is the relative position (0 = start, 1 = end of the context) of the
needle, snapped to the nearest sentence end of the haystack. A sample is a pure function of
``(tokenizer, task, length, depth, index, seed, haystack)``.

Prompts: the instruction, the context and the question form the user turn of the tokenizer's
chat template (when it has one; ``prompt_format="plain"`` uses plain text), and the answer
prefix opens the assistant turn, as RULER does. Greedy generation continues from there.

Scoring is RULER's string match: ``string_match_all`` (share of the references found in the
prediction, case-insensitive) for every task with several references, and the same with a
single reference for ``passkey`` and ``niah``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import re
import threading
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple, Union

PROMPT_FORMATS = ("auto", "chat", "plain")
_PLACEHOLDER = "\u2063SPARSEATTN_CONTEXT\u2063"


# ----------------------------------------------------------------------------- samples and scoring
@dataclass
class Sample:
    """One evaluation input: token ids, references and how to run and score it."""

    task: str
    length: int
    depth: Optional[float]
    index: int
    seed: int
    input_ids: List[int]
    answers: List[str]
    max_new_tokens: int
    kind: str = "generate"  # "generate" (greedy + string match) or "perplexity" (no generation)
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """RULER's ``string_match_all``: share of ``references`` contained in ``prediction`` (case-insensitive)."""
    if not references:
        raise ValueError("references must not be empty")
    pred = prediction.lower()
    return sum(ref.lower() in pred for ref in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """RULER's ``string_match_part``: 1.0 if any reference is contained in ``prediction``."""
    if not references:
        raise ValueError("references must not be empty")
    pred = prediction.lower()
    return float(any(ref.lower() in pred for ref in references))


def sample_seed(seed: int, task: str, length: int, depth: Optional[float], index: int) -> int:
    """A stable 31-bit seed for one sample (the same in every process and Python version)."""
    key = f"{seed}|{task}|{length}|{'-' if depth is None else f'{depth:.6f}'}|{index}"
    return zlib.crc32(key.encode()) & 0x7FFFFFFF


# ----------------------------------------------------------------------------- haystack
_SENTENCE_END = (".", "!", "?")
_GENERATED_POOL = 16384  # tokens of generated text that short windows are drawn from


class Haystack:
    """A pool of haystack token ids with its sentence ends, built once per (tokenizer, source).

    ``source=None`` is the built-in generated text (:func:`sparseattn.eval.haystack.generated_haystack`,
    grown on demand, deterministic in ``seed``); otherwise a directory of ``.txt`` files
    (:func:`sparseattn.eval.haystack.load_haystack_dir`), repeated when a window needs more tokens
    than it holds.
    """

    def __init__(self, tokenizer, source: Optional[Union[str, os.PathLike]] = None, seed: int = 0):
        self.tokenizer = tokenizer
        self.source = None if source is None else str(Path(source).expanduser())
        self.seed = seed
        self.ids: List[int] = []
        self._ends: List[int] = []  # positions p such that a sentence ends just before token p
        self._end_ids: set = set()  # token ids that end a sentence
        self._not_end_ids: set = set()
        self._words: Optional[List[str]] = None
        self._lock = threading.Lock()
        if self.source is not None:
            from .haystack import load_haystack_dir

            self._set(tokenizer(load_haystack_dir(self.source), add_special_tokens=False)["input_ids"])
            if not self.ids:
                raise ValueError(f"the haystack in {self.source} tokenizes to no tokens")
        self._base_len = len(self.ids)

    @property
    def name(self) -> str:
        return self.source if self.source is not None else f"generated (seed {self.seed})"

    def _set(self, ids: List[int]) -> None:
        self.ids = list(ids)
        known = self._end_ids | self._not_end_ids
        for i in set(self.ids) - known:
            (self._end_ids if self.tokenizer.decode([i]).rstrip().endswith(_SENTENCE_END)
             else self._not_end_ids).add(i)
        self._ends = [p + 1 for p, t in enumerate(self.ids) if t in self._end_ids]

    def _limit(self, n: int) -> int:
        """Windows of ``n`` tokens are drawn from ``ids[:limit]``: a function of ``n`` alone (not of
        what was requested before), so a sample does not depend on the other samples of the run."""
        if self.source is None:
            return max(4 * n, _GENERATED_POOL)
        return self._base_len if self._base_len > n else 2 * n + self._base_len

    def _ensure(self, n: int) -> None:
        with self._lock:
            if len(self.ids) >= n:
                return
            if self.source is None:  # the generated text is prefix-stable: a longer pool extends a shorter one
                from .haystack import generated_haystack

                text = generated_haystack(max(2 * n, _GENERATED_POOL), self.tokenizer, seed=self.seed)
                self._set(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            else:  # repeat the directory's text, separated by a blank line
                sep = self.tokenizer("\n\n", add_special_tokens=False)["input_ids"]
                base = self.ids[:self._base_len]
                reps = -(-n // (len(base) + len(sep))) + 1
                self._set((base + sep) * reps)

    def window(self, n: int, rng: random.Random) -> List[int]:
        """``n`` consecutive haystack tokens starting just after a sentence end (seeded by ``rng``)."""
        if n <= 0:
            return []
        limit = self._limit(n)
        self._ensure(limit)
        start = rng.randrange(0, limit - n + 1)
        ends = self._ends
        lo, hi = 0, len(ends)
        while lo < hi:  # first sentence end at or after start
            mid = (lo + hi) // 2
            if ends[mid] < start:
                lo = mid + 1
            else:
                hi = mid
        if lo < len(ends) and ends[lo] + n <= limit:
            start = ends[lo]
        return self.ids[start:start + n]

    def sentence_ends(self, ids: Sequence[int]) -> List[int]:
        """Positions in ``ids`` (0 and ``len(ids)`` included) right after a sentence end."""
        for t in set(ids) - self._end_ids - self._not_end_ids:  # ids from outside the pool
            (self._end_ids if self.tokenizer.decode([t]).rstrip().endswith(_SENTENCE_END)
             else self._not_end_ids).add(t)
        return sorted({0, len(ids)} | {p + 1 for p, t in enumerate(ids) if t in self._end_ids})

    def words(self) -> List[str]:
        """Distinct lowercase alphabetic words (4 to 12 letters) of the haystack, sorted: the
        vocabulary of keys and word lists."""
        if self._words is None:
            prefix = _GENERATED_POOL if self.source is None else min(self._base_len, 400_000)
            self._ensure(prefix)
            text = self.tokenizer.decode(self.ids[:prefix])
            self._words = sorted({w for w in re.findall(r"[A-Za-z]+", text) if 4 <= len(w) <= 12 and w.islower()})
        return self._words


_HAYSTACKS: Dict[tuple, Haystack] = {}
_HAYSTACKS_LOCK = threading.Lock()


def get_haystack(tokenizer, source: Optional[Union[str, os.PathLike]] = None, seed: int = 0) -> Haystack:
    """The :class:`Haystack` for ``(tokenizer, source, seed)``, built once per process."""
    key = (id(tokenizer), None if source is None else str(Path(source).expanduser().resolve()),
           seed if source is None else 0)
    with _HAYSTACKS_LOCK:
        if key not in _HAYSTACKS:
            _HAYSTACKS[key] = Haystack(tokenizer, source, seed)
        return _HAYSTACKS[key]


def insert_at_depths(haystack: Haystack, ids: List[int], needles: Sequence[Tuple[float, List[int]]]) -> List[int]:
    """Insert each ``(depth, needle_ids)`` at the sentence end nearest to ``depth * len(ids)``.

    Needles at the same place keep their order. Returns the new id list.
    """
    ends = haystack.sentence_ends(ids)
    placed = []
    for order, (depth, nid) in enumerate(needles):
        target = depth * len(ids)
        pos = min(ends, key=lambda p: (abs(p - target), p))
        placed.append((pos, order, nid))
    out: List[int] = []
    prev = 0
    for pos, _, nid in sorted(placed):
        out.extend(ids[prev:pos])
        out.extend(nid)
        prev = pos
    out.extend(ids[prev:])
    return out


# ----------------------------------------------------------------------------- prompts
def resolve_prompt_format(tokenizer, prompt_format: str = "auto") -> str:
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {list(PROMPT_FORMATS)}, got {prompt_format!r}")
    if prompt_format == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    if prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompt_format='chat' but the tokenizer has no chat template; use 'plain' or 'auto'")
    return prompt_format


def prompt_parts(tokenizer, instruction: str, question: str, answer_prefix: str,
                 prompt_format: str = "auto") -> Tuple[List[int], List[int]]:
    """Token ids before and after the context: ``before + context + after`` is the prompt.

    The user turn is ``instruction \\n context \\n question``; the answer prefix opens the
    assistant turn (chat format) or follows the question on a new line (plain format).
    """
    fmt = resolve_prompt_format(tokenizer, prompt_format)
    user = f"{instruction}\n{_PLACEHOLDER}\n{question}"
    if fmt == "chat":
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True) + answer_prefix
        prefix_special = []
    else:
        text = f"{user}\n{answer_prefix}"
        bos = getattr(tokenizer, "bos_token_id", None)
        prefix_special = [bos] if bos is not None and getattr(tokenizer, "add_bos_token", False) else []
    before, after = text.split(_PLACEHOLDER)
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return prefix_special + enc(before), enc(after)


def _tok(tokenizer, text: str) -> List[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------- task registry
TASKS: Dict[str, type] = {}


def register_task(cls: type) -> type:
    if not cls.name or cls.name in TASKS:
        raise ValueError(f"task {cls.__name__} needs a unique name, got {cls.name!r}")
    TASKS[cls.name] = cls
    return cls


def list_tasks() -> List[str]:
    """Names of the registered tasks, in registration order."""
    return list(TASKS)


def get_task(name: str, **options) -> "Task":
    """A task object by name (``options`` set its fields, e.g. ``num_distractors=5``)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {list_tasks()}")
    return TASKS[name](**options)


@dataclass
class Task:
    """Base class: ``make(tokenizer, length, ...)`` builds a :class:`Sample`; ``score`` grades it."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    uses_depth: ClassVar[bool] = False
    kind: ClassVar[str] = "generate"
    max_new_tokens: ClassVar[int] = 16

    prompt_format: str = "auto"

    def make(self, tokenizer, length: int, *, depth: Optional[float] = None, index: int = 0, seed: int = 0,
             haystack: Optional[Union[str, os.PathLike, Haystack]] = None) -> Sample:
        """Build sample ``index`` of ``length`` tokens (needle at ``depth`` for depth tasks)."""
        if not isinstance(length, int) or length <= 0:
            raise ValueError(f"length must be a positive int, got {length!r}")
        if self.uses_depth:
            depth = 0.5 if depth is None else depth
            if not (isinstance(depth, (int, float)) and 0.0 <= depth <= 1.0):
                raise ValueError(f"depth must be a number in [0, 1], got {depth!r}")
            depth = float(depth)
        else:
            depth = None
        hay = haystack if isinstance(haystack, Haystack) else get_haystack(tokenizer, haystack, seed)
        s = sample_seed(seed, self.name, length, depth, index)
        rng = random.Random(s)
        ids, answers, meta = self._build(tokenizer, hay, length, depth, rng)
        if len(ids) > length:
            raise ValueError(f"task {self.name!r} cannot fit in {length} tokens (needs {len(ids)}); use a longer length")
        meta.setdefault("haystack", hay.name)
        return Sample(self.name, length, depth, index, s, ids, answers, self.max_new_tokens, self.kind, meta)

    def score(self, prediction: str, sample: Sample) -> float:
        """Score in [0, 1] (RULER ``string_match_all``)."""
        return string_match_all(prediction, sample.answers)

    def _build(self, tokenizer, hay: Haystack, length: int, depth: Optional[float], rng: random.Random):
        raise NotImplementedError

    # shared helper: needles in a haystack window that fills the budget exactly
    def _haystack_prompt(self, tokenizer, hay: Haystack, length: int, instruction: str, question: str,
                         answer_prefix: str, needles: Sequence[Tuple[float, str]], rng: random.Random):
        before, after = prompt_parts(tokenizer, instruction, question, answer_prefix, self.prompt_format)
        needle_ids = [(d, _tok(tokenizer, " " + text.strip())) for d, text in needles]
        budget = length - len(before) - len(after) - sum(len(n) for _, n in needle_ids)
        if budget < 0:
            raise ValueError(f"task {self.name!r} needs more than {length} tokens for its prompt and needles")
        window = hay.window(budget, rng)
        last_end = max((p for p in hay.sentence_ends(window) if p < len(window)), default=0)
        if len(window) - last_end < 0.05 * len(window):
            window = window[:last_end]  # end the haystack on a full sentence (costs a few tokens)
        context = insert_at_depths(hay, window, needle_ids)
        return before + context + after


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def _extend_words(words: List[str], n: int) -> List[str]:
    """The first ``n`` of ``words``, continued with hyphenated pairs of them when ``n`` is larger."""
    if n <= len(words):
        return words[:n]
    out = list(words)
    m = len(words)
    i = 0
    while len(out) < n:
        out.append(f"{words[i % m]}-{words[(i // m + 1 + i) % m]}")
        i += 1
    return out


def _keys(hay: Haystack, rng: random.Random, n: int) -> List[str]:
    words = hay.words()
    if len(words) < 4:
        raise ValueError(f"the haystack {hay.name} has too few distinct words to make keys")
    keys: List[str] = []
    while len(keys) < n:
        key = f"{rng.choice(words)}-{rng.choice(words)}"
        if key not in keys:
            keys.append(key)
    return keys


# ----------------------------------------------------------------------------- retrieval tasks
@register_task
@dataclass
class Passkey(Task):
    """Pass-key retrieval (Landmark Attention): a 5-digit key at ``depth`` in the haystack."""

    name: ClassVar[str] = "passkey"
    description: ClassVar[str] = "5-digit pass key hidden at a depth of the haystack"
    uses_depth: ClassVar[bool] = True
    max_new_tokens: ClassVar[int] = 8

    def _build(self, tokenizer, hay, length, depth, rng):
        key = _number(rng, 5)
        ids = self._haystack_prompt(
            tokenizer, hay, length,
            "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
            "I will quiz you about the important information there.",
            "What is the pass key?", "The pass key is",
            [(depth, f"The pass key is {key}. Remember it. {key} is the pass key.")], rng)
        return ids, [key], {"needle_depths": [depth]}


_NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."


@register_task
@dataclass
class NIAH(Task):
    """RULER ``niah_single``: one needle "One of the special magic numbers for {key} is: {value}."."""

    name: ClassVar[str] = "niah"
    description: ClassVar[str] = "single needle (key word -> 7-digit number) at a depth of the haystack"
    uses_depth: ClassVar[bool] = True
    max_new_tokens: ClassVar[int] = 12

    num_distractors: int = 0  # needles with other keys, at random depths
    num_values: int = 1  # needles with the same key and other values (the first at ``depth``)
    digits: int = 7

    def _build(self, tokenizer, hay, length, depth, rng):
        keys = _keys(hay, rng, 1 + self.num_distractors)
        key = keys[0]
        values = []
        while len(values) < self.num_values:
            v = _number(rng, self.digits)
            if v not in values:
                values.append(v)
        needles = [(depth, _NIAH_NEEDLE.format(key=key, value=values[0]))]
        needles += [(rng.random(), _NIAH_NEEDLE.format(key=key, value=v)) for v in values[1:]]
        needles += [(rng.random(), _NIAH_NEEDLE.format(key=k, value=_number(rng, self.digits))) for k in keys[1:]]
        if self.num_values > 1:
            instruction = ("Some special magic numbers are hidden within the following text. Make sure to memorize "
                           "them. I will quiz you about the numbers afterwards.")
            question = f"What are all the special magic numbers for {key} mentioned in the provided text?"
            prefix = f"The special magic numbers for {key} mentioned in the provided text are"
        else:
            instruction = ("A special magic number is hidden within the following text. Make sure to memorize it. "
                           "I will quiz you about the number afterwards.")
            question = f"What is the special magic number for {key} mentioned in the provided text?"
            prefix = f"The special magic number for {key} mentioned in the provided text is"
        ids = self._haystack_prompt(tokenizer, hay, length, instruction, question, prefix, needles, rng)
        return ids, values, {"key": key, "needle_depths": [d for d, _ in needles], "distractor_keys": keys[1:]}


@register_task
@dataclass
class NIAHMultiKey(NIAH):
    """RULER ``niah_multikey_1``: the needle plus 3 distractor needles with other keys."""

    name: ClassVar[str] = "niah_multikey"
    description: ClassVar[str] = "needle plus 3 distractor needles with other keys"
    num_distractors: int = 3


@register_task
@dataclass
class NIAHMultiValue(NIAH):
    """RULER ``niah_multivalue``: 4 needles with the same key; score = share of values recalled."""

    name: ClassVar[str] = "niah_multivalue"
    description: ClassVar[str] = "4 values for one key (the first at the depth); share recalled"
    max_new_tokens: ClassVar[int] = 48
    num_values: int = 4


# ----------------------------------------------------------------------------- multi-hop / aggregation
@register_task
@dataclass
class VariableTracking(Task):
    """RULER ``vt``: ``VAR A = 12345`` then ``VAR B = VAR A`` ... spread through the haystack, in order."""

    name: ClassVar[str] = "variable_tracking"
    description: ClassVar[str] = "one chain of variable assignments (4 hops); name every variable with the value"
    max_new_tokens: ClassVar[int] = 30
    num_hops: int = 4

    def _build(self, tokenizer, hay, length, depth, rng):
        names: List[str] = []
        while len(names) < self.num_hops + 1:
            n = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
            if n not in names:
                names.append(n)
        value = _number(rng, 5)
        statements = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}."
                                                       for i in range(1, len(names))]
        depths = sorted(rng.random() for _ in statements)
        ids = self._haystack_prompt(
            tokenizer, hay, length,
            "Memorize and track the chain(s) of variable assignment hidden in the following text.\n",
            f"Question: Find all variables that are assigned the value {value} in the text above.",
            f"Answer: According to the chain(s) of variable assignment in the text above, {len(names)} variables "
            f"are assigned the value {value}, they are:",
            list(zip(depths, statements)), rng)
        return ids, names, {"value": value, "needle_depths": depths}


@functools.lru_cache(maxsize=8)
def _zeta(alpha: float) -> float:
    return math.fsum(k ** -alpha for k in range(1, 200_000))


def _fit(build, length: int, lo: int, hi: int):
    """The largest ``n`` in [lo, hi] with ``len(build(n)[0]) <= length`` (``build`` is monotone)."""
    best = build(lo)
    if len(best[0]) > length:
        return best
    while lo < hi:
        mid = (lo + hi + 1) // 2
        cand = build(mid)
        if len(cand[0]) <= length:
            lo, best = mid, cand
        else:
            hi = mid - 1
    return best


@register_task
@dataclass
class KVRetrieval(Task):
    """InfiniteBench ``kv_retrieval``: a JSON object of random UUID key/value pairs, the queried key at
    ``depth`` of the object; the answer is its value (a UUID). As many pairs as fit in ``length``.

    Prompt wording after InfiniteBench / SALE's calibration script ("Extract the value corresponding
    to the specified key in the JSON object below."). The haystack is not used.
    """

    name: ClassVar[str] = "kv_retrieval"
    description: ClassVar[str] = "JSON object of UUID key/value pairs; give the value of one key (at the depth)"
    uses_depth: ClassVar[bool] = True
    max_new_tokens: ClassVar[int] = 40  # a UUID is ~25 tokens

    def _build(self, tokenizer, hay, length, depth, rng):
        def new_uuid():
            return str(uuid.UUID(int=rng.getrandbits(128), version=4))

        key, value = new_uuid(), new_uuid()
        before, after = prompt_parts(
            tokenizer, "Extract the value corresponding to the specified key in the JSON object below.",
            f'Key: "{key}"', "The value associated with the specified key is:", self.prompt_format)
        per_pair = len(_tok(tokenizer, json.dumps({key: value})[1:-1])) + 1
        budget = length - len(before) - len(after)
        others = [(new_uuid(), new_uuid()) for _ in range(max(0, budget // per_pair + 8))]

        def build(n_others: int):
            pairs = others[:n_others]
            at = round(depth * n_others)
            pairs = pairs[:at] + [(key, value)] + pairs[at:]
            return before + _tok(tokenizer, json.dumps(dict(pairs))) + after, at, n_others

        ids, at, n_others = _fit(build, length, 0, len(others))
        return ids, [value], {"key": key, "pairs": n_others + 1, "key_index": at}


@register_task
@dataclass
class CommonWords(Task):
    """RULER ``cwe``: a numbered word list; 10 words appear ``freq_common`` times, the others 3 times.

    ``freq_common`` is 30 (RULER) when that leaves at least half of the budget to the other words,
    otherwise lowered (but kept above ``freq_uncommon``) so short contexts still have a clear answer.
    Words come from the haystack's vocabulary.
    """

    name: ClassVar[str] = "common_words"
    description: ClassVar[str] = "numbered word list; name the 10 most common words"
    max_new_tokens: ClassVar[int] = 120
    num_common: int = 10
    freq_common: int = 30
    freq_uncommon: int = 3

    def _build(self, tokenizer, hay, length, depth, rng):
        words = list(hay.words())
        rng.shuffle(words)
        before, after = prompt_parts(
            tokenizer, "Below is a numbered list of words. In these words, some appear more often than others. "
                       "Memorize the ones that appear most often.",
            f"Question: What are the {self.num_common} most common words in the above list?",
            f"Answer: The top {self.num_common} words that appear most often in the list are:", self.prompt_format)
        budget = length - len(before) - len(after)
        per_entry = 6  # "123. word\n" is about 6 tokens
        freq = self.freq_common
        if self.num_common * freq * per_entry > budget // 2:
            freq = max(self.freq_uncommon + 2, budget // 2 // (self.num_common * per_entry))
        common = words[:self.num_common]
        pool = words[self.num_common:]
        shuffle_seed = rng.random()

        def build(n_uncommon: int):
            entries = common * freq + _extend_words(pool, n_uncommon) * self.freq_uncommon
            random.Random(shuffle_seed).shuffle(entries)
            text = "\n".join(f"{i + 1}. {w}" for i, w in enumerate(entries))
            return before + _tok(tokenizer, text) + after, n_uncommon

        ids, n_unc = _fit(build, length, 0, max(1, budget // (per_entry * self.freq_uncommon)))
        return ids, common, {"freq_common": freq, "uncommon_words": n_unc}


@register_task
@dataclass
class FrequentWords(Task):
    """RULER ``fwe``: coded words with Zipf frequencies (alpha 2); the most frequent is ``....`` noise.

    The answer is the three next most frequent coded words.
    """

    name: ClassVar[str] = "frequent_words"
    description: ClassVar[str] = "Zipf-distributed coded words; name the 3 most frequent"
    max_new_tokens: ClassVar[int] = 50
    alpha: float = 2.0
    vocab_size: int = 2000
    word_len: int = 6

    def _build(self, tokenizer, hay, length, depth, rng):
        vocab: List[str] = []
        seen = set()
        while len(vocab) < self.vocab_size:
            w = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(self.word_len))
            if w not in seen:
                seen.add(w)
                vocab.append(w)
        vocab[0] = "...."
        zeta = _zeta(self.alpha)
        before, after = prompt_parts(
            tokenizer, "Read the following coded text and track the frequency of each coded word. Find the three "
                       "most frequently appeared coded words.",
            "Question: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
            "frequently appeared words in the above coded text?",
            "Answer: According to the coded text above, the three most frequently appeared words are:",
            self.prompt_format)
        shuffle_seed = rng.random()

        def build(n_words: int):
            counts = [int(n_words * (k ** -self.alpha) / zeta) for k in range(1, len(vocab) + 1)]
            words = [w for w, c in zip(vocab, counts) for _ in range(c)]
            random.Random(shuffle_seed).shuffle(words)
            return before + _tok(tokenizer, " ".join(words)) + after, counts

        budget = length - len(before) - len(after)
        ids, counts = _fit(build, length, 1, max(2, budget))
        if not counts[3] < counts[2] or counts[3] == 0:
            raise ValueError(f"frequent_words needs a longer length than {length} tokens for a clear top 3")
        return ids, vocab[1:4], {"counts_top5": counts[:5]}


@register_task
@dataclass
class Perplexity(Task):
    """Perplexity on ``length`` tokens of haystack text, over the second half of the window."""

    name: ClassVar[str] = "perplexity"
    description: ClassVar[str] = "perplexity of the haystack text (second half of each window)"
    kind: ClassVar[str] = "perplexity"
    max_new_tokens: ClassVar[int] = 0
    scored_fraction: float = 0.5

    def _build(self, tokenizer, hay, length, depth, rng):
        if length < 2:
            raise ValueError("perplexity needs length >= 2")
        ids = hay.window(length, rng)
        first = max(1, length - int(round(length * self.scored_fraction)))
        return ids, [], {"score_from": first}

    def score(self, prediction, sample):  # pragma: no cover - perplexity is scored from the logits
        raise TypeError("perplexity samples are scored from the model's log-likelihood, see runner.sample_nll")


__all__ = ["Sample", "Task", "Haystack", "TASKS", "PROMPT_FORMATS", "get_task", "list_tasks", "get_haystack",
           "insert_at_depths", "prompt_parts", "sample_seed", "string_match_all", "string_match_part",
           "register_task"]
