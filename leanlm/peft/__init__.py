"""Parameter-efficient fine-tuning: LoRA, DoRA, LoRA-FA, QLoRA, (IA)3, prompt and prefix tuning.

`apply(model, method, **options)` dispatches by a plain dict; each method is a function taking the
model and its dataclass config. LoRA/DoRA/(IA)3 rewrite modules in place; prompt and prefix tuning
wrap the model, so always use the returned model. Adapters save and load in HF peft's format.
"""
from __future__ import annotations

from leanlm.peft.ia3 import IA3Config, IA3Linear, apply_ia3
from leanlm.peft.io import load_adapter, save_adapter
from leanlm.peft.lora import (LoraConfig, LoraLinear, apply_lora, merge_lora, unload_lora,
                              unmerge_lora)
from leanlm.peft.prompt import (PrefixTuningConfig, PromptTuningConfig, apply_prefix_tuning,
                                apply_prompt_tuning)

# method name -> (config class, transform, fixed config options)
METHODS = {
    "lora": (LoraConfig, apply_lora, {}),
    "dora": (LoraConfig, apply_lora, {"use_dora": True}),
    "lora-fa": (LoraConfig, apply_lora, {"freeze_a": True}),
    "ia3": (IA3Config, apply_ia3, {}),
    "prompt": (PromptTuningConfig, apply_prompt_tuning, {}),
    "prefix": (PrefixTuningConfig, apply_prefix_tuning, {}),
}


def apply(model, method: str, **options):
    """Apply a fine-tuning method by name; returns the model to train (prompt/prefix wrap it)."""
    from leanlm.errors import LeanLMError

    if method not in METHODS:
        raise LeanLMError(f"unknown fine-tuning method {method!r}; choose one of {', '.join(METHODS)}")
    cls, fn, fixed = METHODS[method]
    return fn(model, cls(**{**options, **fixed}))


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


__all__ = ["LoraConfig", "IA3Config", "PromptTuningConfig", "PrefixTuningConfig", "apply", "apply_lora",
           "apply_ia3", "apply_prompt_tuning", "apply_prefix_tuning", "load_adapter", "save_adapter",
           "merge", "unmerge", "merge_lora", "unmerge_lora", "unload_lora", "trainable_parameters", "METHODS"]
