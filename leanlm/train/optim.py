"""Optimizers and learning-rate schedules.

AdamW, Muon and Adafactor are PyTorch's own (torch.optim); Lion, Adam-mini, schedule-free AdamW and
MeZO are written here (no maintained implementation ships with PyTorch). Muon updates the 2-D hidden
matrices and AdamW the rest (embedding, output head, norms, biases), as the modded-nanogpt speedrun
does. Schedules: warmup + cosine, warmup-stable-decay (WSD), constant.
"""
from __future__ import annotations

import math
from collections import defaultdict

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


class AdamMini(torch.optim.Optimizer):
    """Adam-mini (Zhang et al., 2024): one second-moment value per block instead of per coordinate.

    Blocks: each output row of a 2-D hidden matrix (an output neuron; finer than the paper's per-head
    blocks for q/k, which keeps it exact for any head layout), the whole tensor for 1-D parameters.
    A param group with `full=True` (make_optimizer puts the embedding and output head there) keeps
    per-coordinate Adam, as the paper does.
    Memory: v shrinks from rows x cols to rows for every hidden matrix.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, full=False))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                st = self.state[p]
                if "step" not in st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p)
                    vshape = p.shape if group["full"] else ((p.shape[0], 1) if p.dim() == 2 else (1,) * p.dim())
                    st["exp_avg_sq"] = torch.zeros(vshape, dtype=p.dtype)
                st["step"] += 1
                t = float(st["step"])
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                st["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
                g2 = g * g
                if not group["full"]:
                    g2 = g2.mean(dim=1, keepdim=True) if p.dim() == 2 else g2.mean().reshape((1,) * p.dim())
                st["exp_avg_sq"].mul_(b2).add_(g2, alpha=1 - b2)
                m_hat = st["exp_avg"] / (1 - b1 ** t)
                v_hat = st["exp_avg_sq"] / (1 - b2 ** t)
                p.add_(m_hat / (v_hat.sqrt() + group["eps"]), alpha=-group["lr"])


class ScheduleFreeAdamW(torch.optim.Optimizer):
    """Schedule-free AdamW (Defazio et al., 2024): no decay schedule; the model to evaluate is an average.

    The parameters hold y (where gradients are taken) while training. Call `eval()` before evaluating
    or saving (the parameters become the average x) and `train()` before the next step; the training
    loop does both. Update, with c = w_t / sum(w) and w_t = lr_max^2:
        z <- z - lr * g / (sqrt(v) + eps);   x <- (1 - c) x + c z;   y = (1 - beta1) z + beta1 x.
    """

    def __init__(self, params, lr: float = 2.5e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, warmup_steps: int = 0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      warmup_steps=warmup_steps, k=0, lr_max=0.0, weight_sum=0.0, mode="train"))

    @torch.no_grad()
    def _swap(self, to: str):
        for group in self.param_groups:
            if group["mode"] == to:
                continue
            b1 = group["betas"][0]
            for p in group["params"]:
                z = self.state[p].get("z")
                if z is None:
                    continue
                # y = (1 - b1) z + b1 x  <=>  x = (y - (1 - b1) z) / b1
                p.lerp_(z, 1 - 1 / b1) if to == "eval" else p.lerp_(z, 1 - b1)
            group["mode"] = to

    def eval(self):
        self._swap("eval")

    def train(self):
        self._swap("train")

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if group["mode"] != "train":
                raise LeanLMError("schedule-free AdamW: call train() before step() (the parameters hold x)")
            b1, b2 = group["betas"]
            k = group["k"]
            warm = min(1.0, (k + 1) / group["warmup_steps"]) if group["warmup_steps"] else 1.0
            lr = group["lr"] * warm
            bc2 = 1 - b2 ** (k + 1)
            group["lr_max"] = max(lr, group["lr_max"])
            weight = group["lr_max"] ** 2
            group["weight_sum"] += weight
            c = weight / group["weight_sum"] if group["weight_sum"] else 0.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if "z" not in st:
                    st["z"] = p.detach().clone()
                    st["exp_avg_sq"] = torch.zeros_like(p)
                v, z = st["exp_avg_sq"], st["z"]
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                gn = p.grad / ((v / bc2).sqrt() + group["eps"])
                if group["weight_decay"]:
                    gn = gn + group["weight_decay"] * p  # decay at y, as the reference does
                p.lerp_(z, c)  # y now mixes the new average: see the class docstring
                p.add_(gn, alpha=lr * (b1 * (1 - c) - 1))
                z.sub_(gn, alpha=lr)
            group["k"] = k + 1


class Combined:
    """Several optimizers stepping disjoint parameters as one (Muon for hidden matrices + AdamW).

    `param_groups` and `state` are shared with the parts, so the schedule and checkpoints see one optimizer.
    """

    def __init__(self, *parts):
        self.parts = parts
        self.state = defaultdict(dict)
        for o in parts:
            self.state.update(o.state)
            o.state = self.state
        self.param_groups = [g for o in parts for g in o.param_groups]

    def step(self, closure=None):
        for o in self.parts:
            o.step()

    def zero_grad(self, set_to_none: bool = True):
        for o in self.parts:
            o.zero_grad(set_to_none=set_to_none)


def split_hidden_matrices(named_params, keep_adam: tuple[str, ...] = ()) -> tuple[list, list]:
    """(2-D hidden matrices, everything else): the embedding and output head (names in keep_adam) and
    1-D parameters go to the Adam side."""
    hidden, rest = [], []
    for n, p in named_params:
        (hidden if p.dim() == 2 and not n.startswith(keep_adam) else rest).append(p)
    return hidden, rest


OPTIMIZERS = ("adamw", "muon", "lion", "adam-mini", "schedule-free", "adafactor", "sgd")


def make_optimizer(name: str, params, lr: float, weight_decay: float, betas=None, named=None,
                   keep_adam: tuple[str, ...] = ()):
    """params: the trainable parameters; named: (name, param) pairs, needed by muon and adam-mini to tell
    hidden matrices from the embedding/head (keep_adam: their name prefixes)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas or (0.9, 0.999)))
    if name == "lion":
        return Lion(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas or (0.9, 0.99)))
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=lr, weight_decay=weight_decay)
    if name == "schedule-free":
        return ScheduleFreeAdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas or (0.9, 0.999)))
    named = list(named) if named is not None else [(str(i), p) for i, p in enumerate(params)]
    hidden, rest = split_hidden_matrices(named, keep_adam)
    if name == "muon":
        # match_rms_adamw scales Muon's orthogonalized update to AdamW's RMS, so one lr serves both parts
        parts = [torch.optim.Muon(hidden, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")] \
            if hidden else []
        if rest:
            parts.append(torch.optim.AdamW(rest, lr=lr, weight_decay=weight_decay, betas=tuple(betas or (0.9, 0.95))))
        return Combined(*parts)
    if name == "adam-mini":
        groups = [{"params": hidden}] if hidden else []
        if rest:
            full = [p for n, p in named if p.dim() == 2 and n.startswith(keep_adam)]
            ids = {id(p) for p in full}
            if full:
                groups.append({"params": full, "full": True})
            small = [p for p in rest if id(p) not in ids]
            if small:
                groups.append({"params": small})
        return AdamMini(groups, lr=lr, weight_decay=weight_decay, betas=tuple(betas or (0.9, 0.999)))
    raise LeanLMError(f"unknown optimizer {name!r}; choose {', '.join(OPTIMIZERS)} or mezo")


SCHEDULES = ("cosine", "wsd", "constant")


def lr_at(step: int, base_lr: float, warmup: int, total: int, min_ratio: float = 0.1,
          schedule: str = "cosine", decay_fraction: float = 0.2) -> float:
    """Linear warmup to base_lr over `warmup` steps, then: cosine decay to min_ratio * base_lr at `total`;
    or WSD (warmup-stable-decay): flat, then a linear decay to min_ratio over the last decay_fraction of
    the steps; or constant."""
    if warmup and step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    if schedule == "wsd":
        start = total - max(1, int(round(decay_fraction * total)))
        if step < start:
            return base_lr
        t = min(1.0, (step - start) / max(1, total - start))
        return base_lr * (1 - (1 - min_ratio) * t)
    if schedule != "cosine":
        raise LeanLMError(f"unknown schedule {schedule!r}; choose {', '.join(SCHEDULES)}")
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
