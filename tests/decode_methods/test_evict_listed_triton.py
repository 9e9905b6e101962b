"""The fused tail of an H2O / TOVA decode step (``kernels/evict_listed_triton.py``) against the
PyTorch tail of ``_observe_listed`` (the oracle, unchanged).

The kernel: random kept-token lists (ragged counts including 0 and a full row, stale garbage past
the counts naming live positions), random logits with the causal ``-inf`` pattern (and constant
logits, whose equal probabilities make the new scores tie), Lq 1 and 3, GQA groups 1 and 4, every
group reduction, budgets at their edges (0, inside, beyond the count). The oracle is the method's
own ``_observe_listed`` with ``_fused_tail = False`` on the same state, its ``listed_attention``
replaced by the softmax of the same logits. Keep masks, lists (the whole partition, stale lanes
included), counts are equal exactly, scores to fp32 tolerance.

The methods: one instance with the fused tail, a twin with the PyTorch tail, both scoring decode
steps from the list, run side by side over 30 steps (``test_list_scoring.run_pair``). The CUDA twin
does the same in bf16 at 32/8/128 with 8K tokens and a budget of 512.
"""

import types

import pytest
import torch

import sparseattn.decode_methods.eviction as dm_eviction
import sparseattn.decode_methods.h2o as dm_h2o
import sparseattn.decode_methods.tova as dm_tova
from sparseattn.methods.registry import get_method

from ..conftest import HAS_CUDA, requires_cuda, triton_importable
from . import test_list_scoring as list_scoring

pytestmark = pytest.mark.skipif(not triton_importable(), reason="triton is not installed (pip install triton)")

if triton_importable():
    from sparseattn.kernels.evict_listed_triton import MAX_WIDTH, evict_listed_h2o, evict_listed_tova

KDEV = "cuda" if HAS_CUDA else "cpu"


# ----------------------------------------------------------------------------- random states
def random_state(B, H, G, Lq, lengths, *, shared, seed, const_logits=False, full_row=None, empty_row=None,
                 slack=3, max_count=None, device=KDEV):
    """A list state (``tokens [B, H, W + 1]`` with garbage, ``count``, ``keep``, ``scores``) and the
    step's logits ``[B, H, G, Lq, W]`` (-inf past the count and in each row's future). ``shared``:
    every head of a sequence holds one list (TOVA)."""
    g = torch.Generator().manual_seed(seed)
    N = max(lengths) + 5
    counts = torch.zeros(B, H, dtype=torch.int32)
    lists = {}
    for b in range(B):
        n = lengths[b]
        for h in range(H):
            if shared and h > 0:
                lists[b, h] = lists[b, 0]
                continue
            c = int(torch.randint(0, n + 1, (1,), generator=g))
            if (b, h) == full_row:
                c = n
            if max_count is not None:
                c = min(c, max_count)
            if (b, h) == empty_row:
                c = 0
            # the step's new tokens are always listed (they just entered); the rest at random
            new = list(range(max(0, n - Lq), n))[:c]
            rest = torch.randperm(max(0, n - Lq), generator=g)[:c - len(new)].tolist()
            lists[b, h] = sorted(rest + new)
    for (b, h), lst in lists.items():
        counts[b, h] = len(lst)
    W = int(counts.max()) + slack
    tokens = torch.zeros(B, H, W + 1, dtype=torch.int32)
    keep = torch.zeros(B, H, N, dtype=torch.bool)
    for (b, h), lst in lists.items():
        c = len(lst)
        # stale garbage: positions of live tokens (or any valid one for an empty row)
        pool = torch.tensor(lst if lst else list(range(lengths[b])), dtype=torch.int32)
        tokens[b, h] = pool[torch.randint(0, len(pool), (W + 1,), generator=g)]
        tokens[b, h, :c] = torch.tensor(lst, dtype=torch.int32)
        keep[b, h, lst] = True
    scores = (torch.randint(0, 4, (B, H, N), generator=g) * 0.25).float()  # many equal old scores
    logits = torch.zeros(B, H, G, Lq, W) if const_logits else torch.randn(B, H, G, Lq, W, generator=g) * 2
    n = torch.tensor(lengths).view(B, 1, 1, 1, 1)
    qpos = n - Lq + torch.arange(Lq).view(1, 1, 1, Lq, 1)
    pos = tokens[..., :W].long().view(B, H, 1, 1, W)
    live = (torch.arange(W) < counts.unsqueeze(-1)).view(B, H, 1, 1, W)
    logits = logits.masked_fill(~live | (pos > qpos), float("-inf"))
    st = dict(tokens=tokens, count=counts, keep=keep, scores=scores)
    st = {k: v.to(device) for k, v in st.items()}
    return st, logits.to(device), torch.tensor(lengths, device=device), W


def torch_tail(method, st, logits, lengths, W, monkeypatch):
    """The method's own PyTorch tail on ``st`` (in place), fed the softmax of ``logits``."""
    def fake_listed_attention(q, cache, layer, tokens, counts, return_logits=False):
        rows = logits[:, :, :, -q.shape[2]:]
        mass = torch.softmax(rows, dim=-1).nan_to_num(0.0).sum(3)
        return (mass, rows) if return_logits else mass

    with monkeypatch.context() as m:
        m.setattr(dm_h2o, "listed_attention", fake_listed_attention)
        m.setattr(dm_tova, "listed_attention", fake_listed_attention)
        m.setattr(dm_eviction, "use_triton_estimator", lambda x: False)  # drop_evicted's full partition
        method._fused_tail = False
        B, H, G, Lq = logits.shape[:4]
        q = torch.zeros(B, H * G, Lq, 1, device=logits.device)
        cache = types.SimpleNamespace(layer_lengths=lambda layer: lengths)
        snapshot = dm_eviction.ListSnapshot(st["tokens"][..., :W], st["count"], W)
        method._observe_listed(q, cache, 0, st, W, snapshot)
        assert snapshot.taken is not None  # taken (before the eviction) on the PyTorch path too


def assert_states_equal(got, want):
    assert torch.equal(got["count"], want["count"])
    assert torch.equal(got["keep"], want["keep"])
    assert torch.equal(got["tokens"], want["tokens"])  # the whole partition, stale lanes included
    if "scores" in want:
        torch.testing.assert_close(got["scores"], want["scores"], rtol=1e-6, atol=1e-6)


def clone(st):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else list(v) if isinstance(v, list) else v)
            for k, v in st.items()}


# ----------------------------------------------------------------------------- the kernel
H2O_BUDGETS = [([0, 2, 1000], [3, 0, 1000]), ([5, 1000, 1], [1000, 0, 2])]


@pytest.mark.parametrize("const_logits", [False, True])
@pytest.mark.parametrize("budgets", H2O_BUDGETS)
@pytest.mark.parametrize("how", ["mean", "max", "sum"])
@pytest.mark.parametrize("G,Lq", [(1, 1), (4, 3), (4, 1)])
def test_h2o_tail_equals_torch(G, Lq, how, budgets, const_logits, monkeypatch):
    B, H, lengths = 3, 2, [29, 13, 40]
    st, logits, lens, W = random_state(B, H, G, Lq, lengths, shared=False, seed=G * 7 + Lq + len(how),
                                       const_logits=const_logits, full_row=(2, 1), empty_row=(1, 0))
    method = get_method("h2o", kind="decode", hh_size=1, recent_size=1, gqa_score_agg=how)
    hh, recent = (torch.tensor(x, dtype=torch.int64, device=KDEV) for x in budgets)
    st.update(hh=hh, recent=recent, budget_host=[a + b for a, b in zip(*budgets)], bound=[10 ** 6] * B)
    want = clone(st)
    torch_tail(method, want, logits, lens, W, monkeypatch)
    got = clone(st)
    evict_listed_h2o(logits, got["tokens"][..., :W], got["count"], got["scores"], got["keep"], lens, hh, recent,
                     how=how)
    assert_states_equal(got, want)
    assert bool((got["count"] < st["count"]).any())  # something was evicted


@pytest.mark.parametrize("const_logits", [False, True])
@pytest.mark.parametrize("cache_size", [0, 1, 9, 1000])
@pytest.mark.parametrize("G,Lq", [(1, 1), (4, 3)])
def test_tova_tail_equals_torch(G, Lq, cache_size, const_logits, monkeypatch):
    B, H, lengths = 3, 3, [33, 7, 21]
    st, logits, lens, W = random_state(B, H, G, Lq, lengths, shared=True, seed=cache_size + G + Lq,
                                       const_logits=const_logits, full_row=(0, 0), empty_row=(1, 0))
    method = get_method("tova", kind="decode", cache_size=max(1, cache_size))
    method.cache_size = cache_size  # 0 too (the constructor asks for >= 1; the kernel takes it)
    st.update(bound=[10 ** 6] * B)
    want = clone(st)
    torch_tail(method, want, logits, lens, W, monkeypatch)
    got = clone(st)
    evict_listed_tova(logits, got["tokens"][..., :W], got["count"], got["keep"], cache_size)
    assert_states_equal(got, want)
    if cache_size == 1000:
        assert torch.equal(got["count"], st["count"])


@pytest.mark.parametrize("heads_per_program,cache_size", [(2, 9), (3, 1), (3, 1000), (5, 4)])
def test_tova_tail_heads_per_program(heads_per_program, cache_size, monkeypatch):
    # launch 2 with several heads per program (a ragged last run at 2 of 3; one program per sequence
    # at 3 and beyond): every program ranks the same scores, so the result is the same
    B, H, G, Lq, lengths = 2, 3, 3, 1, [45, 26]
    st, logits, lens, W = random_state(B, H, G, Lq, lengths, shared=True, seed=heads_per_program + cache_size,
                                       full_row=(1, 0))
    method = get_method("tova", kind="decode", cache_size=cache_size)
    st.update(bound=[10 ** 6] * B)
    want = clone(st)
    torch_tail(method, want, logits, lens, W, monkeypatch)
    got = clone(st)
    evict_listed_tova(logits, got["tokens"][..., :W], got["count"], got["keep"], cache_size,
                      heads_per_program=heads_per_program)
    assert_states_equal(got, want)


def test_tail_tiles_and_rejects_bad_inputs(monkeypatch):
    # several [BLOCK_G, TILE] passes over the group, a narrow warp count; then the input checks
    B, H, G, Lq = 2, 2, 4, 2
    st, logits, lens, W = random_state(B, H, G, Lq, [50, 31], shared=False, seed=11)
    method = get_method("h2o", kind="decode", hh_size=1, recent_size=1, gqa_score_agg="max")
    hh = torch.tensor([7, 3], device=KDEV)
    recent = torch.tensor([2, 4], device=KDEV)
    st.update(hh=hh, recent=recent, budget_host=[9, 7], bound=[10 ** 6] * B)
    want = clone(st)
    torch_tail(method, want, logits, lens, W, monkeypatch)
    got = clone(st)
    evict_listed_h2o(logits, got["tokens"][..., :W], got["count"], got["scores"], got["keep"], lens, hh, recent,
                     how="max", block_g=1, num_warps=2)
    assert_states_equal(got, want)

    t, c, s, k = st["tokens"][..., :W], st["count"], st["scores"], st["keep"]
    bad = [dict(logits=logits.double()), dict(logits=logits[0]), dict(tokens=t.long()), dict(tokens=t[:, :1]),
           dict(counts=c.long()), dict(scores=s.double()), dict(scores=s[..., :-1]), dict(keep=k.float()),
           dict(lens=lens.float()), dict(hh=hh[:1]), dict(how="median")]
    good = dict(logits=logits, tokens=t, counts=c, scores=s, keep=k, lens=lens, hh=hh, recent=recent, how="mean")
    for case in bad:
        a = dict(good, **case)
        with pytest.raises(ValueError):
            evict_listed_h2o(a["logits"], a["tokens"], a["counts"], a["scores"], a["keep"], a["lens"], a["hh"],
                             a["recent"], how=a["how"])
    wide = torch.full((B, H, 1, 1, MAX_WIDTH + 1), float("-inf"), device=KDEV)
    with pytest.raises(ValueError):
        evict_listed_tova(wide, torch.zeros(B, H, MAX_WIDTH + 1, dtype=torch.int32, device=KDEV), c, k, 4)
    with pytest.raises(ValueError):
        evict_listed_tova(logits, t, c, k, -1)
    with pytest.raises(ValueError):
        evict_listed_tova(logits, t, c, k, 4, heads_per_program=0)


# ----------------------------------------------------------------------------- the methods, step by step
def fused_pair(name, cfg):
    """(the method with the fused tail, its twin with the PyTorch tail): both score from the list."""
    fast, slow = get_method(name, kind="decode", **cfg), get_method(name, kind="decode", **cfg)
    slow._fused_tail = False
    return fast, slow


@pytest.mark.parametrize("name,cfg,Hq,Hkv,Lq", [
    ("h2o", dict(hh_size=6, recent_size=5), 8, 2, 2),
    ("h2o", dict(heavy_ratio=0.2, recent_ratio=0.1, gqa_score_agg="max"), 2, 2, 1),
    ("tova", dict(cache_size=9), 8, 2, 2),
    ("tova", dict(cache_size=7), 2, 2, 1),
])
def test_fused_steps_equal_torch_steps(name, cfg, Hq, Hkv, Lq, monkeypatch):
    # float32 (the fused path's dtypes); the fused twin runs its two kernels in the interpreter
    monkeypatch.setattr(dm_h2o, "use_triton_estimator", lambda x: True)
    monkeypatch.setattr(dm_tova, "use_triton_estimator", lambda x: True)
    monkeypatch.setattr(list_scoring, "pair", fused_pair)
    import sparseattn.kernels.evict_listed_triton as kernels

    calls = []
    for fn in ("evict_listed_h2o", "evict_listed_tova"):
        monkeypatch.setattr(kernels, fn, lambda *a, _f=getattr(kernels, fn), **k: calls.append(1) or _f(*a, **k))
    list_scoring.run_pair(name, cfg, Hq=Hq, Hkv=Hkv, Lq=Lq, dtype=torch.float32, steps=30, prompts=(29, 17), D=32,
                          scores_tol=dict(rtol=1e-5, atol=1e-6))
    assert len(calls) >= 30  # every decode step of the fused twin ran the kernel


# ----------------------------------------------------------------------------- CUDA twins
@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("name,hpp", [("h2o", 1), ("tova", 1), ("tova", 8)])
def test_gpu_tail_equals_torch_large(name, hpp, monkeypatch):
    B, H, G, Lq = 2, 8, 4, 1
    lengths = [8192, 8192 - 77]
    # lists of about the budget's size (W ~ 2K as at budget 2048), one full, one empty
    st, logits, lens, W = random_state(B, H, G, Lq, lengths, shared=name == "tova", seed=0, full_row=(0, 1),
                                       empty_row=(1, 3), max_count=2049, device="cuda")
    if name == "h2o":
        method = get_method("h2o", kind="decode", hh_size=256, recent_size=256)
        hh = torch.tensor([1024, 256], device="cuda")
        recent = torch.tensor([256, 0], device="cuda")
        st.update(hh=hh, recent=recent, budget_host=[1280, 256], bound=[10 ** 6] * B)
    else:
        method = get_method("tova", kind="decode", cache_size=1500)
        st.update(bound=[10 ** 6] * B)
    want = clone(st)
    torch_tail(method, want, logits, lens, W, monkeypatch)
    got = clone(st)
    if name == "h2o":
        evict_listed_h2o(logits, got["tokens"][..., :W], got["count"], got["scores"], got["keep"], lens, hh, recent)
    else:
        evict_listed_tova(logits, got["tokens"][..., :W], got["count"], got["keep"], 1500, heads_per_program=hpp)
    assert_states_equal(got, want)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("name,cfg", [("h2o", dict(hh_size=256, recent_size=256)), ("tova", dict(cache_size=512))])
def test_gpu_fused_steps_equal_torch_steps_bf16(name, cfg):
    # bf16, 32/8/128, ~8K tokens, budget 512, 32 steps; both twins score from the list with the same
    # list logits, so only the tails' fp32 rounding differs (softmax sum order, exp): a step may swap
    # two tokens whose scores tie to ~1e-6, then the fused twin continues from the other's state.
    fast, slow = fused_pair(name, cfg)
    assert list_scoring.bf16_twin_steps(fast, slow, state_tol=dict(rtol=1e-5, atol=1e-6)) <= 3
