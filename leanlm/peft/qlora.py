"""QLoRA: LoRA over frozen NF4 base weights with double-quantized scales, and LoftQ initialisation.

The base weights are leanlm.compress.quant's NF4Linear (QLoRA's 16 quantiles of N(0, 1), one absmax
per block of 64 weights, the absmaxes double-quantized to int8 in blocks of 256 around their mean);
its forward under autograd dequantizes again in backward instead of saving the dense weight, so only
the packed codes stay resident. `nf4_on_load(targets)` gives `leanlm.load(quantize=...)` a hook that
quantizes each target weight as the loader reads it, so the fp32 model is never whole in memory:

    model, tok = leanlm.load(quantize=nf4_on_load(cfg.target_modules))
    model = apply_qlora(model, cfg)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from leanlm.compress.quant.nf4 import NF4Config, NF4Linear
from leanlm.errors import LeanLMError
from leanlm.io.checkpoint import trim_heap
from leanlm.model.layout import all_linear_any_family
from leanlm.model.surgery import replace_module
from leanlm.peft.lora import (ALL_LINEAR, LoraConfig, LoraLinear, freeze_base, matches, skip_head, target_names,
                              with_targets)

QLORA_NF4 = NF4Config(dtype="nf4", block_size=64, double_quant=True)


@dataclass
class QLoraConfig(LoraConfig):
    """LoRA over NF4 base weights; saved as a plain LoRA adapter."""

    @staticmethod
    def quantize_on_load(targets):
        """The loader hook that makes the targets NF4 as they are read (the float model is never whole)."""
        return nf4_on_load(targets)


def nf4_quantize(weight: torch.Tensor, bias: torch.Tensor | None = None) -> NF4Linear:
    """QLoRA's base layer for a dense [out, in] weight."""
    return NF4Linear.from_weight(weight, bias, QLORA_NF4)


def nf4_on_load(targets, cfg: NF4Config = QLORA_NF4):
    """A `leanlm.load(quantize=...)` hook: the target linears become NF4Linear as their weights are read.
    targets None / "all-linear": the all-linear names (the model's family is not known yet: every family's)."""
    if targets is None or targets == ALL_LINEAR:
        targets = all_linear_any_family()

    def quantize(name: str, weight: torch.Tensor, bias: torch.Tensor | None):
        if skip_head(name, targets):
            return None  # same rule as target_names: the head is adapted only when named
        if not matches(name, targets):
            return None
        return NF4Linear.from_weight(weight, bias, cfg)
    return quantize


def loftq_init(layer: LoraLinear, weight: torch.Tensor, iters: int = 1) -> None:
    """LoftQ: alternate NF4 quantization of W - s*B A and a rank-r SVD of the residual, so that
    dequant(Q) + s*B A starts close to W (plain QLoRA starts at dequant(Q), carrying the full error)."""
    s, r = layer.scaling, layer.r
    w = weight.detach().float()
    lowrank = torch.zeros_like(w)
    for _ in range(max(1, iters)):
        resid = w - nf4_quantize(w - lowrank).dequantize()
        U, S, Vh = torch.linalg.svd(resid, full_matrices=False)
        root = S[:r].sqrt()
        B = U[:, :r] * root / s ** 0.5
        A = root[:, None] * Vh[:r] / s ** 0.5
        lowrank = s * (B @ A)
    layer.base_layer.requantize(w - lowrank)
    with torch.no_grad():
        layer.lora_A.weight.copy_(A)
        layer.lora_B.weight.copy_(B)


def quantize_nf4(model: nn.Module, targets) -> list[str]:
    """Replace target nn.Linear modules by NF4Linear, in place (the model is already in memory)."""
    names = target_names(model, targets)
    for name in names:
        lin = model.get_submodule(name)
        if isinstance(lin, nn.Linear):
            replace_module(model, name, nf4_quantize(lin.weight.data, lin.bias.data if lin.bias is not None else None))
    return names


def apply_qlora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Quantize the target linears to NF4 (double-quantized scales), freeze them, add LoRA on top.

    Targets already NF4 (loaded with `leanlm.load(quantize=nf4_on_load(...))`) are used as they are."""
    cfg = with_targets(model, cfg, "target_modules")
    names = target_names(model, cfg.target_modules)
    if not names:
        raise LeanLMError(f"no module matches target_modules={cfg.target_modules!r}")
    freeze_base(model)
    quantized_here = False
    lora_cfg = LoraConfig(**{**cfg.__dict__, "init": "kaiming" if cfg.init == "loftq" else cfg.init})
    for name in names:
        lin = model.get_submodule(name)
        if isinstance(lin, NF4Linear):
            if cfg.init == "loftq":
                raise LeanLMError(f"{name} is already NF4: LoftQ needs the float weights; load the model "
                                  "without quantize=... to use init=loftq")
            replace_module(model, name, LoraLinear(lin, lora_cfg.at(name)))
            continue
        if not isinstance(lin, nn.Linear):
            raise LeanLMError(f"{name} is already quantized ({type(lin).__name__}); QLoRA needs the float model")
        w = lin.weight.data
        layer = LoraLinear(nf4_quantize(w, lin.bias.data if lin.bias is not None else None), lora_cfg.at(name))
        if cfg.init == "loftq":
            loftq_init(layer, w, cfg.loftq_iters)
        replace_module(model, name, layer)
        quantized_here = True
        del lin, w
    if quantized_here:
        _own_remaining(model)
    else:
        trim_heap()
    model.peft_config = cfg
    model.qlora = True
    return model


def _own_remaining(model: nn.Module) -> None:
    """Copy the parameters left in float (embedding, norms) out of the checkpoint's memory map: while
    any tensor still views the map, every page quantization touched stays resident (~the fp32 size)."""
    import gc

    gc.collect()  # the replaced float linears must be gone first
    done: dict[int, nn.Parameter] = {}
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) not in done:
                done[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
            mod._parameters[name] = done[id(p)]
    del done
    gc.collect()
    trim_heap()  # hand the freed float weights back to the OS


def merge_error(model: nn.Module) -> float:
    """Merge every LoRA layer into its NF4 base (dequantize, add, requantize); returns the relative
    Frobenius error the requantization added, over all merged layers."""
    num = den = 0.0
    for m in model.modules():
        if isinstance(m, LoraLinear) and isinstance(m.base_layer, NF4Linear) and not m.merged:
            with torch.no_grad():
                want = m.base_layer.dequantize() + m.delta_weight()
            m.merge()
            got = m.base_layer.dequantize()
            num += float((got - want).pow(2).sum())
            den += float(want.pow(2).sum())
    return (num / den) ** 0.5 if den else 0.0
