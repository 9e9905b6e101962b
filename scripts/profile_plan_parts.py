"""Where a method's kernel time goes, by plan part, on q/k/v captured from a real model (GPU).

    python scripts/profile_plan_parts.py --model ~/smol/smol.gguf --haystack DIR [--length 32768]
        [--layers 3,15,24] [--method vertical_slash] [--seed 0]

Per layer the prefill kernel runs on (``do_bench`` medians, ms; "x ideal" = time / (density x our
dense time), the issue-3 ratio without the estimate):

* ``plan``: the method's plan as it comes;
* ``blocks only``: the same plan without its extra (token-level) columns;
* ``random, same counts``: per (head, query block) as many blocks as the plan's row, drawn at
  random among the causally visible ones (the diagonal kept), i.e. the same work in blocks with
  no diagonal structure (what block top-k plans look like);
* ``dense``: ``plan=None``;
* ``columns -> blocks >= C`` (``--convert``): every key block holding at least C of a row's extra
  columns computed as a whole block instead (a superset of the plan), the other columns kept.

so a gap between ``blocks only`` and ``random, same counts`` is the blocks' layout, and one between
``plan`` and ``blocks only`` the extra columns.
"""

import argparse
import dataclasses

import torch
import triton.testing

from sparseattn.bench.methods import add_capture_args, captured_from_args
from sparseattn.kernels.prefill_triton import attention_triton
from sparseattn.methods import get_method
from sparseattn.methods.base import visible_blocks
from sparseattn.plan import BlockPlan

p = argparse.ArgumentParser()
add_capture_args(p)
p.add_argument("--method", default="vertical_slash")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--convert", default="16,24,32,48", help="comma list of C for 'columns -> blocks >= C' ('' for none)")
args = p.parse_args()

layers, qkv = captured_from_args(args)  # contiguous, as bench methods
method = get_method(args.method)
print(f"{args.model}, {args.length} tokens, {args.method}, {torch.cuda.get_device_name()}")


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def random_same_counts(plan: BlockPlan, gen: torch.Generator) -> BlockPlan:
    """Per row, ``kv_counts`` blocks drawn at random among the visible ones; the diagonal kept."""
    nQ, nK = plan.num_q_blocks, plan.num_k_blocks
    vis = visible_blocks(block_q=plan.block_q, block_k=plan.block_k, q_len=plan.q_len, k_len=plan.k_len,
                         causal=True, device=plan.kv_counts.device)
    score = torch.rand(*plan.kv_counts.shape, nK, generator=gen, device="cpu").to(vis.device)
    last = vis.long().sum(-1).clamp(min=1) - 1  # the diagonal: the last visible block of each row
    score = score.masked_fill(~vis, -1.0)
    score.scatter_(-1, last.view(1, 1, nQ, 1).expand(*plan.kv_counts.shape, 1), 2.0)
    rank = score.argsort(-1, descending=True).argsort(-1)
    keep = (rank < plan.kv_counts.long().unsqueeze(-1)) & vis
    return BlockPlan.from_block_mask(keep, block_q=plan.block_q, block_k=plan.block_k, q_len=plan.q_len,
                                     k_len=plan.k_len, causal=True)


def columns_to_blocks(plan: BlockPlan, c: int) -> BlockPlan:
    """Key blocks holding >= c of a row's extra columns become plan blocks; their columns leave the list."""
    nK, bk = plan.num_k_blocks, plan.block_k
    cols, cnt = plan.extra_indices.long(), plan.extra_counts.long()
    valid = torch.arange(cols.shape[-1], device=cols.device) < cnt.unsqueeze(-1)
    blk = torch.where(valid, cols // bk, torch.full_like(cols, nK)).clamp(max=nK)
    per_block = torch.zeros(*cnt.shape, nK + 1, dtype=torch.long, device=cols.device)
    per_block.scatter_add_(-1, blk, valid.long())
    converted = per_block[..., :nK] >= c
    keep = valid & ~torch.gather(torch.cat([converted, converted[..., :1] & False], -1), -1, blk)
    new_counts = keep.sum(-1)
    ordered = torch.where(keep, cols, torch.full_like(cols, 2**31 - 1)).sort(-1).values
    width = max(1, int(new_counts.max()))
    ordered = ordered[..., :width]
    ordered = torch.where(torch.arange(width, device=cols.device) < new_counts.unsqueeze(-1), ordered, 0)
    blocks = BlockPlan.from_block_mask(plan.block_mask() | converted, block_q=plan.block_q, block_k=bk,
                                       q_len=plan.q_len, k_len=plan.k_len, causal=True)
    return dataclasses.replace(blocks, extra_counts=new_counts.int().contiguous(),
                               extra_indices=ordered.int().contiguous())


gen = torch.Generator().manual_seed(args.seed)
for layer in layers:
    q, k, v = qkv[layer]
    dense_ms = bench(lambda: attention_triton(q, k, v, None, causal=True))
    plan = method.plan(q, k, v)
    parts = {"plan": plan}
    if plan.has_extra:
        parts["blocks only"] = dataclasses.replace(plan, extra_counts=None, extra_indices=None)
    parts["random, same counts"] = random_same_counts(parts.get("blocks only", plan), gen)
    if plan.has_extra:
        for c in (int(x) for x in args.convert.split(",") if x):
            parts[f"columns -> blocks >= {c}"] = columns_to_blocks(plan, c)
    print(f"layer {layer}: dense {dense_ms:.3f} ms; plan {plan.block_q} x {plan.block_k}, "
          f"{float(plan.kv_counts.float().mean()):.1f} blocks per row"
          + (f", {float(plan.extra_counts.float().mean()):.1f} extra columns per row" if plan.has_extra else ""))
    for name, pl in parts.items():
        d = pl.density()
        ms = bench(lambda: attention_triton(q, k, v, pl, causal=True))
        extra = f", {float(pl.extra_counts.float().mean()):.0f} columns" if pl.has_extra else ""
        print(f"  {name:<24} density {d:.3f}  kernel {ms:.3f} ms  = {ms / (d * dense_ms):.2f} x ideal"
              f"  ({float(pl.kv_counts.float().mean()):.1f} blocks{extra} per row)")
