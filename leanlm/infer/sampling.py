"""Next-token selection: greedy, temperature, top-k, top-p, repetition penalty, seeded sampling.

Pure functions over logits [B, V], shared by plain generation, the engine and speculative decoding.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingConfig:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass
class GenerationConfig(SamplingConfig):
    max_new_tokens: int = 128
    stop_token_ids: list[int] | None = None  # None: the tokenizer's end-of-sequence ids
    stop_strings: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    kv_bits: int | None = None  # store the KV cache in 8/4/2 bits (leanlm/infer/kv_quant.py); None: model dtype
    # decode steps through torch.compile (leanlm/infer/compiled.py): True where supported, False never,
    # None where it pays (long generations on models of real size, or once compiled)
    compile: bool | None = None


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (as transformers): seen tokens' positive logits / p, negative * p."""
    if penalty == 1.0:
        return logits
    pen = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, pen, logits)


def warp_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Temperature, top-k and top-p filtering; returns fp32 logits with filtered entries at -inf."""
    logits = logits.float() / max(cfg.temperature, 1e-6)
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= (1 - cfg.top_p)
        remove[..., -1] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(-1, idx, remove), float("-inf"))
    return logits


def sample_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The distribution the sampler draws from (after warping), [B, V] fp32."""
    return warp_logits(logits, cfg).softmax(-1)


def select(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None,
           seen: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] -> next token ids [B]."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if cfg.greedy:
        return logits.argmax(-1)
    probs = sample_probs(logits, cfg)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def make_generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator()
    g.manual_seed(seed)
    return g
