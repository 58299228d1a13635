"""LoRA, rsLoRA, DoRA and LoRA-FA as an in-place transform: `apply_lora(model, LoraConfig(...))`.

A target nn.Linear (or any module with `.weight`/`dequantize()`, e.g. an NF4 linear for QLoRA) is
replaced by `LoraLinear`, which keeps the original as `base_layer` and adds `lora_A`/`lora_B`
(and `lora_magnitude_vector` for DoRA). The names and the maths follow HF peft exactly, so an
adapter moves between peft and leanlm unchanged (see leanlm/peft/io.py).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from leanlm.errors import LeanLMError
from leanlm.model.layout import HEAD, TARGET_WORDS, layout_of, target_linears
from leanlm.model.surgery import replace_module

ALL_LINEAR = "all-linear"  # peft's name for every linear of the blocks (the family's layout lists them)


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # A list matches module names by suffix (a leaf name such as the query projection's matches that
    # module in every block); a string is a regex that must match the full module name (peft's rules).
    # None or "all-linear": every linear of the blocks, from the family's layout (Layout.all_linear).
    # A list may also hold target words (leanlm.model.layout.TARGET_WORDS: attention, mlp, experts,
    # experts.down, router, ...), which the layout turns into the full names of those linears.
    target_modules: list[str] | str | None = None
    use_rslora: bool = False  # scaling alpha/sqrt(r) instead of alpha/r
    use_dora: bool = False  # weight-decomposed: magnitude vector times normalised direction
    freeze_a: bool = False  # LoRA-FA: A stays at its random init, only B trains
    init: str = "kaiming"  # kaiming (peft's default) | gaussian | loftq (QLoRA only)
    loftq_iters: int = 1
    # per-module rank / alpha, peft's rank_pattern / alpha_pattern: {regex: value}, the first key that
    # matches the end of a module name (after a dot) wins
    rank_pattern: dict = dataclasses.field(default_factory=dict)
    alpha_pattern: dict = dataclasses.field(default_factory=dict)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def at(self, name: str) -> "LoraConfig":
        """The config of one module: rank and alpha from the patterns that match its name."""
        r, alpha = pattern_value(self.rank_pattern, name, self.r), pattern_value(self.alpha_pattern, name, self.alpha)
        return self if (r, alpha) == (self.r, self.alpha) else dataclasses.replace(self, r=int(r), alpha=float(alpha))


def pattern_value(patterns: dict, name: str, default):
    """peft's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


@dataclass
class DoraConfig(LoraConfig):
    use_dora: bool = True


@dataclass
class LoraFAConfig(LoraConfig):
    freeze_a: bool = True


def matches(name: str, targets: list[str] | str) -> bool:
    """peft's rule: a regex string must match the full name; a list entry must equal the name or a
    dot-separated end of it (lists of thousands of expert names stay fast: a set lookup per suffix)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    wanted = targets if isinstance(targets, (set, frozenset)) else set(targets)
    parts = name.split(".")
    return any(".".join(parts[i:]) in wanted for i in range(len(parts)))


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The dense weight of a base layer: nn.Linear's own, or a quantized module's dequantization."""
    if hasattr(layer, "dequantize"):
        return layer.dequantize()
    if hasattr(layer, "dequantized_weight"):  # leanlm.compress.quant.QuantLinear
        return layer.dequantized_weight()
    return layer.weight


class LoraLinear(nn.Module):
    def __init__(self, base: nn.Module, cfg: LoraConfig):
        super().__init__()
        if isinstance(base, nn.Linear):
            (out_f, in_f), dt = base.weight.shape, base.weight.dtype
        elif hasattr(base, "in_features") and hasattr(base, "out_features"):
            # a quantized base: its shape without dequantizing it (a dense temporary per layer would
            # cost time and fragment the heap while QLoRA wraps 210 layers)
            out_f, in_f, dt = base.out_features, base.in_features, torch.float32
        else:
            w = base_weight(base)
            (out_f, in_f), dt = w.shape, w.dtype
        self.base_layer = base
        self.in_features, self.out_features = in_f, out_f
        self.r, self.scaling, self.use_dora = cfg.r, cfg.scaling, cfg.use_dora
        self.lora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        dt = dt if dt.is_floating_point else torch.float32
        self.lora_A = nn.Linear(in_f, cfg.r, bias=False, dtype=dt)
        self.lora_B = nn.Linear(cfg.r, out_f, bias=False, dtype=dt)
        if cfg.init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / cfg.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if cfg.freeze_a:
            self.lora_A.weight.requires_grad_(False)
        if cfg.use_dora:
            self.lora_magnitude_vector = nn.Parameter(self.weight_norm().detach().clone())
        self.merged = False
        self.disabled = False
        self._merged_norm = None

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def weight_norm(self, delta: torch.Tensor | None = None) -> torch.Tensor:
        """Row norms of W + scaling * B A (DoRA's ||V + dV||_c, treated as a constant in backward)."""
        w = base_weight(self.base_layer)
        d = self.delta_weight() if delta is None else delta
        return torch.linalg.norm(w + d.to(w.dtype), dim=1).to(w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged or self.disabled:
            return y
        if not self.use_dora:
            return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling
        # DoRA as peft computes it: y + (m/||W+dW|| - 1) * W x + m/||W+dW|| * s * B A x
        w = base_weight(self.base_layer)
        lora_w = (self.lora_B.weight @ self.lora_A.weight).detach()
        norm = torch.linalg.norm(w + self.scaling * lora_w.to(w.dtype), dim=1).to(w.dtype).detach()
        scale = (self.lora_magnitude_vector / norm).view(1, -1)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base = y
            bias = getattr(self.base_layer, "bias", None)
            if bias is not None:
                base = base - bias
        else:
            x = self.lora_dropout(x)
            base = F.linear(x, w.to(x.dtype))
        lora = self.lora_B(self.lora_A(x))
        return y + (scale - 1) * base + scale * lora * self.scaling

    # ---- merge ----
    def merge(self) -> None:
        """Fold the adapter into the base weight (a quantized base is dequantized, merged, requantized)."""
        if self.merged:
            return
        with torch.no_grad():
            w = base_weight(self.base_layer)
            delta = self.delta_weight().to(w.dtype)
            if self.use_dora:
                norm = self.weight_norm(delta).detach()
                self._merged_norm = norm
                new = (self.lora_magnitude_vector / norm).view(-1, 1) * (w + delta)
            else:
                new = w + delta
            self._set_base(new.to(w.dtype))
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        with torch.no_grad():
            w = base_weight(self.base_layer)
            delta = self.delta_weight().to(w.dtype)
            if self.use_dora:
                new = w / (self.lora_magnitude_vector / self._merged_norm).view(-1, 1) - delta
            else:
                new = w - delta
            self._set_base(new.to(w.dtype))
        self.merged = False

    def _set_base(self, new: torch.Tensor) -> None:
        if hasattr(self.base_layer, "requantize"):
            self.base_layer.requantize(new)
        else:
            self.base_layer.weight.data.copy_(new)


def resolve_targets(model: nn.Module, targets):
    """None or "all-linear" -> the family's all-linear leaf names; target words in a list -> the full
    names of the linears they name (from the layout); anything else as given."""
    if targets is None or targets == ALL_LINEAR:
        return layout_of(model).all_linear()
    if isinstance(targets, str) or not any(t in TARGET_WORDS for t in targets):
        return targets
    out = []
    for t in targets:
        names = target_linears(model, t) if t in TARGET_WORDS else [t]
        if not names:
            raise LeanLMError(f"target {t!r} names no linear of this {model.config.model_type} model "
                              f"(it has no such part); target words: {', '.join(TARGET_WORDS)}")
        out += [n for n in names if n not in out]
    return out


def with_targets(model: nn.Module, cfg, *fields: str):
    """The config with its target fields resolved against the model (what gets saved with the adapter)."""
    got = {f: resolve_targets(model, getattr(cfg, f)) for f in fields}
    return dataclasses.replace(cfg, **got) if any(got[f] is not getattr(cfg, f) for f in fields) else cfg


def skip_head(name: str, targets) -> bool:
    """The output head is tied to the embedding in most small models: adapt it only when named."""
    return name.endswith(HEAD) and isinstance(targets, list) and HEAD not in targets


def target_names(model: nn.Module, targets, kinds=(nn.Linear,)) -> list[str]:
    targets = resolve_targets(model, targets)
    wanted = targets if isinstance(targets, str) else set(targets)
    names = []
    for name, mod in model.named_modules():
        if skip_head(name, targets):
            continue
        if matches(name, wanted) and (isinstance(mod, kinds) or hasattr(mod, "dequantize")
                                            or hasattr(mod, "dequantized_weight")):
            names.append(name)
    return names


def freeze_base(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Freeze the model and put a LoRA (DoRA, LoRA-FA) adapter on each target linear, in place."""
    if cfg.r < 1:
        raise LeanLMError(f"LoRA rank must be at least 1, got {cfg.r}")
    if cfg.init == "loftq":
        raise LeanLMError("LoftQ initialisation quantizes the base weights: use QLoRA (method qlora) with init=loftq")
    cfg = with_targets(model, cfg, "target_modules")
    names = target_names(model, cfg.target_modules)
    if not names:
        raise LeanLMError(f"no module matches target_modules={cfg.target_modules!r}; use names like "
                          f"{', '.join(layout_of(model).all_linear()[:3])}, target words ({', '.join(TARGET_WORDS[:4])}, "
                          "...) or a full-name regex")
    freeze_base(model)
    for name in names:
        base = model.get_submodule(name)
        if isinstance(base, LoraLinear):
            raise LeanLMError(f"{name} already has a LoRA adapter; merge or remove it first")
        replace_module(model, name, LoraLinear(base, cfg.at(name)))
    model.peft_config = cfg
    return model


def lora_layers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]


def merge_lora(model: nn.Module) -> None:
    for _, m in lora_layers(model):
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for _, m in lora_layers(model):
        m.unmerge()


def unload_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove the adapters (merging them first unless merge=False): the plain model comes back."""
    for name, m in lora_layers(model):
        if merge:
            m.merge()
        elif m.merged:
            m.unmerge()
        replace_module(model, name, m.base_layer)
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model
