"""Recycled Attention steps that a CUDA graph can replay (issue 4), and their timing per phase.

* the selections equal the pre-issue implementation's (kept below as the oracle) step by step:
  ragged batch, Lq 1 and 2, counter wraps, prefill start, PyTorch and Triton-assembly paths;
* the recycle step's shapes stay fixed within :meth:`recycle_width`, the full step refreshes its
  buffers in place, and a recycle selection built with an earlier step's width (what a replayed
  capture computes) equals the eager one as the cache grows (the CPU twin of the CUDA-graph test);
* ``phase`` / ``set_phase``; ``sparseattn bench decode`` rows for Recycled Attention (phases).
"""

import json

import pytest
import torch

from sparseattn.bench import decode as bench
from sparseattn.bench.timing import capture_graph
from sparseattn.cli import build_parser
from sparseattn.decode_api import DecodeSelection, sparse_decode_attention
from sparseattn.decode_methods import get_decode_method
from sparseattn.decode_methods import recycled as recycled_mod
from sparseattn.decode_methods.base import exact_probs, topk_token_selection
from sparseattn.decode_methods.recycled import RecycledAttention
from sparseattn.decode_methods.tidaldecode import group_scores
from sparseattn.methods.base import compact_rows, rank_mask

from ..conftest import HAS_CUDA, requires_cuda
from ..kernels.test_decode import make_cache, make_q

DEVICE = "cuda" if HAS_CUDA else "cpu"
F64 = torch.float64


# ----------------------------------------------------------------------------- the old implementation
class OldRecycled(RecycledAttention):
    """The selection logic before issue 4 (a width growing every step, compaction), as the oracle."""

    def _select(self, q, cache, layer):
        st = self.state(cache, layer)
        step = st.get("step", 0)
        if step == 0 or "tokens" not in st:
            self._refresh(q, cache, layer, st)
            st["step"] = 1 % self.stride
            return None
        st["step"] = (step + 1) % self.stride
        return self.recycled_selection(cache, layer)

    def _refresh(self, q, cache, layer, st):
        Lq = q.shape[2]
        score = group_scores(exact_probs(q, cache, layer), self.gqa_policy)
        N = score.shape[-1]
        base = cache.layer_lengths(layer).long() - Lq
        j = torch.arange(N, device=q.device)
        candidate = j.view(1, 1, -1) < base.view(-1, 1, 1)
        score = torch.where(candidate, score, score.new_full((), float("-inf")))
        width = max(1, min(N, self.top_k))
        if recycled_mod.use_triton_estimator(q):
            sel = topk_token_selection(score, self.top_k, lengths=base, page_size=cache.page_size, width=width)
            counts, tokens = sel.token_counts, sel.tokens
        else:
            n = torch.full(score.shape[:2], self.top_k, dtype=torch.long, device=q.device)
            keep = rank_mask(score, n) & candidate
            counts, tokens = compact_rows(keep, j.expand(keep.shape), width)
        st.update(tokens=tokens, counts=counts, base=base, base_host=[h - Lq for h in cache.host_lengths(layer)])

    def recycled_selection(self, cache, layer, width=None):
        st = self.state(cache, layer)
        tokens, counts, base = st["tokens"], st["counts"], st["base"]
        B, H, Kw = tokens.shape
        dev = tokens.device
        W = max(1, max(h - b for h, b in zip(cache.host_lengths(layer), st["base_host"])))
        lengths = cache.layer_lengths(layer).long()
        new = base.view(B, 1, 1) + torch.arange(W, device=dev).view(1, 1, W)
        new_ok = new < lengths.view(B, 1, 1)
        old_ok = torch.arange(Kw, device=dev).view(1, 1, Kw) < counts.unsqueeze(-1)
        values = torch.cat([tokens.long(), new.expand(B, H, W)], -1)
        ok = torch.cat([old_ok, new_ok.expand(B, H, W)], -1)
        c, packed = compact_rows(ok, values, Kw + W)
        return DecodeSelection.from_tokens(packed, c, page_size=cache.page_size)


# ----------------------------------------------------------------------------- helpers
def rows_of(sel):
    t, c = sel.tokens.cpu(), sel.token_counts.cpu()
    return [[t[b, h, :c[b, h]].tolist() for h in range(t.shape[1])] for b in range(t.shape[0])]


def append(cache, seed, T=1, counts=None, layers=None):
    """``T`` new tokens per sequence (``counts``: how many are real per sequence) at every layer."""
    g = torch.Generator().manual_seed(seed)
    B, H, D = cache.batch, cache.num_kv_heads, cache.head_dim
    for layer in (range(cache.num_layers) if layers is None else layers):
        k = torch.randn(B, H, T, D, generator=g).to(cache.device, cache.dtype)
        v = torch.randn(B, H, T, D, generator=g).to(cache.device, cache.dtype)
        cache.append(layer, k, v, seq_lens=counts)


def check_selection(sel, cache, layer):
    """Valid, and every entry (also past the counts, which kernels may read) a token of its sequence."""
    lengths = cache.layer_lengths(layer)
    sel.validate(lengths)
    assert bool((sel.tokens >= 0).all()) and bool((sel.tokens < lengths.view(-1, 1, 1)).all())


# (Lq, per-sequence real token counts) of each step: ragged Lq 1 steps and two Lq 2 steps
SCHEDULE = [(1, [1, 1]), (1, [1, 0]), (2, [2, 2]), (1, [0, 1]), (2, [2, 2]), (1, [1, 1]), (1, [1, 1]),
            (1, [1, 0]), (1, [1, 1])]


# ----------------------------------------------------------------------------- same tokens as before
@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("Hq,policy,prefill", [(2, "group_max", False), (6, "group_sum", True),
                                               (6, "first_head", False)])
def test_every_step_reads_what_the_old_implementation_read(monkeypatch, path, Hq, policy, prefill):
    S, K = 3, 9
    steps = 2 * S + 3
    assert len(SCHEDULE) == steps
    dtype = F64 if path == "torch" else torch.float32
    if path == "triton":  # the Triton assembly of the refresh (interpreter on the CPU), both methods
        monkeypatch.setattr(recycled_mod, "use_triton_estimator", lambda x: True)
    cache = make_cache(2, 2, 16, [45, 23], dtype=dtype, layers=1)
    new = get_decode_method("recycled", top_k=K, stride=S, gqa_policy=policy)
    old = OldRecycled(top_k=K, stride=S, gqa_policy=policy)
    if prefill:
        pq = make_q(2, Hq, 20, 16, dtype, seed=2)
        new.on_prefill(pq, cache, 0)
        old.on_prefill(pq, cache, 0)
    recycled = 0
    for step, (Lq, counts) in enumerate(SCHEDULE):
        append(cache, 100 + step, Lq, counts)
        q = make_q(2, Hq, Lq, 16, dtype, seed=30 + step)
        assert new.phase(cache, 0) == ("recycle" if old.state(cache, 0).get("step", 0) else "full")
        got, want = new.select(q, cache, 0), old.select(q, cache, 0)
        assert (got is None) == (want is None), step
        assert new.state(cache, 0)["step"] == old.state(cache, 0)["step"]
        if got is None:
            for name in ("tokens", "counts", "base"):
                assert torch.equal(new.state(cache, 0)[name], old.state(cache, 0)[name]), (step, name)
            continue
        recycled += 1
        check_selection(got, cache, 0)
        assert rows_of(got) == rows_of(want), step
        lengths = cache.layer_lengths(0)
        assert torch.equal(got.token_mask(lengths), want.token_mask(lengths))
    assert recycled == steps - 3  # full steps 0, 3, 6 (after a prefill: 2, 5, 8)


# ----------------------------------------------------------------------------- fixed shapes (CPU twin)
def test_recycle_shapes_stay_fixed_and_a_replayed_width_selects_like_eager():
    # The CPU twin of the CUDA-graph test: a recycle selection built with the width of an
    # earlier step (what a captured step computes when replayed) equals the eager selection while
    # the cache grows in place, and the shapes stay the same within the rounding.
    S, K = 7, 6
    cache = make_cache(2, 2, 16, [60, 37], dtype=F64, layers=1)
    method = get_decode_method("recycled", top_k=K, stride=S)
    st = method.state(cache, 0)
    shapes, ptrs = set(), None
    for cycle in range(3):
        append(cache, 10 * cycle)
        assert method.select(make_q(2, 4, 1, 16, F64, seed=cycle), cache, 0) is None  # full step
        bufs = tuple(st[n].data_ptr() for n in ("tokens", "counts", "base"))
        assert ptrs is None or bufs == ptrs  # refreshed in place: a captured recycle step reads these
        ptrs = bufs
        captured_w = method.recycle_width(cache, 0)
        assert captured_w == 64  # the stride (7) rounded up to 64
        for c in range(1, S):
            append(cache, 10 * cycle + c, counts=[1, c % 2])  # ragged: sequence 1 grows every other step
            replayed = method.recycled_selection(cache, 0, width=captured_w)
            sel = method.select(make_q(2, 4, 1, 16, F64, seed=50 + c), cache, 0)
            check_selection(sel, cache, 0)
            shapes.add((tuple(sel.tokens.shape), tuple(sel.token_counts.shape)))
            assert torch.equal(replayed.tokens, sel.tokens) and torch.equal(replayed.token_counts, sel.token_counts)
            for b, n in enumerate(cache.host_lengths(0)):
                base = st["base_host"][b]
                assert rows_of(sel)[b][0][-(n - base):] == list(range(base, n))
    assert shapes == {((2, 2, K + 64), (2, 2))}


def test_recycle_width_rounding():
    cache = make_cache(2, 2, 16, [70, 50], dtype=F64, layers=1)
    # Stride above the quantum: rounded up to 128, so one width serves a whole cycle.
    long = get_decode_method("recycled", top_k=8, stride=70)
    assert long.select(make_q(2, 2, 1, 16, F64), cache, 0) is None
    assert long.recycle_width(cache, 0) == 128
    # Lq > 1 steps can outgrow the width: it then steps up by the quantum (a new capture).
    short = get_decode_method("recycled", top_k=8, stride=3)
    assert short.select(make_q(2, 2, 1, 16, F64), cache, 0) is None
    widths = []
    for step in range(2):
        append(cache, step, T=40)
        sel = short.select(make_q(2, 2, 40, 16, F64, seed=step), cache, 0)
        check_selection(sel, cache, 0)
        widths.append((short.recycle_width(cache, 0), sel.tokens.shape[-1]))
        assert sel.token_counts.tolist() == [[8 + 1 + 40 * (step + 1)] * 2] * 2
    assert widths == [(64, 8 + 64), (128, 8 + 128)]
    # A width too narrow drops the newest tokens but stays in bounds (a stale capture).
    narrow = short.recycled_selection(cache, 0, width=16)
    check_selection(narrow, cache, 0)
    assert narrow.token_counts.tolist() == [[8 + 16] * 2] * 2
    with pytest.raises(ValueError, match="width"):
        short.recycled_selection(cache, 0, width=0)


def test_phase_and_set_phase():
    cache = make_cache(1, 2, 16, [40], dtype=F64, layers=2)
    method = get_decode_method("recycled", top_k=4, stride=4)
    assert method.phase(cache, 0) == "full"
    with pytest.raises(ValueError, match="no recycled set"):
        method.set_phase(cache, 0, "recycle")
    with pytest.raises(ValueError, match="phase"):
        method.set_phase(cache, 0, "sparse")
    method.on_prefill(make_q(1, 2, 40, 16, F64), cache, 0)
    assert method.phase(cache, 0) == "recycle" and method.phase(cache, 1) == "full"
    q = make_q(1, 2, 1, 16, F64, seed=3)
    method.set_phase(cache, 0, "full")
    assert method.phase(cache, 0) == "full" and method.select(q, cache, 0) is None
    for _ in range(5):  # pinned: every call runs the recycle phase, whatever the counter says
        method.set_phase(cache, 0, "recycle")
        assert method.select(q, cache, 0) is not None
    method.set_phase(cache, 0, "recycle")
    assert method.state(cache, 0)["step"] in (1, 2, 3)  # a counter inside the recycle steps is kept
    every = get_decode_method("recycled", top_k=4, stride=1)
    assert every.select(q, cache, 0) is None and every.phase(cache, 0) == "full"
    with pytest.raises(ValueError, match="stride=1"):
        every.set_phase(cache, 0, "recycle")


# ----------------------------------------------------------------------------- bench rows
def bench_args(tmp_path, device="cpu", dtype="float32", contexts="200", shapes="4/2/16"):
    return build_parser().parse_args(
        ["bench", "decode", "--contexts", contexts, "--batches", "2", "--budgets", "32", "--shapes", shapes,
         "--dtype", dtype, "--device", device, "--out", str(tmp_path), "--methods", "recycled", "--rep-ms", "20"])


def check_recycled_rows(rows, mode, L):
    row = next(r for r in rows if r["method"] == "recycled")
    assert "error" not in row, row.get("error")
    assert row["mode"] == mode
    S = get_decode_method("recycled").stride
    assert row["layer_ms"] == pytest.approx((row["full_ms"] + (S - 1) * row["recycle_ms"]) / S)
    assert row["full_ms"] > 0 and row["recycle_ms"] > 0 and row["sel_layer_ms"] > 0
    assert row["read_tokens"] == 32 + 1  # the recycle step: top_k stored tokens + the newest one
    assert row["read_tokens"] < L


def test_bench_times_recycled_per_phase(tmp_path):
    assert bench.run(bench_args(tmp_path)) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    check_recycled_rows(rows, "eager (phases)", 200)


# ----------------------------------------------------------------------------- GPU twins
@requires_cuda
def test_cuda_graph_replays_both_phases_like_eager_calls():
    lengths = [4001, 3001]  # room in the last page: the page table (the full step's shape) stays
    cache = make_cache(2, 8, 128, lengths, dtype=torch.bfloat16, layers=1)
    cache.reserve(4100)
    method = get_decode_method("recycled", top_k=512, stride=10)
    q = make_q(2, 32, 1, 128, torch.bfloat16, seed=1)
    method.on_prefill(make_q(2, 32, 8, 128, torch.bfloat16, seed=2), cache, 0)
    st = method.state(cache, 0)

    def recycle_step():
        method.set_phase(cache, 0, "recycle")
        sel = method.select(q, cache, 0)
        return sel.tokens, sel.token_counts, sparse_decode_attention(q, cache, 0, sel)

    graph, (tok, cnt, out) = capture_graph(recycle_step)
    for step in range(4):  # the cache grows in place; the replay follows its device lengths
        append(cache, step, counts=[1, step % 2])
        graph.replay()
        eager = method.recycled_selection(cache, 0)
        check_selection(eager, cache, 0)
        torch.cuda.synchronize()
        assert torch.equal(tok, eager.tokens) and torch.equal(cnt, eager.token_counts), step
        ref = sparse_decode_attention(q, cache, 0, eager)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)

    # A captured full step refreshes the buffers in place: replayed with new queries, it stores
    # what an eager full step with those queries stores (another method object as the reference).
    def full_step():
        method.set_phase(cache, 0, "full")
        return method.select(q, cache, 0)

    graph_full, _ = capture_graph(full_step)
    ref_method = get_decode_method("recycled", top_k=512, stride=10)
    for seed in (5, 6):
        q.copy_(make_q(2, 32, 1, 128, torch.bfloat16, seed=seed))
        graph_full.replay()
        ref_method.set_phase(cache, 0, "full")  # its counter moved on with the last comparison
        assert ref_method.select(q, cache, 0) is None
        torch.cuda.synchronize()
        for name in ("tokens", "counts", "base"):
            assert torch.equal(st[name], ref_method.state(cache, 0)[name]), (seed, name)
        graph.replay()  # the recycle capture reads the refreshed set
        torch.cuda.synchronize()
        ref_method.set_phase(cache, 0, "recycle")
        assert torch.equal(tok, ref_method.select(q, cache, 0).tokens)


@requires_cuda
def test_cuda_bench_row_is_graph_timed_per_phase(tmp_path):
    args = bench_args(tmp_path, device="cuda", dtype="bfloat16", contexts="4096", shapes="32/8/128")
    assert bench.run(args) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    check_recycled_rows(rows, "graph (phases)", 4096)
