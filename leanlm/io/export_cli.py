"""`leanlm export [MODEL] --format gguf --type TYPE -o FILE`: a model for llama.cpp, ollama, LM Studio."""
from __future__ import annotations

import sys

from leanlm.io.gguf_export import TYPES


DESCRIPTION = """Write a model as one GGUF file (tensors, tokenizer, chat template) for llama.cpp, ollama, LM Studio.

Families and the llama.cpp architecture each becomes: Llama and Mistral -> llama, Qwen2 -> qwen2,
Qwen3 -> qwen3, Gemma 2 -> gemma2, Gemma 3 (text) -> gemma3, Phi-3 -> phi3 (q/k/v and gate/up fused
again, LongRoPE factors), Mixtral -> llama with experts, Qwen2-MoE -> qwen2moe, Qwen3-MoE -> qwen3moe.
A model llama.cpp would run differently is refused in one line saying why (a query scale or
activation it does not read, dynamic NTK RoPE, Qwen2-MoE dense blocks or top-k renormalization, layers
of different shapes after structured pruning). llama.cpp reads but does not apply the sliding window
of Mistral, Qwen2/Qwen3 and Phi-3 (Gemma's it does): those files match leanlm within the window."""


def add_arguments(p) -> None:
    import argparse

    from leanlm.cli import add_model_args

    p.description = DESCRIPTION
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    add_model_args(p, adapter=False)
    p.add_argument("--format", default="gguf", help="output format (gguf)")
    p.add_argument("--type", default="f16", help=f"tensor type of float weights: {', '.join(TYPES)} (quantized "
                   "linears whose groups are a GGUF block format keep their own codes)")
    p.add_argument("-o", "--output", required=True, help="the .gguf file to write")
    p.add_argument("--json", action="store_true")


def run(args) -> int:
    from leanlm.cli import load_model
    from leanlm.errors import LeanLMError
    from leanlm.io.gguf_export import export_gguf, progress_total
    from leanlm.report import progress, show

    if args.format != "gguf":
        raise LeanLMError(f"unsupported export format {args.format!r}; leanlm exports gguf")
    if args.type.lower() not in TYPES:
        raise LeanLMError(f"unsupported GGUF type {args.type!r}; leanlm exports {', '.join(TYPES)}")
    model, tok = load_model(args)
    n = progress_total(model)
    with progress(disable=not sys.stderr.isatty()) as pb:
        task = pb.add_task("writing GGUF", total=n)
        res = export_gguf(model, tok, args.output, args.type, progress=lambda: pb.advance(task),
                          source=args.model or "default model")
    import os

    out = {"output": args.output, "type": args.type.lower(), "size MB": os.path.getsize(args.output) / 1e6,
           "tensors": ", ".join(f"{k} x{v}" for k, v in sorted(res["types"].items())),
           "linears written from their own codes": res["exact"]}
    show("export", out, args.json)
    return 0
