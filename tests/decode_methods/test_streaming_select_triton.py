"""The one-launch StreamingLLM selection (kernels/streaming_select_triton.py) against the PyTorch
selection it replaces on CUDA (interpreter on the CPU, compiled where CUDA is present)."""

import pytest
import torch

from sparseattn.decode_methods import get_decode_method
from sparseattn.decode_methods import streaming as streaming_mod
from sparseattn.kernels.streaming_select_triton import streaming_select_triton

from ..kernels.test_decode import DEVICE, make_cache


def selections(method, q, cache, monkeypatch):
    monkeypatch.setattr(streaming_mod, "use_triton_estimator", lambda x: False)
    ref = method._select(q, cache, 0)
    monkeypatch.setattr(streaming_mod, "use_triton_estimator", lambda x: True)
    return method._select(q, cache, 0), ref


@pytest.mark.parametrize("P", [4, 16])
@pytest.mark.parametrize("Lq", [1, 3])
@pytest.mark.parametrize("sink,window", [(4, 2000), (4, 37), (0, 16), (7, 1), (33, 50)])
def test_matches_the_pytorch_selection(monkeypatch, P, Lq, sink, window):
    lengths = [3, 4, 17, 40, 64, 65, 150, 301]  # shorter than the sink, than a page, ends mid-page, ...
    lengths = [max(n, Lq) for n in lengths]
    cache = make_cache(len(lengths), 2, 16, lengths, page_size=P, dtype=torch.float32)
    q = torch.randn(len(lengths), 4, Lq, 16, device=DEVICE)
    method = get_decode_method("streaming", sink=sink, window=window)
    mine, ref = selections(method, q, cache, monkeypatch)
    mine.validate(cache.layer_lengths(0))
    for name in ("page_counts", "pages", "token_counts", "tokens"):
        a, b = getattr(mine, name), getattr(ref, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.equal(a.expand_as(b), b), (name, a, b)
    assert torch.equal(mine.token_mask(cache.layer_lengths(0), max(lengths)),
                       ref.token_mask(cache.layer_lengths(0), max(lengths)))


def test_input_checks():
    lengths = torch.tensor([5], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"lengths must be \[B\]"):
        streaming_select_triton(lengths.view(1, 1), q_len=1, sink=4, window=8, page_size=4, width_pages=3)
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        streaming_select_triton(lengths, q_len=1, sink=4, window=0, page_size=4, width_pages=3)


# ----------------------------------------------------------------------------- DuoAttention
@pytest.mark.parametrize("P", [4, 16])
@pytest.mark.parametrize("Lq", [1, 3])
@pytest.mark.parametrize("sink,recent", [(4, 37), (0, 16), (7, 0), (64, 256)])
@pytest.mark.parametrize("per_sequence", [False, True])
def test_duo_selection_matches_the_pytorch_selection(monkeypatch, P, Lq, sink, recent, per_sequence):
    """One launch (``duo_select_triton``) against DuoDecode's PyTorch selection: retrieval heads list
    every page, streaming heads the streaming window; a static [1, Hkv] table or a per-sequence
    [B, Hkv] assignment; ragged lengths (shorter than the sink, than a page, mid-page)."""
    from sparseattn.decode_methods import duo as duo_mod

    lengths = [max(n, Lq) for n in [3, 4, 17, 40, 64, 65, 150, 301]]
    Hkv = 3
    cache = make_cache(len(lengths), Hkv, 16, lengths, page_size=P, dtype=torch.float32)
    q = torch.randn(len(lengths), 2 * Hkv, Lq, 16, device=DEVICE)
    method = get_decode_method("duo", sink=sink, recent=recent, retrieval_heads=[True, False, True])
    if per_sequence:  # what the online rule freezes: one assignment per sequence
        g = torch.Generator().manual_seed(P + Lq)
        method.state(cache, 0)["retrieval"] = (torch.rand(len(lengths), Hkv, generator=g) < 0.5).to(DEVICE)
    monkeypatch.setattr(duo_mod, "use_triton_estimator", lambda x: False)
    ref = method._select(q, cache, 0)
    monkeypatch.setattr(duo_mod, "use_triton_estimator", lambda x: True)
    mine = method._select(q, cache, 0)
    lens = cache.layer_lengths(0)
    mine.validate(lens)
    for name in ("page_counts", "pages", "token_counts", "tokens"):
        a, b = getattr(mine, name), getattr(ref, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == torch.int32 and torch.equal(a, b.to(torch.int32)), (name, a, b)
    assert torch.equal(mine.token_mask(lens, max(lengths)), ref.token_mask(lens, max(lengths)))


def test_duo_input_checks():
    from sparseattn.kernels.streaming_select_triton import duo_select_triton

    lengths = torch.tensor([5, 9], dtype=torch.int32, device=DEVICE)
    ok = torch.ones(1, 2, dtype=torch.bool, device=DEVICE)
    args = dict(num_kv_heads=2, q_len=1, sink=4, window=8, page_size=4, max_pages=3)
    for bad in (ok.int(), ok[:, :1], torch.ones(3, 2, dtype=torch.bool, device=DEVICE)):
        with pytest.raises(ValueError, match="retrieval must be a bool"):
            duo_select_triton(lengths, bad, **args)
    with pytest.raises(ValueError, match="max_pages must be an int >= 1"):
        duo_select_triton(lengths, ok, **dict(args, max_pages=0))
