"""PagedKVCache: contents stay exact across growth, page metadata equals a recomputation, ragged
appends, Quest's bound, bad inputs, and no host syncs on the append path."""

import pytest
import torch

from sparseattn.cache import PagedKVCache

from .conftest import HAS_CUDA, requires_cuda

DEVICE = "cuda" if HAS_CUDA else "cpu"


def _rand(shape, dtype, gen):
    return torch.randn(shape, generator=gen).to(DEVICE, dtype)


class Mirror:
    """The tokens each sequence should hold, kept as plain per-sequence lists."""

    def __init__(self, B):
        self.k = [[] for _ in range(B)]
        self.v = [[] for _ in range(B)]

    def add(self, k, v, counts):
        for b, c in enumerate(counts):
            for t in range(c):
                self.k[b].append(k[b, :, t].cpu())
                self.v[b].append(v[b, :, t].cpu())

    def dense(self, which, b):
        rows = self.k[b] if which == "k" else self.v[b]
        return torch.stack(rows, 1)  # [Hkv, len, D]


def _check_contents(cache, layer, mirror):
    K, V = cache.gather(layer)
    lens = cache.host_lengths(layer)
    assert cache.layer_lengths(layer).tolist() == lens
    for b, n in enumerate(lens):
        assert n == len(mirror.k[b])
        if n:
            assert torch.equal(K[b, :, :n].cpu(), mirror.dense("k", b))
            assert torch.equal(V[b, :, :n].cpu(), mirror.dense("v", b))
        assert (K[b, :, n:] == 0).all() and (V[b, :, n:] == 0).all()


def _recompute_meta(mirror, b, n_pages, P):
    """float64 min / max / mean per page of sequence b, from the mirror: [Hkv, n_pages, D] each."""
    k = mirror.dense("k", b).double()
    mins, maxs, means = [], [], []
    for p in range(n_pages):
        page = k[:, p * P:(p + 1) * P]
        mins.append(page.amin(1))
        maxs.append(page.amax(1))
        means.append(page.mean(1))
    return torch.stack(mins, 1), torch.stack(maxs, 1), torch.stack(means, 1)


def _check_meta(cache, layer, mirror):
    P = cache.page_size
    mn, mx, mean = (cache.page_meta(layer, n).cpu() for n in ("min", "max", "mean"))
    assert mn.dtype == cache.dtype and mean.dtype in (torch.float32, torch.float64)
    for b, n in enumerate(cache.host_lengths(layer)):
        n_pages = -(-n // P)
        if not n_pages:
            continue
        rmin, rmax, rmean = _recompute_meta(mirror, b, n_pages, P)
        assert torch.equal(mn[b, :, :n_pages].double(), rmin)  # min/max are exact key values
        assert torch.equal(mx[b, :, :n_pages].double(), rmax)
        torch.testing.assert_close(mean[b, :, :n_pages].double(), rmean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_growth_across_many_appends_keeps_contents_and_meta_exact(dtype):
    g = torch.Generator().manual_seed(0)
    B, Hkv, D, P, layers = 3, 2, 16, 16, 2
    cache = PagedKVCache(layers, Hkv, D, page_size=P, dtype=dtype, device=DEVICE, max_batch=B, initial_pages=2)
    mirrors = [Mirror(B) for _ in range(layers)]
    caps = {cache.capacity}
    steps = [(21, [21, 5, 0])] + [(1, [1, 1, 1])] * 30 + [(7, [3, 7, 0])] + [(1, [1, 0, 1])] * 25
    for T, counts in steps:
        for layer in range(layers):
            k, v = _rand((B, Hkv, T, D), dtype, g), _rand((B, Hkv, T, D), dtype, g)
            cache.append(layer, k, v, seq_lens=None if counts == [T] * B else counts)
            mirrors[layer].add(k, v, counts)
        caps.add(cache.capacity)
    assert len(caps) > 2  # it grew, by doubling: a handful of reallocations, not one per step
    assert all(b == 2 * a or b > 2 * a for a, b in zip(sorted(caps), sorted(caps)[1:]))
    for layer in range(layers):
        _check_contents(cache, layer, mirrors[layer])
        _check_meta(cache, layer, mirrors[layer])
    # Every logical page maps to its own physical page; page 0 (scratch) belongs to nobody.
    table = cache.page_table.cpu()
    used = [table[b, :-(-n // P)] for b, n in enumerate(cache.host_lengths(0))]
    flat = torch.cat(used)
    assert (flat > 0).all() and flat.unique().numel() == flat.numel() == cache.pages_in_use


def test_ragged_appends_store_only_the_valid_tokens():
    g = torch.Generator().manual_seed(1)
    B, Hkv, D, P = 4, 1, 8, 4
    cache = PagedKVCache(1, Hkv, D, page_size=P, dtype=torch.float32, device=DEVICE, max_batch=B)
    mirror = Mirror(B)
    for counts in ([0, 1, 4, 9], [9, 0, 2, 1], torch.tensor([3, 3, 0, 9]), [0, 0, 0, 0]):
        T = 9
        k, v = _rand((B, Hkv, T, D), torch.float32, g), _rand((B, Hkv, T, D), torch.float32, g)
        cl = counts.tolist() if isinstance(counts, torch.Tensor) else counts
        for b, c in enumerate(cl):  # padding must reach no stored page and no metadata
            k[b, :, c:] = 1e4
            v[b, :, c:] = float("nan")
        cache.append(0, k, v, seq_lens=counts)
        mirror.add(k, v, cl)
    assert cache.lengths.tolist() == [12, 4, 6, 19]
    _check_contents(cache, 0, mirror)
    _check_meta(cache, 0, mirror)
    assert cache.num_pages(0).tolist() == [3, 1, 2, 5] and cache.page_table.shape == (4, 5)


def test_quest_bound_holds_for_every_page():
    # U_p = sum_c max(q_c M_c, q_c m_c) bounds q . k for every key k of page p (Quest, 1.1 step 2).
    g = torch.Generator().manual_seed(2)
    B, Hkv, D, P = 2, 2, 32, 16
    cache = PagedKVCache(1, Hkv, D, page_size=P, dtype=torch.bfloat16, device=DEVICE, max_batch=B)
    cache.append(0, _rand((B, Hkv, 75, D), torch.bfloat16, g), _rand((B, Hkv, 75, D), torch.bfloat16, g),
                 seq_lens=[75, 33])
    for _ in range(3):
        cache.append(0, _rand((B, Hkv, 1, D), torch.bfloat16, g), _rand((B, Hkv, 1, D), torch.bfloat16, g))
    K, _ = cache.gather(0)
    mn, mx = cache.page_meta(0, "min").double(), cache.page_meta(0, "max").double()  # [B, Hkv, nP, D]
    for trial in range(5):
        q = torch.randn(B, Hkv, D, generator=g, dtype=torch.float64).to(DEVICE)
        bound = torch.maximum(q.unsqueeze(2) * mx, q.unsqueeze(2) * mn).sum(-1)  # [B, Hkv, nP]
        scores = torch.einsum("bhd,bhld->bhl", q, K.double())
        for b, n in enumerate(cache.host_lengths(0)):
            for p in range(-(-n // P)):
                page_max = scores[b, :, p * P:min((p + 1) * P, n)].amax(-1)
                assert (page_max <= bound[b, :, p] + 1e-9).all()
    # A page holding one token: the bound is that token's exact score.
    one = PagedKVCache(1, 1, D, page_size=P, dtype=torch.float64, device=DEVICE)
    k = torch.randn(1, 1, 1, D, generator=g, dtype=torch.float64).to(DEVICE)
    one.append(0, k, k)
    q = torch.randn(D, generator=g, dtype=torch.float64).to(DEVICE)
    u = torch.maximum(q * one.page_meta(0, "max")[0, 0, 0], q * one.page_meta(0, "min")[0, 0, 0]).sum()
    torch.testing.assert_close(u, (q * k[0, 0, 0]).sum())


def test_reserve_avoids_growth_and_reset_forgets():
    cache = PagedKVCache(2, 1, 8, page_size=16, dtype=torch.float32, device=DEVICE, max_batch=2, initial_pages=2)
    cache.reserve(100)
    cap, k_pool = cache.capacity, cache.k_pages(0)
    x = torch.randn(2, 1, 100, 8, device=DEVICE)
    for layer in range(2):
        cache.append(layer, x, x)
    assert cache.capacity == cap and cache.k_pages(0) is k_pool
    cache.reset()
    assert cache.batch == 0 and cache.pages_in_use == 0 and cache.lengths.numel() == 0
    cache.append(0, x[:1, :, :3], x[:1, :, :3])
    assert cache.lengths.tolist() == [3]


def test_custom_metadata_is_maintained():
    def absmax(keys, valid):  # [N, Hkv, P, D] -> [N, Hkv, D]
        return torch.where(valid, keys.abs(), torch.zeros((), dtype=keys.dtype, device=keys.device)).amax(2)

    def norms(keys, valid):  # a scalar per page and head: [N, Hkv]
        return (keys.float().norm(dim=-1) * valid.squeeze(-1)).amax(-1)

    g = torch.Generator().manual_seed(3)
    cache = PagedKVCache(1, 2, 8, page_size=4, dtype=torch.float32, device=DEVICE,
                         metadata={"absmax": absmax, "norm": norms})
    assert cache.metadata_names == ("absmax", "norm")
    k = _rand((1, 2, 10, 8), torch.float32, g)
    cache.append(0, k, k)
    cache.append(0, k[:, :, :1], k[:, :, :1])
    allk = torch.cat([k, k[:, :, :1]], 2)
    got = cache.page_meta(0, "absmax")
    for p in range(3):
        torch.testing.assert_close(got[0, :, p], allk[0, :, p * 4:(p + 1) * 4].abs().amax(1))
    assert cache.page_meta(0, "norm").shape == (1, 2, 3)
    with pytest.raises(KeyError, match="keeps"):
        cache.page_meta(0, "min")
    with pytest.raises(ValueError, match="unknown page metadata"):
        PagedKVCache(1, 1, 8, metadata=("median",))
    with pytest.raises(ValueError, match=r"\[N, Hkv, ...\]"):
        PagedKVCache(1, 2, 8, metadata={"bad": lambda k, v: k.sum()})


def test_bad_inputs_raise():
    cache = PagedKVCache(2, 2, 8, page_size=16, dtype=torch.float32, device=DEVICE, max_batch=2)
    x = torch.randn(2, 2, 3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="cache dtype"):
        cache.append(0, x.half(), x.half())
    with pytest.raises(ValueError, match="cache device"):
        cache.append(0, x.to("meta"), x.to("meta"))
    with pytest.raises(ValueError, match="Hkv=2"):
        cache.append(0, x[:, :1], x[:, :1])
    with pytest.raises(ValueError, match="one shape"):
        cache.append(0, x, x[:, :, :2])
    with pytest.raises(ValueError, match="max_batch=2"):
        cache.append(0, x.repeat(2, 1, 1, 1), x.repeat(2, 1, 1, 1))
    with pytest.raises(ValueError, match="layer must be"):
        cache.append(2, x, x)
    with pytest.raises(ValueError, match=r"\[0, T=3\]"):
        cache.append(0, x, x, seq_lens=[4, 1])
    with pytest.raises(ValueError, match="one count per sequence"):
        cache.append(0, x, x, seq_lens=[1])
    cache.append(0, x, x)
    with pytest.raises(ValueError, match="seq_lens\\s+with 0|pass seq_lens"):
        cache.append(0, x[:1], x[:1])
    for bad in (dict(page_size=0), dict(max_batch=0), dict(dtype=torch.int32), dict(initial_pages=1)):
        with pytest.raises(ValueError):
            PagedKVCache(1, 1, 8, **bad)


def test_append_path_reads_nothing_back(monkeypatch):
    # CPU twin of the GPU sync test: forbid every way a tensor value reaches the host.
    cache = PagedKVCache(1, 2, 8, page_size=4, dtype=torch.float32, device=DEVICE, max_batch=2, initial_pages=2)
    x = torch.randn(2, 2, 30, 8, device=DEVICE)
    cache.append(0, x[:, :, :9], x[:, :, :9])  # first append (table growth etc.) outside the guard as well as inside

    def forbid(*a, **k):
        raise AssertionError("host read on the append path")

    for name in ("item", "tolist", "__bool__", "__int__", "__index__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbid)
    for T, counts in ((1, None), (5, [5, 2]), (1, [0, 1]), (30, None)):  # the last one grows the pool
        cache.append(0, x[:, :, :T].contiguous(), x[:, :, :T].contiguous(), seq_lens=counts)
    monkeypatch.undo()
    assert cache.lengths.tolist() == [45, 43] and cache.capacity > 2


@requires_cuda
@pytest.mark.gpu
def test_gpu_append_has_no_host_sync():
    cache = PagedKVCache(2, 2, 64, page_size=16, dtype=torch.bfloat16, device="cuda", max_batch=4, initial_pages=2)
    x = torch.randn(4, 2, 40, 64, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for layer in range(2):
            cache.append(layer, x, x, seq_lens=[40, 3, 0, 17])
        for _ in range(40):  # crosses page boundaries and grows the pool
            for layer in range(2):
                cache.append(layer, x[:, :, :1], x[:, :, :1])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert cache.lengths.tolist() == [80, 43, 40, 57]
