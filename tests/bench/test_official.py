"""The official-baseline helpers (sparseattn.bench.official) on the CPU: flat indices -> masks,
the crop of XAttention's chunk-padded masks, the two official densities, the loader's errors.

The official code itself needs CUDA; only the loader test (and a check of our reading of
FlexPrefill's flat indices against its own pure-torch index transform) uses it, when
``SPARSEATTN_OFFICIAL_SRC`` names an extracted MInference 0.1.6.0 sdist.
"""

import os

import pytest
import torch

from sparseattn.bench import official as of
from sparseattn.bench.methods import plan_density
from sparseattn.plan import BlockPlan

OFFICIAL_SRC = os.environ.get(of.ENV_VAR)
needs_official = pytest.mark.skipif(not OFFICIAL_SRC, reason=f"set {of.ENV_VAR} to an extracted minference-0.1.6.0 "
                                    "sdist to load the official code")


def _flat_lists(mask: torch.Tensor):
    """Per (batch, head): the flat indices ``m * n + j`` of the True blocks, as 1-D int64 tensors."""
    n = mask.shape[-1]
    return [[(torch.nonzero(mask[b, h]) * torch.tensor([n, 1])).sum(-1) for h in range(mask.shape[1])]
            for b in range(mask.shape[0])]


# ----------------------------------------------------------------------------- flat indices
def test_documented_4x4_example():
    expected = torch.zeros(4, 4, dtype=torch.bool)
    for m, j in [(0, 0), (1, 1), (2, 0), (3, 1), (3, 2)]:
        expected[m, j] = True
    idx = torch.tensor([0, 5, 8, 13, 14])
    as_tensor = of.mask_from_flat_block_indices(idx.view(1, 1, -1), 4)
    as_lists = of.mask_from_flat_block_indices([[idx]], 4)
    assert as_tensor.shape == (1, 1, 4, 4) and as_tensor.dtype == torch.bool
    assert torch.equal(as_tensor[0, 0], expected) and torch.equal(as_lists[0, 0], expected)


def test_random_masks_round_trip_with_padding_zeros_and_duplicates():
    g = torch.Generator().manual_seed(0)
    B, H, n = 2, 3, 7
    mask = torch.rand(B, H, n, n, generator=g) < 0.3
    mask[..., 0, 0] = True  # FlexPrefill always selects block (0, 0): zero padding is then harmless
    mask[0, 1] = False
    mask[0, 1, 0, 0] = True  # a head with block (0, 0) only
    lists = _flat_lists(mask)
    padded_lists = []
    for row in lists:
        out = []
        for t in row:
            perm = t[torch.randperm(t.numel(), generator=g)]
            dup = perm[: max(1, t.numel() // 2)]
            out.append(torch.cat([perm, dup, torch.zeros(3, dtype=torch.int64)]))  # shuffled, repeated, zero-padded
        padded_lists.append(out)
    assert torch.equal(of.mask_from_flat_block_indices(padded_lists, n), mask)
    # The padded tensor form, with zeros and with the official kernel's pad value n * (n + 1).
    width = max(t.numel() for row in padded_lists for t in row) + 2
    for pad in (0, n * (n + 1)):
        t = torch.full((B, H, width), pad, dtype=torch.int64)
        for b in range(B):
            for h in range(H):
                x = padded_lists[b][h]
                t[b, h, : x.numel()] = x
        assert torch.equal(of.mask_from_flat_block_indices(t, n), mask)
        assert torch.equal(of.mask_from_flat_block_indices(t.to(torch.int32), n), mask)


def test_flat_indices_edge_cases_and_bad_inputs():
    empty = of.mask_from_flat_block_indices([[torch.zeros(0, dtype=torch.int64)] * 2], 3)
    assert empty.shape == (1, 2, 3, 3) and not empty.any()
    out_of_range = of.mask_from_flat_block_indices(torch.tensor([[[-1, 9, 12, 4]]]), 3)
    assert out_of_range.sum() == 1 and out_of_range[0, 0, 1, 1]
    with pytest.raises(ValueError, match="same, non-zero number of heads"):
        of.mask_from_flat_block_indices([[torch.tensor([0])], []], 2)
    with pytest.raises(ValueError, match=r"\[B, H, N\]"):
        of.mask_from_flat_block_indices(torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match="integer"):
        of.mask_from_flat_block_indices([[torch.tensor([0.0])]], 2)
    with pytest.raises(ValueError, match="n_blocks"):
        of.mask_from_flat_block_indices([[torch.tensor([0])]], 0)


# ----------------------------------------------------------------------------- XAttention's padded mask
def test_crop_of_a_chunk_padded_mask():
    L, bs, chunk = 1000, 128, 2048  # 8 real blocks, padded to 16
    g = torch.Generator().manual_seed(1)
    padded = torch.rand(1, 2, chunk // bs, chunk // bs, generator=g) < 0.5
    crop = of.crop_chunk_padded_mask(padded, q_len=L, k_len=L, block_size=bs)
    assert crop.shape == (1, 2, 8, 8) and torch.equal(crop, padded[:, :, :8, :8])
    plan = BlockPlan.from_block_mask(crop, block_q=bs, block_k=bs, q_len=L, k_len=L, causal=True)
    assert torch.equal(plan.block_mask(), crop & torch.ones(8, 8, dtype=torch.bool).tril())
    with pytest.raises(ValueError, match="smaller"):
        of.crop_chunk_padded_mask(padded[:, :, :7], q_len=L, k_len=L, block_size=bs)
    with pytest.raises(ValueError, match="nQ_padded"):
        of.crop_chunk_padded_mask(padded[0], q_len=L, k_len=L)


def test_official_chunk_size_follows_xattention_prefill():
    assert [of.official_chunk_size(n) for n in (1000, 8192, 32768, 65536, 131072, 262144)] == \
        [2048, 8192, 8192, 4096, 2048, 2048]


# ----------------------------------------------------------------------------- densities
def test_the_two_density_denominators_on_a_hand_built_mask():
    n, bs = 4, 128
    L = n * bs
    mask = torch.zeros(1, 2, n, n, dtype=torch.bool)
    for m, j in [(0, 0), (1, 1), (2, 0), (3, 1), (3, 2)]:  # head 0: 5 blocks
        mask[0, 0, m, j] = True
    mask[0, 1] = torch.ones(n, n, dtype=torch.bool).tril()  # head 1: all 10 causal blocks
    assert of.square_block_density(mask) == pytest.approx(15 / 32)
    assert of.causal_block_density(mask, q_len=L, k_len=L) == pytest.approx(15 / 20)
    # A future block counts in the mask's square (every True entry), never in the causal figure.
    future = mask.clone()
    future[0, 0, 0, 3] = True
    assert of.square_block_density(future) == pytest.approx(16 / 32)
    assert of.causal_block_density(future, q_len=L, k_len=L) == pytest.approx(15 / 20)
    # A plan keeps only the causal blocks: both figures agree with the mask's.
    plan = BlockPlan.from_block_mask(future, block_q=bs, block_k=bs, q_len=L, k_len=L, causal=True)
    assert of.plan_block_densities(plan) == pytest.approx({"square_density": 15 / 32, "causal_block_density": 15 / 20})
    # Ours (plan_density) counts elements: a kept diagonal block has bs (bs + 1) / 2 visible ones.
    visible = L * (L + 1) / 2
    diag = bs * (bs + 1) / 2
    kept = (2 * diag + 3 * bs * bs) + (4 * diag + 6 * bs * bs)
    assert plan_density(plan) == pytest.approx(kept / (2 * visible))
    off_diagonal = BlockPlan.from_block_mask(mask[:, :1] & ~torch.eye(n, dtype=torch.bool), block_q=bs, block_k=bs,
                                             q_len=L, k_len=L, causal=True)  # (2,0), (3,1), (3,2)
    assert of.causal_block_density(off_diagonal) == pytest.approx(3 / 10)
    assert plan_density(off_diagonal) == pytest.approx(3 * bs * bs / visible)  # > 3 / 10: full blocks weigh more
    with pytest.raises(ValueError, match="q_len and k_len"):
        of.causal_block_density(mask)


def test_dense_causal_plan_is_half_the_square_plus_the_diagonal():
    plan = BlockPlan.dense(1, 3, q_len=8 * 128, k_len=8 * 128)
    assert of.square_block_density(plan) == pytest.approx(36 / 64)
    assert of.causal_block_density(plan) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- adapters (no official code needed)
def test_adapter_defaults_and_checks():
    x = of.OfficialXAttention()
    cfg = x.config()
    assert (cfg["stride"], cfg["threshold"], cfg["block_size"], cfg["chunk_size"], cfg["norm"]) == (16, 0.9, 128,
                                                                                                   None, 1.0)
    assert "src" not in cfg and cfg["select_mode"] == "inverse"
    f = of.OfficialFlexPrefill()
    assert (f.config()["gamma"], f.config()["tau"], f.block_size) == (0.9, 0.1, 128)
    assert f.budgets_in_blocks() == (1, 16777216)  # ceil(1 / 128), ceil((2**31 - 1) / 128)
    with pytest.raises(ValueError, match="multiple of stride"):
        of.OfficialXAttention(stride=48)
    with pytest.raises(ValueError, match="chunk_size"):
        of.OfficialXAttention(chunk_size=1000)
    with pytest.raises(ValueError, match="gamma"):
        of.OfficialFlexPrefill(gamma=0.0)
    q = torch.randn(1, 2, 256, 16)
    k = torch.randn(1, 1, 256, 16)
    with pytest.raises(ValueError, match="CUDA only"):
        of.OfficialFlexPrefill(src="/nonexistent").plan(q, k, k)


def test_einops_stand_in_merges_neighbouring_axes_only():
    x = torch.randn(2, 3, 4, 5, 6)
    assert torch.equal(of._rearrange_merge_only(x, "b h g i j -> b (h g) i j"), x.reshape(2, 12, 5, 6))
    with pytest.raises(NotImplementedError):
        of._rearrange_merge_only(x, "b h g i j -> b (g h) i j")
    with pytest.raises(NotImplementedError):
        of._rearrange_merge_only(x, "b h g i j -> b h g j i")


# ----------------------------------------------------------------------------- loading
def test_missing_official_source_raises_with_the_fix(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as err:
        of.load_official(tmp_path / "nope")
    text = str(err.value)
    assert "does not exist" in text and "https://pypi.org/simple/minference/" in text and "--official-src" in text
    monkeypatch.delenv(of.ENV_VAR, raising=False)
    with pytest.raises(FileNotFoundError, match=of.ENV_VAR):
        of.load_official(None)
    partial = tmp_path / "minference-0.1.6.0" / "minference"
    (partial / "modules").mkdir(parents=True)
    (partial / "modules" / "xattention.py").write_text("")
    with pytest.raises(FileNotFoundError, match="ops/xattention_fa.py, modules/flexprefill.py"):
        of.load_official(tmp_path / "minference-0.1.6.0")
    with pytest.raises(FileNotFoundError, match="neither"):
        of.load_official(tmp_path)


@needs_official
def test_loader_finds_the_three_functions_without_minference_init():
    import sys

    had_minference = "minference" in sys.modules
    code = of.load_official(OFFICIAL_SRC)
    assert callable(code.xattn_estimate) and callable(code.get_active_blocks)
    assert callable(code.flex_prefill_attention)
    assert code.xattention.find_blocks_chunked.__module__ == f"{code.package}.modules.xattention"
    assert ("minference" in sys.modules) == had_minference  # minference/__init__.py (CUDA extensions) never ran
    assert of.load_official(OFFICIAL_SRC) is code and of.load_official(code) is code
    assert set(code.sha256) == set(of.FILES.values())


@needs_official
def test_our_reading_of_flat_indices_matches_the_official_transform():
    """``transform_veritcal_slash_idx`` (pure torch) on chosen vertical and slash blocks gives the
    mask those lines mean: column j for rows m >= j, diagonal s as blocks (m, m - s)."""
    code = of.load_official(OFFICIAL_SRC)
    n = 6
    v_idx = torch.tensor([[[0, 2, 0], [0, 5, 0]]])  # [B=1, H=2, 3], zero-padded as get_active_blocks does
    s_idx = torch.tensor([[[0, 3, 1], [0, 0, 0]]])
    got = of.mask_from_flat_block_indices(code.flexprefill.transform_veritcal_slash_idx(v_idx, s_idx, n), n)
    want = torch.zeros(1, 2, n, n, dtype=torch.bool)
    for h, (cols, diags) in enumerate([({0, 2}, {0, 3, 1}), ({0, 5}, {0})]):
        for m in range(n):
            for j in range(n):
                want[0, h, m, j] = (j in cols and j <= m) or (m - j in diags)
    assert torch.equal(got, want)


@needs_official
def test_official_xattention_selection_against_ours(monkeypatch):
    """Our XAttention against the official estimate (its PyTorch path, float32, on the CPU) at the
    official settings (stride 16, threshold 0.9): the block scores are equal; after the first chunk
    of queries the plans are equal; in the first chunk (``current_index == 0``) the official
    ``find_blocks_chunked`` departs from the rule it states. There the diagonal's ``eye``
    overwrites the forced sink column, so a row has one forced block (its diagonal), and the
    cumulative sum it compares lags one block: the official row keeps the diagonal, the sink
    (every unselected position is written as index 0) and the ``max(1, m + 1)`` highest other
    visible blocks (the sink among them), ``m`` being the fewest whose mass with the diagonal's
    reaches the threshold; ours counts the sink's mass as forced and keeps the fewest."""
    import sparseattn as sa
    from sparseattn.bench.synthetic import structured_qkv
    from sparseattn.methods.xattention import antidiagonal_block_scores

    code = of.load_official(OFFICIAL_SRC)
    real_to = torch.Tensor.to

    def to_cpu(self, *args, **kw):  # the official PyTorch path moves tensors to "cuda": stay on the CPU
        if args and str(args[0]).startswith("cuda"):
            return self
        return real_to(self, *args, **kw)

    monkeypatch.setattr(torch.Tensor, "to", to_cpu)
    # L not a multiple of the chunk: the official PyTorch path masks every key before a later chunk
    # when there is no padding (its ``causal_mask[..., -0:]``; its Triton path, used on an H100, does
    # not), so the comparison of later chunks needs a padded tail.
    L, chunk, stride, threshold = 4000, 2048, 16, 0.9
    q, k, v = structured_qkv(1, 4, 2, L, 64, seed=0, device="cpu", dtype=torch.float32)
    sums, masks = code.xattn_estimate(q, k.repeat_interleave(2, 1), block_size=128, stride=stride, norm=1,
                                      threshold=threshold, chunk_size=chunk, select_mode="inverse", use_triton=False,
                                      causal=True, kdb=1)
    n, first = -(-L // 128), chunk // 128
    scores = antidiagonal_block_scores(q, k, block=128, stride=stride, causal=True)
    torch.testing.assert_close(sums[..., :n, :n].float(), scores, atol=1e-5, rtol=1e-5)
    official = of.crop_chunk_padded_mask(masks, q_len=L, k_len=L, block_size=128)
    ours = sa.get_method("xattention", stride=stride, threshold=threshold).plan(q, k, v).block_mask()
    ours = ours.expand_as(official) if ours.shape[1] == 1 else ours
    assert torch.equal(official[..., first:, :], ours[..., first:, :])
    expected = torch.zeros_like(official[..., :first, :])
    for h in range(scores.shape[1]):
        for i in range(first):
            row = scores[0, h, i].double()
            others = sorted((j for j in range(i)), key=lambda j: -row[j].item())
            mass, m = row[i].item(), 0
            while m < len(others) and mass < threshold * row.sum().item():
                mass += row[others[m]].item()
                m += 1
            # Block 0 too: unselected positions are written as index 0 ("index = where(mask, index, 0)").
            expected[0, h, i, [0, i] + others[:max(1, m + 1)]] = True
    assert torch.equal(official[..., :first, :], expected)
    assert (official & ~ours).any()  # the departure shows on these inputs
