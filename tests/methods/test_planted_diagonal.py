"""Methods that estimate slashes must find a planted diagonal: query i attends keys i - OFFSET and
i - OFFSET + 1 (a two-wide line, as real slashes are; a one-wide line of even offset never meets
XAttention's antidiagonals). OFFSET is a multiple of the block so that FlexPrefill's block-granular
slash offsets can represent the line exactly; the check is on the OFFSET line.
"""

import pytest
import torch

from sparseattn.methods import get_method

OFFSET = 128

# Overrides under which each slash-aware estimator must cover the planted diagonal.
SLASH_AWARE = {
    "xattention": {"threshold": 0.7},
    "flexprefill": {"tau": 0.0, "min_budget": 128},
    "vertical_slash": {"vertical_size": 30, "slash_size": 102},
}


def diagonal_qkv(L=700, D=64, Hq=2, Hkv=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(Hkv, L, D, generator=g)
    r = r / r.norm(dim=-1, keepdim=True)
    k = r.unsqueeze(0).clone()
    q = 0.2 * torch.randn(1, Hq, L, D, generator=g)
    G = Hq // Hkv
    # q_i ~ k_{i - OFFSET} + k_{i - OFFSET + 1}: logits about 20 there, O(1) elsewhere
    rq = r.repeat_interleave(G, 0)
    q[:, :, OFFSET:] += 20 * D ** 0.5 * (rq[:, : L - OFFSET] + rq[:, 1: L - OFFSET + 1]).unsqueeze(0)
    v = torch.randn(1, Hkv, L, D, generator=g)
    return q, k, v


@pytest.mark.parametrize("name", list(SLASH_AWARE))
def test_planted_diagonal_is_covered(name):
    q, k, v = diagonal_qkv()
    plan = get_method(name, block_size=64, **SLASH_AWARE[name]).plan(q, k, v)
    plan.validate(causal=True)
    mask = plan.to_dense_mask()[0]
    rows = torch.arange(OFFSET, 700)
    hit = mask[:, rows, rows - OFFSET]
    assert hit.all(), f"{int((~hit).sum())} of {hit.numel()} planted entries missed"
    assert plan.density() < 0.8
