"""Time the row top-k search of ``select_triton._top_lanes`` on the GPU: probes per pass
(2 = bisection) x warps, for the row lengths the selectors see (prefill block rows, Quest /
block top-k page rows, H2O / TOVA kept lists), against ``torch.topk`` on the same rows.

    python scripts/sweep_top_lanes.py [--tiles 256,2048,8192,16384] [--rows 8,64] [--lanes 2,4,8,16]

Each figure is one launch over ``rows`` programs (load a row, search, write a keep mask), in us,
CUDA-graph replay; every variant's mask is checked against the stable-sort prefix first.
"""

import argparse

import torch
import triton
import triton.language as tl

from sparseattn.bench.timing import BenchTimer
from sparseattn.kernels.select_triton import _top_lanes


@triton.jit
def _rows_kernel(X, Want, Out, TILE: tl.constexpr, PROBE_LANES: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, TILE)
    x = tl.load(X + row * TILE + offs)
    cand = x > float("-inf")
    tl.store(Out + row * TILE + offs, _top_lanes(x, cand, tl.load(Want + row), TILE, PROBE_LANES).to(tl.int8))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tiles", default="256,2048,8192,16384")
    p.add_argument("--rows", default="8,64")
    p.add_argument("--lanes", default="2,4,8,16")
    p.add_argument("--warps", default="4,8,16")
    p.add_argument("--keep", type=float, default=0.0625, help="share of each row to keep (default 1/16)")
    args = p.parse_args()
    print(f"device {torch.cuda.get_device_name()}; us per launch (CUDA-graph replay, median)")
    timer = BenchTimer("cuda", rep_ms=100, graphs=True)
    for tile in (int(t) for t in args.tiles.split(",")):
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, tile, device="cuda")
            want = torch.full((rows,), max(1, int(tile * args.keep)), dtype=torch.int32, device="cuda")
            order = torch.sort(x, dim=-1, descending=True, stable=True).indices
            ref = torch.zeros(rows, tile, dtype=torch.int8, device="cuda").scatter_(
                1, order[:, :int(want[0])], 1)
            out = torch.empty_like(ref)
            cells = [f"topk {1e3 * timer(lambda: torch.topk(x, int(want[0]), dim=-1)):.1f}"]
            for lanes in (int(v) for v in args.lanes.split(",")):
                for warps in (int(w) for w in args.warps.split(",")):
                    def launch():
                        _rows_kernel[(rows,)](x, want, out, TILE=tile, PROBE_LANES=lanes, num_warps=warps)
                    launch()
                    ok = torch.equal(out, ref)
                    cells.append(f"L{lanes}w{warps} {1e3 * timer(launch):.1f}{'' if ok else ' WRONG'}")
            print(f"tile {tile:6d} rows {rows:3d}: " + ", ".join(cells), flush=True)


if __name__ == "__main__":
    main()
