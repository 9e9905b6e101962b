"""token_votes_triton (TokenSelect's soft votes) against the PyTorch votes, and TokenSelect's
selections through both paths.

On this CPU machine the kernels run in the Triton interpreter; the ``requires_cuda`` twin runs the
same comparison compiled on a GPU (32/8/128, ~8K tokens, bf16 cache). The oracle is the PyTorch
path of ``TokenSelect.votes`` (``exact_logits`` + masked softmax + sum over heads), and for query
rows ``Lq > 1`` the same formula written here over ``exact_logits``.
"""

import pytest
import torch

import sparseattn.decode_methods.tokenselect as dm_tokenselect
from sparseattn.decode_methods import TokenSelect
from sparseattn.decode_methods.base import exact_logits

from ..conftest import requires_cuda, triton_importable
from .test_decode_logits_triton import DEVICE, make_cache, make_q

pytestmark = pytest.mark.skipif(not triton_importable(), reason="triton is not installed (pip install triton)")

if triton_importable():
    from sparseattn.kernels.decode_logits_triton import _launch
    import sparseattn.kernels.token_votes_triton as token_votes_module
    from sparseattn.kernels.token_votes_triton import token_votes_triton


def kernel_votes(q, cache, candidate, scale, **kw):
    return token_votes_triton(q, cache.k_pages(0), cache.page_table, cache.layer_lengths(0), candidate,
                              page_size=cache.page_size, scale=scale, **kw)


def torch_votes(q, cache, candidate, scale):
    """The formula over every query row (head, new token) of a sequence, from the PyTorch logits."""
    B = q.shape[0]
    logits = exact_logits(q.float(), cache, 0, scale=scale).reshape(B, -1, candidate.shape[-1])
    neg = torch.tensor(float("-inf"), device=logits.device)
    p = torch.softmax(torch.where(candidate.unsqueeze(1), logits, neg), dim=-1).nan_to_num(0.0).sum(1)
    return torch.where(candidate, p, neg)


def assert_votes_close(got, want, rtol=1e-5, atol=1e-6):
    assert got.dtype == torch.float32 and got.shape == want.shape
    outside = torch.isneginf(want)
    assert torch.equal(torch.isneginf(got), outside), "the -inf pattern (non-candidates) differs"
    assert torch.isfinite(got[~outside]).all()
    torch.testing.assert_close(got[~outside], want[~outside].float(), rtol=rtol, atol=atol)


def qbar_of(q):
    return q.float().mean(2, keepdim=True)  # TokenSelect's fingerprint (float32 for 16-bit queries)


def selected(sel, cache):
    """Per sequence the sorted selected positions (the selection's token-mask oracle)."""
    L = cache.max_length(0)
    m = sel.token_mask(cache.layer_lengths(0), L).cpu()
    assert m.shape[1] == 1
    return [torch.nonzero(m[b, 0]).flatten().tolist() for b in range(m.shape[0])]


# Ragged: sequence 1 is so short that it has no candidate for every (n_init, n_local) below.
LENGTHS = [83, 17]


# ----------------------------------------------------------------------------- votes
@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("Lq", [1, 3])
@pytest.mark.parametrize("n_init,n_local,P", [(4, 16, 4), (13, 9, 16)])
def test_votes_match_pytorch(G, Lq, n_init, n_local, P, monkeypatch):
    """TokenSelect.votes through the kernel vs its PyTorch body (the step's Lq moves the window)."""
    Hkv, D = 2, 32
    cache = make_cache(LENGTHS, Hkv, D, P, permute=True, seed=G + Lq + P)
    q = make_q(2, Hkv * G, Lq, D, seed=Lq)
    method = TokenSelect(n_init=n_init, n_local=n_local, top_k=8)
    n = cache.max_pages * P
    forced, candidate = method.windows(cache, 0, Lq, n)
    assert candidate[0].any() and not candidate[1].any()
    want = method.votes(qbar_of(q), cache, 0, candidate)  # CPU: the PyTorch code
    monkeypatch.setattr(dm_tokenselect, "use_triton_estimator", lambda x: True)
    got = method.votes(qbar_of(q), cache, 0, candidate)
    assert_votes_close(got, want)
    assert torch.isneginf(got[1]).all()
    # One vote of mass 1 per query head where a sequence has candidates.
    torch.testing.assert_close(got[0][candidate[0]].sum(), torch.tensor(float(Hkv * G), device=got.device),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [1.0, None])
def test_votes_logit_scale_and_pooling(scale, monkeypatch):
    """``logit_scale=None`` (1/sqrt(D)) and the max-pool branch after the kernel's votes."""
    cache = make_cache([70, 57], 2, 32, 4, permute=True, seed=3)
    q = make_q(2, 6, 1, 32, seed=5)  # G = 3
    method = TokenSelect(n_init=3, n_local=5, top_k=8, logit_scale=scale, kernel_size=5)
    _, candidate = method.windows(cache, 0, 1, cache.max_pages * 4)
    want = method.votes(qbar_of(q), cache, 0, candidate)
    monkeypatch.setattr(dm_tokenselect, "use_triton_estimator", lambda x: True)
    assert_votes_close(method.votes(qbar_of(q), cache, 0, candidate), want)


def test_votes_general_mask_rows_and_configs(monkeypatch):
    """A non-contiguous candidate set (strided view), Lq = 2 query rows each with its own causal
    view (rows that see no candidate add 0), and several tile configurations, one folding the
    runs' statistics in several chunks."""
    cache = make_cache([45, 38], 2, 32, 4, permute=True, seed=7)
    N = cache.max_pages * 4
    g = torch.Generator().manual_seed(0)
    wide = torch.rand(2, 2 * N, generator=g).to(DEVICE) < 0.5
    candidate = wide[:, ::2]  # stride 2: any strides are read as they are
    candidate[1, 36:] = True  # includes the newest tokens: the first query row does not see 37
    q = make_q(2, 4, 2, 32, seed=9)
    want = torch_votes(q, cache, candidate, 0.3)
    for config in [None, (16, 2, 1), (64, 8, 4)]:
        assert_votes_close(kernel_votes(q, cache, candidate, 0.3, config=config), want)
    for use_dot, logits_config in [(False, None), (True, (16, 4, 1))]:
        assert_votes_close(kernel_votes(q, cache, candidate, 0.3, use_dot=use_dot, logits_config=logits_config),
                           want)
    # 16-token tiles make 3 runs of 32 tokens; chunks of 2 runs: a full chunk and a partial one.
    monkeypatch.setattr(token_votes_module, "MAX_RUN_BLOCK", 2)
    assert _launch(q, cache.k_pages(0), cache.page_table, cache.layer_lengths(0), 4, 0.3, None, (16, 4, 1),
                   stats=True)[2] == 3
    assert_votes_close(kernel_votes(q, cache, candidate, 0.3, logits_config=(16, 4, 1)), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_votes_16bit(dtype):
    """16-bit caches: fp32 fingerprints (what TokenSelect passes) give the fp32 product; 16-bit
    queries give the same math as upcast ones, and stay near the PyTorch 16-bit path (which rounds
    each logit to the input dtype)."""
    cache = make_cache([77, 40], 2, 64, 16, dtype=dtype, permute=True, seed=11)
    method = TokenSelect(n_init=5, n_local=7, top_k=8, logit_scale=None)
    _, candidate = method.windows(cache, 0, 1, cache.max_pages * 16)
    q = make_q(2, 8, 1, 64, dtype=dtype, seed=2)
    scale = 64 ** -0.5
    want = torch_votes(q.float(), cache, candidate, scale)
    assert_votes_close(kernel_votes(q.float(), cache, candidate, scale), want)
    assert_votes_close(kernel_votes(q, cache, candidate, scale), want)
    assert_votes_close(kernel_votes(q, cache, candidate, scale), method.votes(q, cache, 0, candidate),
                       rtol=3e-2, atol=1e-4)


def test_votes_no_candidates_anywhere_and_empty():
    cache = make_cache([30, 9], 2, 32, 4, seed=4)
    q = make_q(2, 2, 1, 32)
    N = cache.max_pages * 4
    none = torch.zeros(2, N, dtype=torch.bool, device=DEVICE)
    assert torch.isneginf(kernel_votes(q, cache, none, 1.0)).all()
    every = torch.ones(2, N, dtype=torch.bool, device=DEVICE)  # past the lengths: candidates that nobody sees
    got = kernel_votes(q, cache, every, 1.0)
    assert_votes_close(got, torch_votes(q, cache, every, 1.0))
    assert (got[1, 9:] == 0).all()
    # No query row: every candidate gets 0 votes.
    got = kernel_votes(q[:, :, :0], cache, every & (torch.arange(N, device=DEVICE) < 5), 1.0)
    assert (got[:, :5] == 0).all() and torch.isneginf(got[:, 5:]).all()


def test_stats_mask_restricts_the_row_statistics_only():
    """The logits are those of the plain launch; the folded statistics equal the masked softmax's."""
    cache = make_cache([61, 22], 2, 32, 4, permute=True, seed=6)
    q = make_q(2, 4, 1, 32)
    N = cache.max_pages * 4
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(2, N, generator=g).to(DEVICE) < 0.4
    # 16-token tiles: several runs per row on the GPU too (the statistics are folded across runs).
    args = (q, cache.k_pages(0), cache.page_table, cache.layer_lengths(0), 4, 0.5, None, (16, 4, 1))
    plain, _, _, _ = _launch(*args, stats=False)
    logits, stats, runs, _ = _launch(*args, stats=True, stats_mask=mask)
    assert torch.equal(logits, plain) and runs > 1
    m = stats[..., 0].amax(1)
    l_sum = (stats[..., 1] * torch.exp(stats[..., 0] - m[:, None]).nan_to_num(0.0)).sum(1)
    x = torch.where(mask.view(2, 1, 1, 1, N), logits, float("-inf")).reshape(-1, N)
    torch.testing.assert_close(m, x.amax(1))
    torch.testing.assert_close(l_sum, torch.exp(x - x.amax(1, keepdim=True)).sum(1), rtol=1e-5, atol=1e-6)


def test_votes_reject_bad_inputs():
    cache = make_cache([9, 5], 2, 32, 4)
    q = make_q(2, 4, 1, 32)
    N = cache.max_pages * 4
    cand = torch.ones(2, N, dtype=torch.bool, device=DEVICE)
    bad = [
        dict(candidate=cand.to(torch.uint8)),
        dict(candidate=cand[:, :-1]),
        dict(candidate=cand[0]),
        dict(candidate=None),
        dict(q=q.double()),
        dict(q=make_q(2, 3, 1, 32)),  # Hq not a multiple of Hkv
        dict(config=(48, 4, 4)),
        dict(config=(32, 1, 4)),
        dict(scale=float("inf")),
    ]
    for case in bad:
        with pytest.raises(ValueError):
            token_votes_triton(case.get("q", q), cache.k_pages(0), cache.page_table, cache.layer_lengths(0),
                               case.get("candidate", cand), page_size=4, scale=case.get("scale", 1.0),
                               config=case.get("config"))
    with pytest.raises(ValueError):  # a stats mask without statistics
        _launch(q, cache.k_pages(0), cache.page_table, cache.layer_lengths(0), 4, 1.0, None, None,
                stats=False, stats_mask=cand)


# ----------------------------------------------------------------------------- selections
@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("Lq", [1, 3])
@pytest.mark.parametrize("cfg", [dict(n_init=4, n_local=16, top_k=12),
                                 dict(n_init=2, n_local=15, top_k=7, kernel_size=5, logit_scale=None),
                                 dict(n_init=3, n_local=14, top_k=6, selection_cache=True)])
def test_select_same_tokens_torch_and_triton(G, Lq, cfg, monkeypatch):
    """TokenSelect._select picks the same tokens with the PyTorch votes (and rank_mask) as with the
    Triton votes (and the top-k assembly of the CUDA path); a ragged batch with a candidate-less row."""
    Hkv, D = 2, 32
    cache = make_cache(LENGTHS, Hkv, D, 4, permute=True, seed=G * Lq)
    q = make_q(2, Hkv * G, Lq, D, seed=G + Lq)
    want = selected(TokenSelect(**cfg)._select(q, cache, 0), cache)  # CPU: PyTorch everywhere
    monkeypatch.setattr(dm_tokenselect, "use_triton_estimator", lambda x: True)
    sel = TokenSelect(**cfg)._select(q, cache, 0)
    sel.validate(cache.layer_lengths(0))
    assert selected(sel, cache) == want
    assert len(want[0]) > cfg["n_init"] + cfg["n_local"] + Lq - 1 and len(want[1]) == LENGTHS[1]


# ----------------------------------------------------------------------------- GPU twin
def assert_same_up_to_near_ties(got, want, votes, rtol=5e-3):
    """Selections equal, except for swaps at the budget's edge between tokens whose votes are
    within ``rtol`` (the two paths' logits differ by fp32 rounding)."""
    for b, (g, w) in enumerate(zip(got, want)):
        assert len(g) == len(w)
        diff = sorted(set(g) ^ set(w))
        if diff:
            v = votes[b, diff].float()
            assert torch.isfinite(v).all() and (v.max() - v.min()) <= rtol * v.abs().max(), (b, diff, v)


@requires_cuda
def test_cuda_bf16_8k_matches_pytorch(monkeypatch):
    """B=2, 32 query / 8 KV heads, D=128, ~8K tokens in a bf16 cache, compiled: votes and selections."""
    lengths = [8192, 8192 - 77]
    cache = make_cache(lengths, 8, 128, 16, dtype=torch.bfloat16, permute=True, device="cuda")
    n = cache.max_pages * 16
    for Lq in (1, 3):
        q = make_q(2, 32, Lq, 128, dtype=torch.bfloat16, seed=Lq, device="cuda")
        qbar = qbar_of(q)
        for cfg in (dict(top_k=2048), dict(top_k=512, kernel_size=6), dict(top_k=8000)):
            method = TokenSelect(n_init=128, n_local=512, **cfg)
            _, candidate = method.windows(cache, 0, Lq, n)
            got_votes = method.votes(qbar, cache, 0, candidate)  # Triton on CUDA
            got = selected(method._select(q, cache, 0), cache)
            monkeypatch.setenv("SPARSEATTN_ESTIMATORS", "torch")
            want_votes = method.votes(qbar, cache, 0, candidate)
            want = selected(method._select(q, cache, 0), cache)
            monkeypatch.delenv("SPARSEATTN_ESTIMATORS")
            # Logits of the two paths differ by fp32 rounding (the logits twin allows 2e-3): exp turns
            # an absolute logit error into a relative vote error of the same size.
            assert_votes_close(got_votes, want_votes, rtol=5e-3, atol=1e-6)
            assert_same_up_to_near_ties(got, want, want_votes)
        # A 16-bit fingerprint: the same math as upcast (16-bit products are exact in fp32).
        _, candidate = TokenSelect().windows(cache, 0, Lq, n)
        got_votes = kernel_votes(q[:, :, :1], cache, candidate, 1.0)
        monkeypatch.setenv("SPARSEATTN_ESTIMATORS", "torch")
        want_votes = torch_votes(q[:, :, :1].float(), cache, candidate, 1.0)
        monkeypatch.delenv("SPARSEATTN_ESTIMATORS")
        assert_votes_close(got_votes, want_votes, rtol=5e-3, atol=1e-6)
