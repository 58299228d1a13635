"""`leanlm convert [MODEL] -o DIR`: save a model (e.g. a GGUF) as a Hugging Face folder."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from leanlm.cli import add_model_args

    add_model_args(p)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--save-dtype", default=None, choices=["float32", "bfloat16", "float16"])


def run(args) -> int:
    import leanlm
    from leanlm.cli import load_model

    model, tok = load_model(args)
    leanlm.save(model, tok, args.output, dtype=args.save_dtype)
    print(f"saved {args.output}")
    return 0
