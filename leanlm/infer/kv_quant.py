"""Quantized KV cache: keys and values stored in 8, 4 or 2 bits, dequantized when attention reads them.

Each new key/value vector (one token, one KV head) is quantized on its own: int8 symmetric with one
scale (absmax / 127), or 4/2-bit asymmetric with a scale and a zero point (min/max), the per-token
layout KIVI uses for values. Codes of 4 and 2 bits are kept one per byte here: the cache's memory is
reported as the packed size (`packed_bytes`), which is what a packed layout would hold; reading
costs a dequantization of the prefix per layer and step, so this trades compute for memory.
KIVI's per-channel key quantization (groups of tokens, with the newest tokens kept in full
precision) is not implemented.

Works wherever the static `KVCache` does (generate, chunked prefill, batched left-padded rows).
"""
from __future__ import annotations

import torch

from leanlm.errors import LeanLMError
from leanlm.model.transformer import KVCache

BITS = (8, 4, 2)


def quantize(x: torch.Tensor, bits: int):
    """x [..., D] -> (codes uint8/int8 [..., D], scale [..., 1], zero [..., 1] or None)."""
    x = x.float()
    if bits == 8:
        scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127
        return torch.round(x / scale).clamp_(-127, 127).to(torch.int8), scale, None
    qmax = (1 << bits) - 1
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale = ((hi - lo) / qmax).clamp_min(1e-8)
    return torch.round((x - lo) / scale).clamp_(0, qmax).to(torch.uint8), scale, lo


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, dtype) -> torch.Tensor:
    x = codes.float() * scale
    if zero is not None:
        x = x + zero
    return x.to(dtype)


class QuantizedKVCache(KVCache):
    """The static cache with K/V held as low-bit codes plus per-(token, head) scales (fp16)."""

    def __init__(self, cfg, batch: int, max_len: int, bits: int = 8, dtype=torch.float32,
                 valid: torch.Tensor | None = None, device="cpu"):
        if bits not in BITS:
            raise LeanLMError(f"KV cache bits {bits}: supported {', '.join(map(str, BITS))}")
        super().__init__(cfg, 0, 0, dtype=dtype, device=device)  # no float K/V storage
        self.bits, self.out_dtype = bits, dtype
        code_dtype = torch.int8 if bits == 8 else torch.uint8
        self.kq, self.vq, self.ks, self.vs, self.kz, self.vz = [], [], [], [], [], []
        for i in range(cfg.num_layers):
            shape = (batch, cfg.heads(i)[1], max_len)
            for codes, scales, zeros in ((self.kq, self.ks, self.kz), (self.vq, self.vs, self.vz)):
                codes.append(torch.zeros(*shape, cfg.head_dim, dtype=code_dtype, device=device))
                scales.append(torch.zeros(*shape, 1, dtype=torch.float16, device=device))
                zeros.append(None if bits == 8 else torch.zeros(*shape, 1, dtype=torch.float16, device=device))
        self.batch, self.max_len = batch, max_len
        if valid is not None:
            self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
            self.valid[:, : valid.shape[1]] = valid
            self.valid[:, valid.shape[1]:] = True

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        s, e = self.length, self.length + self.pending
        for x, codes, scales, zeros in ((k, self.kq, self.ks, self.kz), (v, self.vq, self.vs, self.vz)):
            c, sc, z = quantize(x, self.bits)
            codes[layer][:, :, s:e] = c
            scales[layer][:, :, s:e] = sc.half()
            if z is not None:
                zeros[layer][:, :, s:e] = z.half()

        def read(codes, scales, zeros):
            z = None if zeros[layer] is None else zeros[layer][:, :, :e].float()
            return dequantize(codes[layer][:, :, :e], scales[layer][:, :, :e].float(), z, self.out_dtype)
        return read(self.kq, self.ks, self.kz), read(self.vq, self.vs, self.vz)

    def packed_bytes(self) -> int:
        """Bytes of K/V as a packed layout holds them: bits per value plus fp16 scale (and zero) per vector."""
        total = 0
        for i in range(len(self.kq)):
            n = self.kq[i].numel()
            vectors = self.ks[i].numel()
            per_vec = 2 if self.bits == 8 else 4
            total += 2 * (n * self.bits // 8 + vectors * per_vec)
        return total


def float_cache_bytes(cfg, batch: int, tokens: int, bytes_per_value: int = 4) -> int:
    return sum(2 * batch * cfg.heads(i)[1] * tokens * cfg.head_dim * bytes_per_value for i in range(cfg.num_layers))


@torch.no_grad()
def cached_nll(model, ids: torch.Tensor, cache, chunk: int = 64) -> tuple[float, int]:
    """Total next-token NLL of ids [1, T] computed chunk by chunk through `cache` (every chunk attends to
    the cached, possibly quantized, keys and values of the ones before it) -> (nll, tokens scored)."""
    import torch.nn.functional as F

    total, n = 0.0, 0
    T = ids.shape[1]
    for s in range(0, T, chunk):
        x = ids[:, s:s + chunk]
        logits = model(x, cache=cache).float()
        tgt = ids[:, s + 1:s + chunk + 1]
        m = tgt.shape[1]
        if m:
            total += float(F.cross_entropy(logits[0, :m], tgt[0], reduction="sum"))
            n += m
    return total, n
