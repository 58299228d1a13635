"""`leanlm`: one command, one subcommand per job. The model argument is optional everywhere.

Subcommands of other rooms (compress, finetune, serve) live in their own modules, named in
EXTERNAL and imported only when used; each has add_arguments(parser) and run(args) -> int.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from leanlm.errors import LeanLMError

EXTERNAL = {
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


# ---------------------------------------------------------------- info
def cmd_info(args) -> int:
    from leanlm.eval.describe import describe
    from leanlm.report import show

    model, tok = load_model(args)
    d = describe(model)
    d["tokenizer_vocab"] = tok.vocab_size
    d["chat_template"] = bool(tok.chat_template)
    show("model", d, args.json)
    return 0


# ---------------------------------------------------------------- generate / chat
def cmd_generate(args) -> int:
    import leanlm

    model, tok = load_model(args)
    cfg = generation_config(args)
    prompts = args.prompt or ["Once upon a time"]
    if getattr(args, "draft", None) or getattr(args, "prompt_lookup", False):
        return _generate_speculative(args, model, tok, cfg, prompts)
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


def _load_draft(args, model):
    """--draft PATH loads a model sharing the tokenizer; --draft q4 makes a 4-bit copy of the target."""
    import leanlm
    from leanlm.infer import speculative

    if not args.draft:
        return None
    if args.draft == "q4":
        return speculative.quantized_draft(model)
    return leanlm.load(args.draft, dtype=args.dtype)[0]


def _generate_speculative(args, model, tok, cfg, prompts) -> int:
    from leanlm.infer import speculative

    draft = _load_draft(args, model)
    for p in prompts:
        ids = tok.encode_chat([{"role": "user", "content": p}]) if args.chat else tok.encode(p)
        tokens, stats = speculative.generate_speculative(model, ids, cfg, draft=draft,
                                                         prompt_lookup=args.prompt_lookup, stop_ids=tok.eos_ids)
        if tokens and tokens[-1] in tok.eos_ids:
            tokens = tokens[:-1]
        print(tok.decode(tokens))
        print(f"[speculative] {stats.as_dict()}", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    import leanlm

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


# ---------------------------------------------------------------- eval
def cmd_eval(args) -> int:
    from leanlm.data import packaged_text, read_text
    from leanlm.eval.perplexity import perplexity
    from leanlm.report import show

    if args.tasks:
        return _eval_tasks(args)
    if args.ctx < 2 or args.stride < 1 or args.stride > args.ctx:
        raise LeanLMError("need --ctx >= 2 and 1 <= --stride <= --ctx")
    if args.text and args.text.startswith("packaged:"):
        text = packaged_text(args.text.split(":", 1)[1])
    else:
        text = read_text(args.text) if args.text else packaged_text("eval")
    if args.max_chars:
        text = text[: args.max_chars]
    model, tok = load_model(args)
    res = perplexity(model, tok, text, ctx=args.ctx, stride=args.stride, progress=not args.json)
    res = {"perplexity": res["perplexity"], "bits_per_byte": res["bits_per_byte"], "tokens": res["tokens"],
           **{k: v for k, v in res.items() if k not in ("perplexity", "bits_per_byte", "tokens")},
           "text": args.text or "packaged:eval", "ctx": args.ctx, "stride": args.stride}
    show("perplexity", res, args.json)
    return 0


def _eval_tasks(args) -> int:
    """lm-evaluation-harness tasks (the packaged leanlm_* ones run offline) on any leanlm model."""
    import importlib.util

    from leanlm.report import emit_json

    if importlib.util.find_spec("lm_eval") is None:
        raise LeanLMError("`leanlm eval --tasks` needs lm-evaluation-harness: pip install \"leanlm[lmeval]\" "
                          "(lm_eval==0.4.13)")
    from leanlm.eval import lm_eval_bridge

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    model, tok = load_model(args)
    res = lm_eval_bridge.evaluate(model, tok, tasks, limit=args.limit, batch_size=args.batch_size)
    from lm_eval.utils import make_table

    print(make_table(res))
    if args.json:
        emit_json({"results": res["results"], "n-samples": res.get("n-samples"), "model": args.model,
                   "adapter": args.adapter})
    return 0


# ---------------------------------------------------------------- bench
def cmd_bench(args) -> int:
    from leanlm.eval.bench import bench
    from leanlm.report import show

    model, tok = load_model(args)
    if args.draft or args.prompt_lookup:
        from leanlm.eval.speculative import bench_speculative

        res = {"method": "draft " + args.draft if args.draft else "prompt lookup",
               **bench_speculative(model, tok, _load_draft(args, model), args.prompt_len, args.new_tokens,
                                   prompt_lookup=args.prompt_lookup)}
    elif args.concurrency:
        from leanlm.eval.concurrency import bench_concurrency

        res = bench_concurrency(model, concurrency=args.concurrency, prompt_len=args.prompt_len,
                                new_tokens=args.new_tokens)
    else:
        res = bench(model, prompt_len=args.prompt_len, new_tokens=args.new_tokens, batch=args.batch,
                    repeats=args.repeats, prefill_len=args.prefill_len,
                    compile=args.compile)
    res["model"] = args.model or "default (SmolLM2-135M-Instruct, from Q4_1 GGUF)"
    show("speed", res, args.json)
    return 0


# ---------------------------------------------------------------- convert
def cmd_convert(args) -> int:
    import leanlm

    model, tok = load_model(args)
    leanlm.save(model, tok, args.output, dtype=args.save_dtype)
    print(f"saved {args.output}")
    return 0


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """command: the subcommand about to run; only its external module is imported (others stay lazy)."""
    ap = argparse.ArgumentParser(prog="leanlm", description="Efficient LLMs: load, compress, fine-tune, serve, measure.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="describe a model")
    add_model_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="generate text from prompts")
    add_model_args(p)
    p.add_argument("--prompt", action="append", help="prompt text (repeatable: several prompts in one batch)")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    p.add_argument("--no-stream", action="store_true")
    p.add_argument("--draft", default=None,
                   help="speculative decoding with this draft model (sharing the tokenizer), or 'q4' for a 4-bit copy")
    p.add_argument("--prompt-lookup", action="store_true", help="speculative decoding with prompt lookup")
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with the model's chat template")
    add_model_args(p)
    p.add_argument("--system", default=None)
    add_sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("eval", help="perplexity over a text (default: the packaged evaluation text)")
    add_model_args(p)
    p.add_argument("--text", default=None, help=".txt or .jsonl file, or packaged:eval (default), "
                   "packaged:tech (held-out technical text)")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--max-chars", type=int, default=None, help="evaluate only the first N characters")
    p.add_argument("--tasks", default=None,
                   help="lm-evaluation-harness tasks instead of perplexity, e.g. leanlm_mc,leanlm_cloze,"
                        "leanlm_capitals (packaged, offline) or any task lm-eval has locally; needs leanlm[lmeval]")
    p.add_argument("--limit", type=int, default=None, help="with --tasks: first N documents per task")
    p.add_argument("--batch-size", type=int, default=16, help="with --tasks: requests per forward")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="decode/prefill speed, time to first token, memory")
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
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("convert", help="save a model (e.g. a GGUF) as a Hugging Face folder")
    add_model_args(p)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--save-dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=cmd_convert)

    for name, (module, help_) in EXTERNAL.items():
        p = sub.add_parser(name, help=help_)
        p.set_defaults(external=module)
        if command != name:
            continue
        try:
            importlib.import_module(module).add_arguments(p)
        except ImportError:
            p.set_defaults(unavailable=True)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args = ap.parse_args(argv)
    try:
        if getattr(args, "external", None):
            if getattr(args, "unavailable", False):
                raise LeanLMError(f"`leanlm {args.command}` is not available in this build")
            return importlib.import_module(args.external).run(args)
        return args.func(args)
    except LeanLMError as e:
        print(f"leanlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("leanlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
