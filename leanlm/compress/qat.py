"""Quantization-aware training: fake-quantized weights trained by distillation, then packed like PTQ.

`qat` recipe step (also by name: `w4a16-qat-g32`, any bits 2-8 and group size): every target linear
becomes a `FakeQuantLinear` whose forward uses its weight rounded to the RTN grid of
leanlm/compress/quant/grid.py (per group of `group_size` input columns, scales recomputed from the
current weights at every forward, fp16-rounded as stored); the rounding's gradient is the identity
(straight-through estimator), so the float weights learn to sit well on the grid. The loss is the
distillation loss against the model as it was before the recipe (leanlm/compress/recover.py's teacher),
on the recipe's calibration samples. Afterwards each layer is converted to the same packed `QuantLinear`
that RTN/GPTQ produce (codes from the learned weights, same grid), so eval, bench, generate and serve run
it at the packed speed; the converted layer computes exactly what the fake-quantized one did.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from leanlm.compress.quant.grid import rtn_quantize
from leanlm.compress.quant.qlinear import QuantLinear
from leanlm.compress.recover import DistillStepConfig, distill_step
from leanlm.errors import LeanLMError
from leanlm.model.surgery import replace_module


@dataclass
class QATConfig(DistillStepConfig):
    bits: int = 4
    group_size: int = 128  # 0: one group per row
    sym: bool = False  # asymmetric grids like RTN/GPTQ's defaults here
    lr: float = 2e-5
    steps: int = 200

    def validate(self) -> None:
        super().validate()
        if not 2 <= self.bits <= 8:
            raise LeanLMError(f"bits must be in 2..8 (got {self.bits})")
        if self.group_size < 0:
            raise LeanLMError(f"group_size must be >= 0 (got {self.group_size})")


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """w rounded to its RTN grid (grid.rtn_quantize + dequantize, vectorized over whole groups), with the
    straight-through gradient: d(result)/dw = identity."""
    N, K = w.shape
    g = group_size if 0 < group_size < K else K
    with torch.no_grad():
        wf = w.detach().float()
        if K % g:
            from leanlm.compress.quant.grid import dequantize

            codes, s, o = rtn_quantize(wf, bits, g, sym)
            wq = dequantize(codes, s, o, g)
        else:
            maxq = 2 ** bits - 1
            wg = wf.view(N, K // g, g)
            if sym:
                scale = 2 * wg.abs().amax(-1) / maxq
                scale = torch.where(scale > 0, scale, torch.ones_like(scale)).half().float()
                offset = -(2 ** (bits - 1)) * scale
            else:
                lo, hi = wg.amin(-1), wg.amax(-1)
                scale = (hi - lo) / maxq
                scale = torch.where(scale > 0, scale, torch.ones_like(scale)).half().float()
                offset = lo.half().float()
            q = torch.clamp(torch.round((wg - offset[..., None]) / scale[..., None]), 0, maxq)
            wq = (q * scale[..., None] + offset[..., None]).view(N, K)
    return w + (wq.to(w.dtype) - w).detach()


class FakeQuantLinear(nn.Module):
    """A Linear whose forward uses its weight fake-quantized (training only; `to_quant()` packs it)."""

    def __init__(self, base: nn.Linear, bits: int, group_size: int, sym: bool):
        super().__init__()
        self.weight = base.weight
        self.bias = base.bias
        self.in_features, self.out_features = base.in_features, base.out_features
        self.bits, self.group_size, self.sym = bits, group_size, sym

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = fake_quantize(self.weight, self.bits, self.group_size, self.sym)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def to_quant(self) -> QuantLinear:
        codes, s, o = rtn_quantize(self.weight.detach().float(), self.bits, self.group_size, self.sym)
        return QuantLinear.from_codes(codes, s, o, self.bits, self.group_size, self.sym, self.bias)


def qat_step(model, cfg: QATConfig, modules, samples, original=None, callback=None) -> None:
    if original is None:
        raise LeanLMError("the qat step needs the model as it was before the recipe (run it through apply_recipe)")
    fakes = {}
    for name in modules:
        layer = model.get_submodule(name)
        if not isinstance(layer, nn.Linear):
            raise LeanLMError(f"qat: {name} is a {type(layer).__name__}, not a float Linear; quantize it in one "
                              "step only")
        fakes[name] = FakeQuantLinear(layer, cfg.bits, cfg.group_size, cfg.sym)
        replace_module(model, name, fakes[name])
    try:
        distill_step(model, cfg, modules, samples, original=original, callback=callback)
    finally:
        for name, fake in fakes.items():
            replace_module(model, name, fake.to_quant())


qat_step.wants_original = True

METHODS = {"qat": (QATConfig, qat_step)}
