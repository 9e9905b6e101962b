"""sparseattn bench decode on the CPU at toy sizes: every row present, counts and floors consistent."""

import argparse
import json

import pytest

from sparseattn.bench import decode as bench
from sparseattn.cli import build_parser


def _args(tmp_path, **extra):
    parser = build_parser()
    argv = ["bench", "decode", "--contexts", "200", "--batches", "1,2", "--budgets", "32,64", "--shapes", "4/2/16",
            "--dtype", "float32", "--device", "cpu", "--out", str(tmp_path)]
    for key, value in extra.items():
        argv += [f"--{key.replace('_', '-')}", value]
    return parser.parse_args(argv)


def test_rows_for_every_method_budget_and_batch(tmp_path):
    args = _args(tmp_path, methods="streaming,quest")
    assert bench.run(args) == 0
    payload = json.loads((tmp_path / "results.json").read_text())
    rows = payload["rows"]
    assert payload["environment"]["device"] == "cpu" and "commit" in payload["environment"]
    keys = {(r["B"], r["method"], r["budget"]) for r in rows}
    assert keys == {(b, m, n) for b in (1, 2) for m, n in
                    [("ours_dense", None), ("streaming", 32), ("streaming", 64), ("quest", 32), ("quest", 64)]}
    assert not any("error" in r for r in rows)
    for r in rows:
        assert r["layer_ms"] > 0 and r["floor_ms"] > 0 and r["sdpa_ms"] > 0
        # target = 1.5 x the bytes' time + the latency (10 us), floor = 1 x the bytes' time + the latency
        bytes_ms = r["floor_ms"] - 0.010
        assert r["target_ms"] == pytest.approx(1.5 * bytes_ms + 0.010)
        assert r["meets_target"] == (r["layer_ms"] <= r["target_ms"])
        if r["method"] == "ours_dense":
            assert r["read_tokens"] == 200
        elif r["method"] == "streaming":
            assert r["read_tokens"] == r["budget"]  # sink 4 + window budget - 4, exact tokens
        else:  # quest: max(3, budget // 16) pages, one of them the partial last page (8 tokens)
            assert r["read_tokens"] == (max(3, r["budget"] // 16) - 1) * 16 + 8
    table = (tmp_path / "table.md").read_text()
    assert table.count("\n") == len(rows) + 2 and "| quest |" in table


def test_metadata_bytes_by_scorer():
    import torch

    cache = bench.build_cache(1, 2, 16, 64, torch.float32, torch.device("cpu"), 16)
    from sparseattn import get_method

    assert bench.metadata_bytes(get_method("quest", kind="decode"), cache, "steady") == 2 * 2 * 4 * 16 * 4
    assert bench.metadata_bytes(get_method("streaming", kind="decode"), cache, "steady") == 0
    # Exact scorers: TokenSelect reads every key; H2O / TOVA the keys of the tokens they read.
    assert bench.metadata_bytes(get_method("tokenselect", kind="decode"), cache, "steady", 10.0) == 2 * 64 * 16 * 4
    assert bench.metadata_bytes(get_method("h2o", kind="decode"), cache, "steady", 10.0) == 2 * 10 * 16 * 4


def test_bad_arguments_name_the_choices(tmp_path):
    with pytest.raises(SystemExit, match="unknown decode method.*quest"):
        bench.run(_args(tmp_path, methods="qest"))
    with pytest.raises(SystemExit, match="bad shape"):
        bench.run(_args(tmp_path, shapes="32x8"))
    with pytest.raises((SystemExit, argparse.ArgumentTypeError)):
        bench.run(_args(tmp_path, contexts="abc"))
