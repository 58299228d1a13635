"""Parameter-efficient fine-tuning: LoRA, DoRA, LoRA-FA, QLoRA, (IA)3, prompt and prefix tuning, MeZO.

`apply(model, method, **options)` dispatches by one dict, METHODS: name -> (config dataclass, apply).
Options are checked like a recipe step's (leanlm.options.build_config: unknown method or field, wrong
type, bad value -> one line). LoRA/DoRA/(IA)3 rewrite modules in place; prompt and prefix tuning wrap
the model, so always use the returned model. Adapters save and load in HF peft's format (io.py).
"""
from __future__ import annotations

from leanlm.model.transformer import plain_layout
from leanlm.peft.ia3 import IA3Config, IA3Linear, apply_ia3
from leanlm.peft.io import load_adapter, save_adapter
from leanlm.peft.lora import (DoraConfig, LoraConfig, LoraFAConfig, LoraLinear, apply_lora, merge_lora,
                              unload_lora, unmerge_lora)
from leanlm.peft.mezo import MeZOConfig, apply_mezo
from leanlm.peft.prompt import (PrefixTuningConfig, PromptTuningConfig, apply_prefix_tuning,
                                apply_prompt_tuning)
from leanlm.peft.qlora import QLoraConfig, apply_qlora

# method name -> (config class, apply(model, cfg) -> the model to train)
METHODS = {
    "lora": (LoraConfig, apply_lora),
    "dora": (DoraConfig, apply_lora),
    "lora-fa": (LoraFAConfig, apply_lora),
    "qlora": (QLoraConfig, apply_qlora),
    "ia3": (IA3Config, apply_ia3),
    "prompt": (PromptTuningConfig, apply_prompt_tuning),
    "prefix": (PrefixTuningConfig, apply_prefix_tuning),
    "mezo": (MeZOConfig, apply_mezo),
}


def apply(model, method: str, **options):
    """Apply a fine-tuning method by name; returns the model to train (prompt/prefix wrap it)."""
    from leanlm.options import method_config

    cfg, fn = method_config(METHODS, method, options, "fine-tuning method")
    plain_layout(model)  # weights row-major again after a generation (see Transformer.plain_layout)
    return fn(model, cfg)


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge(model) -> None:
    """Fold every LoRA/DoRA/(IA)3 adapter into its base weight (reversible with unmerge)."""
    for m in model.modules():
        if isinstance(m, (LoraLinear, IA3Linear)):
            m.merge()


def unmerge(model) -> None:
    for m in model.modules():
        if isinstance(m, (LoraLinear, IA3Linear)):
            m.unmerge()


__all__ = ["LoraConfig", "DoraConfig", "LoraFAConfig", "QLoraConfig", "MeZOConfig", "IA3Config", "PromptTuningConfig", "PrefixTuningConfig", "apply", "apply_lora",
           "apply_ia3", "apply_prompt_tuning", "apply_prefix_tuning", "load_adapter", "save_adapter",
           "merge", "unmerge", "merge_lora", "unmerge_lora", "unload_lora", "trainable_parameters", "METHODS"]
