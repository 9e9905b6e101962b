"""Kept-token lists of the eviction methods (h2o, tova, snapkv, pyramidkv): the O(kept) selection
must read exactly what the N-wide keep mask says, step after step.

The oracle is the mask path as it was: a subclass whose ``_prepare`` ORs the new tokens into the
mask over its whole width and whose ``_selection`` recompacts the mask
(``DecodeSelection.from_token_mask``). Both run side by side on one cache over 20+ steps (ragged
batch, Lq 1 and 2, GQA groups 1 and 3, budgets that evict and budgets that do not), through the
PyTorch list updates and through the Triton ones (the interpreter here). The two list kernels are
also compared with their PyTorch twins directly. The CUDA twins capture one step of each method in
a CUDA graph and replay it over later steps against eager steps.
"""

import pytest
import torch

from sparseattn.cache import PagedKVCache
from sparseattn.decode_api import DecodeSelection, sparse_decode_attention
from sparseattn.decode_methods import eviction
from sparseattn.decode_methods.eviction import admit_tokens, drop_evicted
from sparseattn.methods.registry import get_method

from ..conftest import HAS_CUDA, requires_cuda

# The kernel-vs-PyTorch tests: interpreter on CPU tensors without CUDA, compiled on CUDA tensors with it.
KDEV = "cuda" if HAS_CUDA else "cpu"

F64 = torch.float64


# ----------------------------------------------------------------------------- the oracle
class MaskOracle:
    """The selection before the lists: new tokens OR-ed into the whole mask, the mask recompacted."""

    _score_from_list = False  # score over the mask (``_observe``): no list anywhere

    def _prepare(self, cache, layer):
        st = self.state(cache, layer)
        B, H = cache.batch, cache.num_kv_heads
        N = cache.max_pages * cache.page_size
        dev = cache.device
        if "keep" not in st:
            st["keep"] = torch.zeros(B, H, N, dtype=torch.bool, device=dev)
            st["seen"] = torch.zeros(B, 1, dtype=torch.long, device=dev)
            st["seen_host"] = [0] * B
            st["bound"] = [0] * B
            self._init_state(st, cache, layer)
        self._width(st, N)
        lengths = cache.layer_lengths(layer).long()
        pos = torch.arange(st["keep"].shape[-1], device=dev).view(1, -1)
        fresh = (pos >= st["seen"].view(-1, 1)) & (pos < lengths.view(-1, 1))
        st["keep"] |= fresh.unsqueeze(1)
        st["seen"] = lengths.view(-1, 1).clone()
        host = cache.host_lengths(layer)
        st["bound"] = [min(n, b + n - s) for n, b, s in zip(host, st["bound"], st["seen_host"])]
        st["seen_host"] = host
        return st

    def _selection(self, st, cache, snapshot=False):
        N = cache.max_pages * cache.page_size
        width = max(1, min(N, max(st["bound"], default=1)))
        return DecodeSelection.from_token_mask(st["keep"][..., :N], page_size=cache.page_size, max_tokens=width)


def pair(name, cfg):
    """(the method, its mask oracle) with one configuration."""
    method = get_method(name, kind="decode", **cfg)
    oracle_cls = type(f"MaskOracle_{type(method).__name__}", (MaskOracle, type(method)), {})
    return method, oracle_cls(**cfg)


def list_matches_mask(method, cache, layer):
    """The state's list holds exactly the mask's tokens, ascending."""
    st = method.state(cache, layer)
    if "tokens" not in st:
        return
    N = cache.max_pages * cache.page_size
    keep, toks, cnt = st["keep"][..., :N].cpu(), st["tokens"].cpu(), st["count"].cpu()
    for b in range(keep.shape[0]):
        for h in range(keep.shape[1]):
            want = torch.nonzero(keep[b, h]).flatten().tolist()
            assert toks[b, h, :int(cnt[b, h])].tolist() == want, (b, h)


@pytest.fixture
def list_backend(request, monkeypatch):
    """Run the list updates through PyTorch or through the Triton kernels (interpreter on CPU); the
    scoring (kept_attention) keeps its own dispatch."""
    if request.param == "triton":
        orig = eviction.use_triton_estimator
        monkeypatch.setattr(eviction, "use_triton_estimator", lambda x: x.dtype == torch.bool or orig(x))
    elif HAS_CUDA:
        monkeypatch.setenv("SPARSEATTN_ESTIMATORS", "torch")
    return request.param


def run_side_by_side(name, cfg, *, Hq, Hkv, Lq, steps=22, prompts=(37, 20, 9), D=8, P=4, layers=1,
                     prefill=True, seed=0, turn_at=None):
    method, oracle = pair(name, cfg)
    dev = "cuda" if HAS_CUDA else "cpu"
    g = torch.Generator().manual_seed(seed)
    B, T = len(prompts), max(prompts)
    cache = PagedKVCache(layers, Hkv, D, page_size=P, dtype=F64, device=dev, max_batch=B, initial_pages=2)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=F64).to(dev)

    for layer in range(layers):
        cache.append(layer, rand(B, Hkv, T, D), rand(B, Hkv, T, D), seq_lens=list(prompts))
        if prefill:
            q = rand(B, Hq, T, D)
            method.on_prefill(q, cache, layer)
            oracle.on_prefill(q, cache, layer)
            assert torch.equal(method.kept(cache, layer), oracle.kept(cache, layer))
    evicted = False
    for t in range(steps):
        if t == turn_at:  # a second prompt chunk (another turn) once the lists exist
            for layer in range(layers):
                cache.append(layer, rand(B, Hkv, 8, D), rand(B, Hkv, 8, D))
                q = rand(B, Hq, 8, D)
                method.on_prefill(q, cache, layer)
                oracle.on_prefill(q, cache, layer)
                assert torch.equal(method.kept(cache, layer), oracle.kept(cache, layer))
                list_matches_mask(method, cache, layer)
        for layer in range(layers):
            cache.append(layer, rand(B, Hkv, Lq, D), rand(B, Hkv, Lq, D))
            q = rand(B, Hq, Lq, D)
            sel, ref = method.select(q, cache, layer), oracle.select(q, cache, layer)
            if ref is None:
                assert sel is None
                continue
            lengths = cache.layer_lengths(layer)
            n = cache.max_length(layer)
            sel.validate(lengths)  # ascending, in range
            assert int(sel.token_counts.max()) <= sel.max_tokens
            assert torch.equal(sel.token_mask(lengths, n), ref.token_mask(lengths, n))
            out = sparse_decode_attention(q, cache, layer, sel, backend="reference")
            want = sparse_decode_attention(q, cache, layer, ref, backend="reference")
            torch.testing.assert_close(out, want, rtol=0, atol=1e-13)
            kept = method.kept(cache, layer)
            assert torch.equal(kept, oracle.kept(cache, layer))
            list_matches_mask(method, cache, layer)
            evicted |= bool((kept.sum(-1) < lengths.view(-1, 1)).any())
    return evicted


GQA = [(2, 2), (6, 2)]  # groups of 1 and 3
EVICTING = [("h2o", dict(hh_size=3, recent_size=4)), ("h2o", dict(heavy_ratio=0.2, recent_ratio=0.1)),
            ("tova", dict(cache_size=7)),
            ("snapkv", dict(window_size=4, max_capacity_prompt=12, kernel_size=3)),
            ("pyramidkv", dict(window_size=4, max_capacity_prompt=12, kernel_size=3, pooling="maxpool", beta=4))]
KEEPING = [("h2o", dict(hh_size=200, recent_size=200)), ("tova", dict(cache_size=500)),
           ("snapkv", dict(window_size=4, max_capacity_prompt=300))]


# (the interpreter is slow: the Triton list updates run one GQA / Lq combination)
COMBOS = [(1, 2, 2, "torch"), (1, 6, 2, "torch"), (2, 2, 2, "torch"), (2, 6, 2, "torch"), (2, 6, 2, "triton")]
BACKENDS = pytest.mark.parametrize("list_backend", ["torch", "triton"], indirect=True)


@pytest.mark.parametrize("Lq,Hq,Hkv,list_backend", COMBOS, indirect=["list_backend"])
@pytest.mark.parametrize("name,cfg", EVICTING)
def test_lists_select_what_the_mask_says(name, cfg, Lq, Hq, Hkv, list_backend):
    layers = 2 if name == "pyramidkv" else 1  # per-layer budgets
    # (Lq = 2: a second prompt chunk half-way, which evicts from existing lists)
    assert run_side_by_side(name, cfg, Hq=Hq, Hkv=Hkv, Lq=Lq, layers=layers, turn_at=10 if Lq == 2 else None)


@BACKENDS
@pytest.mark.parametrize("name,cfg", KEEPING)
@pytest.mark.parametrize("Lq", [1, 2])
def test_lists_with_budgets_that_never_evict(name, cfg, Lq, list_backend):
    assert not run_side_by_side(name, cfg, Hq=6, Hkv=2, Lq=Lq, steps=20)


@BACKENDS
@pytest.mark.parametrize("name,cfg", [("h2o", dict(hh_size=3, recent_size=4)), ("tova", dict(cache_size=7)),
                                      ("snapkv", dict(window_size=4, max_capacity_prompt=12, kernel_size=3))])
def test_lists_without_prefill_hook_and_after_dense_steps(name, cfg, list_backend):
    # No prompt hook: the first select builds the list from the whole cache, then evicts.
    assert run_side_by_side(name, cfg, Hq=6, Hkv=2, Lq=1, prefill=False)
    # dense_below: dense steps admit tokens into the mask only; eviction (and the list) starts at 45.
    if name != "snapkv":
        assert run_side_by_side(name, dict(cfg, dense_below=45), Hq=6, Hkv=2, Lq=2, steps=20, seed=1)


def test_selection_width_and_list_room():
    method, _ = pair("snapkv", dict(window_size=4, max_capacity_prompt=12, kernel_size=3))
    dev = "cuda" if HAS_CUDA else "cpu"
    cache = PagedKVCache(1, 2, 8, page_size=16, dtype=F64, device=dev, max_batch=2)
    g = torch.Generator().manual_seed(0)
    cache.append(0, torch.randn(2, 2, 400, 8, generator=g, dtype=F64).to(dev),
                 torch.randn(2, 2, 400, 8, generator=g, dtype=F64).to(dev), seq_lens=[400, 300])
    method.on_prefill(torch.randn(2, 2, 400, 8, generator=g, dtype=F64).to(dev), cache, 0)
    for step in range(3):
        cache.append(0, torch.randn(2, 2, 1, 8, generator=g, dtype=F64).to(dev),
                     torch.randn(2, 2, 1, 8, generator=g, dtype=F64).to(dev))
        sel = method.select(torch.randn(2, 2, 1, 8, generator=g, dtype=F64).to(dev), cache, 0)
        assert sel.token_counts.cpu().tolist() == [[13 + step] * 2] * 2
        assert sel.max_tokens == 13 + step + eviction.SELECTION_SLACK  # the host bound + the graph slack
        st = method.state(cache, 0)
        assert st["tokens"].shape[-1] - 1 >= sel.max_tokens  # the list has room for the view


# ----------------------------------------------------------------------------- the two kernels
def random_lists(B, H, W, lengths, seen, seed, density=0.5):
    g = torch.Generator().manual_seed(seed)
    keep = (torch.rand(B, H, W, generator=g) < density) & (torch.arange(W) < seen.unsqueeze(-1))
    sel = DecodeSelection.from_token_mask(keep, page_size=1, max_tokens=W)
    return keep, torch.nn.functional.pad(sel.tokens, (0, 1)), sel.token_counts.clone()


def assert_lists_equal(a_tok, a_cnt, b_tok, b_cnt, keep=None):
    assert torch.equal(a_cnt, b_cnt)
    for b in range(a_cnt.shape[0]):
        for h in range(a_cnt.shape[1]):
            n = int(a_cnt[b, h])
            assert torch.equal(a_tok[b, h, :n], b_tok[b, h, :n]), (b, h)
            if keep is not None:
                assert a_tok[b, h, :n].tolist() == torch.nonzero(keep[b, h]).flatten().tolist(), (b, h)


@pytest.mark.parametrize("H", [1, 3])
@pytest.mark.parametrize("block", [16, 128])
def test_admit_kernel_equals_torch(H, block):
    # Rows with 0, 1, 2, 3 and a prompt's worth (several tiles) of new tokens; one row whose list is
    # full (the entries past its capacity are dropped, as a replay past the slack would).
    B, W = 4, 260
    lengths = torch.tensor([41, 200, 260, 3], dtype=torch.int32)
    seen = torch.tensor([40, 0, 258, 3]).view(B, 1).expand(B, H).contiguous()
    keep, tok, cnt = random_lists(B, H, W, lengths, seen, seed=H)
    tok = torch.cat([tok[..., :150], tok[..., -1:]], -1)  # capacity 150: row 1 overflows
    cnt = cnt.clamp(max=150)
    outs = []
    for use_triton in (False, True):
        k, s, t, c = (x.clone().to(KDEV) for x in (keep, seen, tok, cnt))
        admit_tokens(k, s, lengths.to(KDEV), 200, t, c, use_triton=use_triton, block=block)
        outs.append((k, s, t, c))
    (k0, s0, t0, c0), (k1, s1, t1, c1) = outs
    assert torch.equal(k0, k1) and torch.equal(s0, s1)
    assert torch.equal(s0.cpu(), lengths.long().view(B, 1).expand(B, H))
    assert torch.equal(c0, c1)
    for b in range(B):
        for h in range(H):
            n = min(int(c0[b, h]), 150)
            assert torch.equal(t0[b, h, :n], t1[b, h, :n])
            if b != 1:
                assert t0[b, h, :n].tolist() == torch.nonzero(k0[b, h]).flatten().tolist()
    # without a list: the mask alone
    k, s = keep.clone().to(KDEV), seen.clone().to(KDEV)
    admit_tokens(k, s, lengths.to(KDEV), 200, use_triton=True, block=block)
    assert torch.equal(k, k0) and torch.equal(s, s0)


@pytest.mark.parametrize("H", [1, 3])
@pytest.mark.parametrize("block,width", [(16, 150), (1024, 260), (32, 70)])
def test_drop_kernel_equals_torch(H, block, width):
    B, W = 3, 260
    lengths = torch.tensor([260, 100, 0], dtype=torch.int32)
    seen = lengths.long().view(B, 1).expand(B, H).contiguous()
    keep, tok, cnt = random_lists(B, H, W, lengths, seen, seed=7, density=0.6)
    cnt = cnt.clamp(max=width)  # the list's first `width` entries are the state
    g = torch.Generator().manual_seed(8)
    evicted = keep & (torch.rand(B, H, W, generator=g) < 0.7)
    outs = []
    for use_triton in (False, True):
        t, c = tok.clone().to(KDEV), cnt.clone().to(KDEV)
        drop_evicted(evicted.to(KDEV), t, c, width, use_triton=use_triton, block=block)
        outs.append((t, c))
    assert_lists_equal(*outs[0], *outs[1])
    for b in range(B):
        for h in range(H):
            listed = set(tok[b, h, :int(cnt[b, h])].tolist())
            want = sorted(j for j in listed if evicted[b, h, j])
            assert outs[0][0][b, h, :int(outs[0][1][b, h])].tolist() == want


def test_list_updates_check_inputs():
    keep = torch.zeros(2, 3, 10, dtype=torch.bool)
    seen = torch.zeros(2, 3, dtype=torch.long)
    lengths = torch.zeros(2, dtype=torch.int32)
    tok, cnt = torch.zeros(2, 3, 11, dtype=torch.int32), torch.zeros(2, 3, dtype=torch.int32)
    with pytest.raises(ValueError):
        admit_tokens(keep.float(), seen, lengths, 1)
    with pytest.raises(ValueError):
        admit_tokens(keep, seen.int(), lengths, 1)
    with pytest.raises(ValueError):
        admit_tokens(keep, seen, lengths[:1], 1)
    with pytest.raises(ValueError):
        admit_tokens(keep, seen, lengths, 1, tok.long(), cnt)
    with pytest.raises(ValueError):
        admit_tokens(keep, seen, lengths, 1, tok, None)
    with pytest.raises(ValueError):
        drop_evicted(keep, tok[:, :2], cnt, 5)
    with pytest.raises(ValueError):
        drop_evicted(keep, tok, cnt.long(), 5)


# ----------------------------------------------------------------------------- CUDA twins
@requires_cuda
@pytest.mark.gpu
def test_gpu_list_kernels_equal_torch():
    B, H, W = 8, 8, 140_000
    lengths = torch.full((B,), W - 8, dtype=torch.int32)
    lengths[::2] -= 1000
    seen = (lengths.long() - torch.arange(B) % 3).view(B, 1).expand(B, H).contiguous()
    keep, tok, cnt = random_lists(B, H, W, lengths, seen, seed=0, density=0.02)
    keep, tok, cnt, seen, lengths = (x.cuda() for x in (keep, tok, cnt, seen, lengths))
    outs = []
    for use_triton in (False, True):
        k, s, t, c = keep.clone(), seen.clone(), tok.clone(), cnt.clone()
        admit_tokens(k, s, lengths, 2, t, c, use_triton=use_triton)
        ev = k & (torch.rand(k.shape, generator=torch.Generator("cuda").manual_seed(1), device="cuda") < 0.9)
        k.copy_(ev)
        drop_evicted(k, t, c, t.shape[-1] - 1, use_triton=use_triton)
        outs.append((k, s, t, c))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert_lists_equal(outs[0][2].cpu(), outs[0][3].cpu(), outs[1][2].cpu(), outs[1][3].cpu(), keep=outs[0][0].cpu())


GRAPH_METHODS = [("h2o", dict(hh_size=48, recent_size=80)), ("tova", dict(cache_size=96)),
                 ("snapkv", dict(window_size=16, max_capacity_prompt=128)),
                 ("pyramidkv", dict(window_size=16, max_capacity_prompt=128))]


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("name,cfg", GRAPH_METHODS)
def test_gpu_captured_step_replays_like_eager_steps(name, cfg):
    # Prompts are whole pages: the first decode step opens a page (the mask and the cache grow,
    # eagerly), the captured step and its replays then fill that page without any allocation.
    B, Hkv, Hq, D, P, layers = 3, 2, 6, 64, 16, 2
    prompts, warm, steps = [704, 304, 144], 2, 12
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to("cuda", torch.bfloat16)

    prompt = [(rand(B, Hkv, 704, D), rand(B, Hkv, 704, D), rand(B, Hq, 704, D)) for _ in range(layers)]
    data = [[(rand(B, Hkv, 1, D), rand(B, Hkv, 1, D), rand(B, Hq, 1, D)) for _ in range(layers)]
            for _ in range(steps)]
    runs = []
    for _ in range(2):
        cache = PagedKVCache(layers, Hkv, D, page_size=P, dtype=torch.bfloat16, device="cuda", max_batch=B)
        cache.reserve(800)
        method = get_method(name, kind="decode", **cfg)
        for layer, (k, v, q) in enumerate(prompt):
            cache.append(layer, k, v, seq_lens=prompts)
            method.on_prefill(q, cache, layer)
        runs.append((cache, method))

    def step(cache, method, inputs):
        sels, outs = [], []
        for layer, (k, v, q) in enumerate(inputs):
            cache.append(layer, k, v)
            sel = method.select(q, cache, layer)
            sels.append(sel)
            outs.append(sparse_decode_attention(q, cache, layer, sel))
        return sels, outs

    def masks(cache, sels):
        return [sel.token_mask(cache.layer_lengths(layer), 720) for layer, sel in enumerate(sels)]

    cache_e, method_e = runs[0]
    eager = []
    for t in range(steps):
        sels, outs = step(cache_e, method_e, data[t])
        eager.append((masks(cache_e, sels), [o.clone() for o in outs],
                      [method_e.kept(cache_e, layer) for layer in range(layers)]))

    cache_g, method_g = runs[1]
    for t in range(warm):  # eager warm-up steps (compile the kernels, build the lists), the last on a side stream
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side if t == warm - 1 else torch.cuda.current_stream()):
            sels, outs = step(cache_g, method_g, data[t])
        torch.cuda.current_stream().wait_stream(side)
        assert all(torch.equal(a, b) for a, b in zip(masks(cache_g, sels), eager[t][0]))
    static = [tuple(x.clone() for x in layer_in) for layer_in in data[warm]]
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sels_g, outs_g = step(cache_g, method_g, static)
    for t in range(warm, steps):
        for dst, src in zip(static, data[t]):
            for d, s in zip(dst, src):
                d.copy_(s)
        graph.replay()
        torch.cuda.synchronize()
        want_masks, want_outs, want_kept = eager[t]
        for layer in range(layers):
            assert torch.equal(masks(cache_g, sels_g)[layer], want_masks[layer]), (t, layer)
            assert torch.equal(method_g.kept(cache_g, layer), want_kept[layer]), (t, layer)
            torch.testing.assert_close(outs_g[layer], want_outs[layer], rtol=2e-2, atol=2e-2)
    assert torch.equal(cache_g.layer_lengths(0), cache_e.layer_lengths(0))
