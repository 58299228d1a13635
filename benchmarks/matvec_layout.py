"""fp32/bf16 one-row matmul (batch-1 decode) over a row-major vs a column-major weight, per shape.

`F.linear(x, W)` with W [out, in] row-major runs MKL's NT sgemm (a dot product per output row); the same
W stored column-major (`W.t().contiguous().t()`, strides (1, out)) runs an NN sgemm. The shapes are the
default model's: fused q/k/v, o_proj, fused gate/up, down_proj and the tied output head. Each call reads a
different copy of the weight (at least 96 MB in all) so the timing is of memory reads, not of the cache.
Rounds alternate between the layouts; medians of per-call microseconds.

    python benchmarks/matvec_layout.py --threads 1 --dtypes float32,bfloat16 --json
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = {"qkv (fused)": (960, 576), "o_proj": (576, 576), "gate_up (fused)": (3072, 576),
          "down_proj": (576, 1536), "head (tied)": (49152, 576)}


def per_call_us(x, ws, calls: int) -> float:
    for w in ws[:2]:
        F.linear(x, w)
    t = time.perf_counter()
    for i in range(calls):
        F.linear(x, ws[i % len(ws)])
    return (time.perf_counter() - t) / calls * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-mb", type=float, default=96.0, help="weights read round-robin, in MB (beyond the L3)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from leanlm.report import emit_json, print_table

    rows = []
    for dt in args.dtypes.split(","):
        dtype = getattr(torch, dt)
        for name, (o, i) in SHAPES.items():
            mb = o * i * dtype.itemsize / 1e6
            copies = max(2, int(args.min_mb / mb + 0.999))
            row_major = [torch.randn(o, i).to(dtype) for _ in range(copies)]
            col_major = [w.t().contiguous().t() for w in row_major]
            x = torch.randn(1, i).to(dtype)
            calls = max(2 * copies, int(2000 / mb))
            t = {"row": [], "col": []}
            for _ in range(args.rounds):
                t["row"].append(per_call_us(x, row_major, calls))
                t["col"].append(per_call_us(x, col_major, calls))
            r, c = statistics.median(t["row"]), statistics.median(t["col"])
            rows.append({"dtype": dt, "shape": f"{name} {o}x{i}", "row_major_us": r, "row_major_gb_s": mb / r * 1e3,
                         "col_major_us": c, "col_major_gb_s": mb / c * 1e3, "col_speedup": r / c})
            del row_major, col_major
    print_table(f"one-row F.linear, {args.threads} thread(s), medians of {args.rounds} rounds", rows)
    if args.json:
        emit_json({"threads": args.threads, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
