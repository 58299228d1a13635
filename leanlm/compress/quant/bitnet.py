"""BitNet b1.58: ternary weights {-1, 0, +1} times an absmean scale, 8-bit activations per token.

The quantizers are those of "The Era of 1-bit LLMs" (Ma et al., 2024) and its training-tips code:
    weights:      gamma = mean(|W|) (clamped to >= 1e-5); W_t = clamp(round(W / gamma), -1, 1); W ~ W_t * gamma
    activations:  a = 127 / max(|x|) per token (max clamped to >= 1e-5); x_q = clamp(round(x * a), -128, 127);
                  x ~ x_q / a
gamma is one scale per tensor (the paper's choice, `per_row: false`) or one per output row (`per_row: true`,
which keeps more of a pretrained model when converting it without training).

`bitnet158` (recipe step and recipe name) converts each target Linear to a packed `BitLinear`:
- storage: the ternary codes (t + 1, in 0..2) four to a byte (grid.pack at 2 bits) and gamma in fp32, so a
  576 x 1536 layer takes 221 KB on disk instead of 3.5 MB in fp32;
- forward: per-token int8 activations times the ternary matrix. The integer products are exact in fp32
  (|sum| <= 127 * K < 2**24 for K < 132k), so the reference path (`BitLinear.fast = False`, and every input
  of >= PREFILL_ROWS rows) computes (x_q @ W_t^T) / a * gamma exactly. At decode (fewer rows) the codes run
  through PyTorch's packed 4-bit CPU kernel (`_weight_int4pack_mm_for_cpu`, the 4-bit QuantLinear's
  kernel) as t + 8 with scale 1 and zero 0, fed the integer-valued x_q in bf16 (exact): its bf16 output
  rounds the integer sums (relative error <= 2**-9) before the fp32 rescale.
- training: `begin_latent(init)` gives the layer a float latent weight that is fake-quantized at every
  forward with the straight-through estimator (weights and activations: the gradient passes through the
  rounding unchanged); `end_latent()` packs it back. The `distill` recipe step does this for every BitLinear
  (leanlm/compress/recover.py), so `bitnet158+distill` converts, then recovers from the full-precision model
  by quantization-aware distillation, starting from the original float weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from leanlm.compress.quant.grid import pack, packed_width, unpack
from leanlm.io.modules import register_module_type

EPS = 1e-5
PREFILL_ROWS = 128
KERNEL_GROUPS = (256, 128, 64, 32)


@dataclass
class BitNetConfig:
    per_row: bool = False  # one absmean scale per output row instead of one per tensor

    def validate(self):
        pass


# ---- quantizers (the b1.58 formulas) ----

def weight_scale(w: torch.Tensor, per_row: bool) -> torch.Tensor:
    """gamma: mean |w| per tensor ([1]) or per output row ([N]), fp32, >= EPS."""
    a = w.detach().float().abs()
    return (a.mean(dim=1) if per_row else a.mean().reshape(1)).clamp(min=EPS)


def ternarize(w: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (codes int8 [N, K] in {-1, 0, 1}, gamma fp32 [N] or [1]) with w ~ codes * gamma."""
    g = weight_scale(w, per_row)
    t = torch.clamp(torch.round(w.detach().float() / g[:, None]), -1, 1)
    return t.to(torch.int8), g


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token (last dim): -> (integer-valued fp32 x_q in [-128, 127], a fp32 [..., 1]) with x ~ x_q / a."""
    xf = x.float()
    amax = torch.linalg.vector_norm(xf, float("inf"), dim=-1, keepdim=True)  # max |x|, one op (decode)
    a = 127.0 / amax.clamp_(min=EPS)
    return torch.clamp(torch.round(xf * a), -128, 127), a


def fake_quant_weight(w: torch.Tensor, per_row: bool) -> torch.Tensor:
    """codes * gamma with the straight-through gradient (identity)."""
    with torch.no_grad():
        t, g = ternarize(w, per_row)
        wq = t.float() * g[:, None]
    return w + (wq.to(w.dtype) - w).detach()


def fake_quant_activations(x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        q, a = quantize_activations(x)
        xq = q / a
    return x + (xq.to(x.dtype) - x).detach()


def _kernel_group(k: int) -> int:
    return next((kg for kg in KERNEL_GROUPS if k % kg == 0), 32)


def _int4_kernel(t: torch.Tensor):
    """Ternary codes [N, K] -> (packed int4 weight, kernel group, scales/zeros, padded width)."""
    N, K = t.shape
    kg = _kernel_group(K)
    Kp, Np = -(-K // kg) * kg, -(-N // 16) * 16
    codes = F.pad(t.to(torch.int32) + 8, (0, Kp - K, 0, Np - N), value=8)  # code 8 is 0
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 2)
    sz = torch.stack([torch.ones(Kp // kg, Np), torch.zeros(Kp // kg, Np)], -1).to(torch.bfloat16).contiguous()
    return packed, kg, sz, Kp


@register_module_type
class BitLinear(nn.Module):
    """A ternary Linear with 8-bit activations (BitNet b1.58), stored as 2-bit codes; see the module doc."""

    fast = True  # class-wide switch; tests flip it to compare the fast path with the exact reference

    def __init__(self, in_features: int, out_features: int, per_row: bool = False, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.per_row = in_features, out_features, per_row
        self.register_buffer("qweight", torch.full((out_features, packed_width(in_features, 2)), 0x55,
                                                   dtype=torch.uint8))  # codes 1: ternary 0
        self.register_buffer("scale", torch.ones(out_features if per_row else 1, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.latent = None  # float weight while training (begin_latent / end_latent)
        self._kernel = None

    @classmethod
    def from_weight(cls, w: torch.Tensor, per_row: bool = False, bias=None) -> "BitLinear":
        N, K = w.shape
        m = cls(K, N, per_row, bias=bias is not None)
        m._set_codes(*ternarize(w, per_row))
        if bias is not None:
            m.bias.data.copy_(bias.detach().float())
        return m

    def _set_codes(self, t: torch.Tensor, g: torch.Tensor) -> None:
        # new tensors (not copies into the old ones): a fused kernel keyed on the old storage goes stale
        self.qweight = pack((t + 1).to(torch.uint8), 2)
        self.scale = g.float().clone()
        self._kernel = None

    def config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "per_row": self.per_row,
                "bias": self.bias is not None}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, per_row={self.per_row}, "
                f"latent={self.latent is not None}")

    def _load_from_state_dict(self, *args, **kwargs):
        self._kernel = None
        super()._load_from_state_dict(*args, **kwargs)

    def codes(self) -> torch.Tensor:
        """The ternary matrix, int8 [N, K] in {-1, 0, 1}."""
        return unpack(self.qweight, 2, self.in_features).to(torch.int8) - 1

    def dequantized_weight(self) -> torch.Tensor:
        return self.codes().float() * self.scale[:, None]

    # ---- training through a float latent weight ----
    def latent_init(self, candidate: torch.Tensor | None = None) -> torch.Tensor:
        """A float weight that quantizes to exactly this layer's codes and scale: `candidate` (the float
        weight it was converted from) when it does, else codes * gamma / (share of nonzero codes), whose
        absmean is gamma again."""
        t = self.codes()
        if candidate is not None and tuple(candidate.shape) == tuple(t.shape):
            ct, cg = ternarize(candidate, self.per_row)
            if torch.equal(ct, t) and torch.equal(cg, self.scale):
                return candidate.detach().float().clone()
        nz = (t != 0).float()
        share = (nz.mean(dim=1) if self.per_row else nz.mean().reshape(1)).clamp(min=1.0 / t.shape[1])
        return t.float() * (self.scale / share)[:, None]

    def begin_latent(self, init: torch.Tensor | None = None) -> nn.Parameter:
        self.latent = nn.Parameter(self.latent_init(init))
        self.qweight = self.qweight.clone()  # a fused packed kernel of these codes goes stale
        self._kernel = None
        return self.latent

    def end_latent(self) -> None:
        w = self.latent.detach()
        self.latent = None
        self._set_codes(*ternarize(w, self.per_row))

    # ---- forward ----
    @classmethod
    def fused(cls, mods: tuple) -> "_FusedBitLinear | None":
        """One kernel for layers reading the same input (q/k/v, gate/up): per-token activation scales are
        shared, each output column keeps its layer's gamma."""
        a = mods[0]
        if any(type(m) is not cls or m.in_features != a.in_features or m.bias is not None or m.latent is not None
               for m in mods):
            return None
        t = torch.cat([m.codes() for m in mods])
        g = torch.cat([m.scale.expand(m.out_features) for m in mods])
        return _FusedBitLinear(_int4_kernel(t), g, a.in_features, t.shape[0], list(mods))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.latent is not None:
            w = fake_quant_weight(self.latent, self.per_row)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(fake_quant_activations(x), w.to(x.dtype), bias)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if BitLinear.fast and x2.shape[0] < PREFILL_ROWS:
            if self._kernel is None:
                self._kernel = _int4_kernel(self.codes())
            y = _run_kernel(self._kernel, x2, self.scale, self.in_features, self.out_features)
        else:
            q, a = quantize_activations(x2)
            y = F.linear(q, self.codes().float()) * (self.scale / a)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


def _run_kernel(kernel, x2: torch.Tensor, g: torch.Tensor, K: int, N: int) -> torch.Tensor:
    packed, kg, sz, Kp = kernel
    q, a = quantize_activations(x2)
    qb = q.to(torch.bfloat16)  # integers in [-128, 127]: exact in bf16
    if Kp != K:
        qb = F.pad(qb, (0, Kp - K))
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(qb, packed, kg, sz)
    return y[:, :N] * (g / a)  # bf16 * fp32 -> fp32


class _FusedBitLinear:
    def __init__(self, kernel, g, K, N, parts):
        self.kernel, self.g, self.K, self.N, self._parts = kernel, g, K, N, parts

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if not BitLinear.fast or x2.shape[0] >= PREFILL_ROWS:
            return torch.cat([m(x) for m in self._parts], -1)
        return _run_kernel(self.kernel, x2, self.g, self.K, self.N).to(x.dtype).reshape(*shape[:-1], self.N)


def bitnet_solve(state, layer: nn.Linear, cfg: BitNetConfig) -> nn.Module:
    return BitLinear.from_weight(layer.weight, cfg.per_row, bias=layer.bias)


def bitnet_training(model, per_row: bool = False) -> list[str]:
    """From-scratch BitNet: every decoder linear (MoE routers excepted) becomes a BitLinear training its current
    float weight as the latent weight (fake-quantized, straight-through), so any training loop trains a
    b1.58 model; `pack_bitnet(model)` afterwards stores it packed. Returns the converted names."""
    from leanlm.model.layout import all_block_linears
    from leanlm.model.surgery import replace_module

    routers = set(all_block_linears(model, "router"))
    names = [n for n in all_block_linears(model) if n not in routers]
    for n in names:
        lin = model.get_submodule(n)
        m = BitLinear.from_weight(lin.weight, per_row, bias=lin.bias)
        m.begin_latent(lin.weight)
        if m.bias is not None:
            m.bias.requires_grad_(True)
        replace_module(model, n, m)
    return names


def pack_bitnet(model) -> int:
    """Pack every BitLinear still training a latent weight; returns how many."""
    live = [m for m in model.modules() if isinstance(m, BitLinear) and m.latent is not None]
    for m in live:
        m.end_latent()
        if m.bias is not None:
            m.bias.requires_grad_(False)
    return len(live)
