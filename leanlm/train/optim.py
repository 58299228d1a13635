"""Optimizers and the learning-rate schedule: AdamW (torch's), Lion, MeZO, warmup + cosine."""
from __future__ import annotations

import math

import torch

from leanlm.errors import LeanLMError


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al., 2023): sign of an interpolated momentum; one state tensor per parameter."""

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if "exp_avg" not in st:
                    st["exp_avg"] = torch.zeros_like(p)
                m = st["exp_avg"]
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                update = (m * b1 + p.grad * (1 - b1)).sign_()
                p.add_(update, alpha=-group["lr"])
                m.mul_(b2).add_(p.grad, alpha=1 - b2)


def make_optimizer(name: str, params, lr: float, weight_decay: float, betas=None):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas or (0.9, 0.999)))
    if name == "lion":
        return Lion(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas or (0.9, 0.99)))
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise LeanLMError(f"unknown optimizer {name!r}; choose adamw, lion, sgd or mezo")


def lr_at(step: int, base_lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warmup to base_lr over `warmup` steps, then cosine decay to min_ratio * base_lr at `total`."""
    if warmup and step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


class MeZO:
    """Memory-efficient zeroth-order SGD (Malladi et al., 2023): two forward passes, no backward.

    The perturbation z ~ N(0, 1) is regenerated from a seed instead of stored, so memory stays that of
    inference: theta += eps z; L+ ; theta -= 2 eps z; L- ; theta += eps z; theta -= lr * (L+ - L-)/(2 eps) z.
    """

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0):
        self.params = [p for p in params]
        self.param_groups = [{"lr": lr, "eps": eps, "weight_decay": weight_decay}]
        self.state = {}

    def _perturb(self, seed: int, scale: float):
        g = torch.Generator().manual_seed(seed)
        for p in self.params:
            z = torch.randn(p.shape, generator=g, dtype=p.dtype)
            p.data.add_(z, alpha=scale)

    @torch.no_grad()
    def step(self, loss_fn, seed: int) -> float:
        grp = self.param_groups[0]
        eps, lr, wd = grp["eps"], grp["lr"], grp["weight_decay"]
        self._perturb(seed, eps)
        lp = float(loss_fn())
        self._perturb(seed, -2 * eps)
        lm = float(loss_fn())
        proj = (lp - lm) / (2 * eps)
        # restore (+eps z) and update (-lr proj z) in one pass over z: drawing z is most of a step's
        # non-forward time (134M normal draws per pass on the default model); same ops, same order
        g = torch.Generator().manual_seed(seed)
        for p in self.params:
            z = torch.randn(p.shape, generator=g, dtype=p.dtype)
            p.data.add_(z, alpha=eps)
            if wd:
                p.data.mul_(1 - lr * wd)
            p.data.add_(z, alpha=-lr * proj)
        return (lp + lm) / 2

    def state_dict(self):
        return {"state": {}, "param_groups": [dict(self.param_groups[0])]}

    def load_state_dict(self, sd):
        self.param_groups = [dict(sd["param_groups"][0])]

    def zero_grad(self, set_to_none: bool = True):
        pass
