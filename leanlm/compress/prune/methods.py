"""Magnitude, Wanda and SparseGPT as pure functions over one linear layer.

Every method follows the calibration protocol of leanlm.compress.calibrate:
    state = init(layer, cfg); accumulate(state, inputs) per batch; solve(state, layer, cfg)
`solve` writes the pruned weight into layer.weight in place and returns None (SparseGPT with joint
quantization returns the packed QuantLinear that replaces the layer). Magnitude needs no statistics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from leanlm.compress.prune.masks import check_sparsity, nm_mask, parse_pattern, select_mask
from leanlm.errors import LeanLMError


@dataclass
class PruneConfig:
    """Shared by magnitude / wanda / sparsegpt recipe steps (each has its subclass below, naming the method)."""
    kind: ClassVar[str] = "wanda"
    needs_data: ClassVar[bool] = True
    sparsity: float = 0.5  # fraction of weights removed (ignored by N:M patterns, which fix it at N/M)
    pattern: str = "unstructured"  # or "N:M" meaning keep N of every M, e.g. "2:4"
    owl: bool = False  # outlier-weighted layerwise sparsity (unstructured only)
    owl_lambda: float = 0.08  # per-block sparsity varies within sparsity +- owl_lambda
    owl_m: float = 5.0  # outlier threshold: score above owl_m times the layer's mean score
    block_size: int = 128  # SparseGPT: columns per lazy-update block (mask chosen per block)
    dampening: float = 0.01  # SparseGPT: fraction of mean(diag(H)) added to the diagonal
    quant_bits: int | None = None  # SparseGPT: quantize jointly in the same pass (symmetric grid, paper 3.5)
    quant_group_size: int = 128
    targets: list[str] | None = None  # module name patterns; None = every linear in the blocks
    ignore: list[str] | None = None

    def __post_init__(self):
        check_sparsity(self.sparsity)
        parse_pattern(self.pattern)
        if self.owl and parse_pattern(self.pattern) is not None:
            raise LeanLMError("owl: outlier-weighted sparsity applies to unstructured pruning only; set pattern: unstructured")
        if self.quant_bits is not None and not 2 <= int(self.quant_bits) <= 8:
            raise LeanLMError(f"quant_bits {self.quant_bits}: expected 2..8 or null")


@dataclass
class MagnitudeConfig(PruneConfig):
    kind: ClassVar[str] = "magnitude"
    needs_data: ClassVar[bool] = False


@dataclass
class WandaConfig(PruneConfig):
    kind: ClassVar[str] = "wanda"


@dataclass
class SparseGPTConfig(PruneConfig):
    kind: ClassVar[str] = "sparsegpt"


def effective_sparsity(cfg: PruneConfig) -> float:
    nm = parse_pattern(cfg.pattern)
    return cfg.sparsity if nm is None else nm[0] / nm[1]


def _apply_mask(layer: nn.Linear, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        layer.weight.masked_fill_(mask, 0.0)
    return mask


# ---------------------------------------------------------------- magnitude
def magnitude_init(layer: nn.Linear, cfg: PruneConfig) -> dict:
    return {}


def magnitude_accumulate(state: dict, inputs: torch.Tensor) -> None:
    pass


def magnitude_solve(state: dict, layer: nn.Linear, cfg: PruneConfig, sparsity: float | None = None) -> None:
    s = cfg.sparsity if sparsity is None else sparsity
    _apply_mask(layer, select_mask(layer.weight.detach().abs().float(), s, cfg.pattern))


# ---------------------------------------------------------------- wanda
def wanda_init(layer: nn.Linear, cfg: PruneConfig) -> dict:
    return {"sq": torch.zeros(layer.in_features, dtype=torch.float64), "n": 0}


def wanda_accumulate(state: dict, inputs: torch.Tensor) -> None:
    x = inputs.detach().reshape(-1, inputs.shape[-1]).double()
    state["sq"] += x.pow(2).sum(0)
    state["n"] += x.shape[0]


def wanda_score(weight: torch.Tensor, state: dict) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 (the norm over every calibration token)."""
    return weight.detach().abs().double() * state["sq"].sqrt().unsqueeze(0)


def wanda_solve(state: dict, layer: nn.Linear, cfg: PruneConfig, sparsity: float | None = None) -> None:
    s = cfg.sparsity if sparsity is None else sparsity
    if state["n"] == 0:  # no token reached it (a MoE expert nothing was routed to): equal input norms
        return magnitude_solve(state, layer, cfg, s)
    _apply_mask(layer, select_mask(wanda_score(layer.weight, state), s, cfg.pattern))


# ---------------------------------------------------------------- sparsegpt
def sparsegpt_init(layer: nn.Linear, cfg: PruneConfig) -> dict:
    return {"H": torch.zeros(layer.in_features, layer.in_features, dtype=torch.float32), "n": 0}


def sparsegpt_accumulate(state: dict, inputs: torch.Tensor) -> None:
    x = inputs.detach().reshape(-1, inputs.shape[-1]).float()
    state["H"].addmm_(x.t(), x)
    state["n"] += x.shape[0]
    # Wanda's statistic is the Hessian's diagonal: OWL reads it from here too.


def hessian(state: dict) -> torch.Tensor:
    """H = 2 X^T X / n, the Hessian of the layer's squared output error."""
    return state["H"] * (2.0 / max(state["n"], 1))


def _inverse_cholesky(H: torch.Tensor, dampening: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 after dampening; retries with more damping if H is not PD."""
    mean_diag = torch.diag(H).mean()
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    for damp in (dampening, dampening * 10, dampening * 100, 1.0):
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                return U
    raise LeanLMError("sparsegpt: the calibration Hessian is not positive definite even with full dampening; use more calibration samples")


def sparsegpt_solve(state: dict, layer: nn.Linear, cfg: PruneConfig, sparsity: float | None = None):
    """SparseGPT (Frantar & Alistarh, 2023): OBS mask selection and weight update, lazy column blocks.

    Unstructured masks are chosen per block of `block_size` columns by w^2 / [H^-1]_jj^2 (exact count
    per block); N:M masks per group of M columns of each row. Weights that are already zero stay
    zero, so `sparsity: 0` with quant_bits is GPTQ (no act-order) that keeps an earlier step's mask. With quant_bits the kept weights are
    also rounded to the quantizer's symmetric grid (leanlm.compress.quant.grid, zero exactly
    representable) inside the same pass, so quantization error is compensated too, and a packed
    QuantLinear is returned; otherwise layer.weight is updated in place and None is returned.
    """
    s = cfg.sparsity if sparsity is None else sparsity
    nm = parse_pattern(cfg.pattern)
    prune_n, m = nm if nm is not None else (0, 0)
    W = layer.weight.detach().float().clone()
    rows, cols = W.shape
    if nm is not None and cols % m:
        raise LeanLMError(f"N:M sparsity with M={m} needs the input width ({cols}) divisible by {m}")
    pruned_before = W == 0  # masks of earlier steps stay applied (prune, then quantize with sparsity 0)
    # No token reached it (a MoE expert nothing was routed to): identity Hessian, i.e. magnitude pruning
    # (and plain rounding) with no error compensation, rather than zeroing every "dead" column.
    H = hessian(state).clone() if state["n"] else torch.eye(cols)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    Hinv = _inverse_cholesky(H, cfg.dampening)
    bs = cfg.block_size
    if nm is not None and bs % m:
        bs = max(m, bs // m * m)
    bits = cfg.quant_bits
    gs = cfg.quant_group_size if cfg.quant_group_size and 0 < cfg.quant_group_size < cols else cols
    if bits:
        from leanlm.compress.quant.grid import grid_params, quantize_codes
        scales = torch.zeros(rows, -(-cols // gs))
        offsets = torch.zeros_like(scales)
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)
        if nm is None:
            tmp = W1.pow(2) / d1.pow(2).unsqueeze(0)
            k = int(round(tmp.numel() * s))
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
            if k > 0:
                mask1.view(-1)[torch.topk(tmp.flatten(), k, largest=False).indices] = True
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if nm is not None and i % m == 0:
                tmp = W1[:, i:i + m].pow(2) / d1[i:i + m].pow(2).unsqueeze(0)
                mask1[:, i:i + m] = nm_mask(tmp, prune_n, m)
            mask1[:, i] |= pruned_before[:, i1 + i]
            q = w.clone()
            q[mask1[:, i]] = 0.0
            if bits:
                col, gi = i1 + i, (i1 + i) // gs
                if col % gs == 0:
                    # the group's grid from the weights as updated so far (intra-block updates included)
                    rest = torch.cat([W1[:, i:], W[:, i2:]], 1)[:, :gs]
                    scales[:, gi], offsets[:, gi] = grid_params(rest, bits, True)
                codes = quantize_codes(q[:, None], scales[:, gi], offsets[:, gi], bits)[:, 0]
                q = torch.where(mask1[:, i], q, codes * scales[:, gi] + offsets[:, gi])
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    mask |= dead.unsqueeze(0)
    W.masked_fill_(mask, 0.0)
    if bits:
        from leanlm.compress.quant.grid import expand_groups
        from leanlm.compress.quant.qlinear import QuantLinear
        # W sits on the grid (pruned zeros included: the symmetric grid holds 0 exactly), so this is exact
        codes = quantize_codes(W, expand_groups(scales, gs, cols), expand_groups(offsets, gs, cols), bits)
        return QuantLinear.from_codes(codes.to(torch.uint8), scales, offsets, bits, gs, True, bias=layer.bias)
    with torch.no_grad():
        layer.weight.copy_(W.to(layer.weight.dtype))
    return None


def layer_error(layer_weight: torch.Tensor, ref_weight: torch.Tensor, inputs: torch.Tensor) -> float:
    """Squared output error ||X W^T - X W_ref^T||^2 summed over tokens (the quantity OBS minimizes)."""
    x = inputs.reshape(-1, inputs.shape[-1]).float()
    return float((x @ (layer_weight.detach().float() - ref_weight.detach().float()).t()).pow(2).sum())


SOLVERS = {
    "magnitude": (magnitude_init, magnitude_accumulate, magnitude_solve),
    "wanda": (wanda_init, wanda_accumulate, wanda_solve),
    "sparsegpt": (sparsegpt_init, sparsegpt_accumulate, sparsegpt_solve),
}
