"""Instruction selection benchmark: LoRA on the top 10% of an instruction set by IFD, on a random 10%,
and on all of it; accuracy on held-back items and training time.

    PYTHONPATH=. python benchmarks/data_ifd.py --threads 1 --pool 160 --test 42 --steps-full 40 --json

Data (built here from fixed seeds and the packaged texts; nothing else): a mixed instruction set of six
kinds of short tasks of different difficulty for a 135M model, generated in turn (about equal shares):
  dates   rewrite an ISO date as "D Month YYYY"             (a format convention to learn)
  number  write a number 21-99 in words ("forty-seven")      (a convention plus knowledge)
  upper   write a word from the packaged texts in capitals  (easy: the model mostly knows it)
  add     the sum of two numbers 10-49                       (arithmetic)
  count   how many words a 4-9 word snippet of the texts has (hard for a small model)
  last    the last word of such a snippet                    (copying, position)
A record goes to the test split when a hash of its prompt falls in one bucket of five (so train and test
are disjoint by construction); the pool is the first --pool train records, the test split the first
--test test records. The test split is only used for the accuracies below: it is never scored by IFD,
never trained on and nothing (method defaults, steps, learning rate) was chosen by looking at it.

Evaluation: each test record has four choices (the answer and three plausible wrong ones: other date
and number formats, other sums and counts, other words of the snippet); a record is right when the
answer's log-likelihood as the assistant turn (chat template, the end-of-turn token included) is the
highest of the four (lm-eval's "acc"; no generation).

IFD (leanlm.data.select.ifd_scores: the model's loss on the answer with the instruction over its loss on
the answer alone) comes from the untuned default model; the top 10% by IFD (records with IFD >= 1
excluded, as in the paper) vs a seeded random 10% vs the whole pool. The 10% runs take a tenth of the
full run's steps (same batch size, learning rate and schedule).
"""
from __future__ import annotations

import argparse
import json
import random
import time
import zlib

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
DAYS = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
ONES = ["", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
KINDS = ("dates", "number", "upper", "add", "count", "last")


def number_words(n: int) -> str:
    return TENS[n // 10] + ("-" + ONES[n % 10] if n % 10 else "")


def _distinct(gold: str, others: list[str]) -> list[str]:
    out = [gold]
    for o in others:
        if o not in out:
            out.append(o)
    return out[:4]


def _snippets():
    import re

    from leanlm.data import packaged_text

    text = " ".join(packaged_text(n) for n in ("eval", "calib", "tech"))
    words = [w for w in re.findall(r"[A-Za-z]+", text)]
    vocab = sorted({w.lower() for w in words if 5 <= len(w) <= 9})
    return words, vocab


def make_record(kind: str, rng: random.Random, words, vocab) -> dict:
    if kind == "dates":
        y, m = rng.randint(1900, 2099), rng.randint(1, 12)
        d = rng.randint(1, DAYS[m - 1])
        prompt = f"Rewrite the date {y:04d}-{m:02d}-{d:02d} as day, month name and year."
        gold = f"{d} {MONTHS[m - 1]} {y}"
        others = [f"{MONTHS[m - 1]} {d}, {y}", f"{d:02d}/{m:02d}/{y}", f"{d} {MONTHS[m - 1][:3]} {y}"]
    elif kind == "number":
        n = rng.randint(21, 99)
        prompt = f"Write the number {n} in words."
        gold = number_words(n)
        others = [gold.replace("-", " "), gold.capitalize(), str(n)]
    elif kind == "upper":
        w = rng.choice(vocab)
        prompt = f"Write the word '{w}' in capital letters."
        gold = w.upper()
        others = [w, w.capitalize(), " ".join(w.upper())]
    elif kind == "add":
        a, b = rng.randint(10, 49), rng.randint(10, 49)
        prompt = f"What is {a} plus {b}? Answer with the number."
        gold = str(a + b)
        others = [str(a + b + 1), str(a + b - 1), str(a + b + 10)]
    else:
        k = rng.randint(4, 9)
        i = rng.randrange(len(words) - k)
        snip = words[i:i + k]
        if kind == "count":
            prompt = f"How many words are in '{' '.join(snip)}'? Answer with the number."
            gold = str(k)
            others = [str(k - 1), str(k + 1), str(k + 2)]
        else:
            prompt = f"What is the last word of '{' '.join(snip)}'?"
            gold = snip[-1]
            others = [snip[0], snip[-2], snip[len(snip) // 2]] + ["the", "and", "of"]
    return {"prompt": prompt, "completion": gold, "choices": _distinct(gold, others), "kind": kind}


def is_test(prompt: str) -> bool:
    return zlib.crc32(prompt.encode()) % 5 == 0


def mixed_set(split: str, n: int) -> list[dict]:
    words, vocab = _snippets()
    rng = random.Random("ifd-mixed")
    out, seen = [], set()
    j = 0
    while len(out) < n:
        rec = make_record(KINDS[j % len(KINDS)], rng, words, vocab)
        j += 1
        if rec["prompt"] in seen or is_test(rec["prompt"]) != (split == "test") or len(rec["choices"]) < 4:
            continue
        seen.add(rec["prompt"])
        out.append(rec)
    return out


def choice_accuracy(model, tok, records, demos_for=None, batch_size: int = 16) -> dict:
    """Share of records whose answer has the highest log-likelihood of its four choices, overall and by kind.
    demos_for(i): demonstrations (prompt + completion records) asked and answered before record i."""
    from leanlm.data.demos import few_shot_messages
    from leanlm.eval.tasks import loglikelihood_tokens

    reqs, owner = [], []
    for k, r in enumerate(records):
        msgs = few_shot_messages(demos_for(k) if demos_for else [], r["prompt"])
        prompt = tok.apply_chat_template(msgs, add_generation_prompt=True)
        ctx = list(tok.encode(prompt, add_special=False))
        for c in r["choices"]:
            full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": c}], add_generation_prompt=False)
            reqs.append((ctx, list(tok.encode(full[len(prompt):], add_special=False))))
            owner.append(k)
    was = model.training
    model.eval()
    lls = loglikelihood_tokens(model, reqs, batch_size=batch_size)
    model.train(was)
    per = [[] for _ in records]
    for k, (ll, _) in zip(owner, lls):
        per[k].append(ll)
    right = [max(range(len(p)), key=p.__getitem__) == 0 for p in per]  # the answer is choice 0
    by = {}
    for r, ok in zip(records, right):
        by.setdefault(r["kind"], []).append(ok)
    return {"acc": sum(right) / len(right), **{f"acc_{k}": sum(v) / len(v) for k, v in sorted(by.items())}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pool", type=int, default=300)
    ap.add_argument("--test", type=int, default=120)
    ap.add_argument("--steps-full", type=int, default=75)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--methods", default="ifd10,random10,all,ifd10-clusters")
    ap.add_argument("--clusters", type=int, default=6, help="ifd10-clusters: k-means groups of the pool")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    import leanlm
    from leanlm.data.instruct import record_example
    from leanlm.data.scoring import encode, mean_hidden
    from leanlm.data.select import choose, ifd_scores, instruction_pair, kmeans
    from leanlm.peft.cli import prepare
    from leanlm.train import TrainConfig, train

    pool = mixed_set("train", args.pool)
    test = mixed_set("test", args.test)
    assert not {r["prompt"] for r in pool} & {r["prompt"] for r in test}
    model, tok = leanlm.load()
    k = max(1, args.pool // 10)
    t0 = time.perf_counter()
    recs = [{"prompt": r["prompt"], "completion": r["completion"]} for r in pool]
    scores = ifd_scores(model, tok, [instruction_pair(tok, r, f"pool {i}", 512) for i, r in enumerate(recs)])
    ifd_s = time.perf_counter() - t0
    picked, excluded = choose("ifd", [s["ifd"] for s in scores], k)
    sets = {"ifd10": picked, "random10": random.Random(0).sample(range(len(pool)), k),
            "all": list(range(len(pool)))}
    select_s = {"ifd10": ifd_s}
    if "ifd10-clusters" in args.methods.split(","):  # the same IFDs, ranked within k-means groups
        t0 = time.perf_counter()  # of the records' mean hidden states (prompt + answer, as `data select`)
        emb = mean_hidden(model, [encode(tok, r["prompt"] + r["completion"]) for r in recs], 8)
        labels = kmeans(emb, args.clusters)
        sets["ifd10-clusters"] = choose("ifd", [s["ifd"] for s in scores], k, labels=labels)[0]
        select_s["ifd10-clusters"] = ifd_s + time.perf_counter() - t0
        groups = {}
        for i, c in enumerate(labels.tolist()):
            groups.setdefault(c, {}).setdefault(pool[i]["kind"], 0)
            groups[c][pool[i]["kind"]] += 1
        print(json.dumps({"clusters_by_kind": groups}), flush=True)
    by_kind = {}
    for i, s in enumerate(scores):
        by_kind.setdefault(pool[i]["kind"], []).append(s["ifd"])
    print(json.dumps({"ifd_s": ifd_s, "excluded": len(excluded),
                      "mean_ifd_by_kind": {k_: sum(v) / len(v) for k_, v in by_kind.items()}}), flush=True)
    rows = [{"method": "base (no training)", **choice_accuracy(model, tok, test)}]
    print(json.dumps(rows[-1]), flush=True)
    for m in args.methods.split(","):
        idx = sets[m]
        steps = args.steps_full if m == "all" else max(1, args.steps_full // 10)
        model, tok = leanlm.load()
        model = prepare(model, tok, "lora", dict(r=8, alpha=16))
        data = [record_example(tok, recs[i], f"pool {i}") for i in idx]
        torch.manual_seed(0)
        t0 = time.perf_counter()
        train(model, data, TrainConfig(max_steps=steps, batch_size=args.batch_size, lr=args.lr,
                                       warmup_steps=min(5, steps // 4), progress=False))
        train_s = time.perf_counter() - t0
        kinds = {}
        for i in idx:
            kinds[pool[i]["kind"]] = kinds.get(pool[i]["kind"], 0) + 1
        rows.append({"method": m, "examples": len(idx), "steps": steps, "train_s": train_s,
                     "select_s": select_s.get(m, 0.0), **choice_accuracy(model, tok, test),
                     "mean_ifd": sum(scores[i]["ifd"] for i in idx) / len(idx), "kinds": kinds})
        print(json.dumps(rows[-1]), flush=True)
    from leanlm.report import print_table

    print_table(f"IFD selection on the mixed set ({args.pool} pool, {args.test} test)",
                [{k_: v for k_, v in r.items() if k_ != "kinds"} for r in rows])
    if args.json:
        print(json.dumps({"rows": rows, "excluded_ifd_ge_1": len(excluded), "args": vars(args)}))


if __name__ == "__main__":
    main()
