"""QLoRA: LoRA over frozen NF4 base weights with double-quantized scales, and LoftQ initialisation.

NF4Linear stores 4-bit NormalFloat codes (QLoRA's 16 quantiles of N(0, 1)), two per byte, with one
absmax per block of 64 weights; the absmaxes are themselves quantized to int8 in blocks of 256 around
their mean (double quantization: ~0.13 bits per weight of scale overhead instead of 0.5). The matmul
dequantizes on the fly and backward dequantizes again instead of saving the dense weight, so only
the packed codes stay resident. (If leanlm.compress.quant grows its own NF4 module, this one should
become a thin import of it; the layout here matches QLoRA's.)
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from leanlm.errors import LeanLMError
from leanlm.peft.lora import LoraConfig, LoraLinear, freeze_base, replace_module, target_names

NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])
BLOCK, BLOCK2 = 64, 256


def nf4_quantize(w: torch.Tensor):
    """w [out, in] -> (packed uint8 codes, int8 absmax codes, fp32 absmax scales, fp32 absmax mean)."""
    flat = w.detach().float().reshape(-1)
    pad = (-flat.numel()) % BLOCK
    flat = F.pad(flat, (0, pad))
    blocks = flat.view(-1, BLOCK)
    absmax = blocks.abs().amax(1).clamp_min(1e-12)
    # double quantization of the absmaxes: int8 around their mean, one fp32 scale per 256
    mean = absmax.mean()
    c = absmax - mean
    pad2 = (-c.numel()) % BLOCK2
    c2 = F.pad(c, (0, pad2)).view(-1, BLOCK2)
    s2 = (c2.abs().amax(1) / 127).clamp_min(1e-12)
    q2 = torch.round(c2 / s2[:, None]).clamp(-127, 127).to(torch.int8)
    absmax_dq = (q2.float() * s2[:, None]).reshape(-1)[:absmax.numel()] + mean
    # quantize against the scales the dequantizer will see
    norm = (blocks / absmax_dq[:, None]).clamp(-1, 1)
    mids = (NF4[1:] + NF4[:-1]) / 2
    codes = torch.bucketize(norm, mids).to(torch.uint8).reshape(-1)
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed, q2.reshape(-1), s2, mean


def nf4_dequantize(packed, q2, s2, mean, shape, dtype=torch.float32) -> torch.Tensor:
    codes = torch.stack([packed >> 4, packed & 15], 1).reshape(-1).long()
    absmax = (q2.view(-1, BLOCK2).float() * s2[:, None]).reshape(-1) + mean
    n = shape[0] * shape[1]
    vals = NF4[codes].view(-1, BLOCK) * absmax[: codes.numel() // BLOCK, None]
    return vals.reshape(-1)[:n].view(shape).to(dtype)


class _NF4Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, g):
        # recompute the dense weight rather than keeping it alive between forward and backward
        return g @ ctx.layer.dequantize(g.dtype), None


class NF4Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self._quantize(weight)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def _quantize(self, weight):
        packed, q2, s2, mean = nf4_quantize(weight)
        self.register_buffer("nf4_codes", packed)
        self.register_buffer("absmax_codes", q2)
        self.register_buffer("absmax_scales", s2)
        self.register_buffer("absmax_mean", mean.reshape(1))

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return nf4_dequantize(self.nf4_codes, self.absmax_codes, self.absmax_scales, self.absmax_mean[0],
                              (self.out_features, self.in_features), dtype)

    def requantize(self, weight: torch.Tensor) -> None:
        """Replace the weight (merging an adapter): quantize again; the rounding error is the caller's to report."""
        packed, q2, s2, mean = nf4_quantize(weight)
        self.nf4_codes, self.absmax_codes, self.absmax_scales = packed, q2, s2
        self.absmax_mean = mean.reshape(1)

    @property
    def weight(self):  # read-only dense view for code that inspects .weight (shape, dtype)
        return self.dequantize()

    def forward(self, x):
        if torch.is_grad_enabled() and x.requires_grad:
            y = _NF4Matmul.apply(x, self)
        else:
            y = F.linear(x, self.dequantize(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


def loftq_init(layer: LoraLinear, weight: torch.Tensor, iters: int = 1) -> None:
    """LoftQ: alternate NF4 quantization of W - s*B A and a rank-r SVD of the residual, so that
    dequant(Q) + s*B A starts close to W (plain QLoRA starts at dequant(Q), carrying the full error)."""
    s, r = layer.scaling, layer.r
    w = weight.detach().float()
    lowrank = torch.zeros_like(w)
    for _ in range(max(1, iters)):
        q = NF4Linear(w - lowrank)
        resid = w - q.dequantize()
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
    """Replace target nn.Linear modules by NF4Linear, in place."""
    names = target_names(model, targets)
    for name in names:
        lin = model.get_submodule(name)
        replace_module(model, name, NF4Linear(lin.weight.data, lin.bias.data if lin.bias is not None else None))
    return names


def apply_qlora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Quantize the target linears to NF4 (double-quantized scales), freeze them, add LoRA on top."""
    names = target_names(model, cfg.target_modules)
    if not names:
        raise LeanLMError(f"no module matches target_modules={cfg.target_modules!r}")
    freeze_base(model)
    for name in names:
        lin = model.get_submodule(name)
        if not isinstance(lin, nn.Linear):
            raise LeanLMError(f"{name} is already quantized ({type(lin).__name__}); QLoRA needs the float model")
        w = lin.weight.data
        layer = LoraLinear(NF4Linear(w, lin.bias.data if lin.bias is not None else None),
                           LoraConfig(**{**cfg.__dict__, "init": "kaiming" if cfg.init == "loftq" else cfg.init}))
        if cfg.init == "loftq":
            loftq_init(layer, w, cfg.loftq_iters)
        replace_module(model, name, layer)
        del lin, w
    _own_remaining(model)
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
    try:  # hand the freed float weights back to the OS (glibc keeps large freed heaps otherwise)
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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
