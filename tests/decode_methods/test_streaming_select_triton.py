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
