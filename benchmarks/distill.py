"""Recovery by distillation: perplexity before compression, after it, and after the recipe's distill step.

One job = one recipe and one loss, in its own process:
    python benchmarks/distill.py job --recipe w3a16-gptq-g64 --loss fkl --budget-s 240 --threads 2
prints one JSON line: held-out perplexity (packaged tech text, first --eval-chars characters) of the fp32
model, of the compressed model and of the recovered model, share of the increase recovered, compression
and distillation seconds, steps done, peak RSS, load average.

Several jobs side by side, each pinned to its own pair of cores (taskset), results as a Markdown table:
    python benchmarks/distill.py many --jobs w3a16-gptq-g64:fkl,structured-35:fkl,... --budget-s 240 --out FILE
The distillation is bounded by time (--budget-s): the loop runs a cosine schedule over --steps and stops
after the step that crosses the budget (the step count reached is reported).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


class OutOfTime(Exception):
    pass


def job(a) -> dict:
    import torch

    import leanlm
    from leanlm.compress.recipe import apply_recipe, load_recipe
    from leanlm.compress.recover import DistillStepConfig, distill_step
    from leanlm.data import calibration_samples, packaged_text
    from leanlm.eval.perplexity import perplexity
    from leanlm.train.loop import peak_rss_mb

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model, tok = leanlm.load(a.model, dtype=torch.float32)
    text = packaged_text("tech")[: a.eval_chars]

    def ppl(m):
        return perplexity(m, tok, text, ctx=512, stride=512, progress=False)["perplexity"]

    out = {"recipe": a.recipe, "loss": a.loss, "threads": a.threads, "calib": a.calib}
    out["ppl_fp32"] = ppl(model)
    original = copy.deepcopy(model).eval()
    samples = calibration_samples(tok, a.samples, a.seq_len, path=a.calib, seed=0)
    t0 = time.perf_counter()
    apply_recipe(model, load_recipe(a.recipe), samples, progress=False)
    out["compress_s"] = time.perf_counter() - t0
    out["ppl_compressed"] = ppl(model)
    cfg = DistillStepConfig(loss=a.loss, steps=a.steps, lr=a.lr, scales_lr=a.scales_lr, ternary_lr=a.ternary_lr,
                            batch_size=a.batch, seq_len=a.seq_len, temperature=a.temperature, progress=False)
    steps = []
    t1 = time.perf_counter()

    def guard(step, loss):
        steps.append((step, loss))
        if time.perf_counter() - t1 > a.budget_s:
            raise OutOfTime
    try:
        distill_step(model, cfg, [], samples, original=original, callback=guard)
    except OutOfTime:
        pass
    out["distill_s"] = time.perf_counter() - t1
    out["steps"] = len(steps)
    out["first_loss"], out["last_loss"] = steps[0][1], steps[-1][1]
    out["ppl_recovered"] = ppl(model)
    inc = out["ppl_compressed"] - out["ppl_fp32"]
    out["recovered_share"] = (out["ppl_compressed"] - out["ppl_recovered"]) / inc if inc > 0 else None
    out["peak_rss_mb"] = peak_rss_mb()
    out["loadavg"] = os.getloadavg()
    if a.save:  # the recovered model as leanlm saves it (its size on disk)
        folder = leanlm.save(model, tok, a.save)
        out["saved_mb"] = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e6
    return out


def many(a) -> int:
    jobs = [j.split(":") for j in a.jobs.split(",")]
    procs = []
    base = [sys.executable, os.path.abspath(__file__), "job", "--budget-s", str(a.budget_s), "--steps", str(a.steps),
            "--threads", str(a.threads), "--eval-chars", str(a.eval_chars), "--batch", str(a.batch),
            "--seq-len", str(a.seq_len), "--samples", str(a.samples), "--lr", str(a.lr),
            "--scales-lr", str(a.scales_lr), "--ternary-lr", str(a.ternary_lr), "--calib", a.calib]
    base += ["--model", a.model] if a.model else []
    for i, (recipe, loss) in enumerate(jobs):
        cores = ",".join(str(i * a.threads + c) for c in range(a.threads))
        cmd = (["taskset", "-c", cores] if a.pin else []) + base + ["--recipe", recipe, "--loss", loss]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        stdout, _ = p.communicate()
        lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
        results.append(json.loads(lines[-1]) if lines else {"error": p.returncode})
    rows = ["| recipe | loss | ppl fp32 | compressed | recovered | share recovered | steps | distill s | "
            "compress s | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| failed ({r['error']}) |")
            continue
        share = "" if r["recovered_share"] is None else f"{100 * r['recovered_share']:.0f}%"
        rows.append(f"| {r['recipe']} | {r['loss']} | {r['ppl_fp32']:.2f} | {r['ppl_compressed']:.2f} | "
                    f"{r['ppl_recovered']:.2f} | {share} | {r['steps']} | {r['distill_s']:.0f} | "
                    f"{r['compress_s']:.0f} | {r['peak_rss_mb']:.0f} |")
    table = "\n".join(rows)
    print(table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(table + "\n\n" + "\n".join(json.dumps(r) for r in results) + "\n")
    return 0 if all("error" not in r for r in results) else 1


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["job", "many"])
    p.add_argument("--recipe", default="w3a16-gptq-g64")
    p.add_argument("--loss", default="fkl")
    p.add_argument("--jobs", default="w3a16-gptq-g64:fkl")
    p.add_argument("--model", default=None)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--budget-s", type=float, default=240)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--scales-lr", type=float, default=1e-5)
    p.add_argument("--ternary-lr", type=float, default=5e-4, help="BitLinear latent weights (bitnet158)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--calib", default="packaged:prose",
                   help="calibration and distillation text (packaged:prose keeps the runs comparable with earlier ones)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-chars", type=int, default=20000)
    p.add_argument("--pin", action="store_true", help="many: pin each job to its own cores with taskset")
    p.add_argument("--out", default=None)
    p.add_argument("--save", default=None, help="job: save the recovered model to this folder")
    a = p.parse_args()
    if a.mode == "job":
        print(json.dumps(job(a)), flush=True)
        return 0
    return many(a)


if __name__ == "__main__":
    sys.exit(main())
