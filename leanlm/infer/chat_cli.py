"""`leanlm chat [MODEL]`: interactive chat on stdin/stdout with the model's chat template."""
from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    from leanlm.cli import add_model_args, add_sampling_args

    add_model_args(p)
    p.add_argument("--system", default=None)
    add_sampling_args(p)


def run(args) -> int:
    import leanlm
    from leanlm.cli import generation_config, load_model

    model, tok = load_model(args)
    cfg = generation_config(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("leanlm chat — empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        reply = []
        for piece in leanlm.stream(model, tok, messages, cfg, chat=True):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
    return 0
