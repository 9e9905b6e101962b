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
    args = _args(tmp_path, methods="streaming,quest", graph_layers="3")
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


# ----------------------------------------------------------------------------- in a model's decode graph
def _rows(tmp_path, **extra):
    extra.setdefault("batches", "1")
    extra.setdefault("budgets", "32")
    assert bench.run(_args(tmp_path, **extra)) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert not any("error" in r for r in rows), [r["error"] for r in rows if "error" in r]
    return rows


def _check_derived(r):
    g, s = r["graph_layer_ms"], r["sdpa_graph_layer_ms"]
    assert r["graph_vs_floor"] == pytest.approx(g / r["floor_ms"])
    assert r["meets_target_in_graph"] == (g <= r["target_ms"])
    assert r["graph_speedup_vs_sdpa"] == (pytest.approx(s / g) if g > 0 else None)


def test_in_graph_fields_on_the_cpu(tmp_path):
    # On a CPU the timer is perf_counter: the figures are noise, the code path is what runs. The
    # reuse method (TidalDecode: layer 0 selects), Recycled Attention (a chain per phase) and the dense row.
    rows = _rows(tmp_path, methods="streaming,tidaldecode,recycled", graph_layers="3")
    assert {r["method"] for r in rows} == {"ours_dense", "streaming", "tidaldecode", "recycled"}
    dense = next(r for r in rows if r["method"] == "ours_dense")
    assert dense["sdpa_graph_layers"] == 3 and dense["sdpa_graph_mode"] == "eager (cpu)"
    assert dense["sdpa_backend"] == "math"
    t1, tn = dense["sdpa_graph_chain_ms"]
    assert t1 > 0 and tn > 0 and dense["sdpa_graph_layer_ms"] == pytest.approx((tn - t1) / 2)
    for r in rows:
        assert r["cache_layers"] == 3 and r["graph_layers"] == 3
        assert r["sdpa_graph_layer_ms"] == dense["sdpa_graph_layer_ms"]
        g = r["graph_layer_ms"]
        assert isinstance(g, float) and g == g and abs(g) < float("inf")
        if r["method"] == "recycled":
            assert r["graph_mode"] == "eager (cpu, phases)"
            S = 50  # the class default stride
            assert r["graph_layer_ms"] == pytest.approx((r["graph_full_ms"] + (S - 1) * r["graph_recycle_ms"]) / S)
            for phase in ("full", "recycle"):
                t1, tn = r["graph_chain_ms"][phase]
                assert t1 > 0 and tn > 0 and r[f"graph_{phase}_ms"] == pytest.approx((tn - t1) / 2)
        else:
            assert r["graph_mode"] == "eager (cpu)"
            t1, tn = r["graph_chain_ms"]
            assert t1 > 0 and tn > 0 and g == pytest.approx((tn - t1) / 2)
        _check_derived(r)
    table = (tmp_path / "table.md").read_text()
    assert "graph_layer_ms" in table and "meets_target_in_graph" in table and "eager (cpu)" in table


@pytest.mark.parametrize("flag", [("graph_layers", "0"), ("graph_layers", "1"), ("no_graphs", None)])
def test_in_graph_fields_off(tmp_path, flag):
    name, value = flag
    extra = {"methods": "streaming,recycled"}
    if value is None:  # a bare flag: set it on the parsed arguments
        args = _args(tmp_path, **extra, graph_layers="3")
        args.graphs = False
        assert bench.run(args) == 0
        rows = json.loads((tmp_path / "results.json").read_text())["rows"]
        reason = "off (--no-graphs)"
    else:
        rows = _rows(tmp_path, **extra, **{name: value})
        reason = f"off (--graph-layers {value})"
    for r in rows:
        assert r["cache_layers"] == (3 if value is None else 2)
        assert r["graph_layer_ms"] is None and r["graph_mode"] == reason
        assert r["sdpa_graph_layer_ms"] is None
        assert r["graph_vs_floor"] is None and r["meets_target_in_graph"] is None
        assert r["graph_speedup_vs_sdpa"] is None
        assert r["layer_ms"] > 0  # the per-replay figures stay
    table = (tmp_path / "table.md").read_text()
    assert table.count("\n") == len(rows) + 2 and reason in table


class FakeTimer:
    """A timer whose figure for a closure is ``BASE + A[phase] * (layer steps it runs) + C * (SDPA calls)``:
    it runs the closure once and counts (see ``_fake``). ``refuse``: captures of chains fail."""

    BASE, A, C = 0.5, {"full": 0.25, "recycle": 0.0625, None: 0.125}, 2.0
    refuse = False

    def __init__(self, device, **kw):
        self.device = torch_device(device)
        self.graphs = kw.get("graphs", False)
        self.last = {}
        self.seen = FakeTimer.seen

    def timed(self, fn, graph_ok=True):
        calls.update(steps=0, sdpa=0, phases=set())
        fn()
        steps, sdpa = calls["steps"], calls["sdpa"]
        phase = next(iter(calls["phases"])) if calls["phases"] else None
        if steps:
            self.seen.setdefault(("steps", phase), set()).add(steps)
        if sdpa and graph_ok:
            self.seen.setdefault("sdpa", set()).add(sdpa)
        mode = "graph" if graph_ok and self.graphs else "eager"
        if self.refuse and graph_ok and (steps > 1 or sdpa > 1):
            mode = "eager (RuntimeError)"
        self.last = {"mode": mode}
        return self.BASE + self.A[phase] * steps + self.C * sdpa, mode

    def __call__(self, fn, graph_ok=True):
        return self.timed(fn, graph_ok)[0]


calls: dict = {}


def torch_device(device):
    import torch

    return torch.device(device)


@pytest.fixture
def fake_timer(monkeypatch):
    from sparseattn.decode_methods.recycled import RecycledAttention

    FakeTimer.seen = {}
    monkeypatch.setattr(bench, "BenchTimer", FakeTimer)
    real_attention, real_sdpa, real_phase = bench.sparse_decode_attention, bench.sdpa_call, RecycledAttention.set_phase

    def attention(*a, **k):
        calls["steps"] += 1
        return real_attention(*a, **k)

    def sdpa_call(*a, **k):
        fn = real_sdpa(*a, **k)

        def call():
            calls["sdpa"] += 1
            return fn()
        return call

    def set_phase(self, cache, layer, phase):
        calls["phases"].add(phase)
        return real_phase(self, cache, layer, phase)

    monkeypatch.setattr(bench, "sparse_decode_attention", attention)
    monkeypatch.setattr(bench, "sdpa_call", sdpa_call)
    monkeypatch.setattr(RecycledAttention, "set_phase", set_phase)
    return FakeTimer


def test_in_graph_figure_is_the_chain_slope(tmp_path, fake_timer):
    # T_n = BASE + a * n for a chain of n layer steps: (T_N - T_1) / (N - 1) = a exactly; SDPA's
    # chain has min(N, 3) layers; Recycled Attention amortises its two phases' slopes over the stride.
    N, A, C = 5, fake_timer.A, fake_timer.C
    rows = _rows(tmp_path, methods="streaming,tidaldecode,recycled", graph_layers=str(N))
    assert fake_timer.seen["sdpa"] == {1, 3}
    assert fake_timer.seen[("steps", None)] >= {1, N}
    assert fake_timer.seen[("steps", "full")] >= {1, N} and fake_timer.seen[("steps", "recycle")] >= {1, N}
    for r in rows:
        assert r["sdpa_graph_layer_ms"] == pytest.approx(C)
        if r["method"] == "recycled":
            S = 50
            assert r["graph_full_ms"] == pytest.approx(A["full"])
            assert r["graph_recycle_ms"] == pytest.approx(A["recycle"])
            assert r["graph_layer_ms"] == pytest.approx((A["full"] + (S - 1) * A["recycle"]) / S)
            assert r["graph_mode"] == "graph (phases)" and r["mode"] == "graph (phases)"
        else:
            assert r["graph_layer_ms"] == pytest.approx(A[None])
            assert r["graph_chain_ms"] == pytest.approx([fake_timer.BASE + A[None], fake_timer.BASE + N * A[None]])
            assert r["graph_mode"] == "graph"
        assert r["graph_layer_ms"] > 0
        _check_derived(r)
        assert r["graph_speedup_vs_sdpa"] == pytest.approx(C / r["graph_layer_ms"])


def test_not_graph_safe_or_refused_capture_gives_none(tmp_path, fake_timer, monkeypatch):
    from sparseattn.decode_methods.streaming import StreamingDecode

    monkeypatch.setattr(StreamingDecode, "graph_safe", False)
    monkeypatch.setattr(fake_timer, "refuse", True)
    rows = _rows(tmp_path, methods="streaming,quest,recycled", graph_layers="3")
    by = {r["method"]: r for r in rows}
    assert by["streaming"]["graph_mode"] == "not graph-safe (host state)"
    assert by["streaming"]["mode"] == "eager" and by["streaming"]["layer_ms"] > 0
    assert by["quest"]["graph_mode"] == "capture refused: eager (RuntimeError)"
    assert by["ours_dense"]["graph_mode"] == "capture refused: eager (RuntimeError)"
    assert by["ours_dense"]["sdpa_graph_mode"] == "capture refused: eager (RuntimeError)"
    assert by["recycled"]["graph_mode"] == "capture refused: eager (RuntimeError) (phases)"
    for r in rows:
        assert r["graph_layer_ms"] is None and r["sdpa_graph_layer_ms"] is None
        assert r["graph_vs_floor"] is None and r["meets_target_in_graph"] is None and r["graph_speedup_vs_sdpa"] is None
    table = (tmp_path / "table.md").read_text()
    assert "not graph-safe" in table and table.count("\n") == len(rows) + 2


def test_build_cache_layers_share_content_not_storage():
    import torch

    cache = bench.build_cache(2, 2, 16, 40, torch.float32, torch.device("cpu"), 16, layers=3)
    assert cache.num_layers == 3 and cache.host_lengths(2) == [40, 40]
    k0, v0 = cache.gather(0)
    ptrs = set()
    for layer in range(3):
        k, v = cache.gather(layer)
        assert torch.equal(k, k0) and torch.equal(v, v0)
        ptrs |= {cache.k_pages(layer).data_ptr(), cache.v_pages(layer).data_ptr()}
    assert len(ptrs) == 6  # every layer its own K and V pages
    assert bench.build_cache(1, 2, 16, 8, torch.float32, torch.device("cpu"), 16).num_layers == 2  # the default
    two = bench.build_cache(2, 2, 16, 40, torch.float32, torch.device("cpu"), 16)
    assert torch.equal(two.gather(1)[0], k0)  # the same random K/V as before the layers argument


# ----------------------------------------------------------------------------- scripts/decode_table.py
def _decode_table():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "decode_table.py"
    spec = importlib.util.spec_from_file_location("decode_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table_rows(graph: bool):
    rows = []
    for B, scale in ((1, 1.0), (8, 4.0)):
        common = dict(shape="32/8/128", L=131072, B=B, sdpa_ms=0.1 * scale)
        if graph:
            common["sdpa_graph_layer_ms"] = 0.09 * scale
        dense = dict(common, method="ours_dense", budget=None, layer_ms=0.12 * scale, target_ms=0.2 * scale,
                     vs_floor=1.2, speedup_vs_sdpa=0.8, kernel_ms=0.12 * scale, kernel_tbs=2.5, mode="graph")
        quest = dict(common, method="quest", budget=2048, layer_ms=0.03 * scale, target_ms=0.025 * scale,
                     vs_floor=1.5, speedup_vs_sdpa=3.0, select_ms=0.01, kernel_ms=0.02, kernel_tbs=1.0, mode="graph")
        if graph:
            dense.update(graph_layer_ms=0.11 * scale, graph_mode="graph", graph_speedup_vs_sdpa=0.09 / 0.11)
            quest.update(graph_layer_ms=0.02 * scale ** 2, graph_mode="graph", graph_speedup_vs_sdpa=0.09 / 0.02)
        rows += [dense, quest]
    rows.append(dict(shape="32/8/128", L=131072, B=8, method="snapkv", budget=2048, error="boom"))
    return rows


def test_decode_table_with_and_without_in_graph_figures(tmp_path, capsys):
    table = _decode_table()
    old = table.render(_table_rows(False), 2048)
    assert "in graph" not in old and "| quest | 0.030 | 0.025 no |" in old
    assert old.count("| quest |") == 1 and "snapkv" not in old
    new = table.render(_table_rows(True), 2048)
    head = next(line for line in new.splitlines() if line.startswith("| method"))
    assert "| B=1 in graph | B=8 in graph | B=8 in graph vs SDPA | timing |" in head
    lines = {line.split(" | ")[0]: line for line in new.splitlines() if line.startswith("| ")}
    assert lines["| SDPA cuDNN"].endswith("| 0.090 | 0.360 | 1.00 | |")
    assert lines["| quest"].endswith("| 0.020 yes | 0.320 no | 4.50 | graph |")  # 0.02 <= 0.025, 0.32 > 0.1
    assert lines["| ours, dense"].count("|") == head.count("|")
    # The old columns are unchanged by the new ones.
    assert [line for line in old.splitlines() if line.startswith("| quest")][0].removesuffix(" graph |") in \
        lines["| quest"]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"rows": _table_rows(True)}))
    table.main([str(path), "--budget", "2048"])
    assert capsys.readouterr().out == new
    # bench's own table: rows without the new fields (an old results file) render with "-".
    md = bench.markdown_table(_table_rows(False))
    assert md.count("\n") == len(_table_rows(False)) + 2 and "graph_layer_ms" in md.splitlines()[0]
