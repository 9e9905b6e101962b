"""The Triton XAttention estimate (kernels/xattention_triton.py) against the PyTorch oracle
``antidiagonal_block_scores`` it replaces on CUDA.

On the CPU the kernels run in the Triton interpreter (conftest.py), so the shapes are small; tile
configs are forced small too, so that several query tiles, key tiles, key splits and reduction
steps appear. Float32 inputs: within 1e-4 (abs and rel) of the oracle, and exactly 0 wherever the
oracle is 0 (blocks no grouped row can see). The GPU twins at the end run bf16 at real sizes.
"""

import pytest
import torch

import sparseattn.methods.xattention as xmod
from sparseattn.methods import get_method
from sparseattn.methods.xattention import antidiagonal_block_scores

from ..conftest import HAS_CUDA, requires_cuda, triton_importable

pytestmark = [pytest.mark.skipif(not triton_importable(), reason="triton is not importable"),
              # log2 of a block with no visible column is -inf on purpose (numpy warns in the interpreter)
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")]

DEVICE = "cuda" if HAS_CUDA else "cpu"
# 16x16 tiles, 16-wide feature steps, one key tile per program, 16 key blocks per reduction step.
SMALL = (16, 16, 16, 1, 4, 1, 16)


def _kernel():
    from sparseattn.kernels import xattention_triton

    return xattention_triton


def check(B, Hq, Hkv, Lq, Lk, D, *, block, stride, causal, norm=1.0, config=None, dtype=torch.float32, scale=1.0,
          seed=0, atol=1e-4, rtol=1e-4):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, Hq, Lq, D, generator=g) * scale).to(dtype).to(DEVICE)
    k = (torch.randn(B, Hkv, Lk, D, generator=g) * scale).to(dtype).to(DEVICE)
    out = _kernel().antidiagonal_block_scores_triton(q, k, block=block, stride=stride, causal=causal, norm=norm,
                                                     config=config)
    # The oracle on the same (rounded) values in float32: on CUDA its half path would round logits to 16 bits.
    ref = antidiagonal_block_scores(q.float(), k.float(), block=block, stride=stride, causal=causal, norm=norm)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out, ref.float(), atol=atol, rtol=rtol)
    assert (out[ref == 0] == 0).all(), "blocks that no grouped row sees must be exactly 0"
    return out


# (B, Hq, Hkv, Lq, Lk, D, block, stride, causal)
CASES = [
    (1, 2, 2, 203, 203, 16, 16, 4, True),  # L a multiple of neither block nor stride
    (1, 2, 2, 203, 203, 16, 16, 4, False),
    (1, 2, 1, 205, 205, 16, 32, 8, True),  # partial last key group and query group
    (1, 2, 1, 200, 200, 16, 32, 8, False),
    (1, 1, 1, 70, 203, 16, 32, 8, True),  # Lq < Lk: bottom-right alignment
    (1, 1, 1, 70, 203, 16, 16, 4, False),
    (1, 2, 2, 150, 97, 16, 16, 4, True),  # Lq > Lk: the first query rows see nothing (rows of 0)
    (2, 3, 1, 99, 130, 16, 16, 4, True),  # GQA group 3, batch 2
    (2, 3, 3, 99, 130, 16, 32, 8, True),  # GQA group 1, batch 2
    (1, 1, 1, 10, 10, 16, 16, 4, True),  # one (partial) block
    (1, 1, 1, 32, 32, 16, 32, 8, True),  # one whole block
    (1, 1, 1, 1, 45, 16, 16, 4, True),  # one query
    (1, 1, 1, 45, 1, 16, 16, 4, True),  # one key
]


@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,block,stride,causal", CASES)
def test_matches_oracle(B, Hq, Hkv, Lq, Lk, D, block, stride, causal):
    check(B, Hq, Hkv, Lq, Lk, D, block=block, stride=stride, causal=causal)


# Geometry corners, with small tiles: (Lq, Lk, D, block, stride, causal)
SMALL_CASES = [
    (203, 203, 16, 16, 4, True),  # 4 key tiles -> 4 key splits per row, several reduction steps
    (203, 150, 16, 64, 2, True),  # rb = 32 grouped rows per block > block_m: a block spans query tiles
    (203, 203, 20, 24, 4, True),  # rb = 6: padded row/column slots; D = 20: masked feature steps
    (150, 203, 24, 12, 4, False),  # rb = 3, D = 24 not a multiple of the 16-wide feature step
    (77, 77, 16, 4, 4, True),  # rb = 1: block == stride
    (90, 120, 16, 16, 1, True),  # stride 1: plain block sums of the softmax
    (120, 90, 16, 48, 4, True),  # rb = 12, Lq > Lk
]


@pytest.mark.parametrize("Lq,Lk,D,block,stride,causal", SMALL_CASES)
def test_small_tiles(Lq, Lk, D, block, stride, causal):
    check(1, 2, 1, Lq, Lk, D, block=block, stride=stride, causal=causal, config=SMALL)


def test_norm_and_large_logits():
    # norm != 1; then logits ~ +-100 that move the running row max across key tiles and splits.
    check(1, 2, 1, 203, 203, 16, block=16, stride=4, causal=True, norm=0.5)
    check(1, 2, 1, 203, 203, 16, block=16, stride=4, causal=True, scale=6.0, config=SMALL, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(dtype):
    # 16-bit inputs accumulate in fp32: the oracle on the same values in float32 (CPU path).
    check(1, 2, 1, 130, 130, 16, block=32, stride=4, causal=True, dtype=dtype)


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 100, 2, 16, generator=g).to(DEVICE).transpose(1, 2)  # [B, H, L, D] view of [B, L, H, D]
    k = torch.randn(1, 120, 1, 32, generator=g).to(DEVICE)[..., ::2].transpose(1, 2)
    out = _kernel().antidiagonal_block_scores_triton(q, k, block=16, stride=4, causal=True)
    ref = antidiagonal_block_scores(q, k, block=16, stride=4, causal=True)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cap", [3000, 700])
def test_scratch_chunks(monkeypatch, cap):
    # 3000 floats: a few (batch, head) pairs per launch; 700: one pair, its query rows in chunks.
    monkeypatch.setattr(_kernel(), "SCRATCH_ELEMENTS", cap)
    check(2, 3, 1, 203, 180, 16, block=16, stride=4, causal=True, config=SMALL)


def test_empty_and_bad_inputs():
    f = _kernel().antidiagonal_block_scores_triton
    q, k = torch.randn(1, 2, 40, 16), torch.randn(1, 1, 40, 16)
    assert f(q[:, :, :0], k, block=16, stride=4, causal=True).shape == (1, 2, 0, 3)
    assert f(q[:0], k[:0], block=16, stride=4, causal=True).shape == (0, 2, 3, 3)
    bad = [
        (dict(q=q[0]), "4-d"),
        (dict(k=torch.randn(1, 1, 40, 8)), "head_dim"),
        (dict(k=torch.randn(1, 3, 40, 16)), "multiple of key heads"),
        (dict(q=q.double(), k=k.double()), "dtype"),
        (dict(k=k.half()), "dtype"),
        (dict(block=18), "multiple of stride"),
        (dict(stride=0), "stride"),
        (dict(norm=0.0), "norm"),
        (dict(causal=1), "causal"),
        (dict(config=(16, 24, 16, 1, 4, 1, 16)), "powers of two"),
        (dict(config=(8, 16, 16, 1, 4, 1, 16)), "powers of two"),
    ]
    for override, match in bad:
        args = dict(q=q, k=k, block=16, stride=4, causal=True, norm=1.0)
        args.update(override)
        with pytest.raises(ValueError, match=match):
            f(args.pop("q"), args.pop("k"), **args)


def test_xattention_score_dispatch(monkeypatch):
    mod = _kernel()
    real, calls = mod.antidiagonal_block_scores_triton, []
    monkeypatch.setattr(mod, "antidiagonal_block_scores_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(xmod, "use_triton_estimator", lambda x: True)
    method = get_method("xattention", block_size=32, stride=8, norm=2.0)
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 3, 100, 16, generator=g), torch.randn(1, 1, 100, 16, generator=g)
    if torch.cuda.is_available():  # compiled there; the interpreter runs the CPU tensors elsewhere
        q, k = q.cuda(), k.cuda()
    out = method.score(q, k, causal=True)
    assert calls == [1]
    ref = antidiagonal_block_scores(q, k, block=32, stride=8, causal=True, norm=2.0)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    method.score(q.double(), k.double(), causal=True)  # float64 stays on the PyTorch path
    assert calls == [1]
    monkeypatch.setattr(xmod, "use_triton_estimator", lambda x: False)
    method.score(q, k, causal=True)
    assert calls == [1]


# ----------------------------------------------------------------------------- GPU twins
# bf16 inputs; the oracle runs on the same bf16 values in float32 (no TF32: torch's default), so
# both sum the same products in fp32 and differ only in order and in exp2/log2 rounding: block
# masses (up to rb = block / stride) agree within 1e-3 abs + 1e-3 rel.
@requires_cuda
@pytest.mark.parametrize("Hq,Hkv,Lq,Lk,D,stride", [
    (9, 3, 8192, 8192, 64, 8),  # SmolLM2 heads at 8K
    (9, 3, 8192, 8192, 64, 16),
    (9, 3, 3000, 8197, 64, 8),  # Lq < Lk, ragged
    (8, 2, 16389, 16389, 128, 8),  # 32/8/128-style heads (fewer of them), ragged
])
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_bf16_matches_oracle(Hq, Hkv, Lq, Lk, D, stride, causal):
    check(1, Hq, Hkv, Lq, Lk, D, block=128, stride=stride, causal=causal, dtype=torch.bfloat16, atol=1e-3, rtol=1e-3)


@requires_cuda
def test_cuda_fp32_and_graph_capture():
    check(2, 4, 2, 2000, 2100, 64, block=64, stride=4, causal=True)  # exact (ieee) fp32 dot products
    q = torch.randn(1, 9, 4096, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 3, 4096, 64, device="cuda", dtype=torch.bfloat16)
    f = _kernel().antidiagonal_block_scores_triton
    first = f(q, k, block=128, stride=8, causal=True)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = f(q, k, block=128, stride=8, causal=True)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, first, atol=0, rtol=0)
