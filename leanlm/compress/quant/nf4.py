"""NF4 and FP4 (QLoRA, Dettmers et al., 2023): 4-bit codes into a fixed 16-value table times a block absmax.

NF4's table holds the quantiles of a standard normal (QLoRA's values); FP4 is the E2M1 float
grid {0, 0.5, 1, 1.5, 2, 3, 4, 6}/6 with sign. Blocks of `block_size` consecutive input columns
(the last block of a row may be shorter). Double quantization stores the block absmax values as
int8 in blocks of 256 with one fp32 scale each, after subtracting their mean (QLoRA's layout; its
8-bit codes are bitsandbytes' dynamic floats, ours are linear int8), ~0.127 bits per weight
saved at block 64. Inference dequantizes every forward through a byte lookup table: there is no
CPU kernel for table codes, so NF4 saves memory and disk, not time (decode is several times
slower than fp32 here; use the int4 grids for speed).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from leanlm.compress.quant.grid import expand_groups, pack, packed_width, unpack
from leanlm.io.modules import register_module_type

NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230731010437, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0]
_E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
FP4 = [v / 6 for v in _E2M1] + [-v / 6 for v in _E2M1]  # code 8 is -0, kept for a full 16-entry table
TABLES = {"nf4": NF4, "fp4": FP4}
DQ_BLOCK = 256


@dataclass
class NF4Config:
    dtype: str = "nf4"  # or "fp4"
    block_size: int = 64
    double_quant: bool = True

    def validate(self):
        if self.dtype not in TABLES:
            raise ValueError(f"dtype must be one of {', '.join(TABLES)}")
        if self.block_size < 8:
            raise ValueError("block_size must be >= 8")


def block_absmax_of(w: torch.Tensor, block: int) -> torch.Tensor:
    """Absmax of each block of `block` input columns: [N, G] fp32 (the last block may be shorter)."""
    N, K = w.shape
    absmax = torch.stack([w[:, s:s + block].abs().amax(1) for s in range(0, K, block)], 1).float()
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    return absmax


def _nearest(wn: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Code of the nearest table entry (ties to the lower value), as uint8. Counting the midpoints below
    each weight is 2x faster than bucketize here (15 midpoints), and the weights of a whole model pass
    through this when QLoRA quantizes on load."""
    vals, order = torch.sort(table)
    codes = torch.zeros(wn.shape, dtype=torch.uint8)
    for mid in ((vals[1:] + vals[:-1]) / 2).tolist():
        codes += wn > mid
    if not torch.equal(order, torch.arange(len(table))):  # unsorted table (FP4): map back to its codes
        codes = order.to(torch.uint8)[codes.long()]
    return codes


def double_quantize(absmax: torch.Tensor):
    flat = absmax.reshape(-1)
    mean = flat.mean()
    c = flat - mean
    pad = (-c.numel()) % DQ_BLOCK
    blocks = F.pad(c, (0, pad)).view(-1, DQ_BLOCK)
    scale = blocks.abs().amax(1).clamp_min(1e-12) / 127
    q = torch.clamp(torch.round(blocks / scale[:, None]), -127, 127).to(torch.int8)
    return q.reshape(-1)[: flat.numel()], scale, mean


def double_dequantize(q: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, shape) -> torch.Tensor:
    n = q.numel()
    pad = (-n) % DQ_BLOCK
    blocks = F.pad(q.float(), (0, pad)).view(-1, DQ_BLOCK) * scale[:, None]
    return (blocks.reshape(-1)[:n] + mean).reshape(shape)


@register_module_type
class NF4Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, dtype: str = "nf4", block_size: int = 64,
                 double_quant: bool = True, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.dtype, self.block_size, self.double_quant = dtype, min(block_size, in_features), double_quant
        G = -(-in_features // self.block_size)
        self.register_buffer("qweight", torch.zeros(out_features, packed_width(in_features, 4), dtype=torch.uint8))
        self.register_buffer("table", torch.tensor(TABLES[dtype], dtype=torch.float32))
        if double_quant:
            n = out_features * G
            self.register_buffer("absmax_q", torch.zeros(n, dtype=torch.int8))
            self.register_buffer("absmax_scale", torch.ones(-(-n // DQ_BLOCK), dtype=torch.float32))
            self.register_buffer("absmax_mean", torch.zeros((), dtype=torch.float32))
        else:
            self.register_buffer("absmax", torch.ones(out_features, G, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    def config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "dtype": self.dtype,
                "block_size": self.block_size, "double_quant": self.double_quant, "bias": self.bias is not None}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}, "
                f"block_size={self.block_size}, double_quant={self.double_quant}")

    @classmethod
    def from_linear(cls, layer: nn.Linear, cfg: NF4Config) -> "NF4Linear":
        return cls.from_weight(layer.weight, layer.bias, cfg)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, cfg: NF4Config) -> "NF4Linear":
        """Quantize a dense [out, in] weight (QLoRA quantizes each weight as the loader reads it)."""
        N, K = weight.shape
        m = cls(K, N, cfg.dtype, cfg.block_size, cfg.double_quant, bias=bias is not None)
        m.requantize(weight)
        if bias is not None:
            m.bias.data.copy_(bias.detach().float())
        return m

    def requantize(self, weight: torch.Tensor) -> None:
        """Quantize `weight` into this module's codes and scales, in place (merging an adapter into the
        quantized base: dequantize, add, requantize; the rounding error is the caller's to report)."""
        w = weight.detach().float()
        K = self.in_features
        absmax = block_absmax_of(w, self.block_size)
        if self.double_quant:
            q, scale, mean = double_quantize(absmax)
            self.absmax_q.copy_(q)
            self.absmax_scale.copy_(scale)
            self.absmax_mean.copy_(mean)
            absmax = double_dequantize(q, scale, mean, absmax.shape).clamp_min(1e-12)
        else:
            self.absmax.copy_(absmax)
        # codes against the absmax the model will actually use (after double quantization)
        wn = (w / expand_groups(absmax, self.block_size, K)).clamp(-1, 1)
        self.qweight.copy_(pack(_nearest(wn, self.table), 4))
        self._cache = None

    def block_absmax(self) -> torch.Tensor:
        G = -(-self.in_features // self.block_size)
        if self.double_quant:
            return double_dequantize(self.absmax_q, self.absmax_scale, self.absmax_mean,
                                     (self.out_features, G)).clamp_min(1e-12)
        return self.absmax

    def dequantized_weight(self) -> torch.Tensor:
        codes = unpack(self.qweight, 4, self.in_features).long()
        return self.table[codes] * expand_groups(self.block_absmax(), self.block_size, self.in_features)

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache = None
        super()._load_from_state_dict(*args, **kwargs)

    def _fast_weight(self) -> torch.Tensor:
        """Same values as dequantized_weight(), cheaper per call: one gather through a 256-entry byte table
        (two codes per byte) and the block absmax kept decoded (it is tiny)."""
        cache = getattr(self, "_cache", None)
        if cache is None or cache[0] is not self.qweight:
            lut = torch.stack([self.table[torch.arange(256) & 15], self.table[torch.arange(256) >> 4]], -1)
            cache = (self.qweight, lut, self.block_absmax().float())
            self._cache = cache
        _, lut, absmax = cache
        N, K, bs = self.out_features, self.in_features, self.block_size
        w = lut.index_select(0, self.qweight.view(-1).long()).view(N, -1)  # [N, 2 * bytes]; 3x faster than lut[q]
        G = absmax.shape[1]
        if w.shape[1] < G * bs:
            w = F.pad(w, (0, G * bs - w.shape[1]))
        w = w[:, : G * bs].view(N, G, bs).mul_(absmax[:, :, None])
        return w.view(N, -1)[:, :K]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight (what LoRA adds its update to)."""
        return self._fast_weight().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if torch.is_grad_enabled() and x.requires_grad:  # training through a frozen base (QLoRA)
            y = _RecomputedMatmul.apply(x, self)
            return y if bias is None else y + bias.to(y.dtype)
        return F.linear(x, self._fast_weight().to(x.dtype), bias)


class _RecomputedMatmul(torch.autograd.Function):
    """x @ W^T where backward dequantizes W again instead of saving the dense weight: between forward
    and backward only the 4-bit codes stay resident (QLoRA's memory saving)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return F.linear(x, layer._fast_weight().to(x.dtype))

    @staticmethod
    def backward(ctx, g):
        return g @ ctx.layer._fast_weight().to(g.dtype), None


def nf4_solve(state, layer: nn.Linear, cfg: NF4Config) -> NF4Linear:
    return NF4Linear.from_linear(layer, cfg)
