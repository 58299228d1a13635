"""SmoothQuant W8A8 (Xiao et al., 2023): weights and activations in int8.

Each input channel of the activations is divided by s_j = max|X_j|^a / max|W_j|^(1-a) and the
weight's columns are multiplied by s_j, the weight's columns by s_j, with 1/s folded into the preceding norm (the attention
inputs, the MLP inputs) or into the up projection's rows (the MLP output), as the family's layout
lists them (`Layout.smoothing`). The attention output projection is not smoothed: with
grouped-query attention its input channels do not map one-to-one onto the value rows.
The smoothed layers become W8A8Linear (int8.py). AWQ folds its scales the same way (fold_scales).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from leanlm.compress.calibrate import BlockContext
from leanlm.compress.quant.int8 import W8A8Linear
from leanlm.model.layout import base_model, block_prefix, layout_of


@dataclass
class SmoothQuantConfig:
    alpha: float = 0.5  # migration strength: 0 = all difficulty on activations, 1 = all on weights

    def validate(self):
        if not 0 <= self.alpha <= 1:
            raise ValueError("alpha must be in [0, 1]")


def smoothing_groups(ctx: BlockContext) -> list[tuple[nn.Module, str, list[str]]]:
    """(module whose output feeds the linears, how to fold: 'norm' or 'rows', full names of the linears),
    from the layout: a MoE block's norm feeds the router and every expert, each expert's up projection
    its own down projection. Groups holding an already-replaced (quantized) layer are left out: no
    weight to fold."""
    pre, out = block_prefix(ctx.index), []
    for prev, how, rel in layout_of(ctx.model).smoothing(base_model(ctx.model).config, ctx.index):
        names = [pre + r for r in rel]
        if all(type(ctx.layer(n)) is nn.Linear for n in names):
            out.append((ctx.block.get_submodule(prev), how, names))
    return out


@torch.no_grad()
def fold_scales(prev: nn.Module, how: str, linears: list[nn.Linear], s: torch.Tensor):
    """x -> x / s before `linears` (folded into prev), W -> W * s: the block computes the same function.
    A norm folds the scale its own way (`fold_scale_`: a (1 + w) norm differs from a plain one)."""
    if how == "norm":
        prev.fold_scale_(s)
    else:
        prev.weight.div_(s[:, None].to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    for lin in linears:
        lin.weight.mul_(s[None, :].to(lin.weight.dtype))


@torch.no_grad()
def smoothquant_block(ctx: BlockContext, cfg: SmoothQuantConfig):
    absmax: dict[str, torch.Tensor] = {}

    def fn(name, x):
        a = x.abs().amax(0).float()
        absmax[name] = a if name not in absmax else torch.maximum(absmax[name], a)
    targets = set(ctx.modules)
    groups = [g for g in smoothing_groups(ctx) if targets.intersection(g[2])]
    ctx.collect(sorted(targets.union(*[g[2] for g in groups])), fn)
    for prev, how, names in groups:
        seen = [absmax[n] for n in names if n in absmax]  # a MoE expert no token was routed to saw nothing
        if not seen:
            continue
        act = torch.stack(seen).amax(0)
        lins = [ctx.layer(n) for n in names]
        wmax = torch.stack([lin.weight.abs().amax(0).float() for lin in lins]).amax(0)
        s = (act.clamp_min(1e-5).pow(cfg.alpha) / wmax.clamp_min(1e-5).pow(1 - cfg.alpha)).clamp_min(1e-5)
        fold_scales(prev, how, lins, s)
    for n in ctx.modules:
        lin = ctx.layer(n)
        ctx.replace(n, W8A8Linear.from_weight(lin.weight, lin.bias))
