"""RTN: round-to-nearest weight quantization of one Linear (or, at 8 bits, an Embedding), no data needed.

Each group of `group_size` input weights of a row gets its own scale (and zero point when asymmetric);
exact zeros of an earlier pruning step stay exactly zero (`keep_zeros`, see grid.pruned_mask).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from leanlm.compress.quant.grid import pruned_mask, rtn_quantize
from leanlm.compress.quant.qlinear import QuantLinear


@dataclass
class RTNConfig:
    bits: int = 4
    group_size: int = 128  # <= 0: one group per output channel
    sym: bool = True
    keep_zeros: bool = True  # exact zeros (an earlier step's pruning mask) stay exactly zero

    def validate(self):
        if not 2 <= self.bits <= 8:
            raise ValueError("bits must be between 2 and 8")
        if self.group_size > 0 and self.group_size < 8:
            raise ValueError("group_size must be >= 8 (or <= 0 for per-channel)")


def rtn_solve(state, layer: nn.Linear, cfg: RTNConfig) -> nn.Module:
    if isinstance(layer, nn.Embedding):
        from leanlm.compress.quant.embedding import QuantEmbedding

        return QuantEmbedding.from_embedding(layer)  # bits == 8, checked when the recipe is resolved
    w = layer.weight.detach()
    codes, s, o = rtn_quantize(w, cfg.bits, cfg.group_size, cfg.sym, pruned_mask(w, cfg.keep_zeros))
    return QuantLinear.from_codes(codes, s, o, cfg.bits, cfg.group_size, cfg.sym, bias=layer.bias)
