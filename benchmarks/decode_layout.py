"""Batch-1 decode and prefill of the default model with the column-major layout of wide fp32 weights
(`Transformer.column_major_matvec`, the default) against the same model kept row-major, in one run.

Two copies of the model (one with `column_major_matvec = False`); rounds alternate between them so
machine noise hits both alike; medians. `--compile` adds the compiled decode step (one compile each).

    PYTHONPATH=. python benchmarks/decode_layout.py --threads 2 --rounds 5 --json
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--compile", action="store_true", help="also the compiled decode step")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import leanlm
    from leanlm.eval.bench import time_decode
    from leanlm.report import emit_json, print_table

    col, _ = leanlm.load()
    row = copy.deepcopy(col)
    row.column_major_matvec = False
    models = {"row-major": row, "column-major": col}
    paths = [False, True] if args.compile else [False]
    with torch.inference_mode():
        ids = torch.randint(0, col.config.vocab_size, (1, 16))
        for m in models.values():
            time_decode(m, 16, 4)  # warm-up; fuses (and lays out) the weights
            for c in paths[1:]:
                time_decode(m, 16, 2, compile=c)
        diff = (models["row-major"](ids) - models["column-major"](ids)).abs().max().item()
    load = os.getloadavg()[0]
    dec = {(n, c): [] for n in models for c in paths}
    pre = {n: [] for n in models}
    for r in range(args.rounds):
        for n, m in models.items():
            for c in paths:
                dec[n, c].append(time_decode(m, args.prompt_len, args.new_tokens, seed=r, compile=c)[1])
            pre[n].append(time_decode(m, args.prefill_len, 0, seed=r)[0])
    load = max(load, os.getloadavg()[0])
    rows = []
    for n in models:
        row = {"layout": n}
        for c in paths:
            row["compiled_tok_s" if c else "eager_tok_s"] = 1 / statistics.median(dec[n, c])
        row["prefill_tok_s"] = args.prefill_len / statistics.median(pre[n])
        rows.append(row)
    ratio = {k: rows[1][k] / rows[0][k] for k in rows[0] if k != "layout"}
    rows.append({"layout": "column / row", **ratio})
    print_table(f"batch-1 decode ({args.prompt_len}-token prompt, {args.new_tokens} new) and {args.prefill_len}-token "
                f"prefill, fp32, {args.threads} threads, {args.rounds} rounds; max 1-min load {load:.1f}; "
                f"max |logit diff| {diff:.1e}", rows)
    if args.json:
        emit_json({"threads": args.threads, "load": load, "max_abs_logit_diff": diff, "rows": rows,
                   "all_decode_s": {f"{n}{' compiled' if c else ''}": v for (n, c), v in dec.items()},
                   "all_prefill_s": pre})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
