"""`leanlm info [MODEL]`: describe a model (family, shapes, parameters, bytes, tokenizer)."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from leanlm.cli import add_model_args

    add_model_args(p)
    p.add_argument("--json", action="store_true")


def run(args) -> int:
    from leanlm.cli import load_model
    from leanlm.eval.describe import describe
    from leanlm.report import show

    model, tok = load_model(args)
    d = describe(model)
    d["tokenizer_vocab"] = tok.vocab_size
    d["chat_template"] = bool(tok.chat_template)
    show("model", d, args.json)
    return 0
