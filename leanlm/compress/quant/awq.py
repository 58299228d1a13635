"""AWQ (Lin et al., 2024): activation-aware per-channel scaling, then a weight clipping search, then RTN.

For each group of linears that read the same input (the family's layout lists them: q/k/v after the
attention norm, the MLP's gate/up after its norm, the down projection after the up projection),
search s = mean|X|^r over a grid of r in [0, 1), normalised so sqrt(max*min) = 1, minimising the
group's output error ||X W^T - (X/s) Q(W s)^T||; the best s is folded into the preceding op (exact
in full precision). The attention output keeps s = 1 (with grouped-query attention its inputs do
not map onto the value rows).
Then each layer searches, per output row and group, the clipping ratio of the group's range that
minimises that group's contribution to the output error, and is quantized by RTN on the clipped
weights. Error is measured on the layer outputs (a subsample of `max_tokens` calibration tokens).
Pruned weights (exact zeros, `keep_zeros`) stay exactly zero: scaling and clipping map 0 to 0, and
the grids hold 0 exactly (grid.grid_params).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from leanlm.compress.calibrate import BlockContext
from leanlm.compress.quant.grid import dequantize, pruned_mask, rtn_quantize
from leanlm.compress.quant.qlinear import QuantLinear
from leanlm.compress.quant.rtn import RTNConfig
from leanlm.compress.quant.smoothquant import fold_scales, smoothing_groups


@dataclass
class AWQConfig(RTNConfig):
    grid: int = 20  # scale exponents tried: 0, 1/grid, ..., (grid-1)/grid
    clip: bool = True
    clip_grid: int = 10  # clip ratios tried: 1, 1 - 0.5/clip_grid, ..., 0.55
    max_tokens: int = 512  # calibration tokens per block used by the searches (subsampled evenly; CPU budget)

    def validate(self):
        super().validate()
        if self.grid < 1 or self.clip_grid < 1 or self.max_tokens < 16:
            raise ValueError("grid and clip_grid must be >= 1, max_tokens >= 16")


def fake_quant(w: torch.Tensor, cfg: RTNConfig) -> torch.Tensor:
    g = cfg.group_size if cfg.group_size > 0 else w.shape[1]
    codes, s, o = rtn_quantize(w, cfg.bits, g, cfg.sym, pruned_mask(w, cfg.keep_zeros))
    return dequantize(codes, s, o, g)


@torch.no_grad()
def search_scale(x: torch.Tensor, weights: list[torch.Tensor], cfg: AWQConfig) -> torch.Tensor:
    W = torch.cat([w.float() for w in weights])
    x = x.float()
    ref = x @ W.t()
    x_mean = x.abs().mean(0).clamp_min(1e-6)
    best, best_s = float("inf"), torch.ones_like(x_mean)
    for i in range(cfg.grid):
        r = i / cfg.grid
        s = x_mean.pow(r)
        s = s / (s.max() * s.min()).sqrt()
        Wq = fake_quant(W * s, cfg) / s
        err = (x @ Wq.t() - ref).pow(2).mean().item()
        if err < best:
            best, best_s = err, s
    return best_s


@torch.no_grad()
def clip_weight(w: torch.Tensor, x: torch.Tensor, cfg: AWQConfig) -> torch.Tensor:
    """Per (row, group): shrink the group's [min, max] by the ratio with the least output error, clamp."""
    w, x = w.float(), x.float()
    N, K = w.shape
    g = cfg.group_size if 0 < cfg.group_size < K else K
    out = w.clone()
    for s0 in range(0, K, g):
        wg, xg = w[:, s0:s0 + g], x[:, s0:s0 + g]
        ref = xg @ wg.t()
        lo, hi = wg.amin(1, keepdim=True), wg.amax(1, keepdim=True)
        if cfg.sym:
            hi = torch.maximum(hi.abs(), lo.abs())
            lo = -hi
        best_err = torch.full((N,), float("inf"))
        best = wg
        for i in range(cfg.clip_grid):
            r = 1 - 0.5 * i / cfg.clip_grid
            wc = torch.clamp(wg, lo * r, hi * r)
            q = fake_quant(wc, RTNConfig(cfg.bits, -1, cfg.sym, cfg.keep_zeros))
            err = (xg @ q.t() - ref).pow(2).mean(0)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better[:, None], wc, best)
        out[:, s0:s0 + g] = best
    return out


@torch.no_grad()
def awq_block(ctx: BlockContext, cfg: AWQConfig):
    targets = set(ctx.modules)
    groups = [g for g in smoothing_groups(ctx) if targets.intersection(g[2])]
    # every linear of a touched group is captured: in a MoE block the router sees all the norm's tokens,
    # an expert only those routed to it (possibly none)
    X = {n: v.float() for n, v in ctx.capture(sorted(targets.union(*[g[2] for g in groups])),
                                               max_tokens=cfg.max_tokens).items()}
    for prev, how, names in groups:
        x = max((X[n] for n in names), key=len)
        if not len(x):
            continue  # no calibration token reached this group (an unused expert): no scaling
        lins = [ctx.layer(n) for n in names]
        s = search_scale(x, [lin.weight for lin in lins], cfg)
        fold_scales(prev, how, lins, s)
        for n in names:
            X[n] = X[n] / s
    for n in ctx.modules:
        lin = ctx.layer(n)
        # no token (an unused expert): plain RTN, nothing to measure a clipping error on
        w = clip_weight(lin.weight, X[n], cfg) if cfg.clip and len(X[n]) else lin.weight
        codes, sc, off = rtn_quantize(w, cfg.bits, cfg.group_size, cfg.sym, pruned_mask(w, cfg.keep_zeros))
        ctx.replace(n, QuantLinear.from_codes(codes, sc, off, cfg.bits, cfg.group_size, cfg.sym, bias=lin.bias))
