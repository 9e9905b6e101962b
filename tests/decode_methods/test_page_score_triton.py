"""Triton page scoring + top-k selection (Quest, block top-k) against the PyTorch path.

Scores equal the PyTorch ``page_scores`` reduced the same way (float tolerance); selections equal
the PyTorch ``_select`` exactly on tie-free random caches: ragged batch, Lq > 1, GQA groups 1 and
3, page sizes 4 and 16, budgets above the candidate count, a one-page cache. On the CPU the
kernels run in the Triton interpreter; the ``requires_cuda`` test is the GPU twin (bf16, larger).
"""

import pytest
import torch

from sparseattn.decode_api import DecodeSelection
from sparseattn.decode_methods import block_topk as block_topk_mod
from sparseattn.decode_methods import get_decode_method
from sparseattn.decode_methods import quest as quest_mod
from sparseattn.kernels.page_score_triton import (mean_page_scores_triton, quest_page_scores_triton,
                                                  top_pages_selection)
from sparseattn.methods.base import rank_mask

from ..conftest import HAS_CUDA, requires_cuda
from ..kernels.test_decode import make_cache, make_q

DEVICE = "cuda" if HAS_CUDA else "cpu"
F32 = torch.float32
LENGTHS = [1, 16, 34, 37, 141, 203]  # 34 with Lq = 3: the new tokens straddle a 16-token page edge


def lengths_for(Lq):
    return [max(n, Lq) for n in LENGTHS]


def quest_reference_scores(q, cache, layer, policy):
    """PyTorch ``Quest.page_scores`` reduced as ``_select`` does, ``-inf`` outside the candidates."""
    u = get_decode_method("quest").page_scores(q, cache, layer).amax(3)
    s = u.amax(2) if policy == "group_max" else u.sum(2)
    N = cache.layer_lengths(layer).long().view(-1, 1, 1)
    first = torch.div(N - q.shape[2], cache.page_size, rounding_mode="floor")
    idx = torch.arange(s.shape[-1], device=s.device).view(1, 1, -1)
    return torch.where(idx < first, s.float(), torch.full_like(s.float(), float("-inf")))


def mean_reference_scores(q, cache, layer, sink_pages, local):
    s = get_decode_method("block_topk").page_scores(q, cache, layer)
    N = cache.layer_lengths(layer).long().view(-1, 1, 1)
    r = torch.div((N - q.shape[2] - local).clamp(min=0), cache.page_size, rounding_mode="floor")
    idx = torch.arange(s.shape[-1], device=s.device).view(1, 1, -1)
    return torch.where((idx >= torch.clamp(r, max=sink_pages)) & (idx < r), s.float(),
                       torch.full_like(s.float(), float("-inf")))


def reference_selection(scores, lengths, *, page_size, budget, recent, width, sink_pages=0, forced_in_budget=False):
    """What ``top_pages_selection`` must return, built the PyTorch path's way (stable sort, page mask)."""
    N = lengths.long().view(-1, 1, 1)
    n_pages = torch.div(N + page_size - 1, page_size, rounding_mode="floor")
    r = torch.div((N - recent).clamp(min=0), page_size, rounding_mode="floor")
    idx = torch.arange(scores.shape[-1], device=scores.device).view(1, 1, -1)
    forced = (idx < n_pages) & ((idx < sink_pages) | (idx >= r))
    cand = (idx < n_pages) & ~forced
    n_forced = forced.sum(-1)
    free = (budget - n_forced).clamp(min=0) if forced_in_budget else torch.full_like(n_forced, budget)
    keep = rank_mask(torch.where(cand, scores, float("-inf")), free.expand(scores.shape[:2])) & cand
    return DecodeSelection.from_page_mask(keep | forced, page_size=page_size, max_pages=width)


def assert_same_selection(got, want):
    assert got.pages.shape == want.pages.shape
    assert torch.equal(got.page_counts.cpu(), want.page_counts.cpu())
    assert torch.equal(got.pages.cpu(), want.pages.cpu())
    assert got.tokens is None


def both_paths(monkeypatch, module, method, q, cache, layer):
    """(Triton selection, PyTorch selection) of ``method`` for the same inputs."""
    monkeypatch.setattr(module, "use_triton_estimator", lambda x: True)
    got = method.select(q, cache, layer)
    monkeypatch.setattr(module, "use_triton_estimator", lambda x: False)
    want = method.select(q, cache, layer)
    monkeypatch.undo()
    return got, want


# ----------------------------------------------------------------------------- scores
@pytest.mark.parametrize("policy", ["group_max", "group_sum"])
@pytest.mark.parametrize("Hq,Hkv,Lq,P", [(2, 2, 1, 16), (6, 2, 3, 4), (6, 2, 1, 4), (3, 1, 2, 16)])
def test_quest_scores_match_pytorch(policy, Hq, Hkv, Lq, P):
    lengths = lengths_for(Lq)
    cache = make_cache(len(lengths), Hkv, 32, lengths, dtype=F32, page_size=P)
    q = make_q(len(lengths), Hq, Lq, 32, F32)
    got = quest_page_scores_triton(q, cache.page_meta_pool(0, "max"), cache.page_meta_pool(0, "min"),
                                   cache.page_table, cache.layer_lengths(0), page_size=P, gqa_policy=policy)
    want = quest_reference_scores(q, cache, 0, policy)
    assert got.dtype == F32 and got.shape == (len(lengths), Hkv, cache.max_pages)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_quest_scores_bf16_and_strided_q():
    # bf16: the PyTorch path rounds each of its two products to bf16, the kernel keeps fp32.
    lengths = [70, 203]
    cache = make_cache(2, 2, 64, lengths, dtype=torch.bfloat16)
    q = make_q(2, 2, 6, 64, torch.bfloat16).transpose(1, 2).contiguous().transpose(1, 2)  # [B, Hq, Lq, D] strided
    got = quest_page_scores_triton(q, cache.page_meta_pool(0, "max"), cache.page_meta_pool(0, "min"),
                                   cache.page_table, cache.layer_lengths(0), page_size=16)
    want = quest_reference_scores(q, cache, 0, "group_max")
    torch.testing.assert_close(got, want, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("Hq,Hkv,Lq,P,sink,local", [(2, 2, 1, 16, 4, 0), (6, 2, 3, 4, 0, 9), (6, 2, 2, 16, 40, 7)])
def test_mean_scores_match_pytorch(Hq, Hkv, Lq, P, sink, local):
    lengths = lengths_for(Lq)
    cache = make_cache(len(lengths), Hkv, 32, lengths, dtype=F32, page_size=P)
    q = make_q(len(lengths), Hq, Lq, 32, F32)
    sink_pages = -(-sink // P)
    got = mean_page_scores_triton(q, cache.page_meta_pool(0, "mean"), cache.page_table, cache.layer_lengths(0),
                                  page_size=P, sink_pages=sink_pages, local=local, block_p=16)  # several chunks
    torch.testing.assert_close(got, mean_reference_scores(q, cache, 0, sink_pages, local), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- selection step alone
@pytest.mark.parametrize("budget,recent,sink_pages,forced_in_budget",
                         [(5, 1, 0, True), (5, 3, 0, True), (200, 3, 0, True), (4, 9, 2, False), (0, 1, 1, False),
                          (300, 2, 3, False)])
@pytest.mark.parametrize("method", ["bisect", "topk", "two_stage"])
def test_top_pages_selection_matches_rank_mask(budget, recent, sink_pages, forced_in_budget, method):
    # Tie-free scores: a random permutation per row (distinct values), ragged lengths.
    B, H, P = 4, 3, 4
    lengths = torch.tensor([1, 9, 130, 257], dtype=torch.int32, device=DEVICE)
    max_pages = -(-257 // P)
    g = torch.Generator().manual_seed(5)
    scores = torch.argsort(torch.rand(B, H, max_pages, generator=g), -1).float().to(DEVICE)
    # -inf outside the candidates, as the scoring kernels write them (the contract of the step).
    N = lengths.long().view(-1, 1, 1)
    r = torch.div((N - recent).clamp(min=0), P, rounding_mode="floor")
    idx = torch.arange(max_pages, device=DEVICE).view(1, 1, -1)
    scores = scores.masked_fill((idx < r.clamp(max=sink_pages)) | (idx >= r), float("-inf"))
    width = min(max_pages, budget + sink_pages + recent // P + 2)
    kw = dict(page_size=P, budget=budget, recent=recent, width=width, sink_pages=sink_pages,
              forced_in_budget=forced_in_budget)
    # topk: several assembly chunks; two_stage: 5 chunks of 16 pages (some without candidates)
    got = top_pages_selection(scores, lengths, block_k=16, method=method, chunk=16, **kw)
    got.validate(lengths)
    assert_same_selection(got, reference_selection(scores, lengths, **kw))


@pytest.mark.parametrize("forced_in_budget", [True, False])
@pytest.mark.parametrize("method", ["bisect", "two_stage"])
def test_bisection_breaks_ties_like_the_stable_sort(forced_in_budget, method):
    # Few distinct values (many ties at the cut), strided scores, a row longer than one warp's
    # share, a width narrower than max_pages: exactly the PyTorch path's pages (two_stage: ties
    # across its four 64-page chunks too).
    B, H, P = 3, 2, 16
    lengths = torch.tensor([5, 700, 4000], dtype=torch.int32, device=DEVICE)
    max_pages = -(-4000 // P)
    g = torch.Generator().manual_seed(3)
    full = torch.randint(0, 4, (B, max_pages, H), generator=g).float().to(DEVICE)
    scores = full.transpose(1, 2)  # non-contiguous
    N = lengths.long().view(-1, 1, 1)
    r = torch.div((N - 2).clamp(min=0), P, rounding_mode="floor")
    idx = torch.arange(max_pages, device=DEVICE).view(1, 1, -1)
    scores = scores.masked_fill((idx < r.clamp(max=1)) | (idx >= r), float("-inf"))
    kw = dict(page_size=P, budget=37, recent=2, width=41, sink_pages=1, forced_in_budget=forced_in_budget)
    got = top_pages_selection(scores, lengths, method=method, chunk=64, **kw)
    got.validate(lengths)
    assert_same_selection(got, reference_selection(scores, lengths, **kw))


def test_all_ties_give_the_pytorch_pages(monkeypatch):
    # All scores equal (q = 0): the bisection keeps the lowest pages among equal scores, as the
    # stable sort of the PyTorch path does (torch.topk, the long-row fallback, would not).
    lengths = [37, 203, 150]
    cache = make_cache(3, 2, 32, lengths, dtype=F32, layers=3)
    q = torch.zeros(3, 6, 1, 32, device=DEVICE)
    for module, method in ((quest_mod, get_decode_method("quest", token_budget=5 * 16)),
                           (block_topk_mod, get_decode_method("block_topk", topk_pages=4))):
        got, want = both_paths(monkeypatch, module, method, q, cache, 2)
        got.validate(cache.layer_lengths(2))
        assert_same_selection(got, want)


# ----------------------------------------------------------------------------- through the methods
@pytest.mark.parametrize("policy", ["group_max", "group_sum"])
@pytest.mark.parametrize("Hq,Hkv,Lq,P,token_budget", [(2, 2, 1, 16, 64), (6, 2, 3, 16, 48), (6, 2, 1, 4, 40),
                                                      (2, 2, 3, 4, 4000)])
def test_quest_select_matches_pytorch(monkeypatch, policy, Hq, Hkv, Lq, P, token_budget):
    lengths = lengths_for(Lq)
    cache = make_cache(len(lengths), Hkv, 32, lengths, dtype=F32, page_size=P, layers=3)
    q = make_q(len(lengths), Hq, Lq, 32, F32)
    method = get_decode_method("quest", token_budget=token_budget, gqa_policy=policy)
    got, want = both_paths(monkeypatch, quest_mod, method, q, cache, 2)
    got.validate(cache.layer_lengths(2))
    assert_same_selection(got, want)


@pytest.mark.parametrize("Hq,Hkv,Lq,P,topk,sink,local", [(2, 2, 1, 16, 3, 4, 0), (6, 2, 3, 4, 5, 4, 0),
                                                         (6, 2, 2, 16, 3, 20, 7), (2, 2, 1, 4, 1000, 4, 0),
                                                         (6, 2, 1, 16, 0, 4, 0)])
def test_block_topk_select_matches_pytorch(monkeypatch, Hq, Hkv, Lq, P, topk, sink, local):
    lengths = lengths_for(Lq)
    cache = make_cache(len(lengths), Hkv, 32, lengths, dtype=F32, page_size=P, layers=2)
    q = make_q(len(lengths), Hq, Lq, 32, F32)
    method = get_decode_method("block_topk", topk_pages=topk, sink=sink, local=local)
    got, want = both_paths(monkeypatch, block_topk_mod, method, q, cache, 1)
    got.validate(cache.layer_lengths(1))
    assert_same_selection(got, want)


def test_one_page_cache(monkeypatch):
    cache = make_cache(2, 1, 16, [5, 2], dtype=F32, layers=3)
    q = make_q(2, 3, 2, 16, F32)
    assert cache.max_pages == 1
    for module, method, layer in ((quest_mod, get_decode_method("quest", token_budget=16), 2),
                                  (block_topk_mod, get_decode_method("block_topk", topk_pages=2), 1)):
        got, want = both_paths(monkeypatch, module, method, q, cache, layer)
        assert_same_selection(got, want)
        assert got.page_counts.cpu().tolist() == [[1], [1]]


def test_no_host_reads(monkeypatch):
    # The whole Triton step (scores, topk, assembly, DecodeSelection) never reads a device value
    # back: it can be captured in a CUDA graph (the GPU twin below captures it for real).
    cache = make_cache(3, 2, 32, [37, 203, 150], dtype=F32, layers=3)
    q = make_q(3, 6, 2, 32, F32)
    methods = ((quest_mod, get_decode_method("quest", token_budget=64)),
               (block_topk_mod, get_decode_method("block_topk", topk_pages=3)))
    for module, _ in methods:
        monkeypatch.setattr(module, "use_triton_estimator", lambda x: True)

    def forbid(*a, **k):
        raise AssertionError("host read while selecting")

    for attr in ("item", "tolist", "__bool__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, attr, forbid)
    sels = [method.select(q, cache, 2) for _, method in methods]
    monkeypatch.undo()
    for sel in sels:
        sel.validate(cache.layer_lengths(2))


def test_bad_inputs_raise():
    cache = make_cache(2, 2, 32, [40, 9], dtype=F32)
    args = (cache.page_meta_pool(0, "max"), cache.page_meta_pool(0, "min"), cache.page_table, cache.layer_lengths(0))
    q = make_q(2, 4, 1, 32, F32)
    with pytest.raises(ValueError, match="4-D"):
        quest_page_scores_triton(q[0], *args, page_size=16)
    with pytest.raises(ValueError, match="float16"):
        quest_page_scores_triton(q.double(), *args, page_size=16)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        quest_page_scores_triton(make_q(2, 3, 1, 32, F32), *args, page_size=16)
    with pytest.raises(ValueError, match="gqa_policy"):
        quest_page_scores_triton(q, *args, page_size=16, gqa_policy="per_q_head")
    with pytest.raises(ValueError, match="page_table"):
        quest_page_scores_triton(q, *args[:2], cache.page_table.long(), args[3], page_size=16)
    with pytest.raises(ValueError, match="lengths"):
        mean_page_scores_triton(q, cache.page_meta_pool(0, "mean"), cache.page_table, args[3][:1], page_size=16)
    with pytest.raises(ValueError, match="method"):
        top_pages_selection(torch.zeros(2, 2, 3, device=DEVICE), args[3], page_size=16, budget=1, recent=1, width=3,
                            method="sort")
    with pytest.raises(ValueError, match="budget"):
        top_pages_selection(torch.zeros(2, 2, 3, device=DEVICE), args[3], page_size=16, budget=-1, recent=1, width=3)


# ----------------------------------------------------------------------------- GPU twin
@requires_cuda
@pytest.mark.parametrize("name", ["quest", "block_topk"])
def test_cuda_bf16_large_and_graph_safe(monkeypatch, name):
    B, Hq, Hkv, D, P = 2, 32, 8, 128, 16
    lengths = [4096, 3001]
    cache = make_cache(B, Hkv, D, lengths, dtype=torch.bfloat16, layers=3)
    q = make_q(B, Hq, 1, D, torch.bfloat16)
    L = cache.layer_lengths(2)
    if name == "quest":
        method = get_decode_method("quest", token_budget=1024)
        scores = quest_page_scores_triton(q, cache.page_meta_pool(2, "max"), cache.page_meta_pool(2, "min"),
                                          cache.page_table, L, page_size=P)
        torch.testing.assert_close(scores, quest_reference_scores(q, cache, 2, "group_max"), rtol=2e-2, atol=0.25)
        want = reference_selection(scores, L, page_size=P, budget=method.page_budget(P), recent=1,
                                   width=min(cache.max_pages, method.page_budget(P) + 2), forced_in_budget=True)
        module = quest_mod
    else:
        method = get_decode_method("block_topk", topk_pages=64)
        scores = mean_page_scores_triton(q, cache.page_meta_pool(2, "mean"), cache.page_table, L, page_size=P,
                                         sink_pages=1)
        torch.testing.assert_close(scores, mean_reference_scores(q, cache, 2, 1, 0), rtol=1e-3, atol=1e-3)
        want = reference_selection(scores, L, page_size=P, budget=64, recent=1, width=min(cache.max_pages, 67),
                                   sink_pages=1)
        module = block_topk_mod
    monkeypatch.setattr(module, "use_triton_estimator", lambda x: True)  # even under SPARSEATTN_ESTIMATORS=torch
    got = method.select(q, cache, 2)
    got.validate(L)
    assert_same_selection(got, want)  # exact given the kernel's scores (ties are measure-zero in fp32)
    # Mostly the same pages as the PyTorch path (Quest's rounds its bounds to bf16: many ties).
    _, ref = both_paths(monkeypatch, module, method, q, cache, 2)
    overlap = (got.token_mask(L) & ref.token_mask(L)).sum() / ref.token_mask(L).sum()
    assert overlap > 0.75
    # No host sync: the whole step captures in a CUDA graph and replays to the same answer.
    monkeypatch.setattr(module, "use_triton_estimator", lambda x: True)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sel = method.select(q, cache, 2)
    graph.replay()
    torch.cuda.synchronize()
    assert_same_selection(sel, got)


@requires_cuda
@pytest.mark.parametrize("policy", ["group_max", "group_sum"])
def test_cuda_fp32_quest_equals_pytorch(monkeypatch, policy):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # the PyTorch path's bmm exact
    lengths = [4096, 3001]
    cache = make_cache(2, 8, 128, lengths, dtype=F32, layers=3)
    q = make_q(2, 32, 2, 128, F32)
    method = get_decode_method("quest", token_budget=512, gqa_policy=policy)
    got, want = both_paths(monkeypatch, quest_mod, method, q, cache, 2)
    got.validate(cache.layer_lengths(2))
    assert torch.equal(got.page_counts, want.page_counts) and got.pages.shape == want.pages.shape
    # fp32 sums in another order differ by ~1e-5: equal pages except swaps of near-equal scores.
    ref = quest_reference_scores(q, cache, 2, policy).cpu()
    tol = 1e-5 * float(ref[ref.isfinite()].abs().max())
    g_pages, w_pages = got.pages.cpu(), want.pages.cpu()
    for b in range(2):
        for h in range(8):
            n = int(got.page_counts[b, h])
            only_g = sorted(set(g_pages[b, h, :n].tolist()) - set(w_pages[b, h, :n].tolist()))
            only_w = sorted(set(w_pages[b, h, :n].tolist()) - set(g_pages[b, h, :n].tolist()))
            if only_g:
                assert float(ref[b, h, only_w].max() - ref[b, h, only_g].min()) <= tol, (b, h, only_g, only_w)


@requires_cuda
@pytest.mark.parametrize("forced_in_budget,sink_pages,recent", [(True, 0, 1), (False, 1, 17)])
def test_cuda_two_stage_equals_bisect_and_pytorch_at_128k(forced_in_budget, sink_pages, recent):
    """Rows of just over 8K pages (128K tokens), where ``auto`` takes the two-stage selection:
    bf16-rounded scores (ties at the cut), ragged lengths; the same pages as the bisection and the
    PyTorch path."""
    B, H, P = 2, 8, 16
    lengths = torch.tensor([131072 + 5, 100000], dtype=torch.int32, device="cuda")
    max_pages = -(-(131072 + 5) // P)  # 8193
    g = torch.Generator(device="cuda").manual_seed(7)
    scores = torch.randn(B, H, max_pages, generator=g, device="cuda").to(torch.bfloat16).float()
    N = lengths.long().view(-1, 1, 1)
    r = torch.div((N - recent).clamp(min=0), P, rounding_mode="floor")
    idx = torch.arange(max_pages, device="cuda").view(1, 1, -1)
    scores = scores.masked_fill((idx < r.clamp(max=sink_pages)) | (idx >= r), float("-inf"))
    kw = dict(page_size=P, budget=128, recent=recent, width=140, sink_pages=sink_pages,
              forced_in_budget=forced_in_budget)
    want = reference_selection(scores, lengths, **kw)
    for method in ("auto", "two_stage", "bisect"):
        got = top_pages_selection(scores, lengths, method=method, **kw)
        got.validate(lengths)
        assert_same_selection(got, want)
