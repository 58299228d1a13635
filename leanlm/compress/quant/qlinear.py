"""QuantLinear: a Linear whose weight is stored as packed 2-8 bit codes plus per-group scales.

Fast paths (PyTorch's own CPU kernels), chosen at the first forward:
- bits <= 4: `aten._weight_int4pack_mm_for_cpu` in bf16. That kernel computes
  (q4 - 8) * scale + zero per group for group sizes 32/64/128/256 dividing the width, so the
  width is zero-padded to a multiple of the kernel group (padding codes dequantize to exactly 0),
  our groups are split into kernel groups that repeat their scale (any group size that is a
  multiple of 32, including per-channel on widths that are multiples of 32), and 2/3-bit codes
  ride in the 4-bit kernel with the offset folded into its zero. Measured on this machine it is
  ~2x faster than an fp32 matvec at batch 1, but only in bf16 (its fp32 variant is 10x slower).
- 8 bits, symmetric, per-channel: `aten._weight_int8pack_mm` in bf16.
- otherwise (and with `QuantLinear.fast = False`): dequantize to fp32 and F.linear; the tests
  use that path as the reference for the fast ones.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from leanlm.compress.quant.grid import dequantize, pack, packed_width, unpack
from leanlm.io.modules import register_module_type

KERNEL_GROUPS = (256, 128, 64, 32)
PREFILL_ROWS = 128


@register_module_type
class QuantLinear(nn.Module):
    fast = True  # class-wide switch; tests flip it to compare the fast path with the reference

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, sym: bool,
                 bias: bool = False):
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {bits}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.sym = bits, sym
        self.group_size = group_size if 0 < group_size < in_features else in_features
        G = -(-in_features // self.group_size)
        self.register_buffer("qweight", torch.zeros(out_features, packed_width(in_features, bits), dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, G, dtype=torch.float16))
        if not sym:
            self.register_buffer("offsets", torch.zeros(out_features, G, dtype=torch.float16))
        else:
            self.offsets = None
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self._kernel = None  # built lazily from the stored tensors
        self._parts = None  # set on a fused copy (see fused)

    # ---- construction ----
    @classmethod
    def from_codes(cls, codes, scales, offsets, bits, group_size, sym, bias=None) -> "QuantLinear":
        N, K = codes.shape
        m = cls(K, N, bits, group_size, sym, bias=bias is not None)
        m.qweight.copy_(pack(codes, bits))
        m.scales.copy_(scales.half())
        if not sym:
            m.offsets.copy_(offsets.half())
        if bias is not None:
            m.bias.data.copy_(bias.detach().float())
        return m

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, sym={self.sym}, path={self.path()}")

    def config(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "sym": self.sym, "bias": self.bias is not None,
                "in_features": self.in_features, "out_features": self.out_features}

    def _load_from_state_dict(self, *args, **kwargs):
        self._kernel = None
        super()._load_from_state_dict(*args, **kwargs)

    # ---- reference ----
    def codes(self) -> torch.Tensor:
        return unpack(self.qweight, self.bits, self.in_features)

    def offset_values(self) -> torch.Tensor:
        if self.sym:
            return -(2 ** (self.bits - 1)) * self.scales.float()
        return self.offsets.float()

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize(self.codes(), self.scales.float(), self.offset_values(), self.group_size)

    # ---- fast paths ----
    def path(self) -> str:
        if self.bits <= 4 and self._kernel_group() is not None:
            return "int4pack"
        if self.bits == 8 and self.sym and self.group_size == self.in_features:
            return "int8pack"
        return "dequant"

    def _kernel_group(self) -> int | None:
        # Prefer a kernel group that also divides the width: no zero-padding of x or the codes at every
        # call (576 = 4.5 x 128, so a g128 layer runs as kernel groups of 64 that repeat each scale twice).
        fits = [kg for kg in KERNEL_GROUPS if self.group_size % kg == 0]
        exact = [kg for kg in fits if self.in_features % kg == 0]
        return (exact or fits or [None])[0]

    @classmethod
    def fused(cls, mods: tuple) -> "QuantLinear | None":
        """One QuantLinear computing the given layers' outputs concatenated (q/k/v, gate/up), or None when
        they differ in format. Rows are independent in the kernels, so the outputs equal the separate
        layers'. The fused copy keeps only its packed kernel (the layers keep the saved codes)."""
        a = mods[0]
        if any(type(m) is not cls or m.config() | {"out_features": 0} != a.config() | {"out_features": 0}
               for m in mods) or a.path() != "int4pack" or a.bias is not None:
            return None
        n = sum(m.out_features for m in mods)
        f = cls(a.in_features, n, a.bits, a.group_size, a.sym)
        f.qweight = torch.cat([m.qweight for m in mods])
        f.scales = torch.cat([m.scales for m in mods])
        if not a.sym:
            f.offsets = torch.cat([m.offsets for m in mods])
        f._build_kernel()
        f.qweight = f.qweight[:0]  # the kernel holds the weights now
        f._parts = list(mods)  # a list: not registered, not saved; the reference path runs them one by one
        return f

    def _build_kernel(self):
        path = self.path()
        if path == "int4pack":
            kg = self._kernel_group()
            K, N = self.in_features, self.out_features
            Kp = -(-K // kg) * kg
            Np = -(-N // 16) * 16  # the packer wants rows in tiles of 16
            # Center 2/3-bit codes on the kernel's 8 so its bf16 zero stays small (no cancellation).
            half = 2 ** (self.bits - 1)
            codes = self.codes().to(torch.int32) + (8 - half)
            # padding codes 8 with zero 0 dequantize to exactly 0
            codes = F.pad(codes, (0, Kp - K, 0, Np - N), value=8)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 2)
            s = self.scales.float()
            zero = self.offset_values() + half * s  # (q + 8 - half - 8) * s + zero == q * s + offset
            col_group = torch.clamp(torch.arange(0, Kp, kg) // self.group_size, max=s.shape[1] - 1)
            pad_cols = torch.arange(0, Kp, kg) >= K
            s_k, z_k = s[:, col_group], zero[:, col_group]
            z_k[:, pad_cols] = 0
            s_k, z_k = F.pad(s_k, (0, 0, 0, Np - N), value=1.0), F.pad(z_k, (0, 0, 0, Np - N))
            sz = torch.stack([s_k, z_k], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
            self._kernel = ("int4pack", packed, kg, sz, Kp)
        elif path == "int8pack":
            q = (self.codes().to(torch.int16) - 128).to(torch.int8)
            self._kernel = ("int8pack", q.contiguous(), self.scales.to(torch.bfloat16)[:, 0].contiguous())
        else:
            self._kernel = ("dequant",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        many = x2.shape[0] >= PREFILL_ROWS
        if self._parts is not None and (many or not QuantLinear.fast):
            return torch.cat([m(x) for m in self._parts], -1)  # a fused copy keeps no codes of its own
        if not QuantLinear.fast:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.dequantized_weight().to(x.dtype), bias)
        if self._kernel is None:
            self._build_kernel()
        k = self._kernel
        if many and k[0] != "dequant":
            # many rows (prefill, perplexity, calibration): dequantize once and run the fp32 GEMM, which
            # is no slower than the bf16 kernels there and exact in fp32; the kernels win at decode
            k = ("dequant",)
        if k[0] == "int4pack":
            _, packed, kg, sz, Kp = k
            xb = x2.to(torch.bfloat16)
            if Kp != self.in_features:
                xb = F.pad(xb, (0, Kp - self.in_features))
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb.contiguous(), packed, kg, sz).to(x.dtype)
            if y.shape[1] != self.out_features:
                y = y[:, : self.out_features]
        elif k[0] == "int8pack":
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), k[1], k[2]).to(x.dtype)
        else:
            y = F.linear(x2, self.dequantized_weight().to(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)
