"""BitNet b1.58 matmuls at batch 1 on the default model's shapes: fp32 Linear vs ternary BitLinear vs 4-bit.

For each shape (out x in) one random fp32 weight is converted to a BitLinear (2-bit codes, per-token int8
activations, the packed int4 CPU kernel) and to a symmetric 4-bit g128 QuantLinear (RTN; the same kernel,
no activation quantization); the three run the same [1, in] input in alternating rounds, and the table
gives the fastest round's mean microseconds per call (on a shared machine the slower rounds measure
the other processes) and the ratio to fp32 measured in the same run.
Fused shapes (960 x 576: q/k/v; 3072 x 576: gate/up) are what a decode step runs after fuse_projections.

    python benchmarks/bitnet.py --threads 1,2 --json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SHAPES = [(576, 576), (192, 576), (960, 576), (1536, 576), (3072, 576), (576, 1536)]


def per_call_us(f, calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        f()
    return (time.perf_counter() - t) / calls * 1e6


def main(argv=None) -> int:
    import torch
    import torch.nn as nn

    from leanlm.compress.quant.bitnet import BitLinear
    from leanlm.compress.quant.grid import rtn_quantize
    from leanlm.compress.quant.qlinear import QuantLinear

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    out = {"rounds": a.rounds, "calls": a.calls, "loadavg_start": os.getloadavg(), "results": {}}
    for th in [int(t) for t in a.threads.split(",")]:
        torch.set_num_threads(th)
        res = {}
        for N, K in SHAPES:
            lin = nn.Linear(K, N, bias=False)
            nn.init.normal_(lin.weight, std=0.05)
            codes, s, o = rtn_quantize(lin.weight.detach(), 4, 128, True)
            layers = {"fp32": lin, "ternary": BitLinear.from_weight(lin.weight),
                      "w4 g128": QuantLinear.from_codes(codes, s, o, 4, 128, True)}
            x = torch.randn(1, K)
            per = {n: [] for n in layers}
            with torch.no_grad():
                for m in layers.values():
                    per_call_us(lambda m=m: m(x), 10)  # warm-up: builds the packed kernels
                for _ in range(a.rounds):
                    for n, m in layers.items():
                        per[n].append(per_call_us(lambda m=m: m(x), a.calls))
            med = {n: min(v) for n, v in per.items()}
            res[f"{N}x{K}"] = {n: {"us": med[n], "vs_fp32": med["fp32"] / med[n], "median_us": statistics.median(per[n])}
                              for n in layers}
            if not a.json:
                print(f"threads {th} {N:5d}x{K:<5d} " + "  ".join(
                    f"{n} {med[n]:7.1f} us ({med['fp32'] / med[n]:.2f}x)" for n in layers))
        out["results"][str(th)] = res
    out["loadavg_end"] = os.getloadavg()
    if a.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
