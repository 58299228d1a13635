"""Weights and activations in int8: SmoothQuant W8A8 (Xiao et al., 2023) and LLM.int8() (Dettmers et al., 2022).

Both run `torch._int_mm` (int8 x int8 -> int32) with int8 weights per output channel and
activations quantized per token at run time (dynamic absmax / 127); `_int_mm` needs more than 16
rows, so shorter inputs (decode) are zero-padded to 17 rows.
- SmoothQuant divides each input channel of the activations by s_j = max|X_j|^a / max|W_j|^(1-a)
  and multiplies the weight's columns by s_j, folding 1/s into the preceding RMSNorm (q/k/v,
  gate/up) or into up_proj's rows (down_proj). o_proj is not smoothed: with grouped-query
  attention its input channels do not map one-to-one onto v_proj's rows.
- LLM.int8(): input features whose calibration activations exceed `threshold` in magnitude are
  kept in high precision (their weight columns in fp16, an fp matmul); the rest goes through int8.
  The outlier set is found on calibration data (static), where bitsandbytes detects it per batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from leanlm.compress.calibrate import BlockContext
from leanlm.model.layout import base_model, block_prefix, layout_of


def quantize_rows(x: torch.Tensor):
    """Symmetric int8 per row: -> (int8 [M, K], scale fp32 [M])."""
    scale = x.abs().amax(-1).float().clamp_min(1e-8) / 127
    return torch.clamp(torch.round(x.float() / scale[:, None]), -127, 127).to(torch.int8), scale


def int8_matmul(x2: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, fast: bool = True) -> torch.Tensor:
    """Per-token dynamic int8 activations times int8 weights [N, K] -> fp32 [M, N]."""
    xq, xs = quantize_rows(x2)
    if fast:
        M = xq.shape[0]
        if M <= 16:
            xq = F.pad(xq, (0, 0, 0, 17 - M))
        acc = torch._int_mm(xq, w_q.t())[:M].float()
    else:  # reference: the same integers in fp64, exact
        acc = (xq.double() @ w_q.double().t()).float()
    return acc * xs[:, None] * w_scale[None, :]


class W8A8Linear(nn.Module):
    fast = True

    def __init__(self, in_features: int, out_features: int, bias: bool = False, outliers: int = 0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32))
        self.n_outliers = outliers
        if outliers:
            self.register_buffer("outlier_idx", torch.zeros(outliers, dtype=torch.int64))
            self.register_buffer("outlier_weight", torch.zeros(out_features, outliers, dtype=torch.float16))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    def config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "outliers": self.n_outliers}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, outliers={self.n_outliers}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Own, aligned memory: torch._int_mm must not read tensors memory-mapped from safetensors.
        if prefix + "qweight" in state_dict:
            state_dict[prefix + "qweight"] = state_dict[prefix + "qweight"].clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def from_weight(cls, w: torch.Tensor, bias=None, outlier_idx: torch.Tensor | None = None) -> "W8A8Linear":
        w = w.detach().float()
        n_out = 0 if outlier_idx is None else int(outlier_idx.numel())
        m = cls(w.shape[1], w.shape[0], bias=bias is not None, outliers=n_out)
        if n_out:
            m.outlier_idx.copy_(outlier_idx)
            m.outlier_weight.copy_(w[:, outlier_idx].half())
            w = w.clone()
            w[:, outlier_idx] = 0  # int8 part covers the regular columns only (its scale ignores outliers)
        q, s = quantize_rows(w)
        m.qweight.copy_(q)
        m.scales.copy_(s)
        if bias is not None:
            m.bias.data.copy_(bias.detach().float())
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.n_outliers:
            xo = x2[:, self.outlier_idx]
            x2 = x2.index_fill(1, self.outlier_idx, 0.0)
        y = int8_matmul(x2, self.qweight, self.scales, W8A8Linear.fast)
        if self.n_outliers:
            y = y + xo.float() @ self.outlier_weight.float().t()
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


# ---------------------------------------------------------------- SmoothQuant
@dataclass
class SmoothQuantConfig:
    alpha: float = 0.5  # migration strength: 0 = all difficulty on activations, 1 = all on weights

    def validate(self):
        if not 0 <= self.alpha <= 1:
            raise ValueError("alpha must be in [0, 1]")


def smoothing_groups(ctx: BlockContext) -> list[tuple[nn.Module, str, list[str]]]:
    """(module whose output feeds the linears, how to fold: 'norm' or 'rows', full names of the linears),
    from the layout: a MoE block's norm feeds the router and every expert, each expert's up_proj its
    own down_proj. Groups holding an already-replaced (quantized) layer are left out: no weight to fold."""
    pre, out = block_prefix(ctx.index), []
    for prev, how, rel in layout_of(ctx.model).smoothing(base_model(ctx.model).config, ctx.index):
        names = [pre + r for r in rel]
        if all(type(ctx.layer(n)) is nn.Linear for n in names):
            out.append((ctx.block.get_submodule(prev), how, names))
    return out


@torch.no_grad()
def fold_scales(prev: nn.Module, how: str, linears: list[nn.Linear], s: torch.Tensor):
    """x -> x / s before `linears` (folded into prev), W -> W * s: the block computes the same function."""
    if how == "norm":
        prev.weight.div_(s.to(prev.weight.dtype))
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


# ---------------------------------------------------------------- LLM.int8()
@dataclass
class LLMInt8Config:
    threshold: float = 6.0  # activation magnitude that makes an input feature an outlier
    max_outlier_fraction: float = 0.05  # at most this fraction of a layer's input features stays in fp16

    def validate(self):
        if self.threshold <= 0:
            raise ValueError("threshold must be > 0")
        if not 0 <= self.max_outlier_fraction <= 1:
            raise ValueError("max_outlier_fraction must be in [0, 1]")


def llmint8_init(layer: nn.Linear, cfg) -> dict:
    return {"absmax": torch.zeros(layer.in_features)}


def llmint8_accumulate(state: dict, x: torch.Tensor):
    state["absmax"] = torch.maximum(state["absmax"], x.abs().amax(0).float())


def llmint8_solve(state: dict, layer: nn.Linear, cfg: LLMInt8Config) -> W8A8Linear:
    a = state["absmax"]
    idx = torch.nonzero(a > cfg.threshold).flatten()
    cap = int(cfg.max_outlier_fraction * layer.in_features)
    if idx.numel() > cap:
        idx = torch.sort(torch.topk(a, cap).indices).values
    return W8A8Linear.from_weight(layer.weight, layer.bias, idx if idx.numel() else None)
