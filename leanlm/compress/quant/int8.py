"""The int8 matmul and linear shared by SmoothQuant W8A8 (smoothquant.py) and LLM.int8() (llmint8.py).

Both run `torch._int_mm` (int8 x int8 -> int32) with int8 weights per output channel and
activations quantized per token at run time (dynamic absmax / 127); `_int_mm` needs more than 16
rows, so shorter inputs (decode) are zero-padded to 17 rows.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from leanlm.io.modules import register_module_type


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


@register_module_type
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
