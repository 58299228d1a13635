"""`leanlm`: one command, one subcommand per job. The model argument is optional everywhere.

Every subcommand is a module named in COMMANDS, imported only when that subcommand runs; each has
add_arguments(parser) and run(args) -> int, and lives in the room it belongs to. The model and sampling
arguments every room shares are here (add_model_args, load_model, add_sampling_args, generation_config).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from leanlm.errors import LeanLMError

COMMANDS = {
    "info": ("leanlm.eval.info_cli", "describe a model"),
    "generate": ("leanlm.infer.generate_cli", "generate text from prompts"),
    "chat": ("leanlm.infer.chat_cli", "interactive chat with the model's chat template"),
    "eval": ("leanlm.eval.cli", "perplexity over a text (default: the packaged evaluation text)"),
    "bench": ("leanlm.eval.bench_cli", "decode/prefill speed, time to first token, memory"),
    "convert": ("leanlm.io.convert_cli", "save a model (e.g. a GGUF) as a Hugging Face folder"),
    "compress": ("leanlm.compress.cli", "compress a model with a recipe (quantize, prune, low-rank)"),
    "finetune": ("leanlm.peft.cli", "parameter-efficient fine-tuning (LoRA, DoRA, QLoRA, ...)"),
    "distill": ("leanlm.train.distill_cli", "knowledge distillation from a frozen teacher (KL, reverse KL, JSD)"),
    "serve": ("leanlm.serve.cli", "OpenAI-compatible HTTP server over the batching engine"),
    "board": ("leanlm.eval.board", "every recipe on one model: quality, size, speed, Pareto plots"),
    "data": ("leanlm.data.cli", "data tools: dedup, filter, select (DSIR, IFD, diversity), few-shot demos"),
    "prompt": ("leanlm.data.prompt_cli", "prompt compression (LLMLingua / LongLLMLingua style)"),
    "pretrain": ("leanlm.train.pretrain_cli", "pre-train from random init or continue (FSDP2 under torchrun)"),
    "export": ("leanlm.io.export_cli", "write a model as a GGUF file for llama.cpp (f32 ... q4_k, q6_k)"),
}


def add_model_args(p: argparse.ArgumentParser, adapter: bool = True) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="Hugging Face folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights and activations dtype")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    if adapter:
        p.add_argument("--adapter", default=None, help="PEFT adapter folder to apply")


def load_model(args, quantize=None):
    """The model and tokenizer named by args (threads set first); quantize: see leanlm.load."""
    import torch

    import leanlm

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    return leanlm.load(args.model, dtype=args.dtype, adapter=getattr(args, "adapter", None),
                       progress=sys.stderr.isatty(), quantize=quantize)


def load_draft(args, model):
    """--draft PATH loads a model sharing the tokenizer; --draft q4 makes a 4-bit copy of the target."""
    import leanlm
    from leanlm.infer import speculative

    if not args.draft:
        return None
    if args.draft == "q4":
        return speculative.quantized_draft(model)
    return leanlm.load(args.draft, dtype=args.dtype)[0]


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--kv-bits", type=int, default=None, choices=[8, 4, 2], help="quantized KV cache")
    add_compile_arg(p)


def add_compile_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="decode steps through torch.compile (default: eagerly, unless this shape was already "
                        "compiled in the process; compiling the default model's step takes minutes on 2 cores)")


def generation_config(args):
    from leanlm.infer.sampling import GenerationConfig

    if args.max_new_tokens < 1:
        raise LeanLMError("--max-new-tokens must be at least 1")
    if not 0 < args.top_p <= 1:
        raise LeanLMError("--top-p must be in (0, 1]")
    return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                            stop_strings=list(args.stop), kv_bits=getattr(args, "kv_bits", None),
                            compile=getattr(args, "compile", None))


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """command: the subcommand about to run; only its module is imported (the others stay lazy)."""
    ap = argparse.ArgumentParser(prog="leanlm", description="Efficient LLMs: load, compress, fine-tune, serve, measure.")
    sub = ap.add_subparsers(dest="command", required=True)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        p.set_defaults(module=module)
        if command == name:
            importlib.import_module(module).add_arguments(p)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args = ap.parse_args(argv)
    try:
        return importlib.import_module(args.module).run(args)
    except LeanLMError as e:
        print(f"leanlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("leanlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
