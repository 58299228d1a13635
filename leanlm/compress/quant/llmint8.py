"""LLM.int8() (Dettmers et al., 2022): int8 weights and activations with outlier features kept apart.

Input features whose calibration activations exceed `threshold` in magnitude are kept in high precision (their weight columns in fp16, an fp matmul); the rest goes through int8.
The outlier set is found on calibration data (static), where bitsandbytes detects it per batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from leanlm.compress.quant.int8 import W8A8Linear


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
