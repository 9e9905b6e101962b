"""Triton label scoring (Double Sparsity) against the PyTorch path.

Scores equal ``DoubleSparsity.token_scores``' PyTorch path (``label_scores`` reduced as ``_select``
reduces it) within float tolerance: label bits 16/8/4, policies group_max/group_sum/per_q_head,
Lq 1 and 2, GQA groups 1 and 3, label caches per KV head and per query head, ragged batch, page
sizes 4 and 16, a permuted page table. Selections through ``_select`` equal the PyTorch path's on
tie-free random caches. On the CPU the kernel runs in the Triton interpreter; the ``requires_cuda``
tests are the GPU twins (bf16, 32/8/128, B = 2, 4K tokens, a CUDA-graph capture).
"""

import pytest
import torch

from sparseattn.decode_methods import double_sparsity as ds_mod
from sparseattn.decode_methods import get_decode_method
from sparseattn.kernels.label_score_triton import label_scores_triton

from ..conftest import HAS_CUDA, requires_cuda
from ..kernels.test_decode import make_cache, make_q

DEVICE = "cuda" if HAS_CUDA else "cpu"
F32 = torch.float32
LENGTHS = [3, 16, 37, 90]  # ragged; 16 = one full page at P = 16
D = 16


def ds(**kw):
    kw = {"dense_below": 0, "dense_layers": (), **kw}
    return get_decode_method("double_sparsity", **kw)


def random_table(heads, d=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(d, generator=g) for _ in range(heads)]).unsqueeze(0)  # [1, heads, d]


def scores_both(monkeypatch, method, q, cache, layer=0):
    """(Triton, PyTorch) ``token_scores`` of ``method`` for the same inputs."""
    monkeypatch.setattr(ds_mod, "use_triton_estimator", lambda x: True)
    got = method.token_scores(q, cache, layer)
    monkeypatch.setattr(ds_mod, "use_triton_estimator", lambda x: False)
    want = method.token_scores(q, cache, layer)
    monkeypatch.undo()
    return got, want


def select_both(monkeypatch, method, q, cache, layer=0):
    monkeypatch.setattr(ds_mod, "use_triton_estimator", lambda x: True)
    got = method.select(q, cache, layer)
    monkeypatch.setattr(ds_mod, "use_triton_estimator", lambda x: False)
    want = method.select(q, cache, layer)
    monkeypatch.undo()
    return got, want


def assert_same_tokens(got, want, lengths):
    got.validate(lengths)
    assert got.tokens.shape == want.tokens.shape
    assert torch.equal(got.token_counts.cpu(), want.token_counts.cpu())
    assert torch.equal(got.tokens.cpu(), want.tokens.cpu())


# ----------------------------------------------------------------------------- scores and selections
CASES = [  # (policy, bits, Lq, Hq, Hkv, label heads "q"/"kv", page size, force_new_tokens)
    ("group_sum", 16, 1, 6, 2, "kv", 16, True),
    ("group_sum", 16, 2, 6, 2, "q", 4, True),
    ("group_sum", 16, 1, 2, 2, "q", 4, False),  # G = 1
    ("group_max", 16, 2, 6, 2, "kv", 4, False),  # the new tokens are candidates: causal masking matters
    ("group_max", 8, 1, 2, 2, "kv", 16, True),
    ("per_q_head", 16, 1, 6, 2, "q", 16, True),
    ("per_q_head", 8, 2, 6, 2, "kv", 4, False),
    ("group_sum", 8, 2, 6, 2, "q", 16, False),
    ("group_sum", 4, 1, 6, 2, "kv", 4, True),
    ("group_max", 4, 2, 6, 2, "q", 16, True),
    ("per_q_head", 4, 2, 3, 1, "q", 4, True),
]


@pytest.mark.parametrize("policy,bits,Lq,Hq,Hkv,heads,P,force_new", CASES)
def test_scores_and_selection_match_pytorch(monkeypatch, policy, bits, Lq, Hq, Hkv, heads, P, force_new):
    cache = make_cache(len(LENGTHS), Hkv, D, LENGTHS, dtype=F32, page_size=P)
    q = make_q(len(LENGTHS), Hq, Lq, D, F32)
    m = ds(channels=random_table(Hq if heads == "q" else Hkv), r=6, token_budget=12, gqa_policy=policy,
           label_bits=bits, force_new_tokens=force_new)
    got, want = scores_both(monkeypatch, m, q, cache)
    G = Hq // Hkv
    N = cache.max_pages * P
    assert got.dtype == F32 and got.shape == ((len(LENGTHS), Hkv, G, N) if policy == "per_q_head"
                                              else (len(LENGTHS), Hkv, N))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # -inf at the same places
    sel, ref = select_both(monkeypatch, m, q, cache)
    assert_same_tokens(sel, ref, cache.layer_lengths(0))


def test_bf16_cache_and_channel_fallback(monkeypatch):
    # bf16 labels (exact in fp32) times fp32 query labels: only the summation order differs.
    lengths = [70, 203]
    cache = make_cache(2, 2, 32, lengths, dtype=torch.bfloat16)
    q = make_q(2, 6, 1, 32, torch.bfloat16)
    m = ds(r=8, token_budget=24)  # no table: the k-rule channels, one label cache per KV head
    got, want = scores_both(monkeypatch, m, q, cache)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    sel, ref = select_both(monkeypatch, m, q, cache)
    assert_same_tokens(sel, ref, cache.layer_lengths(0))


def test_one_page_and_budget_above_candidates(monkeypatch):
    cache = make_cache(2, 1, D, [5, 2], dtype=F32)  # one page (P = 16)
    q = make_q(2, 3, 2, D, F32)
    for policy in ("group_sum", "per_q_head"):
        m = ds(channels=random_table(1), r=4, token_budget=40, gqa_policy=policy)
        got, want = scores_both(monkeypatch, m, q, cache)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        sel, ref = select_both(monkeypatch, m, q, cache)
        assert_same_tokens(sel, ref, cache.layer_lengths(0))
        assert sel.token_counts.cpu().tolist() == [[5], [2]]


# ----------------------------------------------------------------------------- the kernel alone
@pytest.mark.parametrize("bits", [16, 8, 4])
def test_kernel_permuted_page_table_and_strided_queries(monkeypatch, bits):
    # The pool's physical pages shuffled and the table rewritten to match: the same scores.
    # r = 5 (16/8 bits): channels padded to the tile; small tiles: several tiles and runs per row.
    lengths = [37, 90, 1]
    r = 6 if bits == 4 else 5
    cache = make_cache(3, 2, D, lengths, dtype=F32, page_size=4)
    q = make_q(3, 6, 2, D, F32)
    m = ds(channels=random_table(2), r=r, token_budget=8, label_bits=bits, gqa_policy="group_max")
    _, want = scores_both(monkeypatch, m, q, cache)
    st = m.state(cache, 0)
    pool = st["pool"]
    cap = next(iter(pool.values())).shape[0]
    perm = torch.randperm(cap, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    shuffled = {name: torch.empty_like(t).index_copy_(0, perm, t) for name, t in pool.items()}  # page i -> perm[i]
    table = perm.to(torch.int32)[cache.page_table.long()]
    qlab = m._query_labels(q, st["channels"], F32).view(3, 6, 2, r)
    qlab = qlab.transpose(1, 2).contiguous().transpose(1, 2)  # strided [B, Hq, Lq, r]
    got = label_scores_triton(qlab, shuffled["labels" if bits == 16 else "codes"], table, cache.layer_lengths(0),
                              page_size=4, num_kv_heads=2, label_bits=bits, lo=shuffled.get("lo"),
                              step=shuffled.get("step"), gqa_policy="group_max", n_forced=2, scale=r ** -0.5,
                              block_t=16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_no_host_reads(monkeypatch):
    cache = make_cache(3, 2, D, [37, 90, 60], dtype=F32)
    q = make_q(3, 6, 2, D, F32)
    m = ds(channels=random_table(6), r=6, token_budget=10, label_bits=4, gqa_policy="per_q_head")
    monkeypatch.setattr(ds_mod, "use_triton_estimator", lambda x: True)
    m.select(q, cache, 0)  # the first call resolves the channels (a host table read) and labels the pages

    def forbid(*a, **k):
        raise AssertionError("host read while selecting")

    for attr in ("item", "tolist", "__bool__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, attr, forbid)
    sel = m.select(q, cache, 0)
    monkeypatch.undo()
    sel.validate(cache.layer_lengths(0))


def test_bad_inputs_raise():
    cache = make_cache(2, 2, D, [40, 9], dtype=F32)
    qlab = torch.randn(2, 4, 1, 6, device=DEVICE)
    labels = torch.zeros(cache.capacity, 2, 16, 6, device=DEVICE)
    codes = torch.zeros(cache.capacity, 2, 16, 3, dtype=torch.uint8, device=DEVICE)
    args = (cache.page_table, cache.layer_lengths(0))
    kw = dict(page_size=16, num_kv_heads=2)
    with pytest.raises(ValueError, match="qlab"):
        label_scores_triton(qlab[0], labels, *args, **kw)
    with pytest.raises(ValueError, match="16-bit labels"):
        label_scores_triton(qlab, codes, *args, **kw)
    with pytest.raises(ValueError, match="lo must be"):
        label_scores_triton(qlab, codes, *args, label_bits=4, **kw)
    with pytest.raises(ValueError, match="columns"):
        label_scores_triton(qlab, labels[..., :4], *args, **kw)
    with pytest.raises(ValueError, match="Hkv"):
        label_scores_triton(qlab, labels, *args, page_size=16, num_kv_heads=3)
    with pytest.raises(ValueError, match="page_size"):
        label_scores_triton(qlab, labels, *args, page_size=8, num_kv_heads=2)
    with pytest.raises(ValueError, match="gqa_policy"):
        label_scores_triton(qlab, labels, *args, gqa_policy="mean", **kw)
    with pytest.raises(ValueError, match="label_bits"):
        label_scores_triton(qlab, labels, *args, label_bits=2, **kw)
    with pytest.raises(ValueError, match="page_table"):
        label_scores_triton(qlab, labels, cache.page_table.long(), args[1], **kw)
    with pytest.raises(ValueError, match="lengths"):
        label_scores_triton(qlab, labels, args[0], args[1][:1], **kw)
    with pytest.raises(ValueError, match="n_forced"):
        label_scores_triton(qlab, labels, *args, n_forced=-1, **kw)


# ----------------------------------------------------------------------------- GPU twins
def _big_case(bits, policy, Lq=1, heads="kv"):
    B, Hq, Hkv, Dh = 2, 32, 8, 128
    lengths = [4096, 3001]
    cache = make_cache(B, Hkv, Dh, lengths, dtype=torch.bfloat16, layers=3)
    q = make_q(B, Hq, Lq, Dh, torch.bfloat16)
    table = random_table(Hq if heads == "q" else Hkv, Dh).expand(3, -1, -1)
    m = get_decode_method("double_sparsity", channels=table, token_budget=1024, label_bits=bits, gqa_policy=policy,
                          dense_below=0)
    return cache, q, m


@requires_cuda
@pytest.mark.parametrize("bits,policy,Lq,heads", [(16, "group_sum", 1, "kv"), (8, "group_max", 2, "q"),
                                                  (4, "per_q_head", 1, "kv"), (16, "per_q_head", 2, "q")])
def test_cuda_bf16_large_scores_and_selection(monkeypatch, bits, policy, Lq, heads):
    cache, q, m = _big_case(bits, policy, Lq, heads)
    got, want = scores_both(monkeypatch, m, q, cache, 2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # fp32 products either way
    sel, ref = select_both(monkeypatch, m, q, cache, 2)
    L = cache.layer_lengths(2)
    sel.validate(L)
    assert torch.equal(sel.token_counts, ref.token_counts)
    # Sums in another order may swap scores equal to ~1e-6: nearly all tokens agree.
    overlap = (sel.token_mask(L) & ref.token_mask(L)).sum() / ref.token_mask(L).sum()
    assert overlap > 0.99


@requires_cuda
def test_cuda_graph_capture_and_replay(monkeypatch):
    cache, q, m = _big_case(16, "group_sum")
    monkeypatch.setattr(ds_mod, "use_triton_estimator", lambda x: True)  # even under SPARSEATTN_ESTIMATORS=torch
    eager = m.select(q, cache, 2)  # labels every page; the captured step has nothing new to label
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sel = m.select(q, cache, 2)
    graph.replay()
    torch.cuda.synchronize()
    assert_same_tokens(sel, eager, cache.layer_lengths(2))
    q.copy_(make_q(2, 32, 1, 128, torch.bfloat16, seed=7))  # new queries, same buffers: replay follows them
    graph.replay()
    torch.cuda.synchronize()
    assert_same_tokens(sel, m.select(q, cache, 2), cache.layer_lengths(2))
