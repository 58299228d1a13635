"""Prompt compression benchmark: question answering over packaged passages, answered by the default
model with the full context and with contexts compressed 2x and 4x by leanlm, by llmlingua 0.2.2
(LongLLMLingua settings, the same scorer model, CPU) and by dropping random tokens.

    python -m venv --system-site-packages /work/venvs/llmlingua && /work/venvs/llmlingua/bin/pip install llmlingua==0.2.2
    PYTHONPATH=. python benchmarks/data_prompt.py --n 12 --threads 2 \\
        --llmlingua-python /work/venvs/llmlingua/bin/python --out docs/bench/data_prompt.jsonl

Evaluation set (built here from the packaged texts, seed "qa-test"; nothing was tuned on it, the
compressor's defaults were fixed before it was first run): each item is `--docs` paragraphs of 40-150
words drawn from eval.txt, calib.txt and tech.txt (several hundred tokens in all), with one planted
fact sentence about a made-up name inserted after a random sentence of one random paragraph ("The
name of the miller's horse was Velmora."). The question asks for the name; an answer is correct when
the name appears in the model's greedy reply (case-insensitive). Planted facts are surprising by
construction, which suits perplexity-based pruning; say so next to the figures.

llmlingua 0.2.2 builds a tiktoken cl100k encoder at start-up, which downloads its vocabulary (no
network here): the llmlingua part replaces `tiktoken.encoding_for_model` with the scorer's own
tokenizer, so its `rate` is counted in the same tokens as leanlm's. Its scorer is the default model's
fp32 cache folder (the same weights leanlm scores with), loaded by transformers on CPU.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

KINDS = [("name of the {o}'s horse", "The name of the {o}'s horse was {x}."),
         ("name of the {o}'s ship", "The {o}'s ship was named {x}."),
         ("secret password of the {o}", "The secret password of the {o} was {x}."),
         ("name of the town where the {o} was born", "The {o} was born in a town called {x}."),
         ("name of the {o}'s dog", "The {o} had a dog named {x}.")]
OWNERS = ["miller", "old sailor", "librarian", "gardener", "blacksmith", "weaver", "innkeeper", "clockmaker"]
SYL = ["vel", "mor", "ta", "quist", "bran", "del", "ori", "zan", "lek", "thu", "mira", "gor", "sen", "pal"]
RATES = {"2x": 0.5, "4x": 0.25}
INSTRUCTION = "Answer the question with the name only."


def made_up(rng) -> str:
    return "".join(rng.choice(SYL) for _ in range(3)).capitalize()


def build_items(n: int, docs: int, seed: str = "qa-test") -> list[dict]:
    from leanlm.data import packaged_text

    rng = random.Random(seed)
    pool = [p for name in ("eval", "calib", "tech") for p in packaged_text(name).split("\n\n")
            if 40 <= len(p.split()) <= 150]
    items = []
    for _ in range(n):
        ctx = rng.sample(pool, docs)
        q_t, f_t = rng.choice(KINDS)
        o, x = rng.choice(OWNERS), made_up(rng)
        j = rng.randrange(docs)
        sents = re.split(r"(?<=[.!?])\s+", ctx[j])
        k = rng.randrange(len(sents) + 1)
        ctx[j] = " ".join(sents[:k] + [f_t.format(o=o, x=x)] + sents[k:])
        items.append({"docs": ctx, "question": f"What was the {q_t.format(o=o)}?", "answer": x, "gold_doc": j})
    return items


def random_drop(tok, docs, rate, seed) -> str:
    rng = random.Random(seed)
    out = []
    for d in docs:
        ids = tok.encode(d, add_special=False)
        keep = sorted(rng.sample(range(len(ids)), max(1, round(rate * len(ids)))))
        out.append(tok.decode([ids[i] for i in keep]).strip())
    return "\n\n".join(out)


def llmlingua_part(args) -> None:
    """Run inside the llmlingua venv: compress every item at every rate, one JSON line each."""
    import torch

    torch.set_num_threads(args.threads)
    import tiktoken
    from transformers import AutoTokenizer

    class ScorerTokens:  # stands in for cl100k (whose download needs the network)
        def __init__(self):
            self.t = AutoTokenizer.from_pretrained(args.scorer_dir)

        def encode(self, s, **kw):
            return self.t.encode(s, add_special_tokens=False)

        def decode(self, ids):
            return self.t.decode(ids)

    tiktoken.encoding_for_model = lambda name: ScorerTokens()
    from llmlingua import PromptCompressor

    comp = PromptCompressor(model_name=args.scorer_dir, device_map="cpu")
    with open(args.llmlingua_out, "w") as f:
        for i, it in enumerate(build_items(args.n, args.docs)):
            for name, rate in RATES.items():
                t0 = time.perf_counter()
                r = comp.compress_prompt(it["docs"], question=it["question"], rate=rate, rank_method="longllmlingua",
                                         condition_in_question="after_condition", reorder_context="sort",
                                         dynamic_context_compression_ratio=0.3, condition_compare=True,
                                         context_budget="+100")
                secs = time.perf_counter() - t0
                text = r["compressed_prompt"]
                if text.rstrip().endswith(it["question"]):  # llmlingua appends the question; we add it ourselves
                    text = text.rstrip()[: -len(it["question"])].rstrip()
                f.write(json.dumps({"item": i, "method": f"llmlingua {name}", "context": text, "seconds": secs}) + "\n")
                f.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llmlingua-python", default=None, help="python of a venv with llmlingua==0.2.2")
    ap.add_argument("--part", default="main", choices=["main", "llmlingua"])
    ap.add_argument("--scorer-dir", default=None)
    ap.add_argument("--llmlingua-out", default="/tmp/llmlingua_compressed.jsonl")
    ap.add_argument("--llmlingua-results", default=None, help="read llmlingua's compressed contexts from a file "
                    "written earlier by --part llmlingua instead of running it")
    ap.add_argument("--wait", type=int, default=360, help="10 s polls for --llmlingua-results to fill")
    ap.add_argument("--out", default=None, help="append one JSON line per answer here")
    ap.add_argument("--summarize", default=None, help="only print the table of a file written by --out")
    args = ap.parse_args()
    if args.summarize:
        return summarize([json.loads(line) for line in open(args.summarize)], args.docs)
    if args.part == "llmlingua":
        return llmlingua_part(args)

    import torch

    torch.set_num_threads(args.threads)
    import leanlm
    from leanlm.infer.generate import generate
    from leanlm.infer.sampling import GenerationConfig
    from leanlm.io.registry import converted_dir, default_gguf_path

    model, tok = leanlm.load()
    items = build_items(args.n, args.docs)
    if args.llmlingua_python:
        scorer = str(converted_dir(default_gguf_path()))
        t0 = time.perf_counter()
        subprocess.run([args.llmlingua_python, __file__, "--part", "llmlingua", "--n", str(args.n), "--docs",
                        str(args.docs), "--threads", str(args.threads), "--scorer-dir", scorer,
                        "--llmlingua-out", args.llmlingua_out], check=True)
        print(f"llmlingua part: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    cfg = GenerationConfig(max_new_tokens=20)
    rows = []
    out = open(args.out, "a") if args.out else None

    def answer(i, method, ctx, csecs):
        it = items[i]
        msgs = [{"role": "user", "content": f"{ctx}\n\n{INSTRUCTION}\nQuestion: {it['question']}"}]
        n_prompt = len(tok.encode_chat(msgs))
        t0 = time.perf_counter()
        reply = generate(model, tok, [msgs], cfg)[0]
        asecs = time.perf_counter() - t0
        row = {"item": i, "method": method, "correct": it["answer"].lower() in reply.lower(), "prompt_tokens": n_prompt,
               "context_tokens": len(tok.encode(ctx, add_special=False)), "compress_s": csecs, "answer_s": asecs,
               "reply": reply, "answer": it["answer"], "kept_answer": it["answer"] in ctx}
        rows.append(row)
        if out:
            out.write(json.dumps(row) + "\n")
            out.flush()

    ll_path = Path(args.llmlingua_results or args.llmlingua_out) if (args.llmlingua_python or args.llmlingua_results) else None
    ll_done = set()

    def drain(upto: int) -> None:
        """Answer llmlingua's contexts written so far for items < upto (its part may run beside this one)."""
        if ll_path is None or not ll_path.exists():
            return
        for line in open(ll_path):
            if not line.endswith("\n"):
                break  # a line still being written
            r = json.loads(line)
            if r["item"] < upto and (r["item"], r["method"]) not in ll_done:
                ll_done.add((r["item"], r["method"]))
                answer(r["item"], r["method"], r["context"], r["seconds"])

    for i, it in enumerate(items):  # item by item, so partial results are usable
        answer(i, "full", "\n\n".join(it["docs"]), 0.0)
        for name, rate in RATES.items():
            r = leanlm.compress_prompt(it["docs"], it["question"], rate=rate, model=model, tokenizer=tok)
            answer(i, f"leanlm {name}", r["compressed_prompt"], r["seconds"])
            t0 = time.perf_counter()
            ctx = random_drop(tok, it["docs"], rate, seed=i)
            answer(i, f"random {name}", ctx, time.perf_counter() - t0)
        drain(i + 1)
        print(f"item {i} done", file=sys.stderr, flush=True)
    if ll_path is not None:
        for _ in range(args.wait):  # a run of --part llmlingua started beside this one may still be going
            drain(len(items))
            if len(ll_done) >= len(items) * len(RATES):
                break
            time.sleep(10)
    summarize(rows, args.docs)


def summarize(rows: list[dict], docs: int) -> None:
    """One table row per method over the items that every method answered (a run cut short, or an
    llmlingua part that covered fewer items, leaves some items out of every row, never of one)."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    have = {}
    for r in rows:
        have.setdefault(r["item"], set()).add(r["method"])
    items = {i for i, ms in have.items() if len(ms) == len(methods)}
    rows = [r for r in rows if r["item"] in items]
    summary = []
    full = [r for r in rows if r["method"] == "full"]
    full_tok = sum(r["context_tokens"] for r in full) / len(full)
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        acc = sum(r["correct"] for r in rs) / len(rs)
        summary.append({"method": m, "correct": sum(r["correct"] for r in rs), "accuracy": acc,
                        "answer_kept": sum(r["kept_answer"] for r in rs) / len(rs),
                        "context_tokens": sum(r["context_tokens"] for r in rs) / len(rs),
                        "ratio": full_tok / (sum(r["context_tokens"] for r in rs) / len(rs)),
                        "compress_s": sum(r["compress_s"] for r in rs) / len(rs),
                        "answer_s": sum(r["answer_s"] for r in rs) / len(rs),
                        "end_to_end_s": sum(r["compress_s"] + r["answer_s"] for r in rs) / len(rs)})
    from leanlm.report import print_table

    print_table(f"prompt compression QA ({len(items)} items, {docs} documents each)", summary)
    print(json.dumps({"summary": summary, "n": len(items), "items": sorted(items)}))


if __name__ == "__main__":
    main()
