"""Quantization benchmark on the default model: method x bits x group size.

    python benchmarks/quant.py --threads 1 --samples 32 --seq-len 512 --eval-chars 16000 --out quant.jsonl

(finished rows in --out are kept, so an interrupted run resumes; --rows picks a subset; the
markdown table is printed, or written to --md. docs/bench/quant.md holds the results and analysis.)

Each row runs in its own process (peak RSS is per process): load the fp32 model, apply the recipe
(timed), save it (size on disk), perplexity on the first --eval-chars characters of the packaged
evaluation text (windows of --ctx tokens, no overlap); then load a second, fp32 copy and time
decode at batch 1 alternately on both (5 rounds each, medians), so the ratio is side by side.
Calibration uses the packaged calibration text (Shakespeare + KJV; the evaluation text is Austen,
so GPTQ/AWQ are scored out of their calibration domain).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS = [
    "fp32",
    "asym-rtn-w4-g32",  # sanity check: the weights come from a Q4_1 GGUF (asymmetric, blocks of 32)
    "w4a16-rtn-g128", "w4a16-gptq-g128", "w4a16-awq-g128",
    "w3a16-rtn-g128", "w3a16-gptq-g128", "w3a16-awq-g128",
    "w4a16-rtn-g64", "w4a16-gptq-g64", "w4a16-rtn-g32", "w4a16-gptq-g32",
    "w3a16-rtn-g64", "w3a16-gptq-g64", "w3a16-rtn-g32", "w3a16-gptq-g32",
    "w8a16-rtn", "nf4", "w8a8-smoothquant", "w8a8-llmint8", "w2a16-gptq-g64",
    "w4a16-gptq-g128+emb8", "w4a16-awq-g64", "w3a16-awq-g64", "w4a16-awq-g32", "w3a16-awq-g32",
]
CUSTOM = {  # rows that are not built-in recipe names
    "asym-rtn-w4-g32": "- method: rtn\n  bits: 4\n  group_size: 32\n  sym: false\n",
    "w4a16-gptq-g128+emb8": "- method: gptq\n  bits: 4\n  group_size: 128\n"
                            "- method: rtn\n  bits: 8\n  targets: ['embed_tokens']\n",
    # diagnostics (not in ROWS): GPTQ without pinning the dense model's exact zeros (0.03% of its weights)
    "w3a16-gptq-g64-nokeep": "- method: gptq\n  bits: 3\n  group_size: 64\n  keep_zeros: false\n",
    "w3a16-gptq-g128-nokeep": "- method: gptq\n  bits: 3\n  group_size: 128\n  keep_zeros: false\n",
}


def decode_side_by_side(a, b, rounds=5, new_tokens=24, prompt=32):
    """Median decode tok/s of models a and b, measured alternately (a, b, a, b, ...) so load noise hits both."""
    from leanlm.eval.bench import time_decode

    time_decode(a, 8, 2)
    time_decode(b, 8, 2)
    ta, tb = [], []
    for r in range(rounds):
        ta.append(time_decode(a, prompt, new_tokens, seed=r)[1])
        tb.append(time_decode(b, prompt, new_tokens, seed=r)[1])
    return 1.0 / sorted(ta)[rounds // 2], 1.0 / sorted(tb)[rounds // 2]


def one_row(args) -> dict:
    import torch

    import leanlm
    from leanlm.compress.recipe import apply_recipe, load_recipe, parse_recipe
    from leanlm.data import calibration_samples, packaged_text
    from leanlm.eval.bench import peak_rss_mb
    from leanlm.eval.perplexity import perplexity

    torch.set_num_threads(args.threads)
    name = args.row
    model, tok = leanlm.load(None, dtype=torch.float32)
    row = {"recipe": name, "threads": args.threads}
    t0, c0 = time.perf_counter(), time.process_time()
    if name != "fp32":
        recipe = parse_recipe(CUSTOM[name], name) if name in CUSTOM else load_recipe(name)
        samples = (calibration_samples(tok, args.samples, args.seq_len, path="packaged:prose", seed=0) if recipe.needs_data else None)
        row["calibration"] = None if samples is None else f"{args.samples}x{args.seq_len}"
        apply_recipe(model, recipe, samples, progress=False)
    row["time_s"] = time.perf_counter() - t0
    row["cpu_s"] = time.process_time() - c0  # CPU seconds: what the compression costs on an idle core
    with tempfile.TemporaryDirectory() as d:
        leanlm.save(model, tok, Path(d) / "m")
        row["size_mb"] = (Path(d) / "m" / "model.safetensors").stat().st_size / 1e6
    full = packaged_text("eval")
    text = full[: args.eval_chars] if args.eval_chars > 0 else full
    res = perplexity(model, tok, text, ctx=args.ctx, stride=args.ctx, progress=False)
    row["perplexity"], row["eval_tokens"] = res["perplexity"], res["tokens"]
    if args.full_eval and 0 < args.eval_chars < len(full):
        res = perplexity(model, tok, full, ctx=args.ctx, stride=args.ctx, progress=False)
        row["perplexity_full"], row["eval_tokens_full"] = res["perplexity"], res["tokens"]
    row["peak_rss_mb"] = peak_rss_mb()  # before the fp32 reference copy is loaded for the speed test
    if not args.speed:
        return row
    fp32, _ = leanlm.load(None, dtype=torch.float32)
    row["fp32_decode_tok_s"], row["decode_tok_s"] = decode_side_by_side(fp32, model)
    row["decode_vs_fp32"] = row["decode_tok_s"] / row["fp32_decode_tok_s"]
    return row


def markdown(rows: list[dict], args) -> str:
    base = next((r for r in rows if r["recipe"] == "fp32"), None)
    lines = ["| recipe | calib | perplexity | ppl increase vs fp32 | size MB | decode tok/s "
             "| decode / fp32 (same process) | quant time s | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        inc = "" if base is None else f"{r['perplexity'] - base['perplexity']:+.3f}"
        lines.append(f"| {r['recipe']} | {r.get('calibration') or '-'} | {r['perplexity']:.3f} | {inc} | "
                     f"{r['size_mb']:.1f} | {r.get('decode_tok_s', float('nan')):.2f} | {r.get('decode_vs_fp32', float('nan')):.2f}x | "
                     f"{r['time_s']:.1f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--row", default=None, help="run one row (internal)")
    p.add_argument("--rows", default=None, help="comma-separated subset of rows")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-chars", type=int, default=16000, help="score this prefix of the evaluation text (0: all)")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--full-eval", action="store_true",
                   help="also score the whole evaluation text (perplexity_full), besides the --eval-chars prefix")
    p.add_argument("--no-speed", dest="speed", action="store_false", help="skip the decode timing (and its fp32 copy)")
    p.add_argument("--out", default="docs/bench/quant.jsonl")
    p.add_argument("--md", default=None, help="write the markdown table here (stdout otherwise)")
    args = p.parse_args()
    if args.row:
        print(json.dumps(one_row(args)))
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    done = {r["recipe"] for r in rows}
    todo = args.rows.split(",") if args.rows else ROWS
    for name in todo:
        if name in done:
            continue
        cmd = [sys.executable, __file__, "--row", name, "--threads", str(args.threads), "--samples", str(args.samples),
               "--seq-len", str(args.seq_len), "--eval-chars", str(args.eval_chars), "--ctx", str(args.ctx)]
        cmd += (["--full-eval"] if args.full_eval else []) + ([] if args.speed else ["--no-speed"])
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            print(f"{name}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
            continue
        row = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(row)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    table = markdown(rows, args)
    if args.md:
        Path(args.md).write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
