"""Instruction selection benchmark: LoRA on the top 10% of an instruction set by IFD, on a random 10%,
and on all of it; exact-match accuracy on held-back items and training time.

    PYTHONPATH=. python benchmarks/data_ifd.py --threads 2 --pool 200 --steps-full 50 --json

Data: the packaged "dates" task (leanlm/data/tasks/dates.py: rewrite an ISO date as "D Month YYYY";
train and test dates are disjoint by construction). The pool is the first --pool train records; the
test split (--test records) is only ever used for the accuracy below, never for choosing anything.
IFD scores come from the untuned default model (leanlm.data.select.ifd_scores). The 10% runs take a
tenth of the full run's steps (same batch size, learning rate and schedule): the full run sees each
pool record once, the 10% runs each selected record once.
"""
from __future__ import annotations

import argparse
import json
import random
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pool", type=int, default=200)
    ap.add_argument("--test", type=int, default=24)
    ap.add_argument("--steps-full", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--methods", default="ifd10,random10,all")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    import leanlm
    from leanlm.data.instruct import record_example
    from leanlm.data.select import choose, ifd_scores, instruction_pair
    from leanlm.data.tasks import accuracy, get_task
    from leanlm.peft.cli import prepare
    from leanlm.train import TrainConfig, train

    task = get_task("dates")
    pool = task.records("train", args.pool)
    test = task.records("test", args.test)
    model, tok = leanlm.load()
    k = max(1, args.pool // 10)
    t0 = time.perf_counter()
    scores = ifd_scores(model, tok, [instruction_pair(tok, r, f"pool {i}", 512) for i, r in enumerate(pool)])
    ifd_s = time.perf_counter() - t0
    picked, excluded = choose("ifd", [s["ifd"] for s in scores], k)
    sets = {"ifd10": picked, "random10": random.Random(0).sample(range(len(pool)), k),
            "all": list(range(len(pool)))}
    rows = [{"method": "base (no training)", "accuracy": accuracy(model, tok, task, test)}]
    print(json.dumps(rows[-1]), flush=True)
    for m in args.methods.split(","):
        idx = sets[m]
        steps = args.steps_full if m == "all" else max(1, args.steps_full // 10)
        model, tok = leanlm.load()
        model = prepare(model, tok, "lora", dict(r=8, alpha=16))
        data = [record_example(tok, pool[i], f"pool {i}") for i in idx]
        torch.manual_seed(0)
        t0 = time.perf_counter()
        train(model, data, TrainConfig(max_steps=steps, batch_size=args.batch_size, lr=args.lr,
                                       warmup_steps=min(5, steps // 4), progress=False))
        train_s = time.perf_counter() - t0
        rows.append({"method": m, "examples": len(idx), "steps": steps, "train_s": train_s,
                     "select_s": ifd_s if m == "ifd10" else 0.0, "accuracy": accuracy(model, tok, task, test),
                     "mean_ifd": sum(scores[i]["ifd"] for i in idx) / len(idx)})
        print(json.dumps(rows[-1]), flush=True)
    from leanlm.report import print_table

    print_table(f"IFD selection on dates ({args.pool} pool, {args.test} test)", rows)
    if args.json:
        print(json.dumps({"rows": rows, "excluded_ifd_ge_1": len(excluded), "args": vars(args)}))


if __name__ == "__main__":
    main()
