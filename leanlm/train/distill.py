"""Knowledge distillation through the one training loop: a student learns a frozen teacher's distributions.

`distill(student, teacher, data, DistillConfig(...))` trains the student's parameters that require grad
with a divergence from leanlm.train.losses (forward/reverse/skew KL, generalized JSD, or plain CE),
on the given examples. The teacher signal is online (teacher forward on every batch) or, with
`topk > 0`, its top-k log-probabilities cached once on disk (`cache=` path) and reused.
Checkpoints, exact resume, progress bar and log are the loop's (leanlm.train.loop).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from leanlm.errors import LeanLMError
from leanlm.train.loop import TrainConfig, TrainResult, train
from leanlm.train.losses import LOSSES, DistillLoss, chunked_loss, distill_loss_fn, head, labelled
from leanlm.train.teacher import TopKCache, cache_fingerprint, freeze


@dataclass
class DistillConfig:
    loss: str = "fkl"  # fkl | rkl | skl | srkl | jsd | ce
    temperature: float = 1.0
    beta: float = 0.5  # jsd: 0 = forward KL, 1 = reverse KL
    skew: float = 0.1  # skl / srkl mixture weight
    steps: int = 100
    lr: float = 5e-5
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 256
    warmup: int = 5
    weight_decay: float = 0.0
    bf16: bool = False
    grad_checkpointing: bool = False
    chunk: int = 1024
    topk: int = 0  # > 0: offline teacher, its top-k log-probs cached once
    seed: int = 0

    def validate(self) -> None:
        if self.loss not in LOSSES:
            raise LeanLMError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        for name in ("steps", "batch_size", "grad_accum", "chunk"):
            if getattr(self, name) < 1:
                raise LeanLMError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.seq_len < 2:
            raise LeanLMError(f"seq_len must be >= 2 (got {self.seq_len})")
        if not self.lr > 0:
            raise LeanLMError(f"lr must be > 0 (got {self.lr})")
        if self.topk < 0:
            raise LeanLMError(f"topk must be >= 0 (got {self.topk})")
        self.loss_config().validate()

    def loss_config(self) -> DistillLoss:
        return DistillLoss(self.loss, self.temperature, self.beta, self.skew, self.chunk)


def cached_loss_fn(cache: TopKCache, cfg: DistillLoss):
    """loss_fn for the loop with an offline teacher: its cached top-k distributions."""
    def loss_fn(model, ids, labels):
        h, tgt = labelled(model(ids, return_hidden=True), labels)
        v, i = cache.compact(ids, labels)
        return chunked_loss(h, head(model), lambda a, b: cache.expand(v[a:b], i[a:b]), tgt, cfg), int(tgt.numel())
    return loss_fn


def distill(student, teacher, data: list[dict], cfg: DistillConfig, out_dir: str | None = None,
            resume: bool | str = False, eval_data: list[dict] | None = None, eval_every: int = 0,
            save_every: int = 0, progress: bool = True, pad_id: int = 0, cache: str | None = None,
            teacher_name: str = "teacher", callback=None) -> TrainResult:
    """Train `student` (its parameters that require grad) towards `teacher` on `data`."""
    cfg.validate()
    lcfg = cfg.loss_config()
    if cfg.loss == "ce":
        loss_fn = distill_loss_fn(None, lcfg)
    else:
        if teacher is None:
            raise LeanLMError(f"loss {cfg.loss!r} needs a teacher")
        freeze(teacher)
        if cfg.topk:
            fp = cache_fingerprint(teacher_name, data, cfg.topk, cfg.temperature)
            tk = TopKCache.load(cache, fp) if cache else None
            if tk is None:
                tk = TopKCache.build(teacher, data, cfg.topk, cfg.temperature, cfg.batch_size, progress)
                if cache:
                    tk.save(cache, fp)
            loss_fn = cached_loss_fn(tk, lcfg)
        else:
            loss_fn = distill_loss_fn(teacher, lcfg)
    tcfg = TrainConfig(max_steps=cfg.steps, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, lr=cfg.lr,
                       weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup, bf16=cfg.bf16,
                       grad_checkpointing=cfg.grad_checkpointing, eval_every=eval_every, save_every=save_every,
                       out_dir=out_dir, seed=cfg.seed, progress=progress, pad_id=pad_id)
    return train(student, data, tcfg, eval_data=eval_data, resume=resume, loss_fn=loss_fn, callback=callback)


def config_fields() -> list[str]:
    return [f.name for f in fields(DistillConfig)]
