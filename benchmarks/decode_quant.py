"""Batch-1 decode of quantized copies of the default model against its fp32 model, in one process.

Every variant is built in memory from the same fp32 model with data-free RTN recipes (GPTQ and AWQ
produce the same packed format, so they decode at the same speed). Rounds alternate between the
variants so machine noise hits them alike; the table gives the median tokens/s and the ratio to
fp32 measured in the same run, at each thread count.

    python benchmarks/decode_quant.py --threads 1,2 --json
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics

import torch

VARIANTS = {
    "fp32": None,
    "bf16": "bf16",
    "w8a16 per-channel (int8 kernel)": "- {method: rtn, bits: 8, group_size: 0}",
    "w4a16 g128 sym": "- {method: rtn, bits: 4, group_size: 128}",
    "w4a16 g128 sym + int8 embedding/head": ("- {method: rtn, bits: 4, group_size: 128}\n"
                                            "- {method: rtn, bits: 8, group_size: 0, targets: ['embed_tokens']}"),
    "w4a16 g32 asym (Q4_1 grid) + int8 embedding/head": (
        "- {method: rtn, bits: 4, group_size: 32, sym: false}\n"
        "- {method: rtn, bits: 8, group_size: 0, targets: ['embed_tokens']}"),
    "w3a16 g128 sym": "- {method: rtn, bits: 3, group_size: 128}",
    "bitnet158 ternary (2-bit codes; int8 activations)": "- {method: bitnet158}",
    "bitnet158 ternary + int8 embedding/head": ("- {method: bitnet158}\n"
                                                "- {method: rtn, bits: 8, group_size: 0, targets: ['embed_tokens']}"),
}


def build(base, spec):
    from leanlm.compress.recipe import apply_recipe, parse_recipe

    if spec is None:
        return base
    if spec == "bf16":
        return copy.deepcopy(base).to(torch.bfloat16)
    m = copy.deepcopy(base)
    apply_recipe(m, parse_recipe(spec, "<decode_quant>"), progress=False)
    return m


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import leanlm
    from leanlm.eval.describe import model_bytes
    from leanlm.eval.bench import time_decode

    base, _ = leanlm.load()
    names = [v.strip() for v in args.variants.split(",")]
    models = {n: build(base, VARIANTS[n]) for n in names}
    sizes = {n: model_bytes(m) / 1e6 for n, m in models.items()}
    out = {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "rounds": args.rounds, "results": {}}
    for th in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(th)
        for m in models.values():
            time_decode(m, 16, 4)  # warm-up: fused kernels, allocator, thread pool
        per = {n: [] for n in models}
        for r in range(args.rounds):
            for n, m in models.items():
                per[n].append(time_decode(m, args.prompt_len, args.new_tokens, seed=r)[1])
        base_s = statistics.median(per[names[0]])
        res = {}
        for n in names:
            s = statistics.median(per[n])
            res[n] = {"tok_s": 1 / s, "vs_first": base_s / s, "weights_mb": sizes[n], "all_s": per[n]}
        out["results"][str(th)] = res
        if not args.json:
            print(f"threads {th}")
            for n, v in res.items():
                print(f"  {n:50s} {v['weights_mb']:7.0f} MB {v['tok_s']:7.1f} tok/s  {v['vs_first']:5.2f}x")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
