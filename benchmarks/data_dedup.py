"""Dedup benchmark: precision and recall of `leanlm data dedup` on a corpus with planted near-duplicates,
and records per second.

    python benchmarks/data_dedup.py --threads 2 --json

Corpus (packaged texts only, built here, never used to tune anything): every paragraph of at least 40
words of eval.txt, calib.txt and tech.txt is an original (normalized duplicates among them are
removed first, so the originals are distinct). For a seeded half of the originals one copy is
planted with word edits at a known rate (each word replaced by a random token with probability r, r
cycling through 0.002, 0.005, 0.01, 0.02, 0.05, at least one edit). Ground truth is the exact Jaccard
similarity of the word 5-gram sets of copy and original (the quantity MinHash estimates): a copy is a
true duplicate when it is >= the threshold. A dropped copy is a true positive, a dropped original or
a dropped copy below the threshold is a false positive. Originals, then copies, each shuffled with a fixed seed
(so the original is the record kept), written as JSONL, and run through the CLI code path.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path

RATES = [0.002, 0.005, 0.01, 0.02, 0.05]


def grams(t, n=5):
    w = re.sub(r"\s+", " ", t.lower()).strip().split(" ")
    return {tuple(w[i:i + n]) for i in range(max(1, len(w) - n + 1))}


def build(seed: int, copies: float):
    from leanlm.data import packaged_text
    from leanlm.data.dedup import normalize

    rng = random.Random(seed)
    seen, originals = set(), []
    for name in ("eval", "calib", "tech"):
        for p in packaged_text(name).split("\n\n"):
            if len(p.split()) >= 40 and normalize(p) not in seen:
                seen.add(normalize(p))
                originals.append(p)
    origs, copies_, truth = [], [], {}
    for i, p in enumerate(originals):
        origs.append({"text": p, "id": f"o{i}"})
        if rng.random() < copies:
            r = RATES[len(truth) % len(RATES)]
            w = p.split()
            hit = [rng.random() < r for _ in w]
            hit[rng.randrange(len(w))] = True
            q = " ".join(f"x{rng.randrange(10**9)}" if h else t for t, h in zip(w, hit))
            ga, gb = grams(p), grams(q)
            truth[f"c{i}"] = (r, len(ga & gb) / len(ga | gb))
            copies_.append({"text": q, "id": f"c{i}"})
    rng.shuffle(origs)
    rng.shuffle(copies_)  # every copy comes after every original, so the original is the one kept
    return origs + copies_, truth


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--copies", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verify", default="exact", choices=["exact", "estimate"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from leanlm.data.dedup import DedupConfig, dedup
    from leanlm.data.records import dropped_path

    rows, truth = build(args.seed, args.copies)
    with tempfile.TemporaryDirectory() as d:
        src, out = Path(d) / "corpus.jsonl", Path(d) / "out.jsonl"
        with open(src, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        t0 = time.perf_counter()
        dedup(src, out, DedupConfig(threshold=args.threshold, verify=args.verify), progress=False)
        secs = time.perf_counter() - t0
        dropped = {json.loads(x)["record"]["id"] for x in open(dropped_path(out), encoding="utf-8")}
    pos = {k for k, (_, j) in truth.items() if j >= args.threshold}
    tp = len(dropped & pos)
    fp = len(dropped - pos)
    by_rate = {}
    for k, (r, j) in truth.items():
        b = by_rate.setdefault(r, {"copies": 0, "true_dups": 0, "dropped": 0, "mean_jaccard": 0.0})
        b["copies"] += 1
        b["true_dups"] += j >= args.threshold
        b["dropped"] += k in dropped
        b["mean_jaccard"] += j
    for b in by_rate.values():
        b["mean_jaccard"] = round(b["mean_jaccard"] / b["copies"], 3)
    out = {"records": len(rows), "originals": len(rows) - len(truth), "planted_copies": len(truth),
           "true_duplicates": len(pos), "dropped": len(dropped), "true_positives": tp, "false_positives": fp,
           "precision": tp / max(len(dropped), 1), "recall": tp / max(len(pos), 1),
           "records_per_s": len(rows) / secs, "seconds": secs, "threshold": args.threshold,
           "verify": args.verify, "threads": args.threads, "by_edit_rate": by_rate, "python": sys.version.split()[0]}
    from leanlm.report import show

    show("dedup benchmark", out, args.json)


if __name__ == "__main__":
    main()
