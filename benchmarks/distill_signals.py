"""Teacher signals side by side: `leanlm distill` with an online teacher (forward KL), the offline top-k
teacher (`--topk`, built once, then a second run that reads the cache), sequence-level KD (`--seqkd`) and
on-policy GKD (`--lmbda`), same student, data, steps and settings.

    python3 benchmarks/distill_signals.py --student /tmp/rtn3 --data calib.txt --work /tmp/signals --steps 5 \
        --parallel 3

Each job is one `python3 -m leanlm distill` process; up to --parallel run at once (the cache-reading top-k
run starts only after the run that builds the cache has finished). Per job: the CLI's JSON (perplexity of
the student before and after on the held-out technical text, peak RSS, first/last loss, the top-k cache's
size and whether the run read or built it), seconds per step from its log (wall, the cache build and the
start-up excluded), and the process's CPU seconds (user + system, from wait4) for the whole run.
Prints a Markdown table and, last, one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

JOBS = {  # name -> extra arguments
    "online fkl": [],
    "top-k 64 (builds cache)": ["--topk", "64"],
    "top-k 64 (reads cache)": ["--topk", "64"],
    "seqkd 8 x 64 tokens": ["--seqkd", "8", "--seqkd-tokens", "64"],
    "on-policy lmbda 1": ["--lmbda", "1"],
}
OUT = {"online fkl": "fkl", "top-k 64 (builds cache)": "topk", "top-k 64 (reads cache)": "topk",
       "seqkd 8 x 64 tokens": "seqkd", "on-policy lmbda 1": "lmbda"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student", required=True, help="compressed student folder (e.g. leanlm compress output)")
    p.add_argument("--data", default="packaged:calib", help="training text (leanlm distill --data)")
    p.add_argument("--work", default="/tmp/leanlm-signals")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--eval-chars", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--parallel", type=int, default=1, help="jobs at once")
    p.add_argument("--jobs", default=",".join(JOBS), help="comma-separated subset of: " + ", ".join(JOBS))
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "leanlm", "distill", "--student", a.student, "--data", a.data,
            "--steps", str(a.steps),
            "--batch-size", str(a.batch_size), "--seq-len", str(a.seq_len), "--warmup", str(a.warmup),
            "--eval-chars", str(a.eval_chars), "--threads", str(a.threads), "--seed", "0", "--no-progress", "--json"]
    queue = [j for j in a.jobs.split(",") if j]
    bad = [j for j in queue if j not in JOBS]
    if bad:
        raise SystemExit(f"unknown job(s) {bad}; choose from {list(JOBS)}")
    running, results = {}, {}
    while queue or running:
        for j in list(queue):
            if len(running) >= a.parallel:
                break
            if j == "top-k 64 (reads cache)" and "top-k 64 (builds cache)" in queue + list(running.values()):
                continue
            cmd = base + JOBS[j] + ["-o", str(work / OUT[j])]
            log = work / f"{OUT[j]}{'-reuse' if 'reads' in j else ''}.out"
            with open(log, "w") as f:  # the child keeps its own copy of the descriptor
                proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
            running[proc.pid] = j
            results[j] = {"cmd": " ".join(cmd[1:]), "start": time.time(), "load_start": os.getloadavg()[0],
                          "log": str(log)}
            queue.remove(j)
        pid, status, ru = os.wait4(-1, 0)
        j = running.pop(pid)
        r = results[j]
        r["wall_s"] = time.time() - r["start"]
        r["cpu_s"] = ru.ru_utime + ru.ru_stime
        r["load_end"] = os.getloadavg()[0]
        r["exit"] = os.waitstatus_to_exitcode(status)
        lines = [ln for ln in Path(r["log"]).read_text().splitlines() if ln.startswith("{")]
        if r["exit"] == 0 and lines:
            r.update(json.loads(lines[-1]))
            steps = [json.loads(ln) for ln in (work / OUT[j] / "log.jsonl").read_text().splitlines()][-a.steps:]
            r["s_per_step"] = sum(s["step_s"] for s in steps) / len(steps)
        print(f"# {j}: {json.dumps(r)[:300]}", file=sys.stderr, flush=True)
    print("| teacher signal | ppl before | ppl after | s/step (wall) | run CPU s | peak RSS MB | top-k cache |"
          " first loss | last loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for j in JOBS:
        r = results.get(j)
        if not r or r["exit"]:
            continue
        cache = f"{r['topk_cache_mb']:.1f} MB, {r['topk_cache']}" if "topk_cache" in r else ""
        print(f"| {j} | {r['student_ppl']:.2f} | {r['student_ppl_after']:.2f} | {r['s_per_step']:.1f} | "
              f"{r['cpu_s']:.0f} | {r['peak_rss_mb']:.0f} | {cache} | {r['first_loss']:.4f} | {r['last_loss']:.4f} |")
    print(json.dumps(results))
    return 0 if all(r["exit"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
