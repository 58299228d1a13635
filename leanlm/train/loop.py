"""The one training loop (fine-tuning now; distillation and pre-training reuse it through `loss_fn`).

bf16 autocast on CPU, gradient checkpointing, gradient accumulation, AdamW / Lion / SGD / MeZO,
warmup + cosine, periodic evaluation, atomic checkpoints with exact resume (trainable parameters,
optimizer, RNG, data position; the schedule is a function of the step), a rich progress bar with
loss and tokens/s, and a JSONL log.

Data is a list of examples {"input_ids": [...], "labels": [...]} (labels -100 = no loss). Each epoch
visits them in a permutation drawn from (seed, epoch), so the data position is one integer.
"""
from __future__ import annotations

import functools
import json
import os
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from leanlm.errors import LeanLMError
from leanlm.model.layout import blocks
from leanlm.model.surgery import model_device
from leanlm.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from leanlm.train.optim import MeZO, lr_at, make_optimizer

IGNORE = -100


@dataclass
class TrainConfig:
    max_steps: int = 100
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # adamw | muon | lion | adam-mini | schedule-free | adafactor | sgd | mezo
    betas: list[float] | None = None
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"  # cosine | wsd | constant
    decay_fraction: float = 0.2  # wsd: share of the steps spent decaying
    max_grad_norm: float | None = 1.0
    bf16: bool = False  # autocast matmuls to bfloat16 on CPU
    grad_checkpointing: bool = False
    eval_every: int = 0
    save_every: int = 0
    keep_last: int = 2
    # plain: safetensors of the whole trainable tensors, written by rank 0 (one process);
    # sharded: torch.distributed.checkpoint, every rank its shards, resumable at any world size (always
    # used under torchrun)
    checkpoint_format: str = "plain"
    out_dir: str | None = None  # checkpoints + log.jsonl
    seed: int = 0
    progress: bool = True
    mezo_eps: float = 1e-3
    pad_id: int = 0


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)  # one per optimizer step, this run
    evals: list[dict] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def collate(examples: list[dict], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest example (causal attention never looks right, so no mask is needed)."""
    T = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
    return ids, labels


def micro_batch(data: list[dict], position: int, batch_size: int, seed: int, rank: int = 0,
                world: int = 1) -> list[dict]:
    """The examples of micro-batch number `position` (epochs reshuffle with a generator seeded by epoch).
    batch_size is global: with `world` processes, rank r takes every world-th example from r, so N
    processes together see exactly the one-process batch."""
    per_epoch = max(1, len(data) // batch_size)
    epoch, k = divmod(position, per_epoch)
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return [data[int(i)] for i in perm[k * batch_size:(k + 1) * batch_size][rank::world]]


def _world() -> tuple[int, int]:
    """(rank, world size) when torch.distributed is initialized (torchrun), else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _optimizer_mode(opt, mode: str) -> None:
    """Schedule-free optimizers hold the training point in the parameters; evaluation and saving want the
    average. Others ignore this."""
    fn = getattr(opt, mode, None) if hasattr(opt, "_swap") else None
    if fn is not None:
        fn()


def _head_loss_sum(head, h: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), tgt, reduction="sum")


def causal_lm_loss(model, ids: torch.Tensor, labels: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over labelled positions; the vocab projection runs only there, and in
    chunks of `chunk` positions when there are more: each chunk's logits are recomputed in backward
    (checkpointed), so at most [chunk, vocab] of them exist at a time (49k vocab x 16k positions would be
    3 GB in fp32)."""
    hidden = model(ids, return_hidden=True)
    tgt = labels[:, 1:]
    keep = tgt != IGNORE
    n = int(keep.sum())
    if n == 0:
        return hidden.sum() * 0.0, 0
    h, t = hidden[:, :-1][keep], tgt[keep]
    if n <= chunk:
        return F.cross_entropy(model.logits(h).float(), t), n
    from torch.utils.checkpoint import checkpoint

    total = sum(checkpoint(_head_loss_sum, model.logits, h[i:i + chunk], t[i:i + chunk], use_reentrant=False)
                for i in range(0, n, chunk))
    return total / n, n


def enable_grad_checkpointing(model) -> None:
    """Recompute each block's activations in backward instead of storing them."""
    from torch.utils.checkpoint import checkpoint

    for block in blocks(model):
        if getattr(block, "_leanlm_ckpt", False):
            continue
        fwd = block.forward

        def run(*args, _fwd=fwd, **kw):
            if torch.is_grad_enabled():
                return checkpoint(_fwd, *args, use_reentrant=False, **kw)
            return _fwd(*args, **kw)

        block.forward = functools.wraps(fwd)(run)
        block._leanlm_ckpt = True


@torch.no_grad()
def evaluate_loss(model, data: list[dict], batch_size: int, bf16: bool = False, pad_id: int = 0) -> float:
    was = model.training
    model.eval()
    dev = model_device(model)
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        ids, labels = (t.to(dev) for t in collate(data[i:i + batch_size], pad_id))
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss, n = causal_lm_loss(model, ids, labels)
        total += float(loss) * n
        count += n
    model.train(was)
    return total / max(count, 1)


def _rewind_log(log: Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint by the interrupted run."""
    if not log.exists():
        return
    keep = [ln for ln in log.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    log.write_text("".join(ln + "\n" for ln in keep))


def train(model, data: list[dict], cfg: TrainConfig, eval_data: list[dict] | None = None,
          resume: bool | str = False, loss_fn=None, callback=None) -> TrainResult:
    """Train the parameters of `model` that require grad. Returns losses, evals, throughput, peak RSS.

    resume: True = continue from the latest checkpoint in cfg.out_dir (if any); a path = that checkpoint.
    loss_fn(model, ids, labels) -> (loss, n_tokens) replaces the causal-LM loss (distillation).
    callback(step, loss) runs after every optimizer step (a test uses it to simulate a crash).
    """
    if not data:
        raise LeanLMError("no training examples; check the data file")
    loss_fn = loss_fn or causal_lm_loss
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise LeanLMError("the model has no trainable parameters; apply a fine-tuning method first")
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(model)
    mezo = cfg.optimizer == "mezo"
    if mezo:
        opt = MeZO(params, lr=cfg.lr, eps=cfg.mezo_eps, weight_decay=cfg.weight_decay)
    else:
        from leanlm.model.layout import EMBED, HEAD

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        # a parameter may carry `lr_scale` (its learning rate relative to cfg.lr): one group per scale
        scales: dict[float, list] = {}
        for p in params:
            scales.setdefault(float(getattr(p, "lr_scale", 1.0)), []).append(p)
        groups = params if list(scales) == [1.0] else [{"params": ps, "lr_scale": s} for s, ps in scales.items()]
        opt = make_optimizer(cfg.optimizer, groups, cfg.lr, cfg.weight_decay, cfg.betas, named=named,
                             keep_adam=tuple(n for n in (EMBED, HEAD)))
    rank, world = _world()
    if cfg.batch_size % world:
        raise LeanLMError(f"--batch-size {cfg.batch_size} is the global batch: it must divide by the "
                          f"{world} processes")
    out = Path(cfg.out_dir) if cfg.out_dir else None
    log = out / "log.jsonl" if out else None
    step, position = 0, 0
    torch.manual_seed(cfg.seed)
    if cfg.checkpoint_format not in ("plain", "sharded"):
        raise LeanLMError(f"checkpoint_format {cfg.checkpoint_format!r}: choose plain or sharded")
    sharded = cfg.checkpoint_format == "sharded" or world > 1
    if resume:
        ck = Path(resume) if isinstance(resume, (str, Path)) and not isinstance(resume, bool) else (
            latest_checkpoint(out) if out else None)
        if ck is not None:
            st = load_checkpoint(ck, model, opt)  # either format, saved at any world size
            step, position = st["step"], st["position"]
            if log and rank == 0:
                _rewind_log(log, step)
    if out:
        out.mkdir(parents=True, exist_ok=True)
    res = TrainResult(steps=step)
    dev = model_device(model)
    model.train()
    t0 = time.perf_counter()
    bar = None
    if cfg.progress and rank == 0:
        from leanlm.report import progress
        bar = progress()
        bar.start()
        task = bar.add_task("training", total=cfg.max_steps, completed=step)
    try:
        while step < cfg.max_steps:
            lr = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio, cfg.schedule,
                       cfg.decay_fraction)
            for g in opt.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            ts = time.perf_counter()
            tokens = 0
            if mezo:
                batch = micro_batch(data, position, cfg.batch_size, cfg.seed)
                ids, labels = (t.to(dev) for t in collate(batch, cfg.pad_id))
                position += 1
                tokens = sum(len(e["input_ids"]) for e in batch)
                seed = int(torch.randint(0, 2**31 - 1, (1,)))

                def closure():
                    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                        return loss_fn(model, ids, labels)[0]
                loss_val = opt.step(closure, seed)
            else:
                loss_val = 0.0
                for _ in range(cfg.grad_accum):
                    batch = micro_batch(data, position, cfg.batch_size, cfg.seed, rank, world)
                    ids, labels = (t.to(dev) for t in collate(batch, cfg.pad_id))
                    position += 1
                    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                        loss, n = loss_fn(model, ids, labels)
                    if world > 1:  # FSDP2 averages gradients over ranks: weight each rank by its share of the
                        # global batch's labelled tokens, so N processes follow one process's mean loss
                        from leanlm.train.distributed import sum_over_ranks

                        total = sum_over_ranks(float(n))
                        loss = loss * (n * world / total) if total else loss
                    (loss / cfg.grad_accum).backward()
                    loss_val += float(loss.detach()) / cfg.grad_accum
                    tokens += sum(len(e["input_ids"]) for e in batch)  # tokens processed, not just labelled
                if world > 1:  # log the global batch's loss on every rank (each rank saw its own share)
                    from leanlm.train.distributed import mean_over_ranks

                    loss_val = mean_over_ranks(loss_val)
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - ts
            res.losses.append(loss_val)
            res.tokens += tokens
            rec = {"step": step, "loss": round(loss_val, 6), "lr": lr, "tokens": tokens,
                   "tok_per_s": round(tokens / dt, 1) if dt else 0.0, "step_s": round(dt, 4)}
            if cfg.eval_every and eval_data and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                _optimizer_mode(opt, "eval")
                rec["eval_loss"] = evaluate_loss(model, eval_data, cfg.batch_size, cfg.bf16, cfg.pad_id)
                _optimizer_mode(opt, "train")
                res.evals.append({"step": step, "eval_loss": rec["eval_loss"]})
            if log and rank == 0:
                with open(log, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            if bar is not None:
                bar.update(task, completed=step,
                           description=f"loss {loss_val:.4f}  {rec['tok_per_s']:.0f} tok/s")
            if out and cfg.save_every and (step % cfg.save_every == 0 or step == cfg.max_steps):
                # a schedule-free checkpoint holds the training point y (its state holds z): resume continues
                # exactly; the model saved at the end holds the average x
                meta = {"step": step, "position": position, "config": asdict(cfg)}
                if sharded:  # a collective: every rank writes its shards
                    from leanlm.train.sharded_checkpoint import save_sharded_checkpoint

                    save_sharded_checkpoint(out, model, opt, meta, keep_last=cfg.keep_last)
                elif rank == 0:
                    save_checkpoint(out, model, opt, meta, keep_last=cfg.keep_last)
            if callback is not None:
                callback(step, loss_val)
    finally:
        if bar is not None:
            bar.stop()
        _optimizer_mode(opt, "eval")  # the trained model is the schedule-free average
    res.steps = step
    res.seconds = time.perf_counter() - t0
    res.peak_rss_mb = peak_rss_mb()
    model.eval()
    return res


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)
        os.environ.setdefault("OMP_NUM_THREADS", str(n))
