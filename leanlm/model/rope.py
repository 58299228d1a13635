"""Rotary position embeddings with the scaling types transformers reads from config.json.

Each function mirrors the reference formula (transformers' modeling_rope_utils) so logits match.
"""
from __future__ import annotations

import math

import torch

from leanlm.model.config import ModelConfig


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def rope_dim(cfg: ModelConfig) -> int:
    """Channels of a head that RoPE turns (Phi-3/4's partial_rotary_factor leaves the rest as they are)."""
    return int(cfg.head_dim * cfg.partial_rotary_factor)


def rope_inv_freq(cfg: ModelConfig, seq_len: int | None = None, local: bool = False) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the attention scaling applied to cos/sin.

    seq_len only matters for dynamic NTK, which stretches the base once the sequence outgrows
    max_position_embeddings, and for LongRoPE, whose long factors apply once the sequence outgrows
    the original (pretraining) length. local: the sliding layers' own RoPE (Gemma 3).
    """
    dim, theta, rs = rope_dim(cfg), cfg.rope_theta, cfg.rope_scaling or {}
    if local:
        theta, rs = cfg.local_rope_theta, cfg.local_rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default")) if rs else "default"
    if kind == "default":
        return _base_inv_freq(theta, dim), 1.0
    factor = float(rs["factor"]) if rs.get("factor") is not None else None
    if kind == "linear":
        return _base_inv_freq(theta, dim) / factor, 1.0
    if kind == "dynamic":
        max_pos = cfg.max_position_embeddings
        n = max(seq_len or max_pos, max_pos)
        base = theta * ((factor * n / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim), 1.0
    if kind == "llama3":
        inv = _base_inv_freq(theta, dim)
        low, high = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        old = float(rs["original_max_position_embeddings"])
        low_wl, high_wl = old / low, old / high
        wl = 2 * math.pi / inv
        scaled = torch.where(wl > low_wl, inv / factor, inv)
        smooth = (old / wl - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wl < high_wl) & ~(wl > low_wl)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        orig = rs.get("original_max_position_embeddings") or cfg.max_position_embeddings
        if factor is None:
            factor = cfg.max_position_embeddings / orig

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attn = rs.get("attention_factor")
        if attn is None:
            if rs.get("mscale") and rs.get("mscale_all_dim"):
                attn = mscale(factor, rs["mscale"]) / mscale(factor, rs["mscale_all_dim"])
            else:
                attn = mscale(factor)
        beta_fast = rs.get("beta_fast") or 32
        beta_slow = rs.get("beta_slow") or 1

        def corr_dim(rot):
            return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(theta))

        lo, hi = corr_dim(beta_fast), corr_dim(beta_slow)
        if rs.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo), 0, 1)
        pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
        extra, inter = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
        keep = 1 - ramp  # 1 where we extrapolate (high frequencies)
        return inter * (1 - keep) + extra * keep, float(attn)
    if kind == "longrope":  # Phi-3 (LongRoPE / "su"): per-frequency factors, short or long by sequence length
        orig = int(rs["original_max_position_embeddings"])
        if factor is None:
            factor = cfg.max_position_embeddings / orig
        attn = rs.get("attention_factor")
        if attn is None:
            attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
        ext = torch.tensor(rs["long_factor"] if seq_len and seq_len > orig else rs["short_factor"],
                           dtype=torch.float32)
        return 1.0 / (ext * theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), float(attn)
    raise ValueError(kind)


class RopeTable:
    """cos/sin for positions [0, n), built once and grown on demand (dynamic NTK rebuilds per length)."""

    def __init__(self, cfg: ModelConfig, local: bool = False):
        self.cfg, self.local = cfg, local
        self.cos = self.sin = None
        self.n = 0
        self.key = None

    def _build(self, n: int, seq_len: int | None):
        inv, scale = rope_inv_freq(self.cfg, seq_len, self.local)
        t = torch.arange(n, dtype=torch.float32)
        freqs = torch.outer(t, inv)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos, self.sin = emb.cos() * scale, emb.sin() * scale
        self.n = n
        self.cast = {}

    def lookup(self, positions: torch.Tensor, max_pos: int, dtype: torch.dtype):
        """positions [B, T] -> cos, sin [B, 1, T, head_dim] in dtype."""
        need = max_pos + 1
        key = None
        rs = (self.cfg.local_rope_scaling if self.local else self.cfg.rope_scaling) or {}
        kind = rs.get("rope_type", rs.get("type"))
        if kind == "dynamic":
            key = max(need, self.cfg.max_position_embeddings)
        elif kind == "longrope":  # like transformers: the whole forward takes the long factors past the original length
            orig = int(rs["original_max_position_embeddings"])
            key = orig + 1 if need > orig else 0
        # Tables are built outside inference mode: a model that generated first can still be trained.
        if self.cos is None or need > self.n or key != self.key:
            n = max(need, min(self.cfg.max_position_embeddings, 8192), 2 * self.n if need > self.n else self.n)
            with torch.inference_mode(False):
                self._build(n, key)
            self.key = key
        if dtype not in self.cast:  # keep the fp32 master, cast once per dtype
            with torch.inference_mode(False):
                self.cast[dtype] = (self.cos.to(dtype), self.sin.to(dtype))
        cos, sin = self.cast[dtype]
        if positions.shape[0] == 1:
            p = positions[0]
            return cos[p][None, None], sin[p][None, None]
        return cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    xr = x[..., :r]  # partial rotary: the remaining channels pass through
    return torch.cat([xr * cos + rotate_half(xr) * sin, x[..., r:]], dim=-1)
