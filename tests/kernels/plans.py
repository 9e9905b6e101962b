"""Plan builders for kernel tests (small shapes; plain loops are fine here)."""

import torch

from sparseattn import BlockPlan


def cdiv(a, b):
    return -(-a // b)


def random_plan(B, H, Lq, Lk, bq, bk, density=0.5, seed=0, causal=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    bm = torch.rand(B, H, cdiv(Lq, bq), cdiv(Lk, bk), generator=g) < density
    return BlockPlan.from_block_mask(bm.to(device), block_q=bq, block_k=bk, q_len=Lq, k_len=Lk, causal=causal)


def empty_plan(B, H, Lq, Lk, bq, bk, device="cpu"):
    bm = torch.zeros(B, H, cdiv(Lq, bq), cdiv(Lk, bk), dtype=torch.bool, device=device)
    return BlockPlan.from_block_mask(bm, block_q=bq, block_k=bk, q_len=Lq, k_len=Lk)


def with_extra_columns(plan, n_cols=5, seed=0, seen_by_all=False):
    """Add up to ``n_cols`` random extra key columns per row, outside the row's selected blocks.

    ``seen_by_all``: only columns every query of the block sees under causal masking.
    """
    g = torch.Generator().manual_seed(seed)
    bm = plan.block_mask().cpu()
    B, H, nQ, nK = bm.shape
    counts = torch.zeros(B, H, nQ, dtype=torch.int32)
    idx = torch.zeros(B, H, nQ, n_cols, dtype=torch.int32)
    for b in range(B):
        for h in range(H):
            for m in range(nQ):
                limit = plan.k_len
                if seen_by_all:  # keys up to the block's first query (bottom-right aligned)
                    limit = max(0, min(plan.k_len, plan.k_len - plan.q_len + m * plan.block_q + 1))
                free = [j for j in range(limit) if not bm[b, h, m, j // plan.block_k]]
                if not free:
                    continue
                pick = torch.randperm(len(free), generator=g)[:n_cols]
                cols = sorted(free[i] for i in pick.tolist())
                counts[b, h, m] = len(cols)
                idx[b, h, m, : len(cols)] = torch.tensor(cols, dtype=torch.int32)
    dev = plan.device
    from dataclasses import replace
    return replace(plan, extra_counts=counts.to(dev), extra_indices=idx.to(dev))


def make_plan(kind, B, Hplan, Lq, Lk, bq, bk, device="cpu", seed=0, causal=True):
    if kind == "none":
        return None
    if kind == "all":
        return BlockPlan.dense(B, Hplan, block_q=bq, block_k=bk, q_len=Lq, k_len=Lk, causal=causal, device=device)
    if kind == "random":
        return random_plan(B, Hplan, Lq, Lk, bq, bk, seed=seed, causal=causal, device=device)
    if kind == "empty":
        return empty_plan(B, Hplan, Lq, Lk, bq, bk, device=device)
    if kind == "band":
        return BlockPlan.from_band(B, Hplan, sink=7, window=bk + 5, block_q=bq, block_k=bk, q_len=Lq, k_len=Lk,
                                   device=device)
    if kind == "extra":
        return with_extra_columns(random_plan(B, Hplan, Lq, Lk, bq, bk, density=0.3, seed=seed, causal=causal,
                                              device=device), seed=seed)
    raise ValueError(kind)
