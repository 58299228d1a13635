"""Prompt tuning and prefix tuning: trainable virtual tokens in front of every sequence.

Both wrap the model (sequence length changes, so no module can be swapped in place); the wrapper
keeps the Transformer's forward signature, `config`, `new_cache` and `dtype`.
- Prompt tuning prepends `prompt_embeddings` [n, hidden] to the input embeddings and drops the
  virtual positions from the logits.
- Prefix tuning prefills per-layer K/V (`prompt_embeddings` [n, layers*2*kv_heads*head_dim], peft's
  layout) through the cache argument: `PrefixCache` wraps the caller's cache, or none in training.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from leanlm.errors import LeanLMError
from leanlm.model.layout import embedding
from leanlm.peft.lora import freeze_base


@dataclass
class PromptTuningConfig:
    num_virtual_tokens: int = 20
    init_ids: list[int] | None = None  # initialise from these tokens' embeddings (peft's TEXT init)


@dataclass
class PrefixTuningConfig:
    num_virtual_tokens: int = 20


class VirtualTokenModel(nn.Module):
    def __init__(self, model: nn.Module, cfg):
        super().__init__()
        self.base_model = model
        self.peft_config = cfg
        self.n = cfg.num_virtual_tokens

    @property
    def config(self):
        return self.base_model.config

    @property
    def dtype(self):
        return self.base_model.dtype

    @property
    def model(self):
        return self.base_model.model

    def num_parameters(self) -> int:
        return self.base_model.num_parameters()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.base_model.logits(hidden)


class PromptTuned(VirtualTokenModel):
    def __init__(self, model: nn.Module, cfg: PromptTuningConfig):
        super().__init__(model, cfg)
        emb = embedding(model).weight
        if cfg.init_ids:
            ids = torch.tensor([cfg.init_ids[i % len(cfg.init_ids)] for i in range(self.n)])
            init = emb.detach()[ids].clone().float()
        else:  # peft's RANDOM init is nn.Embedding's N(0, 1); that swamps a small LM, so use the vocab's scale
            init = torch.randn(self.n, emb.shape[1]) * emb.detach().float().std()
        self.prompt_embeddings = nn.Parameter(init)

    def forward(self, input_ids=None, cache=None, positions=None, inputs_embeds=None,
                last_only=False, return_hidden=False):
        x = self.base_model.embed(input_ids) if inputs_embeds is None else inputs_embeds
        first = cache is None or cache.length == 0
        if first:
            p = self.prompt_embeddings.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
            x = torch.cat([p, x], 1)
            if positions is not None:
                pre = torch.arange(self.n, device=x.device).expand(positions.shape[0], -1)
                positions = torch.cat([pre, positions + self.n], 1)
        elif positions is not None:
            positions = positions + self.n
        out = self.base_model(inputs_embeds=x, cache=cache, positions=positions,
                              last_only=last_only, return_hidden=return_hidden)
        return out[:, self.n:] if first and not last_only else out

    def virtual_tokens(self):
        """For the serving engine: the virtual tokens are these input embeddings."""
        from leanlm.infer.engine import VirtualTokens

        return VirtualTokens(self.n, embeds=self.prompt_embeddings.detach())

    def new_cache(self, batch: int, max_len: int, valid: torch.Tensor | None = None):
        if valid is not None:
            valid = torch.cat([torch.ones(valid.shape[0], self.n, dtype=torch.bool), valid.bool()], 1)
        return self.base_model.new_cache(batch, max_len + self.n, valid)


class PrefixCache:
    """Cache protocol wrapper: every layer's keys/values start with the trainable prefix."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], inner=None):
        self.pk, self.pv, self.inner = keys, values, inner
        self.n = keys[0].shape[2]
        self.T = 0

    @property
    def length(self):
        return self.inner.length if self.inner is not None else 0

    def begin(self, T, positions, window):
        self.T = T
        if self.inner is None:
            if positions is None:
                positions = torch.arange(T).unsqueeze(0)
            mask = "causal"
        else:
            positions, mask = self.inner.begin(T, positions, window)
        return positions + self.n, self._with_prefix(mask)

    def window_mask(self, window):
        # without an inner cache this is one causal forward of T tokens; the prefix is always in view
        return self._with_prefix("causal" if self.inner is None else self.inner.window_mask(window))

    def _with_prefix(self, mask):
        if mask is None:
            return None
        start = 0 if self.inner is None else self.inner.length
        if isinstance(mask, str):
            q = torch.arange(start, start + self.T).unsqueeze(1)
            mask = (torch.arange(start + self.T).unsqueeze(0) <= q)[None, None]
        pre = torch.ones(*mask.shape[:-1], self.n, dtype=torch.bool)
        return torch.cat([pre, mask], -1)

    def update(self, layer, k, v):
        if self.inner is not None:
            k, v = self.inner.update(layer, k, v)
        B = k.shape[0]
        pk = self.pk[layer].to(k.dtype).expand(B, -1, -1, -1)
        pv = self.pv[layer].to(v.dtype).expand(B, -1, -1, -1)
        return torch.cat([pk, k], 2), torch.cat([pv, v], 2)

    def end(self):
        if self.inner is not None:
            self.inner.end()


class PrefixTuned(VirtualTokenModel):
    def __init__(self, model: nn.Module, cfg: PrefixTuningConfig):
        super().__init__(model, cfg)
        c = model.config
        kv = {c.heads(i)[1] for i in range(c.num_layers)}
        if len(kv) != 1:
            raise LeanLMError("prefix tuning needs the same number of KV heads in every layer")
        self.kv_heads, self.head_dim, self.layers = kv.pop(), c.head_dim, c.num_layers
        dim = self.layers * 2 * self.kv_heads * self.head_dim
        self.prompt_embeddings = nn.Parameter(torch.randn(self.n, dim) * 0.02)

    def prefix_kv(self):
        e = self.prompt_embeddings.view(self.n, self.layers * 2, self.kv_heads, self.head_dim)
        e = e.permute(1, 2, 0, 3).unsqueeze(1)  # [layers*2, 1, kv_heads, n, head_dim]
        return [e[2 * i] for i in range(self.layers)], [e[2 * i + 1] for i in range(self.layers)]

    def virtual_tokens(self):
        """For the serving engine: the virtual tokens' K/V, written into each sequence's first slots."""
        from leanlm.infer.engine import VirtualTokens

        keys, values = self.prefix_kv()  # [1, kv_heads, n, head_dim] per layer
        return VirtualTokens(self.n, keys=[k.detach()[0].transpose(0, 1) for k in keys],
                             values=[v.detach()[0].transpose(0, 1) for v in values])

    def forward(self, input_ids=None, cache=None, positions=None, inputs_embeds=None,
                last_only=False, return_hidden=False):
        keys, values = self.prefix_kv()
        return self.base_model(input_ids, cache=PrefixCache(keys, values, cache), positions=positions,
                               inputs_embeds=inputs_embeds, last_only=last_only, return_hidden=return_hidden)

    def new_cache(self, batch: int, max_len: int, valid: torch.Tensor | None = None):
        return self.base_model.new_cache(batch, max_len, valid)


def apply_prompt_tuning(model: nn.Module, cfg: PromptTuningConfig) -> nn.Module:
    """Returns the wrapped model (use the return value)."""
    freeze_base(model)
    return PromptTuned(model, cfg)


def apply_prefix_tuning(model: nn.Module, cfg: PrefixTuningConfig) -> nn.Module:
    """Returns the wrapped model (use the return value)."""
    freeze_base(model)
    return PrefixTuned(model, cfg)
