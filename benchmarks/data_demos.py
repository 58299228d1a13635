"""Few-shot demonstration selection: k nearest examples by the model's own hidden states vs random and
fixed choices, on the mixed-kind instruction set of benchmarks/data_ifd.py.

    PYTHONPATH=. python benchmarks/data_demos.py --threads 1 --k 4 --json

For each test record, k demonstrations are chosen from the training pool (leanlm.data.demos:
`knn` = cosine similarity of mean hidden states of the prompts, `random` = a seeded sample per record,
`fixed` = the pool's first k for every record) and put before the question as earlier chat turns
(`few_shot_messages`); the untuned default model then ranks the record's four choices by
log-likelihood (data_ifd.py's `choice_accuracy`, lm-eval's "acc"). Zero-shot is the baseline.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pool", type=int, default=160)
    ap.add_argument("--test", type=int, default=42)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    import leanlm
    from data_ifd import choice_accuracy, mixed_set
    from leanlm.data.demos import DemoSelector

    pool = mixed_set("train", a.pool)
    test = mixed_set("test", a.test)
    assert not {r["prompt"] for r in pool} & {r["prompt"] for r in test}
    model, tok = leanlm.load()
    model.eval()
    sel = DemoSelector(model, tok, [{"prompt": r["prompt"], "completion": r["completion"], "kind": r["kind"]}
                                    for r in pool])
    rows = []
    for strategy in ("zero-shot", "fixed", "random", "knn"):
        t0 = time.perf_counter()
        if strategy == "zero-shot":
            chosen = [[] for _ in test]
        else:
            chosen = [sel.select(r["prompt"], a.k, strategy, seed=i) for i, r in enumerate(test)]
        select_s = time.perf_counter() - t0
        same_kind = (sum(d["kind"] == r["kind"] for ds, r in zip(chosen, test) for d in ds)
                     / max(1, sum(len(ds) for ds in chosen)))
        t0 = time.perf_counter()
        acc = choice_accuracy(model, tok, test, lambda i: chosen[i], batch_size=8)
        rows.append({"strategy": strategy, "k": 0 if strategy == "zero-shot" else a.k, **acc,
                     "demos_of_same_kind": round(same_kind, 3), "select_s": round(select_s, 2),
                     "score_s": round(time.perf_counter() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
    from leanlm.report import print_table

    print_table(f"few-shot demonstrations ({a.pool} pool, {a.test} test, k={a.k})", rows)
    if a.json:
        print(json.dumps({"rows": rows, "args": vars(a), "load": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
