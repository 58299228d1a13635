"""Sparse storage: a pruned weight saves as a bitmask (1 bit per weight) plus its kept values.

At 50% sparsity an fp32 weight shrinks to 53% of its size (fp16: 56%); N:M weights use the same
layout (a bitmask costs the same 1 bit per weight as 2:4's 2-bit indices). Loading restores the
dense tensor bit for bit, zeros included, so masks stay applied after save and load.

Checkpoint layout: weight `W` of shape [R, C] becomes `W.sparse_bitmask` (uint8 [ceil(R*C/8)],
little-endian bit order, row-major) and `W.sparse_values` (the nonzeros in row-major order, W's
dtype); the compression metadata lists the packed names with their shapes:
    meta["sparse"] = {"<module>.weight": [R, C], ...}
"""
from __future__ import annotations

import math

import numpy as np
import torch

from leanlm.errors import LeanLMError
from leanlm.io.modules import register_state_codec
from leanlm.model.layout import EMBED

MASK_SUFFIX, VALUES_SUFFIX = ".sparse_bitmask", ".sparse_values"


def pack_sparse(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense tensor -> (bitmask uint8, kept values)."""
    flat = w.detach().reshape(-1)
    keep = flat != 0
    bits = np.packbits(keep.cpu().numpy(), bitorder="little")
    return torch.from_numpy(bits), flat[keep].clone()


def unpack_sparse(bitmask: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    n = math.prod(shape)
    if bitmask.dtype != torch.uint8 or bitmask.numel() != (n + 7) // 8:
        raise LeanLMError(f"sparse tensor: bitmask holds {bitmask.numel()} bytes, shape {list(shape)} needs {(n + 7) // 8}")
    keep = torch.from_numpy(np.unpackbits(bitmask.cpu().numpy(), count=n, bitorder="little").astype(bool))
    if int(keep.sum()) != values.numel():
        raise LeanLMError(f"sparse tensor: bitmask marks {int(keep.sum())} weights but {values.numel()} values are stored; "
                          "the checkpoint is damaged — save it again")
    out = torch.zeros(n, dtype=values.dtype)
    out[keep] = values
    return out.reshape(shape)


def packed_nbytes(w: torch.Tensor) -> int:
    nz = int((w != 0).sum())
    return (w.numel() + 7) // 8 + nz * w.element_size()


def pack_state(sd: dict[str, torch.Tensor], min_saving: float = 0.1) -> tuple[dict[str, torch.Tensor], dict]:
    """Replace every 2-D float weight that packs at least `min_saving` smaller; return (tensors, meta)."""
    out, meta = {}, {}
    for k, v in sd.items():
        if (k.endswith(".weight") and v.dim() == 2 and v.is_floating_point() and not k.startswith(EMBED + ".")
                and packed_nbytes(v) <= (1 - min_saving) * v.numel() * v.element_size()):
            out[k + MASK_SUFFIX], out[k + VALUES_SUFFIX] = pack_sparse(v)
            meta[k] = list(v.shape)
        else:
            out[k] = v
    return out, ({"sparse": meta} if meta else {})


def unpack_state(sd: dict[str, torch.Tensor], meta: dict | None, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Inverse of pack_state: dense tensors back under their original names."""
    packed = (meta or {}).get("sparse") or {}
    if not packed:
        return sd
    sd = dict(sd)
    for k, shape in packed.items():
        try:
            bits, vals = sd.pop(k + MASK_SUFFIX), sd.pop(k + VALUES_SUFFIX)
        except KeyError:
            raise LeanLMError(f"{source}: sparse tensor {k} is listed in leanlm_compression but its bitmask/values "
                              "are missing; the checkpoint is incomplete — save it again")
        sd[k] = unpack_sparse(bits, vals, shape)
    return sd


register_state_codec("sparse", pack_state, unpack_state)
