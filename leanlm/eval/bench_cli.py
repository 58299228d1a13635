"""`leanlm bench [MODEL]`: decode/prefill speed, time to first token, memory; with --concurrency the
batching engine, with --draft / --prompt-lookup speculative decoding against plain decoding."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from leanlm.cli import add_compile_arg, add_model_args

    add_model_args(p)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=4, help="batch size for the batch-N decode figure")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=None, help="measure the batching engine at N requests")
    p.add_argument("--draft", default=None, help="compare speculative decoding with this draft model, or 'q4'")
    p.add_argument("--prompt-lookup", action="store_true", help="compare speculative decoding by prompt lookup")
    add_compile_arg(p)
    p.add_argument("--json", action="store_true")


def run(args) -> int:
    from leanlm.cli import load_draft, load_model
    from leanlm.eval.bench import bench
    from leanlm.report import show

    model, tok = load_model(args)
    if args.draft or args.prompt_lookup:
        from leanlm.eval.speculative import bench_speculative

        res = {"method": "draft " + args.draft if args.draft else "prompt lookup",
               **bench_speculative(model, tok, load_draft(args, model), args.prompt_len, args.new_tokens,
                                   prompt_lookup=args.prompt_lookup)}
    elif args.concurrency:
        from leanlm.eval.concurrency import bench_concurrency

        res = bench_concurrency(model, concurrency=args.concurrency, prompt_len=args.prompt_len,
                                new_tokens=args.new_tokens)
    else:
        res = bench(model, prompt_len=args.prompt_len, new_tokens=args.new_tokens, batch=args.batch,
                    repeats=args.repeats, prefill_len=args.prefill_len, compile=args.compile)
    res["model"] = args.model or "default (SmolLM2-135M-Instruct, from Q4_1 GGUF)"
    show("speed", res, args.json)
    return 0
