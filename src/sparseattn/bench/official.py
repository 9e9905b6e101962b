"""The official XAttention and FlexPrefill code, run as baselines (issue 3: "ours must be >= 3x
faster than the official implementations at equal or better attention-mass recall").

Nothing here copies the official code: it is *loaded* from MInference 0.1.6.0's source
distribution (MIT license), which carries both methods' reference implementations:

* ``minference/modules/xattention.py`` + ``minference/ops/xattention_fa.py``: XAttention's
  estimate ``xattn_estimate`` (ported from mit-han-lab/x-attention, with its Triton kernels);
* ``minference/modules/flexprefill.py``: FlexPrefill's ``get_active_blocks``,
  ``flex_prefill_attention`` and its Triton block-sparse kernel.

:func:`load_official` imports those three files under a synthetic package
(:data:`PACKAGE`) without running ``minference/__init__.py``, which pulls MInference's CUDA
extensions. What it gives back is wrapped three ways:

* pure helpers turning the official outputs into a :class:`~sparseattn.plan.BlockPlan`
  (:func:`mask_from_flat_block_indices` for FlexPrefill's flat block indices,
  :func:`crop_chunk_padded_mask` for XAttention's chunk-padded masks) and the official density
  figures (:func:`square_block_density`, :func:`causal_block_density`);
* the adapters :class:`OfficialXAttention` and :class:`OfficialFlexPrefill`, with the
  ``plan(q, k, v, *, causal, layer_idx)`` / ``config()`` interface of our methods, so that
  :func:`sparseattn.bench.methods.run_case` times the official estimate, our kernel on the
  official plan, and the recall, exactly as for our methods;
* :func:`official_flexprefill_attention_fn` and :func:`official_xattention_attention_fn`: the
  official end-to-end attention as a callable to time.

Layout at this module's boundary: ours, ``q [B, Hq, L, D]``, ``k, v [B, Hkv, L, D]``; the
adapters convert to what the official functions take.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.util
import math
import os
import re
import sys
import types
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

from ..plan import BlockPlan

PACKAGE = "sparseattn_official_src"
ENV_VAR = "SPARSEATTN_OFFICIAL_SRC"
SDIST = "minference-0.1.6.0"
# Module name under the synthetic package -> file under the ``minference`` package directory.
# Order matters: xattention.py imports ``..ops.xattention_fa``.
FILES = {
    "ops.xattention_fa": "ops/xattention_fa.py",
    "modules.xattention": "modules/xattention.py",
    "modules.flexprefill": "modules/flexprefill.py",
}
FETCH_HINT = (
    f"The official code is read from MInference 0.1.6.0's source distribution ({SDIST}.tar.gz, MIT license). "
    "`pip download --no-deps --no-binary :all: minference==0.1.6.0` fails while preparing metadata (its setup.py "
    "builds CUDA extensions), so fetch the tarball from PyPI's simple index and extract it:\n"
    "  url=$(curl -s https://pypi.org/simple/minference/ "
    "| grep -o 'https://[^\"#]*minference-0\\.1\\.6\\.0\\.tar\\.gz' | head -1)\n"
    f"  curl -sL \"$url\" -o /tmp/{SDIST}.tar.gz && mkdir -p /tmp/mdl && tar xzf /tmp/{SDIST}.tar.gz -C /tmp/mdl\n"
    f"then pass --official-src /tmp/mdl/{SDIST} (or set {ENV_VAR}=/tmp/mdl/{SDIST}).")

# Where each default of the adapters comes from.
XATTN_DEFAULTS_SOURCE = {
    "stride": "16: the first of XAttention's RULER settings (mit-han-lab/x-attention scripts/run_ruler.sh runs 16, "
              "8, 4) and ../shared/GPU.md's official measurement; MInference's xattention_forward defaults to 8",
    "threshold": "0.9: MInference's xattention_forward default and GPU.md (Xattention_prefill's own default is 0.8)",
    "block_size": "128: Xattention_prefill's default (it asserts block_size == 128)",
    "norm": "1: Xattention_prefill's default",
    "chunk_size": "None: computed as Xattention_prefill does when None (8192 at 32K); MInference's xattention_forward "
                  "passes 2048",
    "use_triton": "True: Xattention_prefill's default; xattn_estimate itself falls back to its PyTorch path on a GPU "
                  "whose name lacks '100' (H200: yes, H100: no)",
    "select_mode/kdb/keep_sink/keep_recent": "'inverse' / 1 / False / False: Xattention_prefill's call",
}
FLEX_DEFAULTS_SOURCE = {
    "gamma": "0.9: MInference's flexprefill_forward and models_patch defaults, GPU.md (FlexPrefill's repo: 0.8)",
    "tau": "0.1: MInference's flexprefill_forward and models_patch defaults, GPU.md",
    "min_budget": "None = 1 token = ceil(1 / 128) = 1 block: flex_prefill_attention in MInference (FlexPrefill's "
                  "repo: 1024 tokens)",
    "max_budget": "None = 2**31 - 1 tokens (no cap): flex_prefill_attention",
    "block_size": "128: flex_prefill_attention's default",
    "gqa_interleave": "False: q head h reads KV head h // G, our layout (flex_prefill_attention's default)",
}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------- loading
@dataclass(frozen=True)
class OfficialCode:
    """The three official modules, loaded by :func:`load_official`."""

    root: Path  # the ``minference`` package directory
    package: str
    xattention_fa: types.ModuleType
    xattention: types.ModuleType
    flexprefill: types.ModuleType
    version: Optional[str]  # from the sdist's PKG-INFO, when there
    sha256: Dict[str, str]  # of each loaded file, for the results' environment
    einops_shim: bool  # flexprefill.py was loaded with our merge-only ``rearrange`` (no einops installed)

    @property
    def xattn_estimate(self) -> Callable:
        return self.xattention.xattn_estimate

    @property
    def get_active_blocks(self) -> Callable:
        return self.flexprefill.get_active_blocks

    @property
    def flex_prefill_attention(self) -> Callable:
        return self.flexprefill.flex_prefill_attention

    def describe(self) -> dict:
        """JSON-ready facts: where the code came from and which bytes ran."""
        return {"root": str(self.root), "package": self.package, "version": self.version, "sha256": self.sha256,
                "einops_shim": self.einops_shim}


_LOADED: Dict[Path, OfficialCode] = {}


def find_official_root(src: Union[str, os.PathLike, None] = None) -> Path:
    """The ``minference`` package directory inside ``src`` (the extracted sdist's root, or that
    package directory itself); ``src=None`` reads :data:`ENV_VAR`.

    Raises ``FileNotFoundError`` naming what is missing and how to get it (:data:`FETCH_HINT`).
    """
    if src is None:
        src = os.environ.get(ENV_VAR) or None
        if src is None:
            raise FileNotFoundError(f"no official source directory given (argument or {ENV_VAR}).\n{FETCH_HINT}")
    base = Path(src).expanduser()
    if not base.is_dir():
        raise FileNotFoundError(f"official source directory {str(base)!r} does not exist.\n{FETCH_HINT}")
    for root in (base / "minference", base):
        if (root / "modules").is_dir() or (root / "ops").is_dir():
            missing = [rel for rel in FILES.values() if not (root / rel).is_file()]
            if missing:
                raise FileNotFoundError(f"{str(root)!r} lacks {', '.join(missing)}: not an extracted {SDIST} sdist?\n"
                                        f"{FETCH_HINT}")
            return root.resolve()
    raise FileNotFoundError(f"{str(base)!r} holds neither minference/modules/ nor modules/: not an extracted {SDIST} "
                            f"sdist?\n{FETCH_HINT}")


def _rearrange_merge_only(tensor: torch.Tensor, pattern: str) -> torch.Tensor:
    """``einops.rearrange`` for patterns that only merge neighbouring axes, in order.

    flexprefill.py needs einops for one call, ``rearrange(qk, "b h g i j -> b (h g) i j")``,
    which is a reshape; this stands in when einops is not installed (a GPU machine without
    network). Any other pattern raises ``NotImplementedError``.
    """
    left, sep, right = pattern.partition("->")
    names = left.split()
    groups = [g[0].split() if g[0] else [g[1]] for g in re.findall(r"\(([^)]*)\)|([^\s()]+)", right)]
    in_order = [n for g in groups for n in g] == names and len(set(names)) == len(names)
    if not sep or not in_order or len(names) != tensor.dim():
        raise NotImplementedError(f"the einops stand-in only merges neighbouring axes in order, got {pattern!r} for "
                                  f"a {tensor.dim()}-D tensor (install einops for the general case)")
    sizes = dict(zip(names, tensor.shape, strict=True))
    return tensor.reshape([math.prod(sizes[n] for n in g) for g in groups])


@contextlib.contextmanager
def _einops_importable():
    """Yields whether a stand-in ``einops`` module was put in ``sys.modules`` (removed on exit)."""
    try:
        import einops  # noqa: F401

        have = True
    except ImportError:
        have = False
    if have:  # (not inside the try: an ImportError of the loaded file must not land in that except)
        yield False
        return
    shim = types.ModuleType("einops")
    shim.rearrange = _rearrange_merge_only
    sys.modules["einops"] = shim
    try:
        yield True
    finally:
        if sys.modules.get("einops") is shim:
            del sys.modules["einops"]


def _package(name: str, path: Path) -> types.ModuleType:
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(path)]
    mod = importlib.util.module_from_spec(spec)  # no __init__.py runs: the package is synthetic
    sys.modules[name] = mod
    return mod


def load_official(src: Union[str, os.PathLike, "OfficialCode", None] = None) -> OfficialCode:
    """Import the three official files from an extracted MInference 0.1.6.0 sdist.

    ``src``: the sdist root (``.../minference-0.1.6.0``) or its ``minference`` directory; None
    reads :data:`ENV_VAR`; an :class:`OfficialCode` is returned as is. Loaded once per directory.

    The files are imported as ``sparseattn_official_src.{ops.xattention_fa, modules.xattention,
    modules.flexprefill}`` under synthetic packages whose search paths are the sdist's
    ``minference``, ``ops`` and ``modules`` directories, so their relative imports
    (``from ..ops.xattention_fa import ...``; flexprefill.py's fallback ``from
    ..ops.flash_attn_triton import ...`` when flash_attn is absent) resolve to the sdist's files
    while ``minference/__init__.py`` (CUDA extensions) never runs. Needs torch and triton;
    einops is replaced by :func:`_rearrange_merge_only` while flexprefill.py loads if it is not
    installed.
    """
    if isinstance(src, OfficialCode):
        return src
    root = find_official_root(src)
    if root in _LOADED:
        return _LOADED[root]
    package = PACKAGE if not any(c.package == PACKAGE for c in _LOADED.values()) else f"{PACKAGE}_{len(_LOADED)}"
    created: List[str] = []
    mods: Dict[str, types.ModuleType] = {}
    shim_used = False
    try:
        top = _package(package, root)
        created.append(package)
        for sub in ("ops", "modules"):
            setattr(top, sub, _package(f"{package}.{sub}", root / sub))
            created.append(f"{package}.{sub}")
        for name, rel in FILES.items():
            full = f"{package}.{name}"
            spec = importlib.util.spec_from_file_location(full, root / rel)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[full] = mod
            created.append(full)
            with _einops_importable() as shim:
                spec.loader.exec_module(mod)
            shim_used |= shim and name == "modules.flexprefill"
            parent, _, leaf = full.rpartition(".")
            setattr(sys.modules[parent], leaf, mod)
            mods[name] = mod
    except Exception as exc:
        for name in list(sys.modules):  # leave no half-loaded package behind
            if name in created or name.startswith(package + "."):
                del sys.modules[name]
        raise ImportError(f"could not import the official code from {root}: {type(exc).__name__}: {exc} "
                          "(it needs torch and triton)") from exc
    for name, fn in (("modules.xattention", "xattn_estimate"), ("modules.flexprefill", "get_active_blocks"),
                     ("modules.flexprefill", "flex_prefill_attention")):
        if not callable(getattr(mods[name], fn, None)):
            raise ImportError(f"{root / FILES[name]} has no function {fn}: not MInference 0.1.6.0?")
    version = None
    pkg_info = root.parent / "PKG-INFO"
    if pkg_info.is_file():
        m = re.search(r"^Version:\s*(\S+)", pkg_info.read_text(errors="replace"), re.M)
        version = m.group(1) if m else None
    sha = {rel: hashlib.sha256((root / rel).read_bytes()).hexdigest() for rel in FILES.values()}
    code = OfficialCode(root=root, package=package, xattention_fa=mods["ops.xattention_fa"],
                        xattention=mods["modules.xattention"], flexprefill=mods["modules.flexprefill"],
                        version=version, sha256=sha, einops_shim=shim_used)
    _LOADED[root] = code
    return code


# ----------------------------------------------------------------------------- pure helpers
FlatIndices = Union[torch.Tensor, Sequence[Sequence[torch.Tensor]]]


def mask_from_flat_block_indices(block_idx: FlatIndices, n_blocks: int, *, device=None) -> torch.Tensor:
    """bool ``[B, H, n, n]`` from FlexPrefill's flat block indices (True = compute the block).

    ``block_idx``: what ``get_active_blocks`` returns (a list over the batch of lists over the
    query heads of 1-D index tensors, of varying lengths) or the padded int tensor ``[B, H, N]``
    that ``triton_block_wise_prefill_attention`` builds from it. Index ``m * n + j`` is query block
    ``m``, key block ``j`` of the ``n x n`` grid (its docstring: in a 4x4 grid, blocks (0,0),
    (1,1), (2,0), (3,1), (3,2) are ``[0, 5, 8, 13, 14]``).

    Duplicates are harmless. Zero is block (0, 0), a real block: FlexPrefill pads with zeros
    (``transform_veritcal_slash_idx``), which is safe because it always selects block (0, 0)
    (its first vertical block is forced). Entries outside ``[0, n * n)``, such as the official
    kernel's own padding value ``n * (n + 1)``, are ignored, as its kernel ignores them.
    """
    if not isinstance(n_blocks, int) or isinstance(n_blocks, bool) or n_blocks <= 0:
        raise ValueError(f"n_blocks must be a positive int, got {n_blocks!r}")
    nn_ = n_blocks * n_blocks
    if isinstance(block_idx, torch.Tensor):
        if block_idx.dim() != 3:
            raise ValueError(f"block_idx must be [B, H, N], got shape {tuple(block_idx.shape)}")
        if block_idx.dtype.is_floating_point or block_idx.dtype == torch.bool:
            raise ValueError(f"block_idx must hold integers, got {block_idx.dtype}")
        idx = block_idx.to(device) if device is not None else block_idx
    else:
        if not isinstance(block_idx, (list, tuple)) or not block_idx or not all(
                isinstance(row, (list, tuple)) for row in block_idx):
            raise ValueError("block_idx must be a [B, H, N] tensor or a non-empty list (batch) of lists (heads) "
                             "of 1-D index tensors, as get_active_blocks returns")
        B, H = len(block_idx), len(block_idx[0])
        if H == 0 or any(len(row) != H for row in block_idx):
            raise ValueError(f"every batch entry must list the same, non-zero number of heads, got "
                             f"{[len(row) for row in block_idx]}")
        flat = [t for row in block_idx for t in row]
        if not all(isinstance(t, torch.Tensor) and not t.dtype.is_floating_point for t in flat):
            raise ValueError("every head's entry must be an integer tensor of flat block indices")
        dev = device if device is not None else flat[0].device
        flat = [t.reshape(-1).to(device=dev, dtype=torch.int64) for t in flat]
        # The official kernel's own padding (out of range, hence ignored below).
        idx = torch.nn.utils.rnn.pad_sequence(flat, batch_first=True, padding_value=n_blocks * (n_blocks + 1))
        idx = idx.view(B, H, idx.shape[-1])  # (an explicit width: -1 is ambiguous when every list is empty)
    idx = idx.long()
    B, H = idx.shape[:2]
    inside = (idx >= 0) & (idx < nn_)
    dest = torch.where(inside, idx, torch.full_like(idx, nn_))  # outside -> a trash slot cut off below
    buf = torch.zeros(B, H, nn_ + 1, dtype=torch.bool, device=idx.device)
    buf.scatter_(-1, dest, True)
    return buf[..., :nn_].reshape(B, H, n_blocks, n_blocks)


def official_chunk_size(k_len: int) -> int:
    """The query chunk ``Xattention_prefill`` gives ``xattn_estimate`` when ``chunk_size=None``.

    The next power of two of ``k_len``, at least 2048, capped so that chunk x padded length stays
    at ``128K x 2048``: 8192 at 32K, 4096 at 64K, 2048 from 128K. It only sets how many query rows
    are scored at once (each row still sees all its keys), i.e. speed and memory, not the mask.
    """
    if k_len <= 0:
        raise ValueError(f"k_len must be positive, got {k_len}")
    pow2 = 1 << (k_len - 1).bit_length()
    return max(min(max(2048, pow2), (128 * 1024 * 2048) // pow2), 2048)


def crop_chunk_padded_mask(mask: torch.Tensor, *, q_len: int, k_len: int, block_size: int = 128) -> torch.Tensor:
    """``[B, H, ceil(q_len / bs), ceil(k_len / bs)]`` from ``xattn_estimate``'s ``simple_masks``.

    ``xattn_estimate`` pads q and k with zeros up to a multiple of its ``chunk_size`` and returns
    the mask of the padded grid (``[B, H, q_pad / bs, k_pad / bs]``; padded query blocks keep their
    forced sink and diagonal blocks). ``Xattention_prefill`` hands its kernel the top-left corner,
    ``mask[:, :, :q_block_num, :k_block_num]``; so does this (a view).
    """
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise ValueError(f"mask must be a [B, H, nQ_padded, nK_padded] tensor, got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    nQ, nK = _cdiv(q_len, block_size), _cdiv(k_len, block_size)
    if mask.shape[2] < nQ or mask.shape[3] < nK:
        raise ValueError(f"mask {tuple(mask.shape)} is smaller than the ({nQ}, {nK}) blocks of q_len={q_len}, "
                         f"k_len={k_len}, block_size={block_size}")
    return mask[:, :, :nQ, :nK]


def square_block_density(mask: Union[torch.Tensor, BlockPlan]) -> float:
    """Kept blocks / all ``nQ x nK`` blocks of the grid, over every (batch, head): FlexPrefill's
    ``return_computational_ratio`` (activated blocks / ``n * n * B * H``), the figure the official
    code reports. Up to one half for a dense causal plan. A plan counts its (causal) blocks; a
    mask counts every True entry."""
    if isinstance(mask, BlockPlan):
        total = mask.batch * mask.heads * mask.num_q_blocks * mask.num_k_blocks
        return float(mask.kv_counts.sum()) / total if total else 0.0
    total = mask.numel()
    return float(mask.sum()) / total if total else 0.0


def causal_block_density(mask: Union[torch.Tensor, BlockPlan], *, block_q: int = 128, block_k: int = 128,
                         q_len: Optional[int] = None, k_len: Optional[int] = None) -> float:
    """Kept causal-visible blocks / causal-visible blocks (``n (n + 1) / 2`` per head when
    ``q_len == k_len``): the denominator of MInference's commented-out XAttention print
    (``approx_simple_mask.sum() / ((k_block_num + 1) * k_block_num / 2 * num_heads)``).

    Every visible block weighs the same here; :func:`sparseattn.bench.methods.plan_density` counts
    visible elements (a diagonal block has about half of a full one's), so the two differ a little
    for the same plan, either way. A mask needs ``q_len`` and ``k_len`` (blocks beyond the causal
    limit are not counted).
    """
    if isinstance(mask, BlockPlan):
        block_q, block_k, q_len, k_len = mask.block_q, mask.block_k, mask.q_len, mask.k_len
        mask = mask.block_mask()
    if q_len is None or k_len is None:
        raise ValueError("causal_block_density of a mask needs q_len and k_len")
    nQ, nK = _cdiv(q_len, block_q), _cdiv(k_len, block_k)
    if tuple(mask.shape[-2:]) != (nQ, nK):
        raise ValueError(f"mask must end in (nQ, nK) = ({nQ}, {nK}), got {tuple(mask.shape)}")
    limits = BlockPlan.causal_block_limits(block_q=block_q, block_k=block_k, q_len=q_len, k_len=k_len,
                                           device=mask.device)
    visible = torch.arange(nK, device=mask.device).view(1, -1) < limits.view(-1, 1).long()
    heads = mask.numel() // (nQ * nK) if nQ * nK else 0
    total = int(limits.sum()) * heads
    return float((mask.bool() & visible).sum()) / total if total else 0.0


def plan_block_densities(plan: BlockPlan) -> dict:
    """``{"square_density", "causal_block_density"}`` of a plan (block counts; token extras of
    band or extra-column plans are not counted)."""
    return {"square_density": square_block_density(plan), "causal_block_density": causal_block_density(plan)}


# ----------------------------------------------------------------------------- adapters
def _check_inputs(q, k, v, who: str):
    from ..checks import check_qkv

    dims = check_qkv(q, k, v)
    if not q.is_cuda:
        raise ValueError(f"{who}: the official code runs on CUDA only (it calls .to('cuda') and "
                         f"torch.cuda.get_device_properties), got q on {q.device}")
    return dims


def _config(obj) -> dict:
    return {f.name: getattr(obj, f.name) for f in fields(obj) if f.init and f.name != "src"}


@dataclass(kw_only=True)
class _OfficialAdapter:
    """What both adapters share: ``src`` (the sdist, see :func:`load_official`) and its code,
    loaded on first use."""

    src: object = None
    _code: Optional[OfficialCode] = field(default=None, init=False, repr=False)

    @property
    def code(self) -> OfficialCode:
        if self._code is None:
            self._code = load_official(self.src)
        return self._code


@dataclass(kw_only=True)
class OfficialXAttention(_OfficialAdapter):
    """The official XAttention estimate (``xattn_estimate``) as a plan builder.

    ``plan`` repeats K to one head per query head (``repeat_interleave(G, dim=1)``: MInference's
    attention forward calls transformers' ``repeat_kv`` before ``xattention_forward``, and
    ``xattn_estimate`` asserts ``Hq == Hkv``), runs ``xattn_estimate`` with
    ``Xattention_prefill``'s arguments, crops the chunk-padded mask
    (:func:`crop_chunk_padded_mask`) and builds a per-query-head plan. Where each default comes
    from: :data:`XATTN_DEFAULTS_SOURCE`. ``src``: the sdist (see :func:`load_official`), loaded at
    the first ``plan``.
    """

    stride: int = 16
    threshold: float = 0.9
    block_size: int = 128
    norm: float = 1.0
    chunk_size: Optional[int] = None
    use_triton: bool = True
    keep_sink: bool = False
    keep_recent: bool = False
    _triton_ok: Optional[bool] = field(default=None, init=False, repr=False)

    def __post_init__(self):
        for name in ("stride", "block_size"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if self.block_size % self.stride:
            raise ValueError(f"block_size must be a multiple of stride, got {self.block_size}, {self.stride}")
        if not 0.0 < float(self.threshold) <= 1.0:
            raise ValueError(f"threshold must lie in (0, 1], got {self.threshold}")
        if self.chunk_size is not None and (self.chunk_size <= 0 or self.chunk_size % (self.stride * self.block_size)):
            raise ValueError(f"chunk_size must be a positive multiple of stride * block_size = "
                             f"{self.stride * self.block_size} (the Triton path's tiling), got {self.chunk_size}")

    def config(self) -> dict:
        return {"implementation": "official (MInference 0.1.6.0 xattn_estimate)", **_config(self),
                "select_mode": "inverse", "kdb": 1}

    def _use_triton(self) -> bool:
        # xattn_estimate's own rule, applied once here so that its fallback message is not printed
        # on every timed call: its Triton kernels only on a GPU whose name contains "100".
        if self._triton_ok is None:
            name = torch.cuda.get_device_properties(torch.cuda.current_device()).name
            self._triton_ok = "100" in name
        return self.use_triton and self._triton_ok

    def block_mask(self, q: torch.Tensor, k: torch.Tensor, v: Optional[torch.Tensor] = None, *,
                   causal: bool = True) -> torch.Tensor:
        """bool ``[B, Hq, nQ, nK]``: the official mask, cropped to the real blocks."""
        _, Hq, Hkv, Lq, Lk, _ = _check_inputs(q, k, k if v is None else v, "OfficialXAttention")
        G = Hq // Hkv
        # Its Triton kernels address the feature axis without a stride: give it contiguous rows.
        q = q.contiguous()
        k_rep = k.contiguous() if G == 1 else k.repeat_interleave(G, dim=1)
        _, masks = self.code.xattn_estimate(
            q, k_rep, block_size=self.block_size, stride=self.stride, norm=self.norm, threshold=self.threshold,
            chunk_size=self.chunk_size or official_chunk_size(Lk), select_mode="inverse",
            use_triton=self._use_triton(), causal=causal, kdb=1, keep_sink=self.keep_sink,
            keep_recent=self.keep_recent)
        return crop_chunk_padded_mask(masks, q_len=Lq, k_len=Lk, block_size=self.block_size)

    def plan(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
             layer_idx: Optional[int] = None, transient: bool = False) -> BlockPlan:
        """Per-query-head plan for ``q [B, Hq, L, D]``, ``k, v [B, Hkv, L, D]`` (``layer_idx``
        unused: one threshold for all layers; ``transient`` unused: each call builds a new plan)."""
        mask = self.block_mask(q, k, v, causal=causal)
        return BlockPlan.from_block_mask(mask, block_q=self.block_size, block_k=self.block_size, q_len=q.shape[2],
                                         k_len=k.shape[2], causal=causal)


@dataclass(kw_only=True)
class OfficialFlexPrefill(_OfficialAdapter):
    """The official FlexPrefill selection (``get_active_blocks``) as a plan builder.

    ``plan`` calls ``get_active_blocks`` as ``flex_prefill_attention`` does (budgets in tokens
    turned into blocks with ``math.ceil(budget / block_size)``) on ``[B, L, H, D]`` views of our
    tensors with native GQA (Hkv KV heads, ``gqa_interleave=False``: query head h reads KV head
    h // G, as in our layout; FlexPrefill's selection is then the same as on repeated K), and
    turns the flat block indices into a per-query-head plan (:func:`mask_from_flat_block_indices`).
    Causal only (the official kernel is). Where each default comes from:
    :data:`FLEX_DEFAULTS_SOURCE`.
    """

    gamma: float = 0.9
    tau: float = 0.1
    block_size: int = 128
    min_budget: Optional[int] = None
    max_budget: Optional[int] = None
    gqa_interleave: bool = False

    def __post_init__(self):
        if not 0.0 < float(self.gamma) <= 1.0:
            raise ValueError(f"gamma must lie in (0, 1], got {self.gamma}")
        if not 0.0 <= float(self.tau) <= 1.0:
            raise ValueError(f"tau must lie in [0, 1], got {self.tau}")
        if self.block_size not in (16, 32, 64, 128):
            raise ValueError(f"block_size must be one of 16, 32, 64, 128 (flex_prefill_attention), got "
                             f"{self.block_size}")
        for name in ("min_budget", "max_budget"):
            val = getattr(self, name)
            if val is not None and (not isinstance(val, int) or val <= 0):
                raise ValueError(f"{name} must be None or a positive number of tokens, got {val!r}")

    def config(self) -> dict:
        return {"implementation": "official (MInference 0.1.6.0 get_active_blocks)", **_config(self)}

    def budgets_in_blocks(self) -> tuple:
        """``(min, max)`` budgets in blocks, as ``flex_prefill_attention`` computes them."""
        lo = 1 if self.min_budget is None else self.min_budget
        hi = 2147483647 if self.max_budget is None else self.max_budget
        return math.ceil(lo / self.block_size), math.ceil(hi / self.block_size)

    def block_mask_blhd(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """bool ``[B, Hq, n, n]`` from ``get_active_blocks`` on FlexPrefill's own layout
        ``q [B, L, Hq, D]``, ``k, v [B, L, Hkv, D]``."""
        lo, hi = self.budgets_in_blocks()
        idx = self.code.get_active_blocks(q, k, v, self.block_size, self.gamma, lo, hi, self.tau,
                                          self.gqa_interleave)
        return mask_from_flat_block_indices(idx, _cdiv(q.shape[1], self.block_size), device=q.device)

    def block_mask(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """bool ``[B, Hq, n, n]`` for our layout.

        The ``[B, L, H, D]`` tensors are transposed views, not copies (MInference's
        flexprefill_forward makes contiguous copies): get_active_blocks reads them through torch
        ops and triton_bnhd_pool's explicit strides. ASSUMPTION checked on the GPU by
        scripts/official_compare.py (``plan_matches_contiguous``): the same mask as on copies.
        """
        _check_inputs(q, k, v, "OfficialFlexPrefill")
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"FlexPrefill needs q_len == k_len, got {q.shape[2]} and {k.shape[2]}")
        return self.block_mask_blhd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

    def plan(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
             layer_idx: Optional[int] = None, transient: bool = False) -> BlockPlan:
        """Per-query-head plan for ``q [B, Hq, L, D]``, ``k, v [B, Hkv, L, D]`` (``transient``
        unused: each call builds a new plan)."""
        if not causal:
            raise NotImplementedError("the official FlexPrefill is causal only")
        mask = self.block_mask(q, k, v)
        L = q.shape[2]
        return BlockPlan.from_block_mask(mask, block_q=self.block_size, block_k=self.block_size, q_len=L, k_len=L,
                                         causal=True)


# ----------------------------------------------------------------------------- end to end
def official_flexprefill_attention_fn(method: OfficialFlexPrefill, q: torch.Tensor, k: torch.Tensor,
                                      v: torch.Tensor) -> Callable[[], torch.Tensor]:
    """``fn() -> out [B, Hq, L, D]`` (a transposed view): the official ``flex_prefill_attention``
    (selection and its own Triton block-sparse kernel), timed in its native layout.

    The ``[B, L, H, D]`` contiguous copies are made here, once, outside what is timed (the layout
    FlexPrefill's API takes; MInference's flexprefill_forward makes the same copies). Native GQA
    (``gqa_interleave=False``), bf16 only (the kernel asserts it).
    """
    _check_inputs(q, k, v, "official_flexprefill_attention_fn")
    if q.dtype != torch.bfloat16:
        raise ValueError(f"the official FlexPrefill kernel needs bfloat16, got {q.dtype}")
    qb, kb, vb = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    attn = method.code.flex_prefill_attention

    def fn():
        out = attn(qb, kb, vb, method.gamma, method.tau, min_budget=method.min_budget, max_budget=method.max_budget,
                   gqa_interleave=method.gqa_interleave, block_size=method.block_size)
        return out.transpose(1, 2)

    fn.inputs_blhd = (qb, kb, vb)  # the copies, for checks on the same tensors
    return fn


_FLEX = None


def compiled_flex_attention():
    """``torch.compile(flex_attention, dynamic=False)``, compiled once per process."""
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def official_xattention_attention_fn(method: OfficialXAttention, q: torch.Tensor, k: torch.Tensor,
                                     v: torch.Tensor) -> Callable[[], torch.Tensor]:
    """``fn() -> out [B, Hq, L, D]``: the official XAttention estimate, then FlexAttention on its
    mask (the official kernel, ``block_sparse_attn_func`` from mit-han-lab/Block-Sparse-Attention,
    is a CUDA extension we do not have; ../shared/GPU.md measured the same stand-in).

    Each call: ``method.plan`` (estimate, crop, plan), the FlexAttention ``BlockMask`` from the plan
    (:func:`sparseattn.bench.kernel.flex_block_mask`) and compiled ``flex_attention`` with
    ``enable_gqa`` (query head h reads KV head h // G).
    """
    from .kernel import flex_block_mask

    B, Hq, Hkv = _check_inputs(q, k, v, "official_xattention_attention_fn")[:3]
    flex = compiled_flex_attention()

    def fn():
        plan = method.plan(q, k, v, causal=True)
        return flex(q, k, v, block_mask=flex_block_mask(plan, B, Hq), enable_gqa=Hq != Hkv)

    return fn


__all__ = [
    "PACKAGE", "ENV_VAR", "FETCH_HINT", "OfficialCode", "find_official_root", "load_official",
    "mask_from_flat_block_indices", "official_chunk_size", "crop_chunk_padded_mask", "square_block_density",
    "causal_block_density", "plan_block_densities", "OfficialXAttention", "OfficialFlexPrefill",
    "official_flexprefill_attention_fn", "official_xattention_attention_fn", "compiled_flex_attention",
    "XATTN_DEFAULTS_SOURCE", "FLEX_DEFAULTS_SOURCE",
]
