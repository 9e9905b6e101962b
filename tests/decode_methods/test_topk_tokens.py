"""The top-k token selection (``decode_methods.base.topk_token_selection`` + the Triton assembly in
``kernels/topk_tokens_triton.py``) against ``rank_mask`` + ``DecodeSelection.from_token_mask``.

The helper alone on tie-free random scores (ragged batch, H = 1 and 3, unions over G = 2 query
heads, k above the candidate count, k = 0, forced sinks/tails apart or overlapping, -inf inside the
candidates), its tie-exact mode on scores full of ties, and each of the five methods that use it
(TokenSelect, TidalDecode, DELTA - page level, through ``top_pages_selection`` -, Recycled
Attention, Double Sparsity): the selection with ``use_triton_estimator`` forced on in the method's
module equals the PyTorch path's on random float32 caches (Lq 1 and 2, GQA groups 1 and 3). On
the CPU the kernel runs in the Triton interpreter; the ``requires_cuda`` tests are the GPU twins
(bf16, 32/8/128, 4K tokens) and a CUDA-graph capture of the steps.
"""

import pytest
import torch

from sparseattn.decode_api import DecodeSelection
from sparseattn.decode_methods import delta as delta_mod
from sparseattn.decode_methods import double_sparsity as ds_mod
from sparseattn.decode_methods import get_decode_method
from sparseattn.decode_methods import recycled as recycled_mod
from sparseattn.decode_methods import tidaldecode as tidal_mod
from sparseattn.decode_methods import tokenselect as tokenselect_mod
from sparseattn.decode_methods.base import topk_positions, topk_token_selection
from sparseattn.kernels.topk_tokens_triton import assemble_token_selection
from sparseattn.methods.base import rank_mask

from ..conftest import HAS_CUDA, requires_cuda
from ..kernels.test_decode import make_cache, make_q

DEVICE = "cuda" if HAS_CUDA else "cpu"
NEG = float("-inf")


# ----------------------------------------------------------------------------- references
def windows(lengths, N, sink, forced_last):
    """bool ``[B, 1, N]`` (candidates, forced) as the helper defines them."""
    j = torch.arange(N, device=lengths.device).view(1, 1, -1)
    n = lengths.long().view(-1, 1, 1)
    r0 = (n - forced_last).clamp(min=0)
    s0 = r0.clamp(max=sink)
    return (j >= s0) & (j < r0), ((j < s0) | (j >= r0)) & (j < n)


def reference(score, k, lengths, *, sink=0, forced_last=0, width=None, page_size=4):
    """``rank_mask`` (stable: ties to the lower position) + ``from_token_mask``, the methods' PyTorch way."""
    N = score.shape[-1]
    cand, forced = windows(lengths, N, sink, forced_last)
    G = score.shape[2] if score.dim() == 4 else 1
    if width is None:
        width = max(1, min(N, sink + G * k + forced_last))
    n = torch.full(score.shape[:-1], k, dtype=torch.long, device=score.device)
    if score.dim() == 4:
        keep = (rank_mask(score, n) & cand.unsqueeze(2) & (score > NEG)).any(2)
    else:
        keep = rank_mask(score, n) & cand & (score > NEG)
    return DecodeSelection.from_token_mask(keep | forced, page_size=page_size, max_tokens=width)


def tie_free(shape, lengths, sink, forced_last, seed=0, holes=0.0):
    """Distinct scores per row (a random permutation), -inf outside the candidates (and at a
    fraction ``holes`` of them)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.argsort(torch.rand(shape, generator=g), -1).float()
    if holes:
        s = s.masked_fill(torch.rand(shape, generator=g) < holes, NEG)
    s = s.to(lengths.device)
    cand, _ = windows(lengths, shape[-1], sink, forced_last)
    if len(shape) == 4:
        cand = cand.unsqueeze(2)
    return torch.where(cand, s, torch.full_like(s, NEG))


def assert_same(got, want):
    for name in ("page_counts", "pages", "token_counts", "tokens"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.shape == b.shape, (name, a.shape, b.shape)
            assert torch.equal(a.cpu(), b.cpu()), (name, a, b)
    assert got.page_size == want.page_size


# ----------------------------------------------------------------------------- the helper
@pytest.mark.parametrize("H,G", [(1, None), (3, None), (3, 2)])
@pytest.mark.parametrize("k", [0, 5, 40, 500])
@pytest.mark.parametrize("sink,forced_last", [(0, 0), (4, 7), (30, 25), (0, 1)])
def test_helper_matches_rank_mask(H, G, k, sink, forced_last):
    # Ragged: 1 token (everything forced or nothing), 37 (sink and tail overlap at (30, 25)), 203;
    # N = 212 > every length, as a cache's max_pages * page_size. k = 500: more than the candidates.
    lengths = torch.tensor([37, 1, 203], dtype=torch.int32, device=DEVICE)
    shape = (3, H, G, 212) if G else (3, H, 212)
    score = tie_free(shape, lengths, sink, forced_last, seed=k + sink)
    got = topk_token_selection(score, k, lengths=lengths, page_size=4, sink=sink, forced_last=forced_last)
    got.validate(lengths)
    assert_same(got, reference(score, k, lengths, sink=sink, forced_last=forced_last))


def test_helper_drops_neg_inf_picks_and_keeps_widths():
    # Candidates with -inf scores are never read, even when k exceeds the finite candidates; an
    # explicit width pads with zeros; int64 lengths; one-token sequences in a one-position cache.
    lengths = torch.tensor([150, 90], dtype=torch.int64, device=DEVICE)
    score = tie_free((2, 3, 2, 160), lengths, 3, 2, seed=3, holes=0.6)
    for k in (10, 100):
        got = topk_token_selection(score, k, lengths=lengths, page_size=4, sink=3, forced_last=2, width=300)
        assert_same(got, reference(score, k, lengths, sink=3, forced_last=2, width=300))
    one = torch.ones(2, dtype=torch.int32, device=DEVICE)
    score = torch.full((2, 1, 1), NEG, device=DEVICE)
    for fl in (0, 1):
        got = topk_token_selection(score, 4, lengths=one, page_size=4, forced_last=fl)
        assert_same(got, reference(score, 4, one, forced_last=fl))


def test_assembly_carries_across_chunks_and_merges_duplicates():
    # 16-entry steps: the running count and the duplicate check cross chunk edges.
    B, H, n_keys, N = 2, 2, 70, 100
    lengths = torch.tensor([100, 61], dtype=torch.int32, device=DEVICE)
    g = torch.Generator().manual_seed(1)
    keys = torch.randint(0, N + 1, (B, H, n_keys), generator=g).to(torch.int32).sort(-1).values.to(DEVICE)
    counts, tokens = assemble_token_selection(keys, lengths, width=90, sink=5, forced_last=9, block=16)
    cand, forced = windows(lengths, N + 1, 5, 9)
    mask = torch.zeros(B, H, N + 1, dtype=torch.bool, device=DEVICE).scatter_(-1, keys.long(), True)
    want = DecodeSelection.from_token_mask(((mask & cand) | forced)[..., :N], page_size=1, max_tokens=90)
    assert torch.equal(counts, want.token_counts) and torch.equal(tokens, want.tokens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_stable_ties_match_rank_mask_on_tied_scores(dtype):
    # Few distinct values (negative ones and zeros too): ties everywhere, also at the budget's edge.
    lengths = torch.tensor([120, 57], dtype=torch.int32, device=DEVICE)
    g = torch.Generator().manual_seed(2)
    raw = (torch.randint(-3, 4, (2, 3, 128), generator=g).float() * 0.5).to(dtype).to(DEVICE)
    raw = torch.where(raw == 0, -raw, raw)  # some -0.0: equal to +0.0, also a tie
    cand, _ = windows(lengths, 128, 2, 3)
    score = torch.where(cand, raw, torch.full_like(raw, NEG))
    for k in (1, 13, 60):
        got = topk_token_selection(score, k, lengths=lengths, page_size=4, sink=2, forced_last=3, stable_ties=True)
        assert_same(got, reference(score, k, lengths, sink=2, forced_last=3))
    # topk_positions alone: -inf, +inf and NaN.
    row = torch.tensor([[1.0, NEG, float("inf"), float("nan"), 1.0, -0.0, 0.0]], device=DEVICE)
    assert sorted(topk_positions(row, 7, stable_ties=True).tolist()[0]) == [0, 2, 4, 5, 6, 7, 7]
    # NaN ranks first, as in torch.topk, and then reads as dropped; of the two 1.0, position 0 wins.
    assert sorted(topk_positions(row, 3, stable_ties=True).tolist()[0]) == [0, 2, 7]


def test_plain_topk_on_ties_gives_a_valid_selection_of_equal_scores():
    lengths = torch.tensor([200, 150], dtype=torch.int32, device=DEVICE)
    score = torch.zeros(2, 2, 200, device=DEVICE)
    cand, _ = windows(lengths, 200, 0, 1)
    score = torch.where(cand, score, torch.full_like(score, NEG))
    got = topk_token_selection(score, 20, lengths=lengths, page_size=4, forced_last=1)
    got.validate(lengths)
    want = reference(score, 20, lengths, forced_last=1)
    assert torch.equal(got.token_counts, want.token_counts)  # same size; which tied tokens may differ


def test_helper_input_checks():
    lengths = torch.tensor([5], dtype=torch.int32, device=DEVICE)
    s = torch.zeros(1, 1, 5, device=DEVICE)
    with pytest.raises(ValueError, match="score must be a float"):
        topk_token_selection(s[0], 2, lengths=lengths, page_size=4)
    with pytest.raises(ValueError, match="score must be a float"):
        topk_token_selection(s.long(), 2, lengths=lengths, page_size=4)
    with pytest.raises(ValueError, match="lengths must be"):
        topk_token_selection(s, 2, lengths=lengths.view(1, 1), page_size=4)
    with pytest.raises(ValueError, match="k must be"):
        topk_token_selection(s, -1, lengths=lengths, page_size=4)
    with pytest.raises(ValueError, match="width must be"):
        topk_token_selection(s, 1, lengths=lengths, page_size=4, width=0)
    with pytest.raises(ValueError, match="keys must be an int32"):
        assemble_token_selection(torch.zeros(1, 1, 3, device=DEVICE), lengths, width=4)
    with pytest.raises(ValueError, match="block must be a power of two"):
        assemble_token_selection(torch.zeros(1, 1, 3, dtype=torch.int32, device=DEVICE), lengths, width=4, block=24)
    empty = topk_token_selection(torch.zeros(0, 2, 5, device=DEVICE), 2, page_size=4,
                                 lengths=torch.zeros(0, dtype=torch.int32, device=DEVICE))
    assert empty.tokens.shape == (0, 2, 2)


# ----------------------------------------------------------------------------- the five methods
LENGTHS = [23, 90]


def both_paths(monkeypatch, module, fn):
    """(new path, PyTorch path) of ``fn()`` with ``use_triton_estimator`` forced in ``module`` only
    (the scores come from the same PyTorch code both times)."""
    monkeypatch.setattr(module, "use_triton_estimator", lambda x: True)
    got = fn()
    monkeypatch.setattr(module, "use_triton_estimator", lambda x: False)
    want = fn()
    monkeypatch.undo()
    return got, want


def setup(Lq, G, P=4, seed=0):
    cache = make_cache(len(LENGTHS), 2, 16, LENGTHS, dtype=torch.float32, page_size=P, seed=seed)
    return cache, make_q(len(LENGTHS), 2 * G, Lq, 16, torch.float32, seed=seed + 1)


@pytest.mark.parametrize("Lq", [1, 2])
@pytest.mark.parametrize("G", [1, 3])
def test_tidaldecode(monkeypatch, Lq, G):
    cache, q = setup(Lq, G)
    for policy in ("group_max", "group_sum", "per_q_head"):
        for budget in (9, 300):
            m = get_decode_method("tidaldecode", token_budget=budget, gqa_policy=policy, selection_layers=(0,),
                                  dense_layers=())
            got, want = both_paths(monkeypatch, tidal_mod, lambda: m.choose(q, cache, 0))
            got.validate(cache.layer_lengths(0))
            assert_same(got, want)


@pytest.mark.parametrize("Lq", [1, 2])
@pytest.mark.parametrize("G", [1, 3])
def test_tokenselect(monkeypatch, Lq, G):
    cache, q = setup(Lq, G)
    for kw in (dict(n_init=3, n_local=5, top_k=7), dict(n_init=3, n_local=5, top_k=7, kernel_size=3),
               dict(n_init=30, n_local=9, top_k=0), dict(n_init=0, n_local=1, top_k=500, kernel_size=4)):
        m = get_decode_method("tokenselect", **kw)
        got, want = both_paths(monkeypatch, tokenselect_mod, lambda: m.select(q, cache, 0))
        got.validate(cache.layer_lengths(0))
        assert_same(got, want)


@pytest.mark.parametrize("kernel_size", [-1, 3])
def test_tokenselect_selection_cache(monkeypatch, kernel_size):
    # The cache path keeps its masks; only the sort became a (radix) top-k. Two method objects, one
    # per path, see the same queries (a repeat hits the cache, a new one misses). Max-pooling makes
    # plateaus of tied votes: the radix select breaks them like the sort.
    cache, _ = setup(1, 2)
    kw = dict(n_init=3, n_local=5, top_k=7, selection_cache=True, similarity_threshold=0.5, kernel_size=kernel_size)
    new, old = get_decode_method("tokenselect", **kw), get_decode_method("tokenselect", **kw)
    for seed in (5, 5, 6, 6):
        q = make_q(len(LENGTHS), 4, 1, 16, torch.float32, seed=seed)
        got, want = both_paths(monkeypatch, tokenselect_mod,
                               lambda: (new if tokenselect_mod.use_triton_estimator(q) else old).select(q, cache, 0))
        assert_same(got, want)
        assert torch.equal(new.state(cache, 0)["reused"], old.state(cache, 0)["reused"])


@pytest.mark.parametrize("Lq", [1, 2])
@pytest.mark.parametrize("G", [1, 3])
def test_double_sparsity(monkeypatch, Lq, G):
    cache, q = setup(Lq, G)
    for policy in ("group_sum", "group_max", "per_q_head"):
        for budget, force in ((9, True), (40, False), (300, True)):
            m = get_decode_method("double_sparsity", token_budget=budget, gqa_policy=policy, force_new_tokens=force,
                                  r=8, dense_layers=(), dense_below=0)
            got, want = both_paths(monkeypatch, ds_mod, lambda: m.select(q, cache, 0))
            got.validate(cache.layer_lengths(0))
            assert_same(got, want)


@pytest.mark.parametrize("Lq", [1, 2])
@pytest.mark.parametrize("G", [1, 3])
def test_delta(monkeypatch, Lq, G):
    cache, q = setup(Lq, G)
    for budget, recent in ((5, 0), (5, 1), (6, 3), (40, 2)):
        m = get_decode_method("delta", page_budget=budget, recent_pages=recent, dense_layers=(), delta_layers=(0,))
        got, want = both_paths(monkeypatch, delta_mod, lambda: m.choose(q, cache, 0))
        got.validate(cache.layer_lengths(0))
        assert_same(got, want)


@pytest.mark.parametrize("Lq", [1, 2])
@pytest.mark.parametrize("G", [1, 3])
def test_recycled(monkeypatch, Lq, G):
    # A full step (the refresh), then a recycle step that reads the stored set.
    cache, q = setup(Lq, G)
    for policy in ("group_max", "group_sum", "first_head"):
        for k in (6, 300):
            m = get_decode_method("recycled", top_k=k, stride=2, gqa_policy=policy)

            def run():
                cache.method_state.clear()
                assert m.select(q, cache, 0) is None
                st = m.state(cache, 0)
                return (st["tokens"].clone(), st["counts"].clone()), m.select(q, cache, 0)

            (got_t, got_sel), (want_t, want_sel) = both_paths(monkeypatch, recycled_mod, run)
            assert torch.equal(got_t[0], want_t[0]) and torch.equal(got_t[1], want_t[1])
            assert_same(got_sel, want_sel)


# ----------------------------------------------------------------------------- GPU twins
def overlap(got, want, lengths):
    a, b = got.token_mask(lengths), want.token_mask(lengths)
    return (a & b).sum().item() / max(b.sum().item(), 1)


@requires_cuda
def test_cuda_helper_equals_cpu_oracle():
    B, H, G, N, k = 2, 8, 4, 4096, 512
    lengths = torch.tensor([4096, 3001], dtype=torch.int32, device="cuda")
    for shape in ((B, H, N), (B, H, G, N)):
        score = tie_free(shape, lengths, 64, 129, seed=7).cuda()
        got = topk_token_selection(score, k, lengths=lengths, page_size=16, sink=64, forced_last=129)
        got.validate(lengths)
        assert_same(got, reference(score.cpu(), k, lengths.cpu(), sink=64, forced_last=129, page_size=16))


def cuda_methods():
    return [(tidal_mod, "tidaldecode", dict(token_budget=256, selection_layers=(0,), dense_layers=()), "choose"),
            (tidal_mod, "tidaldecode", dict(token_budget=256, gqa_policy="per_q_head", selection_layers=(0,),
                                            dense_layers=()), "choose"),
            (tokenselect_mod, "tokenselect", dict(n_init=64, n_local=256, top_k=1024), "select"),
            (tokenselect_mod, "tokenselect", dict(n_init=64, n_local=256, top_k=1024, kernel_size=5), "select"),
            (ds_mod, "double_sparsity", dict(token_budget=256, dense_layers=(), dense_below=0), "select"),
            (delta_mod, "delta", dict(page_budget=32, recent_pages=4, dense_layers=(), delta_layers=(0,)), "choose")]


@requires_cuda
@pytest.mark.parametrize("Lq", [1, 2])
def test_cuda_methods_bf16_match_the_pytorch_selection(monkeypatch, Lq):
    # bf16, 32/8/128, 4K tokens, B = 2. Both paths rank the same fp32 scores (exact_probs' kernel,
    # the label scores, ...), so they differ only where scores tie at the budget's edge: fp32
    # probabilities of bf16 products rarely do, so we ask for the same counts and >= 99 % of the
    # tokens (exact equality is expected; pooled TokenSelect breaks ties exactly).
    lengths = [4096, 3001]
    cache = make_cache(2, 8, 128, lengths, dtype=torch.bfloat16, page_size=16)
    q = make_q(2, 32, Lq, 128, torch.bfloat16)
    lens = cache.layer_lengths(0)
    for module, name, kw, fn in cuda_methods():
        m = get_decode_method(name, **kw)
        got, want = both_paths(monkeypatch, module, lambda: getattr(m, fn)(q, cache, 0))
        got.validate(lens)
        if got.tokens is not None:
            assert torch.equal(got.token_counts, want.token_counts), name
        else:
            assert torch.equal(got.page_counts, want.page_counts), name
        assert overlap(got, want, lens) >= 0.99, name
    rec = get_decode_method("recycled", top_k=1024, stride=2)
    got, want = both_paths(monkeypatch, recycled_mod,
                           lambda: (cache.method_state.clear(), rec.select(q, cache, 0), rec.select(q, cache, 0))[2])
    assert torch.equal(got.token_counts, want.token_counts) and overlap(got, want, lens) >= 0.99


@requires_cuda
def test_cuda_graph_captures_the_selection_step():
    # Capture each step once, replay it on new queries: equal to the eager selection of those.
    lengths = [4096, 3001]
    cache = make_cache(2, 8, 128, lengths, dtype=torch.bfloat16, page_size=16)
    q = make_q(2, 32, 1, 128, torch.bfloat16)
    q2 = make_q(2, 32, 1, 128, torch.bfloat16, seed=9)
    for _, name, kw, fn in cuda_methods():
        m = get_decode_method(name, **kw)
        step = getattr(m, fn)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compiles the kernels, fills lazy state (labels)
            step(q, cache, 0)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            sel = step(q, cache, 0)
        q.copy_(q2)
        graph.replay()
        want = step(q2, cache, 0)
        torch.cuda.synchronize()
        assert_same(sel, want)
        q.copy_(make_q(2, 32, 1, 128, torch.bfloat16))
