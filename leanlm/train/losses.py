"""Token-level distillation losses over the vocabulary, computed in chunks at labelled positions only.

Divergences between the teacher's distribution p and the student's q, both softmax(logits / T):

    fkl   forward KL             KL(p || q) = sum p (log p - log q)            (the classic KD loss)
    rkl   reverse KL (MiniLLM)   KL(q || p)                                    (mode seeking)
    skl   skew KL (DistiLLM)     KL(p || a p + (1 - a) q)                     (a = `skew`)
    srkl  skew reverse KL        KL(q || a q + (1 - a) p)
    jsd   generalized JSD (GKD)  b KL(p || m) + (1 - b) KL(q || m),  m = b p + (1 - b) q;
          b = 0 is forward KL and b = 1 reverse KL exactly (TRL's `generalized_jsd_loss` convention)
    ce    plain next-token cross-entropy on the labels (no teacher)

The result is the mean over labelled positions (TRL's "batchmean" with labels), not multiplied by T^2.

Memory: a [tokens, vocab] tensor is 49k x 4 bytes = 190 KB per token, so 8 x 512 tokens is 0.8 GB per
copy and autograd keeps several. Here the head projection runs on `chunk` rows at a time, and each chunk
is wrapped in activation checkpointing, so only one chunk's logits exist at once, in forward and in
backward (the chunk's logits are recomputed from its hidden states during backward).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from leanlm.errors import LeanLMError
from leanlm.model.layout import HEAD, base_model

IGNORE = -100
LOSSES = ("fkl", "rkl", "skl", "srkl", "jsd", "ce")


@dataclass
class DistillLoss:
    kind: str = "fkl"
    temperature: float = 1.0
    beta: float = 0.5  # jsd: 0 = forward KL ... 1 = reverse KL
    skew: float = 0.1  # skl / srkl: weight of the first distribution in the mixture (DistiLLM's alpha)
    chunk: int = 1024  # labelled positions per head projection

    def validate(self) -> None:
        if self.kind not in LOSSES:
            raise LeanLMError(f"unknown distillation loss {self.kind!r}; choose one of {', '.join(LOSSES)}")
        if not self.temperature > 0:
            raise LeanLMError(f"temperature must be > 0 (got {self.temperature})")
        if not 0 <= self.beta <= 1:
            raise LeanLMError(f"beta must be in [0, 1] (got {self.beta})")
        if not 0 <= self.skew < 1:
            raise LeanLMError(f"skew must be in [0, 1) (got {self.skew})")
        if self.chunk < 1:
            raise LeanLMError(f"chunk must be >= 1 (got {self.chunk})")


def head(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden [n, H] (after the final norm) -> logits [n, vocab] for any leanlm model."""
    base = base_model(model)
    fn = getattr(base, "logits", None)
    return fn if callable(fn) else base.get_submodule(HEAD)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """fp32 at least (bf16 logits from autocast would lose the small differences a KL measures)."""
    return x if x.dtype == torch.float64 else x.float()


def _kl(lp_a: torch.Tensor, lp_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row from log-probabilities; 0 * log 0 counts as 0."""
    pa = lp_a.exp()
    return torch.where(pa > 0, pa * (lp_a - lp_b), torch.zeros_like(pa)).sum(-1)


def _mix(lp_a: torch.Tensor, lp_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w a + (1 - w) b) from log-probabilities (w strictly inside (0, 1))."""
    return torch.logaddexp(lp_a + math.log(w), lp_b + math.log1p(-w))


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "fkl",
               temperature: float = 1.0, beta: float = 0.5, skew: float = 0.1) -> torch.Tensor:
    """Per-row divergence [n] between teacher and student logits [n, vocab] (see the module docstring)."""
    q = F.log_softmax(_wide(student_logits) / temperature, -1)
    p = F.log_softmax(_wide(teacher_logits) / temperature, -1)
    if kind == "fkl":
        return _kl(p, q)
    if kind == "rkl":
        return _kl(q, p)
    if kind == "skl":
        return _kl(p, _mix(p, q, skew)) if skew > 0 else _kl(p, q)
    if kind == "srkl":
        return _kl(q, _mix(q, p, skew)) if skew > 0 else _kl(q, p)
    if kind == "jsd":
        if beta == 0:
            return _kl(p, q)
        if beta == 1:
            return _kl(q, p)
        m = _mix(p, q, beta)
        return beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    raise LeanLMError(f"unknown divergence {kind!r}; choose one of {', '.join(LOSSES[:-1])}")


def labelled(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states [n, H] at the positions that predict a label, and those labels [n]."""
    tgt = labels[:, 1:]
    keep = tgt != IGNORE
    return hidden[:, :-1][keep], tgt[keep]


def chunked_loss(student_hidden: torch.Tensor, student_head, teacher, targets: torch.Tensor,
                 cfg: DistillLoss) -> torch.Tensor:
    """Mean loss over n rows. student_hidden [n, H]; teacher(start, end) -> teacher logits [end-start, V]
    (ignored for "ce"); targets [n] (the labels, used by "ce"). Each chunk's head projection and loss
    run under activation checkpointing when gradients are on."""
    n = student_hidden.shape[0]
    if n == 0:
        return student_hidden.sum() * 0.0
    total = 0.0

    def piece(h, start, end):
        logits = student_head(h)
        if cfg.kind == "ce":
            return F.cross_entropy(_wide(logits), targets[start:end], reduction="sum")
        with torch.no_grad():
            t = teacher(start, end)
        return divergence(logits, t, cfg.kind, cfg.temperature, cfg.beta, cfg.skew).sum()

    grad = torch.is_grad_enabled() and student_hidden.requires_grad
    for start in range(0, n, cfg.chunk):
        end = min(n, start + cfg.chunk)
        h = student_hidden[start:end]
        if grad and n > cfg.chunk:
            total = total + checkpoint(piece, h, start, end, use_reentrant=False)
        else:
            total = total + piece(h, start, end)
    return total / n


def distill_loss_fn(teacher_model, cfg: DistillLoss):
    """A `loss_fn(model, ids, labels) -> (loss, n)` for leanlm.train.train with an online teacher: the
    frozen teacher runs on the same ids (no grad), and both heads run per chunk of labelled rows."""
    cfg.validate()
    t_head = head(teacher_model) if teacher_model is not None else None

    def loss_fn(model, ids, labels):
        hidden = model(ids, return_hidden=True)
        h, tgt = labelled(hidden, labels)
        if cfg.kind == "ce" or teacher_model is None:
            if cfg.kind != "ce":
                raise LeanLMError(f"loss {cfg.kind!r} needs a teacher")
            return chunked_loss(h, head(model), None, tgt, cfg), int(tgt.numel())
        with torch.no_grad():
            th, _ = labelled(teacher_model(ids, return_hidden=True), labels)
        return chunked_loss(h, head(model), lambda a, b: t_head(th[a:b]), tgt, cfg), int(tgt.numel())

    return loss_fn
