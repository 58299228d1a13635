"""Does the calibration set decide PTQ's gain out of domain? 4-bit g128 RTN / GPTQ / AWQ, old text vs the mix.

    python benchmarks/calib_mix.py --samples 64 --seq-len 512 --eval-chars 40000 --out calib_mix.jsonl

Rows: fp32, RTN (no calibration), then GPTQ and AWQ (leanlm's `w4a16-{gptq,awq}-g128` recipes, default
settings) calibrated on (a) `packaged:prose` (the old single calibration text: Shakespeare + KJV Genesis)
and (b) the packaged default mix (`packaged:mix`). Each row is scored by perplexity (windows of --ctx
tokens, no overlap) on the first --eval-chars characters of three texts, none of them ever used for
calibration or for choosing the mix:
  austen  packaged eval.txt (Jane Austen, Persuasion): literary, the old calibration text's domain
  legal   licence texts from /usr/share/common-licenses (GPL-3, then Apache-2.0, then MPL-2.0, joined by a
          blank line): legal English, a domain none of the mix's parts (prose, code, technical docs,
          chat) covers; every Debian system holds these files (package base-files)
  tech    packaged tech.txt (Python HOWTOs): technical documentation, the mix's docs/code domain but
          other documents
Rows run in one process, one after another, each on a fresh copy of the model; finished rows in --out
are kept, so an interrupted run resumes. Each row records `uptime`'s load averages before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

LEGAL = ["/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/Apache-2.0",
         "/usr/share/common-licenses/MPL-2.0"]
ROWS = {  # name -> (recipe, calibration spec)
    "fp32": (None, None),
    "rtn": ("w4a16-rtn-g128", None),
    "gptq-prose": ("w4a16-gptq-g128", "packaged:prose"),
    "gptq-mix": ("w4a16-gptq-g128", "packaged:mix"),
    "awq-prose": ("w4a16-awq-g128", "packaged:prose"),
    "awq-mix": ("w4a16-awq-g128", "packaged:mix"),
}


def texts(eval_chars: int) -> dict:
    from leanlm.data import packaged_text

    legal = "\n\n".join(Path(p).read_text(encoding="utf-8").strip() for p in LEGAL)
    out = {"austen": packaged_text("eval"), "legal": legal, "tech": packaged_text("tech")}
    return {k: v[:eval_chars] if eval_chars > 0 else v for k, v in out.items()}


def one_row(name: str, args, evals: dict) -> dict:
    import torch

    import leanlm
    from leanlm.compress.recipe import apply_recipe, load_recipe, resolve
    from leanlm.data import calibration_plan, calibration_samples
    from leanlm.eval.perplexity import perplexity

    recipe_name, spec = ROWS[name]
    load0 = os.getloadavg()
    model, tok = leanlm.load(None, dtype=torch.float32)
    row = {"row": name, "recipe": recipe_name, "calib": spec, "load_before": [round(x, 2) for x in load0]}
    if recipe_name:
        recipe = load_recipe(recipe_name)
        resolve(recipe, model)
        t0, c0 = time.perf_counter(), time.process_time()
        samples = None
        if recipe.needs_data:
            samples = calibration_samples(tok, args.samples, args.seq_len, path=spec, seed=args.seed)
            row["plan"] = calibration_plan(spec, args.samples)
            row["samples"] = list(samples.shape)
        apply_recipe(model, recipe, samples, progress=False)
        row["time_s"] = time.perf_counter() - t0
        row["cpu_s"] = time.process_time() - c0
    model.eval()
    for k, text in evals.items():
        row[f"ppl_{k}"] = perplexity(model, tok, text, ctx=args.ctx, stride=args.ctx, progress=False)["perplexity"]
    row["load_after"] = [round(x, 2) for x in os.getloadavg()]
    return row


def table(rows: list[dict]) -> str:
    by = {r["row"]: r for r in rows}
    fp, rtn = by.get("fp32"), by.get("rtn")
    keys = ("austen", "legal", "tech")
    lines = ["| row | calibration | " + " | ".join(f"ppl {k} | kept of RTN's increase ({k})" for k in keys)
             + " | time s (CPU s) | load 1/5/15 before |",
             "|---|---|" + "---:|---:|" * len(keys) + "---:|---|"]
    for r in rows:
        cells = []
        for k in keys:
            p = r[f"ppl_{k}"]
            kept = ""
            if fp and rtn and r["row"] not in ("fp32", "rtn"):
                kept = f"{100 * (p - fp[f'ppl_{k}']) / (rtn[f'ppl_{k}'] - fp[f'ppl_{k}']):.0f}%"
            elif r["row"] == "rtn":
                kept = "100%"
            cells += [f"{p:.2f}", kept]
        t = f"{r['time_s']:.0f} ({r['cpu_s']:.0f})" if "time_s" in r else ""
        lines.append(f"| {r['row']} | {r['calib'] or ''} | " + " | ".join(cells)
                     + f" | {t} | {'/'.join(map(str, r['load_before']))} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of " + ",".join(ROWS))
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-chars", type=int, default=40000, help="characters of each evaluation text (0: all)")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="calib_mix.jsonl")
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    bad = [n for n in names if n not in ROWS]
    if bad:
        p.error(f"unknown rows {bad}; choose from {', '.join(ROWS)}")
    out = Path(args.out)
    done = {}
    if out.exists():
        for line in out.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[r["row"]] = r
    evals = texts(args.eval_chars)
    for name in names:
        if name in done:
            continue
        row = one_row(name, args, evals)
        row.update({"eval_chars": args.eval_chars, "ctx": args.ctx})
        done[name] = row
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), file=sys.stderr, flush=True)
    print(table([done[n] for n in ROWS if n in done]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
