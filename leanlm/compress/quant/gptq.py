"""GPTQ (Frantar et al., 2022) as pure functions over one Linear layer (RTN, its baseline: rtn.py).

GPTQ quantizes columns one at a time and spreads each column's rounding error over the columns
not yet quantized, weighted by the inverse Hessian H = 2 X^T X / n of the layer's inputs
(Cholesky form, lazy block updates of `block_size` columns). Options follow the reference:
dampening (fraction of the mean diagonal added to H), act-order (columns by decreasing H
diagonal). With act-order, groups are *static*: each group's scale comes from the original
weights of its contiguous columns, so the stored layout is plain (no g_idx permutation at
inference, the same fast kernel). Without act-order a group's scale is computed from the
already-updated weights when the solver reaches its first column, like the reference.

Masks of earlier pruning steps are kept (`keep_zeros`, default on; a layer whose weights are at least
1% exact zeros counts as pruned, see grid.pruned_mask): weights that are exactly zero
stay exactly zero. They get the grid's zero code (0 is exact on the symmetric grid; an asymmetric
group holding one gets an integer zero point, grid.grid_params), and as in SparseGPT a pruned
weight's accumulated update is removed when the solver reaches its column, its error compensated in
the columns not yet quantized, so the compensation ends up only in the kept weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from leanlm.compress.quant.grid import grid_params, pruned_mask, quantize_codes
from leanlm.compress.quant.qlinear import QuantLinear
from leanlm.compress.quant.rtn import RTNConfig, rtn_solve


@dataclass
class GPTQConfig(RTNConfig):
    damp: float = 0.01
    act_order: bool = True
    block_size: int = 128

    def validate(self):
        super().validate()
        if not 0 <= self.damp < 1:
            raise ValueError("damp must be in [0, 1)")
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")


class HessianState:
    def __init__(self, k: int):
        self.H = torch.zeros(k, k, dtype=torch.float32)
        self.n = 0


def gptq_init(layer: nn.Linear, cfg) -> HessianState:
    return HessianState(layer.in_features)


def gptq_accumulate(state: HessianState, x: torch.Tensor):
    """Running mean of 2 x x^T over tokens (x: [tokens, in])."""
    x = x.float()
    m = x.shape[0]
    state.H *= state.n / (state.n + m)
    state.n += m
    x = x * (2 / state.n) ** 0.5
    state.H.addmm_(x.t(), x)


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, sym: bool, damp: float = 0.01,
                  act_order: bool = True, block_size: int = 128, keep_zeros: bool = True):
    """Core solver. W [N, K], H [K, K] (not modified). Returns codes [N, K], scales/offsets [N, G].

    keep_zeros: the weights that are exactly zero in W come out as codes that dequantize to exactly 0.
    """
    W = W.detach().float().clone()
    N, K = W.shape
    pruned = pruned_mask(W, keep_zeros)
    if pruned is None:
        pruned = torch.zeros(N, K, dtype=torch.bool)
    masked = bool(pruned.any())
    g = group_size if 0 < group_size < K else K
    G = -(-K // g)
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    static = act_order
    scales = torch.zeros(N, G)
    offsets = torch.zeros(N, G)
    if static:
        for j in range(G):
            scales[:, j], offsets[:, j] = grid_params(W[:, j * g:(j + 1) * g], bits, sym,
                                                      pruned[:, j * g:(j + 1) * g] if masked else None)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(K)
    W, H, pruned = W[:, perm], H[perm][:, perm], pruned[:, perm]
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    codes = torch.zeros(N, K)
    group_of = perm // g  # group of each (permuted) column in the original layout
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            gi = int(group_of[col])
            if not static and col % g == 0:
                # reached a new group: its grid comes from the weights updated so far
                rest = torch.cat([W1[:, i:], W[:, i2:]], 1)[:, : min(g, K - col)]
                scales[:, gi], offsets[:, gi] = grid_params(rest, bits, sym,
                                                            pruned[:, col:col + rest.shape[1]] if masked else None)
            w = W1[:, i]
            d = Hinv1[i, i]
            wq = w.masked_fill(pruned[:, col], 0.0) if masked else w  # a pruned weight goes back to 0
            q = quantize_codes(wq[:, None], scales[:, gi], offsets[:, gi], bits)[:, 0]
            codes[:, col] = q
            dq = q * scales[:, gi] + offsets[:, gi]
            err = (w - dq) / d
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    inv = torch.argsort(perm)
    return codes[:, inv].to(torch.uint8), scales, offsets


def gptq_solve(state: HessianState, layer: nn.Linear, cfg: GPTQConfig) -> QuantLinear:
    if state is None or state.n == 0:
        return rtn_solve(None, layer, cfg)
    codes, s, o = gptq_quantize(layer.weight, state.H, cfg.bits, cfg.group_size, cfg.sym, cfg.damp,
                                cfg.act_order, cfg.block_size, cfg.keep_zeros)
    return QuantLinear.from_codes(codes, s, o, cfg.bits, cfg.group_size, cfg.sym, bias=layer.bias)
