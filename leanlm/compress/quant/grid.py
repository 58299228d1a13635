"""Uniform integer grids (RTN's and GPTQ's quantizer), groups of any size, and bit packing.

One representation everywhere: a weight row is cut into groups of `group_size` input columns (the
last group may be shorter, so any group size works on any width); each group has a scale and an
offset and dequantizes as `q * scale + offset`, q an unsigned code in [0, 2**bits - 1].
Symmetric grids have offset = -2**(bits-1) * scale (GPTQ's convention: zero point 2**(bits-1));
asymmetric grids use the group minimum as offset (a float zero point, like GGUF's Q4_1), so a
weight that already sits on a Q4_1 grid is reproduced exactly.
Scales and offsets are rounded to fp16 when computed, so what the solver sees is what is stored.

Pruned weights (exact zeros that must stay zero, `keep_zero`): the symmetric grid always holds 0
exactly (code 2**(bits-1)). An asymmetric group that must hold 0 and whose float-minimum grid does
not already map it to exactly 0 gets an integer zero point z instead: offset = -z * scale, with the
scale rounded up to `11 - bits` significant bits so that z * scale is exact in fp16 (the stored
offset) and code z dequantizes to exactly 0.
"""
from __future__ import annotations

import math

import torch


def num_groups(in_features: int, group_size: int) -> int:
    return math.ceil(in_features / group_size)


def expand_groups(t: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """[N, G] per-group values -> [N, K] per-column values (the last group may be shorter)."""
    return t.repeat_interleave(group_size, dim=1)[:, :in_features]


def grid_params(w: torch.Tensor, bits: int, sym: bool,
                keep_zero: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset [N] for the columns of w [N, k] (one group).

    keep_zero: optional bool [N, k], True where the weight must dequantize to exactly 0 (a pruned
    weight; its value in w is ignored); rows holding one get a grid on which 0 is exact.
    """
    w = w.float()
    maxq = 2 ** bits - 1
    if keep_zero is not None:
        w = w.masked_fill(keep_zero, 0.0)
    if sym:
        amax = w.abs().amax(dim=1)
        scale = 2 * amax / maxq
        scale = torch.where(scale > 0, scale, torch.ones_like(scale)).half().float()
        offset = -(2 ** (bits - 1)) * scale
        return scale, offset
    lo, hi = w.amin(dim=1), w.amax(dim=1)
    scale = (hi - lo) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).half().float()
    offset = lo.half().float()
    if keep_zero is not None:
        need = keep_zero.any(dim=1) & ~zero_is_exact(scale, offset, bits)
        if need.any():
            s, o = zero_point_grid(lo[need], hi[need], bits)
            scale, offset = scale.clone(), offset.clone()
            scale[need], offset[need] = s, o
    return scale, offset


def zero_is_exact(scale: torch.Tensor, offset: torch.Tensor, bits: int) -> torch.Tensor:
    """Per row: does some code of the grid dequantize to exactly 0?"""
    z = torch.clamp(torch.round(-offset / scale), 0, 2 ** bits - 1)
    return z * scale + offset == 0


def zero_point_grid(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric grid over [min(lo, 0), max(hi, 0)] with an integer zero point z: code z is exactly 0.

    The scale is rounded *up* to 11 - bits significant bits (the range stays covered), so z * scale
    (z < 2**bits) has at most 11 significant bits and the offset -z * scale is exact in fp16. A scale
    that would fall below fp16's normal range becomes a power of two (then z * scale is exact too).
    """
    maxq = 2 ** bits - 1
    lo, hi = torch.clamp(lo.float(), max=0), torch.clamp(hi.float(), min=0)
    scale = (hi - lo) / maxq
    scale = torch.where(scale > 0, scale, torch.full_like(scale, 2.0 ** -10))
    quantum = torch.exp2(torch.floor(torch.log2(scale)) - (10 - bits))
    scale = torch.ceil(scale / quantum) * quantum
    z = torch.clamp(torch.round(-lo / scale), 0, maxq)
    offset = -z * scale
    bad = (scale.half().float() != scale) | (offset.half().float() != offset)
    if bad.any():  # subnormal fp16 range: a power-of-two scale, still covering the range
        scale = torch.where(bad, torch.clamp(torch.exp2(torch.ceil(torch.log2(scale))), min=2.0 ** -14), scale)
        z = torch.clamp(torch.round(-lo / scale), 0, maxq)
        offset = -z * scale
    return scale, offset


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest codes for w [N, k] given per-row (or [N, k]-broadcast) scale and offset."""
    if scale.dim() == 1:
        scale, offset = scale[:, None], offset[:, None]
    return torch.clamp(torch.round((w.float() - offset) / scale), 0, 2 ** bits - 1)


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool, keep_zero: torch.Tensor | None = None):
    """Round-to-nearest: codes [N, K] (uint8), scales [N, G], offsets [N, G] (fp32 values of fp16s).

    keep_zero: optional bool [N, K] of weights that must dequantize to exactly 0 (see grid_params).
    """
    N, K = w.shape
    g = group_size if group_size > 0 else K
    if keep_zero is not None:
        w = w.masked_fill(keep_zero, 0.0)
    scales, offsets = [], []
    for start in range(0, K, g):
        s, o = grid_params(w[:, start:start + g], bits, sym,
                           None if keep_zero is None else keep_zero[:, start:start + g])
        scales.append(s)
        offsets.append(o)
    scales, offsets = torch.stack(scales, 1), torch.stack(offsets, 1)
    codes = quantize_codes(w, expand_groups(scales, g, K), expand_groups(offsets, g, K), bits)
    return codes.to(torch.uint8), scales, offsets


def dequantize(codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_size: int) -> torch.Tensor:
    N, K = codes.shape
    G = scales.shape[1]
    w = codes.float()
    if G * group_size != K:  # shorter last group: pad to whole groups, then cut
        w = torch.nn.functional.pad(w, (0, G * group_size - K))
    w = w.view(N, G, -1).mul_(scales.float()[:, :, None]).add_(offsets.float()[:, :, None])
    return w.view(N, -1)[:, :K]


# ---- bit packing: codes of `bits` bits along the input dimension, little-endian bit stream ----

def packed_width(in_features: int, bits: int) -> int:
    return math.ceil(in_features * bits / 8) if bits in (1, 2, 4, 8) else math.ceil(in_features / 8) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [N, K] in [0, 2**bits) -> uint8 [N, packed_width(K, bits)]. 3 bits: 8 codes in 3 bytes."""
    N, K = codes.shape
    c = codes.to(torch.int64)
    if bits == 8:
        return c.to(torch.uint8)
    per = 8 if bits not in (1, 2, 4) else 8 // bits  # codes per chunk
    nbytes = bits if per == 8 else 1
    pad = (-K) % per
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.view(N, -1, per)
    acc = torch.zeros(c.shape[:2], dtype=torch.int64)
    for i in range(per):
        acc |= c[:, :, i] << (bits * i)
    out = torch.stack([(acc >> (8 * j)) & 255 for j in range(nbytes)], -1)
    return out.reshape(N, -1).to(torch.uint8)[:, : packed_width(K, bits)]


def unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of pack: uint8 [N, packed_width] -> codes uint8 [N, in_features]."""
    N = packed.shape[0]
    if bits == 8:
        return packed[:, :in_features].to(torch.uint8)
    if bits in (2, 4):  # fast path: shifts on uint8, no int64 temporaries
        per = 8 // bits
        mask = 2 ** bits - 1
        c = torch.stack([(packed >> (bits * i)) & mask for i in range(per)], -1)
        return c.view(N, -1)[:, :in_features]
    per = 8 if bits not in (1, 2, 4) else 8 // bits
    nbytes = bits if per == 8 else 1
    p = packed.to(torch.int64)
    chunks = math.ceil(in_features / per)
    if p.shape[1] < chunks * nbytes:
        p = torch.nn.functional.pad(p, (0, chunks * nbytes - p.shape[1]))
    p = p.view(N, chunks, nbytes)
    acc = torch.zeros(N, chunks, dtype=torch.int64)
    for j in range(nbytes):
        acc |= p[:, :, j] << (8 * j)
    mask = 2 ** bits - 1
    c = torch.stack([(acc >> (bits * i)) & mask for i in range(per)], -1)
    return c.reshape(N, -1)[:, :in_features].to(torch.uint8)


MASK_MIN_FRACTION = 0.01


def pruned_mask(w: torch.Tensor, keep_zeros: bool) -> torch.Tensor | None:
    """The exact zeros of w as a pruning mask to keep, or None.

    A layer counts as pruned when at least 1% of its weights are exactly zero. Dense weights hold a
    few zeros by accident (0.03% on the default model, whose weights sit on a Q4_1 grid); pinning
    those would only constrain the solver and move results for no reason."""
    if not keep_zeros:
        return None
    m = w == 0
    return m if m.float().mean().item() >= MASK_MIN_FRACTION else None
