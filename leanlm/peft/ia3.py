"""(IA)3: learned per-channel rescaling of activations, as an in-place transform.

On attention projections the output is scaled (`ia3_l` shape [out, 1]); on feed-forward modules
the input is scaled (`ia3_l` shape [1, in]) - peft's layout and key names, so adapters interchange.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from leanlm.errors import LeanLMError
from leanlm.peft.lora import base_weight, freeze_base, matches, replace_module, target_names


@dataclass
class IA3Config:
    target_modules: list[str] | str = field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    feedforward_modules: list[str] | str = field(default_factory=lambda: ["down_proj"])


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
    names = target_names(model, cfg.target_modules)
    if not names:
        raise LeanLMError(f"no module matches target_modules={cfg.target_modules!r}")
    freeze_base(model)
    for name in names:
        ff = matches(name, cfg.feedforward_modules)
        replace_module(model, name, IA3Linear(model.get_submodule(name), ff))
    model.peft_config = cfg
    return model
