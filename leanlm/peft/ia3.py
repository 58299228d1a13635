"""(IA)3: learned per-channel rescaling of activations, as an in-place transform.

On attention projections the output is scaled (`ia3_l` shape [out, 1]); on feed-forward modules
the input is scaled (`ia3_l` shape [1, in]) - peft's layout and key names, so adapters interchange.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from leanlm.errors import LeanLMError
from leanlm.model.layout import layout_of
from leanlm.model.surgery import replace_module
from leanlm.peft.lora import base_weight, freeze_base, matches, resolve_targets, target_names


@dataclass
class IA3Config:
    # None: peft's defaults for the family, from its layout: the key and value projections and the
    # MLP's down projection, which is also the one feed-forward module (its input is scaled). Lists may
    # hold target words (see LoraConfig.target_modules).
    target_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None


def default_targets(model) -> tuple[list[str], list[str]]:
    """(target_modules, feedforward_modules) of (IA)3 for the model's family."""
    lay = layout_of(model)
    return [lay.leaf("k"), lay.leaf("v"), lay.down], [lay.down]


class IA3Linear(nn.Module):
    def __init__(self, base: nn.Module, feedforward: bool):
        super().__init__()
        out_f, in_f = base_weight(base).shape
        self.base_layer = base
        self.is_feedforward = feedforward
        shape = (1, in_f) if feedforward else (out_f, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape))
        self.merged = False
        self.disabled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return self.base_layer(x)
        s = self.ia3_l.flatten()
        if self.is_feedforward:
            return self.base_layer((x * s).to(x.dtype))
        y = self.base_layer(x)
        return (y * s).to(y.dtype)

    def _scale(self, inverse: bool) -> None:
        s = self.ia3_l.detach().flatten()
        if inverse:
            s = 1 / s
        with torch.no_grad():
            w = base_weight(self.base_layer)
            new = w * s.view(1, -1) if self.is_feedforward else w * s.view(-1, 1)
            if hasattr(self.base_layer, "requantize"):
                self.base_layer.requantize(new)
            else:
                self.base_layer.weight.data.copy_(new)
            bias = getattr(self.base_layer, "bias", None)
            if bias is not None and not self.is_feedforward:
                bias.data.mul_(s)

    def merge(self) -> None:
        if not self.merged:
            self._scale(inverse=False)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._scale(inverse=True)
            self.merged = False


def apply_ia3(model: nn.Module, cfg: IA3Config) -> nn.Module:
    targets, feedforward = default_targets(model)
    cfg = dataclasses.replace(cfg, target_modules=targets if cfg.target_modules is None else cfg.target_modules,
                              feedforward_modules=feedforward if cfg.feedforward_modules is None
                              else cfg.feedforward_modules)
    cfg = dataclasses.replace(cfg, target_modules=resolve_targets(model, cfg.target_modules),
                              feedforward_modules=resolve_targets(model, cfg.feedforward_modules))
    names = target_names(model, cfg.target_modules)
    if not names:
        raise LeanLMError(f"no module matches target_modules={cfg.target_modules!r}")
    freeze_base(model)
    for name in names:
        ff = matches(name, cfg.feedforward_modules)
        replace_module(model, name, IA3Linear(model.get_submodule(name), ff))
    model.peft_config = cfg
    return model
