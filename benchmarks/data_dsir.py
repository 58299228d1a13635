"""DSIR benchmark: select toward one domain from a mixed pool, continue pre-training on the same number
of tokens, and measure the target domain's perplexity: DSIR vs perplexity filtering vs random.

    PYTHONPATH=. python benchmarks/data_dsir.py --threads 2 --steps 20 --json   # the defaults
    PYTHONPATH=. python benchmarks/data_dsir.py --threads 1 --tokens 3000 --steps 12 --batch-size 2 --seq-len 128 \\
        --eval-chars 4000 --ppl-max-tokens 32 --json                         # the run in docs/bench/data.md

Data (packaged texts only, built here; nothing was tuned on the evaluation text): tech.txt (Python
HOWTOs) is cut by characters into thirds: the first third is DSIR's target text, the paragraphs of the
second third go into the pool, the last third is the held-out evaluation text (never in the pool, the
target or any choice). The pool also holds every paragraph of eval.txt (novel: Austen) and calib.txt
(play: The Tempest; scripture: Genesis), of at least 20 words. Each method ranks the pool and takes
records in rank order until `--tokens` tokens:
  dsir       leanlm's DSIR weights toward the target third (Gumbel top-k, seed 0)
  perplexity the lowest perplexity under the default model first (classic perplexity filtering:
             "keep the fluent text"; it knows nothing of the target domain)
  random     a seeded shuffle
Then LoRA (r 8, all linear layers) continues pre-training the default model on the selected text
(windows of --seq-len tokens, --steps steps of --batch-size), and the perplexity of the held-out third
is measured before and after (ctx 256, stride 128). The share of each selection that came from tech.txt
is reported as well.
"""
from __future__ import annotations

import argparse
import json
import random
import time

TARGETS = None  # all linear layers, from the model's layout


def pool_and_texts():
    from leanlm.data import packaged_text

    tech = packaged_text("tech")
    a, b = len(tech) // 3, 2 * len(tech) // 3
    target, middle, held = tech[:a], tech[a:b], tech[b:]
    pool = [{"text": p, "domain": "tech"} for p in middle.split("\n\n") if len(p.split()) >= 20]
    pool += [{"text": p, "domain": "novel"} for p in packaged_text("eval").split("\n\n") if len(p.split()) >= 20]
    for p in packaged_text("calib").split("\n\n"):
        if len(p.split()) >= 20:
            pool.append({"text": p, "domain": "scripture" if p[:8] == "Genesis " or "God" in p else "play"})
    return pool, target, held


def select_only(pool, target, args):
    """Share of each selection (budget in words) drawn from the target domain: DSIR with the mean and
    with the paper's summed log weight, and random; no model is loaded."""
    import numpy as np

    from leanlm.data.select import gumbel_top_k, hashed_ngrams, log_ratio, ngram_counts

    texts = [r["text"] for r in pool]
    ratio = log_ratio(ngram_counts([target], 10_000), ngram_counts(texts, 10_000))
    feats = [hashed_ngrams(t, 10_000) for t in texts]
    summed = np.array([float(ratio[f].sum()) for f in feats])
    mean = np.array([s / max(len(f), 1) for s, f in zip(summed, feats)]) * float(np.mean([len(f) for f in feats]))
    words = [len(t.split()) for t in texts]
    budget = args.tokens * 3 // 4  # about as many words as --tokens tokens
    rows = []
    for name, order in (("dsir (mean per n-gram, default)", gumbel_top_k(mean, len(texts), 0)),
                        ("dsir (paper's sum)", gumbel_top_k(summed, len(texts), 0)),
                        ("random", random.Random(0).sample(range(len(texts)), len(texts)))):
        picked, have = [], 0
        for i in order:
            if have >= budget:
                break
            picked.append(int(i))
            have += words[i]
        share = sum(pool[i]["domain"] == "tech" for i in picked) / len(picked)
        rows.append({"method": name, "records": len(picked), "words": have, "tech_share": share})
    pool_share = sum(r["domain"] == "tech" for r in pool) / len(pool)
    from leanlm.report import print_table

    print_table(f"selection toward tech from {len(pool)} records (tech share of the pool {pool_share:.3f})", rows)
    if args.json:
        print(json.dumps({"rows": rows, "pool": len(pool), "pool_tech_share": pool_share}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=12_000)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-chars", type=int, default=12_000)
    ap.add_argument("--ppl-max-tokens", type=int, default=256, help="tokens scored per pool record by the "
                    "perplexity filter")
    ap.add_argument("--methods", default="dsir,random,perplexity")
    ap.add_argument("--select-only", action="store_true", help="only the selections' domain shares (no model)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    import leanlm
    from leanlm.data.instruct import text_examples
    from leanlm.data.quality import PerplexityScorer
    from leanlm.data.select import dsir_log_weight, gumbel_top_k, hashed_ngrams, log_ratio, ngram_counts
    from leanlm.eval.perplexity import perplexity
    from leanlm.peft.cli import prepare
    from leanlm.train import TrainConfig, train

    pool, target, held = pool_and_texts()
    held = held[: args.eval_chars]
    if args.select_only:
        return select_only(pool, target, args)
    model, tok = leanlm.load()
    base_ppl = perplexity(model, tok, held, ctx=256, stride=128, progress=False)["perplexity"]
    rows = [{"method": "base (no training)", "target_ppl": base_ppl}]
    print(json.dumps(rows[-1]), flush=True)
    texts = [r["text"] for r in pool]
    ntok = [len(tok.encode(t, add_special=False)) for t in texts]
    t0 = time.perf_counter()
    ratio = log_ratio(ngram_counts([target], 10_000), ngram_counts(texts, 10_000))
    lens = [len(hashed_ngrams(t, 10_000)) for t in texts]
    w = np.array([dsir_log_weight(t, ratio, True) for t in texts]) * float(np.mean(lens))
    orders = {"dsir": [int(i) for i in gumbel_top_k(w, len(texts), seed=0)]}
    dsir_s = time.perf_counter() - t0
    orders["random"] = random.Random(0).sample(range(len(texts)), len(texts))
    print(json.dumps({"dsir_s": dsir_s}), flush=True)
    ppl_s = 0.0
    for method in args.methods.split(","):
        if method == "perplexity":  # scored only when its turn comes: the slowest selection, run last by choice
            t0 = time.perf_counter()
            scorer, stok = leanlm.load()  # the untuned model (`model` may hold an earlier method's adapter)
            ppl = PerplexityScorer(scorer, stok, max_tokens=args.ppl_max_tokens, batch_size=8)(texts)
            del scorer
            orders["perplexity"] = sorted(range(len(texts)), key=lambda i: ppl[i])
            ppl_s = time.perf_counter() - t0
        picked, have = [], 0
        for i in orders[method]:
            if have >= args.tokens:
                break
            picked.append(i)
            have += ntok[i]
        share = sum(pool[i]["domain"] == "tech" for i in picked) / len(picked)
        model, tok = leanlm.load()
        model = prepare(model, tok, "lora", dict(r=8, alpha=16))
        data = text_examples("\n\n".join(texts[i] for i in sorted(picked)), tok, args.seq_len)
        torch.manual_seed(0)
        t0 = time.perf_counter()
        res = train(model, data, TrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                             warmup_steps=2, progress=False))
        train_s = time.perf_counter() - t0
        model.eval()
        after = perplexity(model, tok, held, ctx=256, stride=128, progress=False)["perplexity"]
        rows.append({"method": method, "records": len(picked), "tokens": have, "tech_share": share,
                     "select_s": dsir_s if method == "dsir" else ppl_s if method == "perplexity" else 0.0,
                     "train_s": train_s, "last_loss": res.losses[-1], "target_ppl": after})
        print(json.dumps(rows[-1]), flush=True)
    from leanlm.report import print_table

    print_table(f"DSIR toward tech ({len(pool)} pool records, {args.steps} LoRA steps)", rows)
    if args.json:
        print(json.dumps({"rows": rows, "pool": len(pool), "args": vars(args)}))


if __name__ == "__main__":
    main()
