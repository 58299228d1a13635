"""`leanlm generate [MODEL] --prompt TEXT`: generate from prompts (streamed when one), optionally by
speculative decoding with a draft model or prompt lookup."""
from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    from leanlm.cli import add_model_args, add_sampling_args

    add_model_args(p)
    p.add_argument("--prompt", action="append", help="prompt text (repeatable: several prompts in one batch)")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    p.add_argument("--no-stream", action="store_true")
    p.add_argument("--draft", default=None,
                   help="speculative decoding with this draft model (sharing the tokenizer), or 'q4' for a 4-bit copy")
    p.add_argument("--prompt-lookup", action="store_true", help="speculative decoding with prompt lookup")
    add_sampling_args(p)


def run(args) -> int:
    import leanlm
    from leanlm.cli import generation_config, load_model

    model, tok = load_model(args)
    cfg = generation_config(args)
    prompts = args.prompt or ["Once upon a time"]
    if args.draft or args.prompt_lookup:
        return _speculative(args, model, tok, cfg, prompts)
    if len(prompts) == 1 and not args.no_stream:
        for piece in leanlm.stream(model, tok, prompts[0], cfg, chat=args.chat):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    for text in leanlm.generate(model, tok, prompts, cfg, chat=args.chat):
        print(text)
        print("---")
    return 0


def _speculative(args, model, tok, cfg, prompts) -> int:
    from leanlm.cli import load_draft
    from leanlm.infer import speculative

    draft = load_draft(args, model)
    for p in prompts:
        ids = tok.encode_chat([{"role": "user", "content": p}]) if args.chat else tok.encode(p)
        tokens, stats = speculative.generate_speculative(model, ids, cfg, draft=draft,
                                                         prompt_lookup=args.prompt_lookup, stop_ids=tok.eos_ids)
        if tokens and tokens[-1] in tok.eos_ids:
            tokens = tokens[:-1]
        print(tok.decode(tokens))
        print(f"[speculative] {stats.as_dict()}", file=sys.stderr)
    return 0
