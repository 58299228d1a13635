"""Knowledge distillation through the one training loop: a student learns a frozen teacher's distributions.

`distill(student, teacher, data, DistillConfig(...))` trains the student's parameters that require grad
with a divergence from leanlm.train.losses (forward/reverse/skew KL, generalized JSD, or plain CE),
on the given examples. The teacher signal is online (teacher forward on every batch) or, with
`topk > 0`, its top-k log-probabilities cached once on disk (`cache=` path) and reused. With
`on_policy` = lambda > 0, that share of batches is the student's own samples scored by the teacher (GKD).
Checkpoints, exact resume, progress bar and log are the loop's (leanlm.train.loop).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

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
    on_policy: float = 0.0  # GKD's lambda: share of batches replaced by the student's own samples
    on_policy_prompt: int = 16  # prompt tokens kept from each row
    on_policy_tokens: int = 64  # tokens the student samples after them (temperature 1)
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
        if not 0 <= self.on_policy <= 1:
            raise LeanLMError(f"on_policy (lambda) must be in [0, 1] (got {self.on_policy})")
        if self.on_policy and (self.topk or self.loss == "ce"):
            raise LeanLMError("on-policy batches need an online teacher and a divergence loss (not topk, not ce)")
        if self.on_policy_prompt < 1 or self.on_policy_tokens < 1:
            raise LeanLMError("on_policy_prompt and on_policy_tokens must be >= 1")
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


@torch.no_grad()
def student_samples(model, ids: torch.Tensor, prompt_len: int, new_tokens: int, eos_ids=(),
                    pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """On-policy data (GKD): each row's first prompt_len tokens, then up to new_tokens sampled from the student
    at temperature 1 with its KV cache (draws from torch's global generator, so a resumed run draws the
    same). Labels cover the sampled tokens only, up to and including each row's first end-of-sequence token
    (one of eos_ids): what follows it is pad_id with no label, and sampling stops once every row has ended
    (TRL's GKDTrainer masks its generations the same way). The model is not fused for inference: it is
    training."""
    was = model.training
    model.eval()
    prompt = ids[:, :prompt_len]
    B, P = prompt.shape
    eos = torch.tensor(sorted({int(e) for e in eos_ids}), dtype=torch.long)
    done = torch.zeros(B, 1, dtype=torch.bool)
    cache = model.new_cache(B, P + new_tokens)
    logits = model(prompt, cache=cache, last_only=True)[:, -1]
    out, scored = [], []
    for i in range(new_tokens):
        nxt = torch.multinomial(torch.softmax(logits.float(), -1), 1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)  # a finished row only pads
        out.append(nxt)
        scored.append(~done)
        done = done | torch.isin(nxt, eos)
        if bool(done.all()) or i == new_tokens - 1:
            break
        logits = model(nxt, cache=cache)[:, -1]
    model.train(was)
    gen = torch.cat(out, 1)
    labels = torch.cat([torch.full_like(prompt, -100), gen.masked_fill(~torch.cat(scored, 1), -100)], 1)
    return torch.cat([prompt, gen], 1), labels


def on_policy_loss_fn(loss_fn, cfg: "DistillConfig", eos_ids=(), pad_id: int = 0):
    """With probability lambda a batch is replaced by the student's own continuations of its prompts,
    which the teacher then scores (GKD's on-policy mixture), each up to its first end-of-sequence token.
    The loss is the mean over the sampled tokens scored."""
    def wrapped(model, ids, labels):
        if float(torch.rand(())) < cfg.on_policy:
            ids, labels = student_samples(model, ids, cfg.on_policy_prompt, cfg.on_policy_tokens, eos_ids, pad_id)
        return loss_fn(model, ids, labels)
    return wrapped


def distill(student, teacher, data: list[dict], cfg: DistillConfig, out_dir: str | None = None,
            resume: bool | str = False, eval_data: list[dict] | None = None, eval_every: int = 0,
            save_every: int = 0, progress: bool = True, pad_id: int = 0, cache: str | None = None,
            teacher_name: str = "teacher", callback=None, eos_ids=()) -> TrainResult:
    """Train `student` (its parameters that require grad) towards `teacher` on `data`. eos_ids: the
    end-of-sequence tokens that end the student's on-policy samples (none: each runs on_policy_tokens)."""
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
        if cfg.on_policy:
            loss_fn = on_policy_loss_fn(loss_fn, cfg, eos_ids, pad_id)
    tcfg = TrainConfig(max_steps=cfg.steps, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, lr=cfg.lr,
                       weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup, bf16=cfg.bf16,
                       grad_checkpointing=cfg.grad_checkpointing, eval_every=eval_every, save_every=save_every,
                       out_dir=out_dir, seed=cfg.seed, progress=progress, pad_id=pad_id)
    return train(student, data, tcfg, eval_data=eval_data, resume=resume, loss_fn=loss_fn, callback=callback)


def config_fields() -> list[str]:
    return [f.name for f in fields(DistillConfig)]
