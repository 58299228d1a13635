"""`leanlm prompt compress`: shorten a long prompt with a small scorer model (LLMLingua-style).

The context comes from a .txt file (split into segments at blank lines) or a .jsonl file (one
document per record), or stdin with `-`. The compressed context goes to stdout (or -o FILE, written
atomically), then a summary table; with --json the summary (with the compressed text) is the last line.
"""
from __future__ import annotations

import argparse
import sys

from leanlm.errors import LeanLMError


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="prompt_command", required=True)
    c = sub.add_parser("compress", help="compress a context to a fraction of its tokens")
    c.add_argument("context", help=".txt (segments split at blank lines) or .jsonl (one document per record), "
                   "or - for stdin")
    c.add_argument("--question", default=None, help="rank documents by how well they predict this question "
                   "(LongLLMLingua); it is not compressed")
    c.add_argument("--rate", type=float, default=0.5, help="fraction of tokens kept, in (0, 1]; 0.5 = 2x")
    c.add_argument("--chunk", type=int, default=128, help="tokens per iterative pruning step")
    c.add_argument("--reorder", action="store_true", help="put the kept documents in rank order")
    c.add_argument("--contrastive", action="store_true", help="prune tokens by LongLLMLingua's contrastive "
                   "perplexity (surprisal without minus with the question); needs --question")
    c.add_argument("--model", default=None, help="scorer: Hugging Face folder or .gguf (default: SmolLM2-135M-Instruct)")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    c.add_argument("--threads", type=int, default=None)
    c.add_argument("-o", "--output", default=None, help="write the compressed context here instead of stdout")
    c.add_argument("--json", action="store_true")


def _context(path: str):
    from leanlm.data.text import read_texts

    if path == "-":
        data = sys.stdin.buffer.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise LeanLMError(f"stdin: byte {e.start} is not UTF-8; give UTF-8 text") from None
        if not text.strip():
            raise LeanLMError("stdin: the context is empty")
        return text
    docs = read_texts(path)
    return docs if path.lower().endswith(".jsonl") else docs[0]


def run(args) -> int:
    from leanlm.cli import load_model
    from leanlm.data.prompt_compress import check_rate, compress_prompt
    from leanlm.io.atomic import atomic_write_text
    from leanlm.report import emit_json, print_table

    check_rate(args.rate)
    context = _context(args.context)
    model, tok = load_model(args)
    res = compress_prompt(context, args.question, args.rate, model, tok, chunk=args.chunk, reorder=args.reorder,
                          contrastive=args.contrastive)
    if args.output:
        atomic_write_text(args.output, res["compressed_prompt"] + "\n")
    else:
        print(res["compressed_prompt"])
    summary = {k: v for k, v in res.items() if k != "compressed_prompt"}
    summary["kept_segments"] = ",".join(map(str, summary["kept_segments"]))
    if args.output:
        summary["output"] = args.output
    print_table("prompt compress", summary)
    if args.json:
        emit_json({**summary, "compressed_prompt": res["compressed_prompt"]})
    return 0
