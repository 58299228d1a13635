"""Mask selection shared by every pruning method: which weights to drop given a score per weight.

A mask is a bool tensor shaped like the weight, True where the weight is *pruned* (set to zero).
Unstructured masks prune the same count in every output row (Wanda's per-output comparison group,
which both Wanda and magnitude use here); N:M masks prune N of every M consecutive input weights
of a row (2:4 keeps 2 of 4, the pattern sparse tensor cores and some CPU kernels accelerate).
"""
from __future__ import annotations

import re

import torch

from leanlm.errors import LeanLMError


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' (keep N of every M) -> (prune_n, m)."""
    if pattern in ("unstructured", "", None):
        return None
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not m or int(m.group(1)) <= 0 or int(m.group(1)) >= int(m.group(2)):
        raise LeanLMError(f"pattern {pattern!r}: expected 'unstructured' or 'N:M' (keep N of every M), 0 < N < M, e.g. '2:4'")
    keep, size = int(m.group(1)), int(m.group(2))
    return size - keep, size


def check_sparsity(sparsity: float, where: str = "sparsity") -> float:
    if not 0.0 <= float(sparsity) < 1.0:
        raise LeanLMError(f"{where}: {sparsity} is not in [0, 1); use e.g. 0.5 for 50% of weights removed")
    return float(sparsity)


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the round(sparsity * in) lowest-scoring weights of every row."""
    k = int(round(score.shape[1] * sparsity))
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        idx = torch.topk(score, k, dim=1, largest=False).indices
        mask.scatter_(1, idx, True)
    return mask


def nm_mask(score: torch.Tensor, prune_n: int, m: int) -> torch.Tensor:
    """Prune the prune_n lowest-scoring weights in every group of m consecutive inputs of each row."""
    rows, cols = score.shape
    if cols % m:
        raise LeanLMError(f"N:M sparsity with M={m} needs the input width ({cols}) divisible by {m}")
    g = score.reshape(rows, cols // m, m)
    idx = torch.topk(g, prune_n, dim=2, largest=False).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(2, idx, True)
    return mask.reshape(rows, cols)


def select_mask(score: torch.Tensor, sparsity: float, pattern: str = "unstructured") -> torch.Tensor:
    nm = parse_pattern(pattern)
    return row_mask(score, sparsity) if nm is None else nm_mask(score, *nm)


def is_nm(weight: torch.Tensor, prune_n: int, m: int) -> bool:
    """True when every group of m consecutive inputs of every row has at least prune_n zeros."""
    rows, cols = weight.shape
    zeros = (weight.reshape(rows, cols // m, m) == 0).sum(-1)
    return bool((zeros >= prune_n).all())


def sparsity_of(weight: torch.Tensor) -> float:
    return float((weight == 0).float().mean())
