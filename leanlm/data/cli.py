"""`leanlm data dedup|filter|select|demos`: streaming data tools over .txt / .jsonl files or folders.

Each writes the kept records to OUTPUT (JSONL, every field kept) and each dropped record, with its
reason, to OUTPUT's sidecar (out.jsonl -> out.dropped.jsonl), both atomically; then prints a summary
table (and with --json one JSON object as the last line).
"""
from __future__ import annotations

import argparse
import sys

from leanlm.errors import LeanLMError


def _model_opts(p, required: bool = False):
    p.add_argument("--model", default=None, help="reference model: Hugging Face folder or .gguf (default: "
                   "SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--batch-size", type=int, default=8, help="records per forward pass")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens of each record the model sees")


def _io_opts(p):
    p.add_argument("input", help=".txt or .jsonl file, or a folder of them (searched recursively)")
    p.add_argument("-o", "--output", required=True, help="output .jsonl (dropped records go to OUTPUT.dropped.jsonl)")
    p.add_argument("--field", default=None, help="JSONL text field (default: text, else messages, else "
                   "prompt + completion)")
    p.add_argument("--txt-unit", default="file", choices=["file", "paragraph", "line"],
                   help="what one record of a .txt file is")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", required=True)

    d = sub.add_parser("dedup", help="remove exact and near duplicates (MinHash + LSH)")
    _io_opts(d)
    d.add_argument("--threshold", type=float, default=0.8, help="Jaccard similarity of a near duplicate")
    d.add_argument("--num-perm", type=int, default=128, help="MinHash permutations")
    d.add_argument("--ngram", type=int, default=5, help="words per shingle")
    d.add_argument("--verify", default="exact", choices=["exact", "estimate"],
                   help="decide a candidate pair by its exact shingle Jaccard (default) or the MinHash estimate")
    d.add_argument("--no-exact", action="store_true", help="skip exact (normalized hash) deduplication")
    d.add_argument("--no-near", action="store_true", help="skip near-duplicate deduplication")

    f = sub.add_parser("filter", help="filter by length, repetition and perplexity under a reference model")
    _io_opts(f)
    _model_opts(f)
    for name, what in (("min-words", "fewest words"), ("max-words", "most words"),
                       ("max-repetition", "largest share of repeated word 3-grams"),
                       ("min-perplexity", "lowest perplexity"), ("max-perplexity", "highest perplexity")):
        f.add_argument(f"--{name}", default=None, help=f"{what}: a value, or a percentile of the input like p90")

    s = sub.add_parser("select", help="select a budget of records: dsir, ifd, length, diversity")
    _io_opts(s)
    _model_opts(s)
    s.add_argument("--method", default="dsir", choices=["dsir", "ifd", "length", "diversity"])
    s.add_argument("--budget", required=True, help="records to keep: a count (200) or a fraction (0.1)")
    s.add_argument("--target", default=None, help="dsir: target text (.txt/.jsonl or packaged:eval|calib|tech)")
    s.add_argument("--buckets", type=int, default=10_000, help="dsir: hashed n-gram buckets")
    s.add_argument("--no-noise", action="store_true", help="dsir: take the top weights instead of resampling")
    s.add_argument("--no-length-norm", action="store_true",
                   help="dsir: the paper's summed log weight instead of the mean per n-gram")
    s.add_argument("--clusters", type=int, default=0, metavar="K",
                   help="ifd: rank within K k-means groups of the records' hidden states, taking from "
                        "each in turn (for pools that mix kinds of task)")
    s.add_argument("--seed", type=int, default=0)

    m = sub.add_parser("demos", help="choose k few-shot demonstrations for a query from a JSONL pool")
    m.add_argument("pool", help=".jsonl pool of examples (prompt + completion)")
    m.add_argument("--query", required=True)
    m.add_argument("-k", type=int, default=4)
    m.add_argument("--strategy", default="knn", choices=["knn", "random", "fixed"])
    m.add_argument("--key", default="prompt", help="field compared with the query")
    m.add_argument("--seed", type=int, default=0)
    _model_opts(m)
    m.add_argument("--json", action="store_true")


def _load(args):
    from leanlm.cli import load_model

    if args.batch_size < 1 or args.max_tokens < 2:
        raise LeanLMError("need --batch-size >= 1 and --max-tokens >= 2")
    return load_model(args)


def run(args) -> int:
    from leanlm.report import show

    cmd = args.data_command
    progress = cmd != "demos" and not args.no_progress and sys.stderr.isatty()
    if cmd == "dedup":
        from leanlm.data.dedup import DedupConfig, dedup

        cfg = DedupConfig(threshold=args.threshold, num_perm=args.num_perm, ngram=args.ngram,
                          exact=not args.no_exact, near=not args.no_near,
                          verify=args.verify)
        res = dedup(args.input, args.output, cfg, args.field, args.txt_unit, progress)
    elif cmd == "filter":
        from leanlm.data.quality import FilterConfig, filter_records

        cfg = FilterConfig(args.min_words, args.max_words, args.max_repetition, args.min_perplexity,
                           args.max_perplexity, args.max_tokens, args.batch_size)
        needs_model = any(b[0] == "perplexity" for b in cfg.bounds())
        model, tok = _load(args) if needs_model else (None, None)
        res = filter_records(args.input, args.output, cfg, model, tok, args.field, args.txt_unit, progress)
    elif cmd == "select":
        from leanlm.data.select import SelectConfig, select

        cfg = SelectConfig(method=args.method, budget=args.budget, target=args.target, buckets=args.buckets,
                           noise=not args.no_noise, length_norm=not args.no_length_norm, seed=args.seed,
                           max_tokens=args.max_tokens, batch_size=args.batch_size, clusters=args.clusters)
        cfg.check()
        model, tok = _load(args) if args.method in ("ifd", "diversity") else (None, None)
        res = select(args.input, args.output, cfg, model, tok, args.field, args.txt_unit, progress)
    else:
        return _demos(args)
    show(f"data {cmd}", res, args.json)
    return 0


def _demos(args) -> int:
    import json

    from leanlm.data.demos import DemoSelector
    from leanlm.data.instruct import read_jsonl

    pool = [rec for _, rec in read_jsonl(args.pool)]
    model, tok = _load(args) if args.strategy == "knn" else (None, None)
    chosen = DemoSelector(model, tok, pool, key=args.key, max_tokens=args.max_tokens).select(
        args.query, args.k, args.strategy, args.seed)
    if args.json:
        print(json.dumps({"query": args.query, "strategy": args.strategy, "demos": chosen}, ensure_ascii=False))
    else:
        for ex in chosen:
            print(json.dumps(ex, ensure_ascii=False))
    return 0
