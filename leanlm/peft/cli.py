"""`leanlm finetune [MODEL] --method lora|dora|lora-fa|ia3|prompt|prefix|qlora|mezo [--data FILE] -o OUT`.

Without --data it trains on a packaged task (leanlm/data/tasks) and reports exact-match accuracy on
its held-out split before and after. With --data it trains on the file (chat / prompt-completion /
text JSONL, or .txt) and reports held-out loss before and after. OUT gets the adapter in peft's
format (MeZO, which tunes all weights, writes a full model folder), log.jsonl and checkpoints/.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from leanlm.errors import LeanLMError

METHOD_NAMES = ["lora", "dora", "lora-fa", "ia3", "prompt", "prefix", "qlora", "mezo"]  # leanlm.peft.METHODS
# Learning rates and step counts that work on the packaged task with SmolLM2-135M (docs/bench/finetune.md).
DEFAULT_LR = {"lora": 2e-3, "dora": 2e-3, "lora-fa": 4e-3, "qlora": 2e-3, "ia3": 3e-2, "prompt": 3e-2,
              "prefix": 1e-2, "mezo": 1e-6}
DEFAULT_STEPS = {"mezo": 400}  # otherwise 60
PROMPT_INIT = "Rewrite the answer in the requested format."  # prompt tuning starts from these tokens


def add_arguments(p: argparse.ArgumentParser) -> None:
    from leanlm.cli import add_model_args

    add_model_args(p, adapter=False)
    p.add_argument("--method", default="lora", choices=METHOD_NAMES)
    p.add_argument("--data", default=None, help="training .jsonl (messages / prompt+completion / text) or .txt; "
                   "default: the packaged task")
    p.add_argument("--task", default="dates", help="packaged task used without --data")
    p.add_argument("-o", "--output", required=True, help="output folder (adapter, log.jsonl, checkpoints)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default 60; MeZO 400)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default per method)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "lion", "sgd"])
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--targets", default=None,
                   help="comma-separated target words (attention, attn_in, mlp, experts, experts.down, "
                        "shared_expert, router...: the family's layout names them) and/or module names, or a "
                        "regex over full module names (default: every linear of the blocks; docs/finetune.md)")
    p.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(rank)")
    p.add_argument("--virtual-tokens", type=int, default=16, help="prompt / prefix tuning length")
    p.add_argument("--mezo-eps", type=float, default=1e-3)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for matmuls")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--train-examples", type=int, default=1024)
    p.add_argument("--test-examples", type=int, default=64)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--pack", type=int, default=0, metavar="SEQ_LEN", help="pack examples into rows of SEQ_LEN")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT")
    p.add_argument("--merge", action="store_true", help="also write the merged model to OUT/merged")
    from leanlm.train.distributed import add_device_argument

    add_device_argument(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")


def targets_arg(s: str | None):
    if s is None:
        return None  # the family's all-linear set (leanlm.peft.lora.resolve_targets)
    parts = [t.strip() for t in s.split(",") if t.strip()]
    if any(ch in s for ch in "*[]()|\\^$") and len(parts) == 1:
        return s  # a regex over full module names
    return parts


def method_class(method: str):
    from leanlm.options import method_entry
    from leanlm.peft import METHODS

    return method_entry(METHODS, method, "fine-tuning method")[0]


def method_options(args, tokenizer=None) -> dict:
    """The command line's options that the method's config has a field for."""
    fields = {f.name for f in dataclasses.fields(method_class(args.method))}
    given = dict(r=args.rank, alpha=args.alpha, dropout=args.dropout, target_modules=targets_arg(args.targets),
                 use_rslora=args.rslora, num_virtual_tokens=args.virtual_tokens)
    if "init_ids" in fields and tokenizer is not None:
        given["init_ids"] = tokenizer.encode(PROMPT_INIT, add_special=False)
    return {k: v for k, v in given.items() if k in fields}


def load_for(args):
    """The model and tokenizer. A method whose config has `quantize_on_load` (QLoRA) gets its targets
    quantized as the loader reads them, so the float model is never whole in memory (its accuracy
    "before" is then the quantized base's)."""
    from leanlm.cli import load_model

    hook = getattr(method_class(args.method), "quantize_on_load", None)
    if hook is None:
        return load_model(args)
    return load_model(args, quantize=hook(targets_arg(args.targets)))


def prepare(model, tokenizer, method: str, options: dict):
    """Apply `method` to the model; returns the model to train."""
    from leanlm.peft import apply

    return apply(model, method, **options)


def load_data(args, tokenizer):
    """(train examples, held-out examples, task or None, test records or None)."""
    from leanlm.data.instruct import load_examples, pack, record_example

    if args.data:
        exs = load_examples(args.data, tokenizer, max_len=args.max_len)
        if len(exs) < 2:
            raise LeanLMError(f"{args.data}: needs at least 2 examples (one is held out for evaluation)")
        n_eval = max(1, len(exs) // 10)
        train, held = exs[n_eval:], exs[:n_eval]
        task = recs = None
    else:
        from leanlm.data.tasks import get_task

        task = get_task(args.task)
        train = [record_example(tokenizer, r, f"task {task.name}") for r in task.records("train", args.train_examples)]
        recs = task.records("test", args.test_examples)
        held = [record_example(tokenizer, r, f"task {task.name}") for r in recs]
    if args.pack:
        train = pack(train, args.pack)
    return train, held, task, recs


def run(args) -> int:
    import copy

    import torch

    from leanlm.peft import save_adapter, trainable_parameters
    from leanlm.report import emit_json, print_table
    from leanlm.train import TrainConfig, distributed, evaluate_loss, train

    out = Path(args.output)
    if args.max_steps is not None and args.max_steps < 1:
        raise LeanLMError("--max-steps must be at least 1")
    device = distributed.device_for(args.device)
    rank, world = distributed.init(device)
    if world > 1 and args.method == "mezo":
        raise LeanLMError("--method mezo runs on one process (its perturbations are not sharded)")
    torch.manual_seed(args.seed)
    model, tok = load_for(args)
    model.to(device)
    base_name = getattr(model, "source", None)
    train_data, held, task, recs = load_data(args, tok)

    def measure(m) -> dict:
        if task is not None:
            from leanlm.data.tasks import accuracy

            return {"accuracy": accuracy(m, tok, task, recs)}
        return {"eval_loss": evaluate_loss(m, held, args.batch_size)}

    before = measure(model)
    model = prepare(model, tok, args.method, method_options(args, tok))
    plain = copy.deepcopy(model) if world > 1 and rank == 0 else None  # rank 0 saves from an unsharded copy
    distributed.shard(model, bf16=args.bf16 and world > 1)
    method = method_class(args.method)
    full_model = getattr(method, "full_model", False)
    steps = args.max_steps or DEFAULT_STEPS.get(args.method, 60)
    cfg = TrainConfig(max_steps=steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                      lr=args.lr or DEFAULT_LR[args.method], weight_decay=args.weight_decay,
                      optimizer=getattr(method, "optimizer", args.optimizer), warmup_steps=args.warmup,
                      bf16=args.bf16 and world == 1, grad_checkpointing=args.grad_checkpointing,
                      eval_every=args.eval_every, save_every=args.save_every, out_dir=str(out), seed=args.seed,
                      progress=not args.no_progress and not args.json and rank == 0, mezo_eps=args.mezo_eps,
                      pad_id=tok.pad_id if tok.pad_id is not None else 0)
    t0 = time.perf_counter()
    res = train(model, train_data, cfg, eval_data=held if args.eval_every else None, resume=args.resume)
    wall = time.perf_counter() - t0
    after = measure(model)
    trainable = trainable_parameters(model)
    model = distributed.unsharded(model, plain)
    if rank != 0:
        distributed.finish()
        return 0
    model.cpu()
    if full_model:
        from leanlm.api import save

        save(model, tok, out / "model")
    else:
        save_adapter(model, out / "adapter", base_name=base_name)
    if args.merge and not full_model and hasattr(model, "peft_config") and not hasattr(model, "base_model"):
        from leanlm.api import save
        from leanlm.peft import unload_lora

        save(unload_lora(model), tok, out / "merged")
    result = {"method": args.method, "trainable_params": trainable, "processes": world, "steps": res.steps,
              "train_seconds": round(wall, 1), "step_seconds": round(wall / max(1, len(res.losses)), 3),
              "tokens_per_s": round(res.tokens_per_s * world, 1), "peak_rss_mb": round(res.peak_rss_mb, 1),
              "first_loss": res.losses[0] if res.losses else None,
              "last_loss": res.losses[-1] if res.losses else None,
              **{f"{k}_before": v for k, v in before.items()}, **{f"{k}_after": v for k, v in after.items()},
              "output": str(out)}
    print_table(f"finetune ({args.method})", result)
    if args.json:
        emit_json(result)
    distributed.finish()
    return 0
