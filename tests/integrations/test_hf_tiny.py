"""sparseattn.patch on a tiny randomly initialised Llama (no weights to load), CPU and CUDA.

On CUDA the value-dependent estimators replay CUDA graphs (methods/graphs.py): the layers of one
forward share a graph (first layer eager, second captures, the rest replay), so a patched forward
must give exactly the logits it gives with the graphs off, and a full-budget method must give the
unpatched model's logits.
"""

import importlib.util

import pytest
import torch

import sparseattn as sa
from sparseattn.integrations.hf import patch
from sparseattn.methods import graphs

from ..conftest import requires_cuda

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")

L = 640


def tiny_llama(device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=3, vocab_size=512, max_position_embeddings=4096,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).to(device, dtype).eval()


def run(model, ids, **kw):
    with torch.no_grad():
        if not kw:
            return model(ids).logits.float()
        with patch(model, decode=None, **kw):
            return model(ids).logits.float()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_full_budget_method_equals_unpatched(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = tiny_llama(device, dtype)
    ids = torch.randint(0, 512, (1, L), generator=torch.Generator().manual_seed(1)).to(device)
    dense = run(model, ids)
    full = run(model, ids, prefill=sa.get_method("block_topk", block_size=64, topk=1000))
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(full, dense, atol=tol, rtol=tol)


@requires_cuda
@pytest.mark.parametrize("name,opts", [("xattention", {"block_size": 64, "stride": 8}),
                                       ("block_topk", {"block_size": 64, "topk": 3}),
                                       ("flexprefill", {"block_size": 64}),
                                       ("vertical_slash", {"vertical_size": 64, "slash_size": 128})])
def test_graph_replay_inside_a_forward_equals_eager(name, opts):
    model = tiny_llama("cuda", torch.bfloat16)
    ids = torch.randint(0, 512, (1, L), generator=torch.Generator().manual_seed(2)).to("cuda")
    method = sa.get_method(name, **opts)
    graphs.clear_estimator_graphs()
    sa.set_estimator_graphs(False)
    try:
        eager = run(model, ids, prefill=method)
        sa.set_estimator_graphs(True)
        first = run(model, ids, prefill=method)  # layer 0 eager, layer 1 captures, layer 2 replays
        assert any(isinstance(x, graphs._Graph) for x in graphs._graphs.values()), name
        again = run(model, ids, prefill=method)  # every layer replays
    finally:
        sa.set_estimator_graphs(True)
        graphs.clear_estimator_graphs()
    assert torch.equal(first, eager), name
    assert torch.equal(again, eager), name
