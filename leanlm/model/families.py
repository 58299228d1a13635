"""The family table: one entry per model family leanlm runs.

An entry holds the Hugging Face architecture name, the GGUF architecture name, the layout (module
names by role, leanlm/model/layout.py), the config fields the family fixes or reads its own way, and
its checkpoint key map. Nothing outside leanlm/model/ branches on `model_type`: it asks this table.

Adding a family: a `Family(...)` entry here (plus model code in transformer.py only where its math is
new); see docs/architecture.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from leanlm.errors import LeanLMError
from leanlm.model import moe
from leanlm.model.layout import LLAMA, Layout


def _identity(sd: dict, cfg) -> dict:
    return sd


def _nothing(*args) -> dict:
    return {}


@dataclass(frozen=True)
class Family:
    model_type: str  # config.json's model_type
    hf_arch: str  # config.json's architectures[0]
    gguf_arch: str | None  # general.architecture in a GGUF file (None: no GGUF mapping)
    layout: Layout = LLAMA
    fixed: dict = field(default_factory=dict)  # config fields this family always has, whatever config.json says
    out_bias_follows_qkv: bool = True  # o_proj has a bias whenever attention_bias is set (Llama); else never (Qwen2)
    sliding_flag: str | None = None  # config.json key that must be true for sliding_window to apply
    gguf_sliding: bool = False  # among families sharing a GGUF architecture, the one a sliding window means
    # checkpoint keys <-> leanlm's state dict keys (fused q/k/v, per-expert names...). load_keys must
    # rename keys whatever their values are (the quantizing loader maps key names through it first) and
    # leave leanlm's own names unchanged (leanlm's compressed checkpoints keep them).
    load_keys: Callable[[dict, object], dict] = _identity
    save_keys: Callable[[dict, object], dict] = _identity
    # config.json fields read/written the family's own way: read_config(d, num_layers) -> ModelConfig
    # fields; write_config(cfg) -> config.json fields
    read_config: Callable[[dict, int], dict] = _nothing
    write_config: Callable[[object], dict] = _nothing


FAMILIES: dict[str, Family] = {f.model_type: f for f in [
    Family("llama", "LlamaForCausalLM", "llama"),
    Family("mistral", "MistralForCausalLM", "llama", gguf_sliding=True),
    Family("qwen2", "Qwen2ForCausalLM", "qwen2", fixed={"attention_bias": True, "attention_out_bias": False},
           out_bias_follows_qkv=False, sliding_flag="use_sliding_window"),
    Family("qwen3", "Qwen3ForCausalLM", "qwen3", fixed={"qk_norm": True}, sliding_flag="use_sliding_window"),
    # mixtures of experts (leanlm/model/moe.py). llama.cpp writes Mixtral as "llama" with expert tensors.
    Family("mixtral", "MixtralForCausalLM", "llama", fixed={"norm_topk_prob": True},
           load_keys=moe.mixtral_load_keys, save_keys=moe.mixtral_save_keys,
           read_config=lambda d, n: moe.read_moe_config(d, n, norm_default=True), write_config=moe.write_mixtral),
    Family("qwen2_moe", "Qwen2MoeForCausalLM", "qwen2moe", out_bias_follows_qkv=False,
           sliding_flag="use_sliding_window", load_keys=moe.split_fused_experts,
           read_config=lambda d, n: {**moe.read_moe_config(d, n, norm_default=False),
                                     "attention_bias": bool(d.get("qkv_bias", True)), "attention_out_bias": False},
           write_config=lambda c: {**moe.write_moe_config(c), "qkv_bias": c.attention_bias}),
    Family("qwen3_moe", "Qwen3MoeForCausalLM", "qwen3moe", fixed={"qk_norm": True}, sliding_flag="use_sliding_window",
           load_keys=moe.split_fused_experts, read_config=lambda d, n: moe.read_moe_config(d, n, norm_default=False),
           write_config=moe.write_moe_config),
]}


def family(model_type: str, source: str = "config") -> Family:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise LeanLMError(f"{source}: unsupported architecture model_type={model_type!r}; "
                          f"leanlm runs {', '.join(FAMILIES)}") from None


def gguf_archs() -> list[str]:
    return sorted({f.gguf_arch for f in FAMILIES.values() if f.gguf_arch})


def family_for_gguf(arch: str, sliding: bool = False, source: str = "GGUF") -> Family:
    """The family stored under a GGUF architecture name (llama.cpp writes Mistral as "llama": a sliding
    window tells them apart)."""
    out = [f for f in FAMILIES.values() if f.gguf_arch == arch]
    if not out:
        raise LeanLMError(f"{source}: unsupported architecture {arch!r}; leanlm reads GGUF {', '.join(gguf_archs())}")
    return next((f for f in out if f.gguf_sliding == sliding), out[0])
