"""Synthetic q/k/v whose causal attention has the structure real long-context heads show.

:func:`structured_qkv` builds ``q [B, Hq, L, D]``, ``k, v [B, Hkv, L, D]`` (canonical layout,
GQA allowed) whose softmax attention ``softmax(q k^T / sqrt(D))`` has, per head:

* **attention sinks**: the first :data:`SINK_LOGITS` keys get a large logit from every query;
* a **local band**: a logit that peaks at distance 0 and decays with the log of the distance
  (a power-law band, as RoPE gives), reaching the background near :data:`LOCAL_RANGE` tokens;
* **slash lines**: the same kernel centred on fixed offsets ``i - j = o`` (fixed-offset
  diagonals), two per query head, offsets log-uniform in ``[128, min(L/4, 8192)]``;
* **vertical lines**: about one key in :data:`VERTICAL_EVERY` (positions uniform at random,
  shared by the KV group) that every query of the head attends to, with log-normal strengths
  (a few very strong, many moderate);
* **needles**: individual strong (query, key) pairs, one per :data:`NEEDLE_EVERY` tokens per KV
  group (at least one), the key at least 256 tokens (L/4 when shorter) before its query;
* a diffuse **background** of small pseudo-random logits.

The default constants aim at a block density of about 10 % (block 128) for the 90 %-mass
oracle (:func:`sparseattn.eval.fidelity.oracle_plan`) at 128K tokens with Hq/Hkv/D = 32/8/128:
estimated on the CPU for the first two KV groups (8 query heads) on 8 query blocks spread over
the second to last eighth of the sequence, 10.3 % for seed 0 and 11.6 % for seed 2, per head
5-17 % (vertical-heavy heads sparser, heads with much background denser). At 128K the vertical
lines hold most of the mass (60-90 %), then sinks, slash lines and the local band; at short
lengths the local band, slash lines and sinks dominate. ``sparseattn bench methods`` reports
the exact oracle density of its case next to the methods.

Construction. A logit is ``q_i . k_j / sqrt(D)``; the head dimension is cut into orthogonal
subspaces, so the logits of the parts add. Per (batch, KV head) the keys are built once and the
``Hq / Hkv`` query heads of the group each get their own query side (so the heads of a group
share key positions but weigh the parts differently). Subspaces (for ``D = 128``: 96 + 1 + 1 +
16 + 14 dims):

* **relative position** (``2F`` dims, ``F = 3D/8`` frequency pairs, frequencies geometric from
  1 to ``2 pi / LOCAL_RANGE`` rad/token, like RoPE): ``k_j = a (cos w_f j, sin w_f j)_f`` and
  ``q_i = a R(i) u_h`` with ``u_h = sum_c beta_c R(-o_c) 1`` (``R`` rotates each pair). Then
  ``q_i . k_j / sqrt(D) = sum_c beta_c / F * sum_f cos(w_f (i - j - o_c))``: a peak of logit
  ``beta_c`` on the diagonal ``i - j = o_c`` decaying with ``log |i - j - o_c|``. Offset 0 is
  the local band, the others are slash lines; one subspace carries all of them (rotations
  compose), and far from every line the sum behaves like noise of std about
  ``sqrt(sum_c beta_c^2 / 2F)`` (about 1.8 logits at the defaults, the larger part of the
  background: a rank-2F Toeplitz kernel cannot be sharp and quiet at once);
* **sink** (1 dim): ``k_j = SINK_LOGITS[j] * c`` for the first keys, 0 elsewhere;
  ``q_i = s_h * c`` for every query (``c = D**0.25``): logit ``s_h * SINK_LOGITS[j]``;
* **vertical** (1 dim): ``k_j = beta_j * c`` for the vertical keys, 0 elsewhere, ``beta_j``
  log-normal around :data:`VERTICAL_LOGIT`; ``q_i = t_h * c``: logit ``t_h * beta_j``;
* **needles** (``D/8`` dims): needle ``n`` adds ``sqrt(NEEDLE_LOGIT) * c * e_n`` to its key and
  to its query (``e_n`` a basis vector of the subspace, reused cyclically), logit
  ``NEEDLE_LOGIT``; a needle query also hits earlier needle keys that share its basis vector;
* **background** (the remaining dims): i.i.d. Gaussian q and k with a logit std of
  :data:`NOISE_LOGIT_STD`.

Finally q and k of each KV group are multiplied by one random orthogonal ``D x D`` matrix (dot
products unchanged; no axis carries a part alone, as in real activations); ``v`` is i.i.d.
standard normal. Per query head ``h`` a profile (``h % 4``: mixed, local-heavy, vertical-heavy,
slash-heavy, each jittered by the seed) scales the parts.

Random draws come from CPU generators seeded by ``(seed, batch, KV head)``: the result is a
pure function of the arguments (bitwise per seed on one device and dtype; the same draws on
every device). Memory: the outputs plus one head of float32 temporaries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch

#: Sink logits of the first keys (times the head's sink scale).
SINK_LOGITS = (11.0, 8.0, 7.0, 6.0)
#: Peak logit of the local band (offset 0), before the head profile.
LOCAL_LOGIT = 10.0
#: Peak logit of each slash line, before the head profile.
SLASH_LOGIT = 10.0
#: Slash lines per query head, offsets ``i - j`` log-uniform in [SLASH_MIN_OFFSET, min(L/4, SLASH_MAX_OFFSET)].
SLASHES_PER_HEAD = 2
SLASH_MIN_OFFSET = 128
SLASH_MAX_OFFSET = 8192
#: Distance (tokens) at which the relative-position kernel reaches the background.
LOCAL_RANGE = 2048
#: One vertical key per this many keys, on average.
VERTICAL_EVERY = 1024
#: Median logit of a vertical key and the std of its log-normal spread (in logit units).
VERTICAL_LOGIT = 9.0
VERTICAL_SPREAD = 1.0
#: Logit of a needle pair; one needle per this many tokens per KV head (at least one).
NEEDLE_LOGIT = 20.0
NEEDLE_EVERY = 2048
#: Std of the i.i.d. background logits.
NOISE_LOGIT_STD = 0.3

#: Per query-head profiles (sink, local, slash, vertical) scales, used as ``h % 4``.
PROFILES = (
    ("mixed", (1.0, 1.0, 1.0, 1.0)),
    ("local", (1.0, 1.1, 0.8, 0.9)),
    ("vertical", (0.95, 0.9, 0.85, 1.08)),
    ("slash", (1.0, 0.95, 1.1, 0.95)),
)


@dataclass
class GroupLayout:
    """What was planted for one (batch, KV head) and its query heads (absolute positions)."""

    batch: int
    kv_head: int
    sink_keys: List[int]
    vertical_keys: List[int]
    vertical_logits: List[float]
    #: query head -> slash offsets (``i - j``), without the local band's offset 0
    slash_offsets: Dict[int, List[int]] = field(default_factory=dict)
    #: query head -> profile name
    profiles: Dict[int, str] = field(default_factory=dict)
    #: (query head, query position, key position) per needle
    needles: List[Tuple[int, int, int]] = field(default_factory=list)


@dataclass
class SyntheticLayout:
    """Everything :func:`structured_qkv` planted, per (batch, KV head)."""

    B: int
    Hq: int
    Hkv: int
    L: int
    D: int
    seed: int
    groups: List[GroupLayout]

    def group(self, batch: int, kv_head: int) -> GroupLayout:
        return self.groups[batch * self.Hkv + kv_head]


def _check(B, Hq, Hkv, L, D):
    for name, x in (("B", B), ("Hq", Hq), ("Hkv", Hkv), ("L", L), ("D", D)):
        if not isinstance(x, int) or isinstance(x, bool) or x <= 0:
            raise ValueError(f"{name} must be a positive int, got {x!r}")
    if Hq % Hkv:
        raise ValueError(f"Hq must be a multiple of Hkv (GQA), got Hq={Hq}, Hkv={Hkv}")
    if D < 16 or D % 2:
        raise ValueError(f"D must be an even head dim >= 16 (the parts need their own subspaces), got {D}")


def _dims(D: int):
    F = (3 * D) // 8  # frequency pairs of the relative-position subspace
    n_needle = max(1, D // 8)
    n_noise = D - 2 * F - 2 - n_needle
    return F, n_needle, n_noise


def _frequencies(F: int) -> torch.Tensor:
    hi, lo = 1.0, 2 * math.pi / LOCAL_RANGE
    if F == 1:
        return torch.tensor([hi], dtype=torch.float64)
    return hi * (lo / hi) ** (torch.arange(F, dtype=torch.float64) / (F - 1))


def _group(b: int, g: int, *, G: int, L: int, D: int, seed: int, device, dtype, k_out, v_out, q_out):
    """Fill ``k_out [L, D]``, ``v_out [L, D]`` and ``q_out [G, L, D]`` for one KV group; return its layout."""
    gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + b * 10_007 + g * 101 + 17) % (2**63 - 1))
    F, n_needle, n_noise = _dims(D)
    c = D ** 0.25
    rot0, sink_d, vert_d, nd0, noise0 = 0, 2 * F, 2 * F + 1, 2 * F + 2, 2 * F + 2 + n_needle

    # --- the key side (shared by the group)
    omega = _frequencies(F)  # float64 [F]
    a = math.sqrt(math.sqrt(D) / F)  # q_rot . k_rot / sqrt(D) = (beta / F) sum_f cos(...)
    pos = torch.arange(L, dtype=torch.float64)
    ang = pos.view(-1, 1) * omega.view(1, -1)  # [L, F], CPU float64: identical on every device
    cos = torch.cos(ang).float().to(device)  # computed in float64 on the CPU, then moved once
    sin = torch.sin(ang).float().to(device)
    del ang
    k = torch.zeros(L, D, dtype=torch.float32, device=device)
    k[:, rot0:2 * F:2] = a * cos
    k[:, rot0 + 1:2 * F:2] = a * sin
    n_sink = min(len(SINK_LOGITS), L)
    k[:n_sink, sink_d] = (torch.tensor(SINK_LOGITS[:n_sink]) * c).to(device)
    # verticals: about L / VERTICAL_EVERY distinct keys after the sinks, log-normal strengths
    n_vert = max(1, round(L / VERTICAL_EVERY)) if L > n_sink else 0
    cand = torch.randperm(max(L - n_sink, 0), generator=gen)[:n_vert] + n_sink
    vert_keys = sorted(int(x) for x in cand)
    vert_logit = VERTICAL_LOGIT + VERTICAL_SPREAD * torch.randn(len(vert_keys), generator=gen, dtype=torch.float64)
    if vert_keys:
        k[torch.tensor(vert_keys, device=device), vert_d] = (vert_logit * c).float().to(device)
    if n_noise:
        s = math.sqrt(NOISE_LOGIT_STD * math.sqrt(D) / math.sqrt(n_noise))
        k[:, noise0:] = (s * torch.randn(L, n_noise, generator=gen)).to(device)

    # --- needles: (query head, query pos, key pos), key well before the query (outside the band)
    needles = []
    n_nd = max(1, L // NEEDLE_EVERY)
    gap = min(256, max(1, L // 4))
    if L > gap + 1:
        for n in range(n_nd):
            j = int(torch.randint(0, L - gap - 1, (1,), generator=gen))
            i = int(torch.randint(j + gap, L, (1,), generator=gen))
            h = int(torch.randint(0, G, (1,), generator=gen))
            needles.append((h, i, j))
            k[j, nd0 + n % n_needle] += math.sqrt(NEEDLE_LOGIT) * c

    # --- one random orthogonal matrix for the group (dot products unchanged)
    Q, Rm = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))
    Q = (Q * torch.sign(torch.diagonal(Rm)).view(1, -1)).float()
    Qd = Q.to(device)
    k_out.copy_((k @ Qd).to(dtype))
    v_out.copy_(torch.randn(L, D, generator=gen).to(device=device, dtype=dtype))
    del k

    layout = GroupLayout(batch=b, kv_head=g, sink_keys=list(range(n_sink)), vertical_keys=vert_keys,
                         vertical_logits=[float(x) for x in vert_logit], needles=needles)
    # --- the query side, one head at a time
    lo_off, hi_off = SLASH_MIN_OFFSET, max(SLASH_MIN_OFFSET, min(L // 4, SLASH_MAX_OFFSET))
    for hh in range(G):
        h_abs = g * G + hh
        name, (s_sink, s_loc, s_sl, s_vert) = PROFILES[h_abs % len(PROFILES)]
        jit = 1.0 + 0.05 * torch.randn(4, generator=gen, dtype=torch.float64)
        s_sink, s_loc, s_sl, s_vert = (float(x) for x in torch.tensor([s_sink, s_loc, s_sl, s_vert],
                                                                        dtype=torch.float64) * jit)
        u = torch.rand(SLASHES_PER_HEAD, generator=gen, dtype=torch.float64)
        offsets = sorted({int(round(math.exp(math.log(lo_off) + float(x) * (math.log(hi_off) - math.log(lo_off)))))
                          for x in u})
        layout.slash_offsets[h_abs] = offsets
        layout.profiles[h_abs] = name
        # u_h = sum_c beta_c R(-o_c) 1, per frequency a complex number
        comps = [(0, LOCAL_LOGIT * s_loc)] + [(o, SLASH_LOGIT * s_sl) for o in offsets]
        ur = torch.zeros(F, dtype=torch.float64)
        ui = torch.zeros(F, dtype=torch.float64)
        for o, beta in comps:
            ur += beta * torch.cos(omega * o)
            ui -= beta * torch.sin(omega * o)
        q = torch.zeros(L, D, dtype=torch.float32, device=device)
        ur_d, ui_d = (a * ur).float().to(device), (a * ui).float().to(device)
        q[:, rot0:2 * F:2] = cos * ur_d - sin * ui_d  # Re(e^{i w i} u)
        q[:, rot0 + 1:2 * F:2] = sin * ur_d + cos * ui_d  # Im(e^{i w i} u)
        q[:, sink_d] = s_sink * c
        q[:, vert_d] = s_vert * c
        if n_noise:
            s = math.sqrt(NOISE_LOGIT_STD * math.sqrt(D) / math.sqrt(n_noise))
            q[:, noise0:] = (s * torch.randn(L, n_noise, generator=gen)).to(device)
        for n, (h, i, j) in enumerate(needles):
            if h == hh:
                q[i, nd0 + n % n_needle] += math.sqrt(NEEDLE_LOGIT) * c
        q_out[hh].copy_((q @ Qd).to(dtype))
        del q
    layout.needles = [(g * G + h, i, j) for h, i, j in needles]
    return layout


@torch.no_grad()
def structured_qkv(B: int, Hq: int, Hkv: int, L: int, D: int, *, seed: int = 0, device="cpu",
                   dtype: torch.dtype = torch.float32, return_layout: bool = False):
    """Synthetic ``q [B, Hq, L, D]``, ``k, v [B, Hkv, L, D]`` with sinks, a local band, slash lines,
    vertical lines, needles and a diffuse background (construction: see the module docstring).

    Args:
        B, Hq, Hkv, L, D: batch, query heads, KV heads (``Hq % Hkv == 0``), length, head dim
            (even, >= 16).
        seed: the result is a pure function of the arguments; same seed, same tensors.
        device, dtype: where and in what dtype the outputs live (parts are built in float32).
        return_layout: also return a :class:`SyntheticLayout` with the planted positions.

    Returns:
        ``(q, k, v)`` or ``(q, k, v, layout)``.
    """
    _check(B, Hq, Hkv, L, D)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    G = Hq // Hkv
    q = torch.empty(B, Hq, L, D, device=device, dtype=dtype)
    k = torch.empty(B, Hkv, L, D, device=device, dtype=dtype)
    v = torch.empty(B, Hkv, L, D, device=device, dtype=dtype)
    groups = []
    for b in range(B):
        for g in range(Hkv):
            groups.append(_group(b, g, G=G, L=L, D=D, seed=seed, device=device, dtype=dtype, k_out=k[b, g],
                                 v_out=v[b, g], q_out=q[b, g * G:(g + 1) * G]))
    if return_layout:
        return q, k, v, SyntheticLayout(B=B, Hq=Hq, Hkv=Hkv, L=L, D=D, seed=seed, groups=groups)
    return q, k, v


__all__ = ["structured_qkv", "SyntheticLayout", "GroupLayout"]
