"""`leanlm pretrain --model CONFIG|FOLDER --data TEXT|JSONL|DIR -o OUT`: train from random init or continue.

CONFIG is a built-in shape (tiny, small, medium, smollm2-135m), a config.json, or a model folder (its
weights are the starting point). Text is tokenized with the default model's tokenizer (or --tokenizer /
the folder's), packed into rows of --seq-len tokens with a held-out validation split, and trained by the one
loop (progress, log.jsonl, sharded checkpoints through torch.distributed.checkpoint with exact resume at
any number of processes: `--resume` continues on 1 process a run saved by 2, or the reverse). OUT gets
the model folder (OUT/model), the loss curve (OUT/loss.png) and log.jsonl. Under
`torchrun --nproc_per_node N -m leanlm pretrain ...` the same command shards the model with FSDP2 and
splits the global --batch-size over the processes.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from leanlm.errors import LeanLMError


def add_arguments(p: argparse.ArgumentParser) -> None:
    from leanlm.train.optim import OPTIMIZERS, SCHEDULES
    from leanlm.train.pretrain import BUILTIN, INITS

    p.add_argument("--model", default="tiny", help=f"built-in shape ({', '.join(BUILTIN)}), a config.json, "
                   "or a model folder to continue from")
    p.add_argument("--data", default="packaged:calib", help=".txt, .jsonl (field 'text'), a folder of them, or "
                   "packaged:NAME (default: the packaged calibration text)")
    p.add_argument("--tokenizer", default=None, help="model folder or .gguf whose tokenizer to use "
                   "(default: the model folder's, else the default model's)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8, help="global batch (sequences per step, all processes)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--optimizer", default="adamw", choices=list(OPTIMIZERS))
    p.add_argument("--schedule", default="cosine", choices=list(SCHEDULES))
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--init", default="normal", choices=list(INITS),
                   help="rezero: a learnable gate at 0 on every residual branch (folded into the output "
                        "projections when the model is saved, so OUT/model is a plain checkpoint)")
    p.add_argument("--mup-base-width", type=int, default=None, metavar="N",
                   help="muP learning rates: hidden matrices train at lr x N / hidden_size (tune lr at width N, "
                        "reuse it at any width); embedding, head and 1-D parameters keep lr")
    p.add_argument("--convert", default=None, metavar="moe:EXPERTSxK|mqa:KV|grow:depth|grow:width",
                   help="convert the starting model before training: sparse upcycling into a MoE (e.g. moe:8x2), "
                        "GQA -> fewer KV heads by mean-pooling (mqa:1), or function-preserving growth")
    p.add_argument("--aux-coef", type=float, default=0.01, help="MoE load-balancing loss weight")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (one process) / bf16 FSDP2 params (torchrun)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    from leanlm.train.distributed import add_device_argument

    add_device_argument(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")


def _tokenizer(args):
    import leanlm

    src = args.tokenizer
    if src is None and Path(args.model).is_dir():
        src = args.model
    if src is None:
        from leanlm.io.registry import default_gguf_path

        src = str(default_gguf_path())
    from leanlm.io.tokenizer import Tokenizer

    p = Path(src)
    if p.is_dir():
        return Tokenizer.from_folder(p)
    return leanlm.load(src)[1]


def _model(args, tok):
    import leanlm
    from leanlm.train.pretrain import builtin_config, config_from_file, new_model

    p = Path(args.model)
    if p.is_dir():
        model = leanlm.load(str(p))[0]
        source = "continued from " + str(p)
    else:
        cfg = config_from_file(p) if p.suffix == ".json" else builtin_config(args.model, tok, args.seq_len)
        if cfg.vocab_size < tok.vocab_size:
            raise LeanLMError(f"the model's vocab_size {cfg.vocab_size} is smaller than the tokenizer's "
                              f"{tok.vocab_size}")
        model = new_model(cfg, args.init, args.seed)
        source = f"random init ({args.init})"
    if args.convert:
        model = convert(model, args.convert)
        source += f", converted {args.convert}"
    for q in model.parameters():
        q.requires_grad_(True)
    return model, source


def convert(model, spec: str):
    """--convert: moe:EXPERTSxK, mqa:KV_HEADS, grow:depth or grow:width."""
    from leanlm.train.pretrain import grow_depth, grow_width, to_mqa, upcycle_moe

    kind, _, arg = spec.partition(":")
    try:
        if kind == "moe":
            e, k = (int(x) for x in arg.lower().split("x"))
            return upcycle_moe(model, e, k)
        if kind == "mqa":
            return to_mqa(model, int(arg or 1))
    except ValueError:
        raise LeanLMError(f"--convert {spec!r}: expected moe:EXPERTSxK (e.g. moe:8x2) or mqa:KV_HEADS (e.g. mqa:1)")
    if kind == "grow" and arg in ("depth", "width"):
        return grow_depth(model, 2) if arg == "depth" else grow_width(model)
    raise LeanLMError(f"--convert {spec!r}: expected moe:EXPERTSxK, mqa:KV_HEADS, grow:depth or grow:width")


def full_sequence_loss(model, ids, labels):
    """Next-token loss over every labelled position, computed inside the model's forward (so FSDP2's
    root unshard covers the output head)."""
    import torch.nn.functional as F

    logits = model(ids)
    tgt = labels[:, 1:]
    keep = tgt != -100
    n = int(keep.sum())
    return F.cross_entropy(logits[:, :-1][keep].float(), tgt[keep]), n


def plot_losses(log: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from leanlm.io.atomic import atomic_write_bytes

    recs = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], label="train", lw=1)
    ev = [r for r in recs if "eval_loss" in r]
    if ev:
        ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="validation", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    import io

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())


def run(args) -> int:
    import torch

    from leanlm.report import emit_json, print_table
    from leanlm.train import TrainConfig, train
    from leanlm.train import distributed
    from leanlm.train.loop import evaluate_loss
    from leanlm.train.pretrain import pack, read_documents

    for name in ("max_steps", "batch_size", "seq_len"):
        if getattr(args, name) < 1:
            raise LeanLMError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.val_fraction < 0.5:
        raise LeanLMError("--val-fraction must be in [0, 0.5)")
    device = distributed.device_for(args.device)
    rank, world = distributed.init(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok = _tokenizer(args)
    docs = read_documents(args.data)
    train_rows, val_rows = pack(docs, tok, args.seq_len, args.val_fraction)
    model, source = _model(args, tok)
    model.to(device)
    n_params = model.num_parameters()
    distributed.shard(model, bf16=args.bf16 and world > 1)
    if args.mup_base_width is not None:
        from leanlm.train.pretrain import MUP_OPTIMIZERS, apply_mup

        if args.optimizer not in MUP_OPTIMIZERS:
            raise LeanLMError(f"--mup-base-width applies to {', '.join(MUP_OPTIMIZERS)} (Muon and Adam-mini set "
                              "their own per-matrix scales)")
        apply_mup(model, args.mup_base_width)
    out = Path(args.output)
    cfg = TrainConfig(max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                      weight_decay=args.weight_decay, optimizer=args.optimizer, schedule=args.schedule,
                      warmup_steps=args.warmup, bf16=args.bf16 and world == 1,
                      grad_checkpointing=args.grad_checkpointing, eval_every=args.eval_every,
                      save_every=args.save_every, checkpoint_format="sharded", out_dir=str(out), seed=args.seed,
                      progress=not args.no_progress and not args.json, pad_id=0)
    t0 = time.perf_counter()
    loss_fn = full_sequence_loss
    if model.config.num_experts:
        from leanlm.train.pretrain import moe_loss

        loss_fn = moe_loss(args.aux_coef, model.config.num_experts_per_tok)
    res = train(model, train_rows, cfg, eval_data=val_rows, resume=args.resume, loss_fn=loss_fn)
    wall = time.perf_counter() - t0
    val = evaluate_loss(model, val_rows, args.batch_size) if world == 1 else distributed.mean_over_ranks(
        evaluate_loss(model, val_rows[rank::world] or val_rows, max(1, args.batch_size // world)))
    state = distributed.full_state_dict(model) if world > 1 else None
    rss = distributed.from_every_rank(res.peak_rss_mb)
    result = {"model": args.model, "source": source, "params": n_params, "optimizer": args.optimizer,
              "steps": res.steps, "processes": world, "train_rows": len(train_rows), "val_rows": len(val_rows),
              "seq_len": args.seq_len, "tokens_per_s": round(res.tokens_per_s * world, 1),
              "seconds": round(wall, 1), "peak_rss_mb": round(max(rss), 1),
              "peak_rss_mb_per_process": [round(r, 1) for r in rss],
              "first_loss": res.losses[0] if res.losses else None,
              "final_loss": res.losses[-1] if res.losses else None, "val_loss": round(val, 6),
              "output": str(out)}
    if rank == 0:
        import leanlm

        if state is not None:
            from leanlm.train.pretrain import new_model

            plain = new_model(model.config)
            plain.load_state_dict(state)
            model = plain
        model.cpu()
        if model.config.residual_gates:  # the saved model is a plain checkpoint of its family
            model.fold_residual_gates()
        leanlm.save(model, tok, out / "model")
        log = out / "log.jsonl"
        if log.exists():
            plot_losses(log, out / "loss.png")
        print_table("pretrain", result)
        if args.json:
            emit_json(result)
    distributed.finish()
    return 0
