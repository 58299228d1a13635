"""Int8 embedding table (one symmetric scale per token row, like GGUF's Q8_0 embedding) and its tied output head.

With tied embeddings the same int8 table is the output projection: `TiedInt8Head` runs it with
`aten._weight_int8pack_mm` (bf16, per-row scales), the largest matmul of a small model's decode.
Select it in a recipe with an `rtn` step of `bits: 8` whose targets match the embedding (the `-e8`
suffix of a `w{bits}a16-...` recipe name adds that step).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from leanlm.io.modules import register_module_type
from leanlm.model.layout import EMBED, HEAD
from leanlm.model.surgery import replace_module

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@register_module_type
class QuantEmbedding(nn.Module):
    fast = True

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: str = "float32"):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.dtype_name = num_embeddings, embedding_dim, dtype
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(num_embeddings, dtype=torch.float16))

    def config(self) -> dict:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim, "dtype": self.dtype_name}

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows"

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> "QuantEmbedding":
        w = emb.weight.detach().float()
        m = cls(w.shape[0], w.shape[1], str(emb.weight.dtype).replace("torch.", ""))
        scale = (w.abs().amax(1).clamp_min(1e-8) / 127).half()
        m.scales.copy_(scale)
        m.qweight.copy_(torch.clamp(torch.round(w / scale.float()[:, None]), -127, 127).to(torch.int8))
        return m

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Own, aligned memory: PyTorch's int8 kernels crash on tensors memory-mapped from safetensors.
        for k in ("qweight", "scales"):
            if prefix + k in state_dict:
                state_dict[prefix + k] = state_dict[prefix + k].clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table (for code that reads the embedding's weight)."""
        return (self.qweight.float() * self.scales.float()[:, None]).to(DTYPES[self.dtype_name])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.qweight[ids].float() * self.scales[ids].float()[..., None]).to(DTYPES[self.dtype_name])

    def on_install(self, model: nn.Module, name: str):
        """Called when set into a model: a tied output head switches to this table."""
        cfg = getattr(model, "config", None)
        if name == EMBED and getattr(cfg, "tie_word_embeddings", False):
            replace_module(model, HEAD, TiedInt8Head(self))


class TiedInt8Head(nn.Module):
    """The output head reading the int8 embedding table; holds no tensors of its own (nothing extra is saved)."""

    def __init__(self, emb: QuantEmbedding):
        super().__init__()
        self._emb = [emb]  # a list, so the table is not registered (and saved) twice
        self.in_features, self.out_features = emb.embedding_dim, emb.num_embeddings
        self._kernel = None

    def __setattr__(self, name, value):
        if name == "weight":  # Transformer.tie_weights() assigns the embedding's weight: the table is shared already
            return
        super().__setattr__(name, value)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied int8"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emb = self._emb[0]
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if QuantEmbedding.fast:
            if self._kernel is None or self._kernel[0] is not emb.qweight:
                self._kernel = (emb.qweight, emb.scales.to(torch.bfloat16))
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), emb.qweight, self._kernel[1])
        else:
            y = F.linear(x2.float(), emb.qweight.float() * emb.scales.float()[:, None])
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)
