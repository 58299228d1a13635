"""Adapters on disk in HF peft's format: adapter_config.json + adapter_model.safetensors.

Key names are peft's (`base_model.model.<module>.lora_A.weight`, `...lora_magnitude_vector`,
`...ia3_l`, `prompt_embeddings`); our module names mirror transformers', so the map is a prefix.
One table, FORMATS, says per peft_type which config class it is, how the method is applied, how its
config maps to and from adapter_config.json, and which tensors the adapter holds; adding a PEFT method
with a peft counterpart is one entry here.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from typing import Callable, NamedTuple

from leanlm.errors import LeanLMError
from leanlm.peft import hf_map
from leanlm.peft.ia3 import IA3Config, IA3Linear, apply_ia3
from leanlm.peft.lora import LoraConfig, LoraLinear, apply_lora
from leanlm.peft.prompt import PrefixTuningConfig, PromptTuningConfig, apply_prefix_tuning, apply_prompt_tuning

PREFIX = "base_model.model."
# peft config fields we read; any other field set away from its default means a feature we lack.
# (rank_pattern / alpha_pattern are read; target_parameters, transformers' fused MoE experts and router,
# are mapped onto leanlm's linears by hf_map.py before this check.)
_LORA_UNSUPPORTED = {"bias": "none", "fan_in_fan_out": False, "lora_bias": False, "modules_to_save": None,
                     "layers_to_transform": None, "target_parameters": None,
                     "trainable_token_indices": None, "use_qalora": False,
                     "exclude_modules": None, "layer_replication": None}


def _peft_version() -> str:
    """peft's version if installed (read from metadata: importing peft pulls in transformers)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("peft")
    except PackageNotFoundError:
        return "0.13.0"


def _listed(v):
    return v if isinstance(v, str) else sorted(v)


# ---------------------------------------------------------------- LoRA / DoRA (LoRA-FA, QLoRA save as LoRA)
def _lora_to(cfg: LoraConfig, model) -> dict:
    return {"r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "target_modules": _listed(cfg.target_modules),
            "use_rslora": cfg.use_rslora, "use_dora": cfg.use_dora, "bias": "none", "fan_in_fan_out": False,
            "init_lora_weights": True, "lora_bias": False, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": dict(cfg.rank_pattern), "alpha_pattern": dict(cfg.alpha_pattern)}


def _lora_from(d: dict, source: str) -> LoraConfig:
    for k, default in _LORA_UNSUPPORTED.items():
        v = d.get(k, default)
        if v not in (default, None) and v != {} and v is not False:
            raise LeanLMError(f"{source}: peft option {k}={v!r} is not supported by leanlm; "
                              "retrain the adapter without it")
    tm = d.get("target_modules")
    if tm is None:
        raise LeanLMError(f"{source}: target_modules is missing")
    return LoraConfig(r=int(d["r"]), alpha=float(d.get("lora_alpha", 8)), dropout=float(d.get("lora_dropout", 0.0)),
                      target_modules=tm if isinstance(tm, str) else list(tm),
                      use_rslora=bool(d.get("use_rslora", False)), use_dora=bool(d.get("use_dora", False)),
                      rank_pattern=dict(d.get("rank_pattern") or {}), alpha_pattern=dict(d.get("alpha_pattern") or {}))


def _lora_tensors(model: nn.Module) -> dict[str, nn.Parameter]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLinear):
            out[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.weight
            out[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.weight
            if m.use_dora:
                out[f"{PREFIX}{name}.lora_magnitude_vector"] = m.lora_magnitude_vector
    return out


# ---------------------------------------------------------------- (IA)3
def _ia3_to(cfg: IA3Config, model) -> dict:
    return {"target_modules": _listed(cfg.target_modules), "feedforward_modules": _listed(cfg.feedforward_modules),
            "fan_in_fan_out": False, "init_ia3_weights": True}


def _ia3_from(d: dict, source: str) -> IA3Config:
    tm, ff = d.get("target_modules"), d.get("feedforward_modules") or []
    return IA3Config(target_modules=tm if isinstance(tm, str) else list(tm),
                     feedforward_modules=ff if isinstance(ff, str) else list(ff))


def _ia3_tensors(model: nn.Module) -> dict[str, nn.Parameter]:
    return {f"{PREFIX}{name}.ia3_l": m.ia3_l for name, m in model.named_modules() if isinstance(m, IA3Linear)}


# ---------------------------------------------------------------- prompt / prefix tuning
def _prompt_to(cfg: PromptTuningConfig, model) -> dict:
    c = model.config
    return {"num_virtual_tokens": cfg.num_virtual_tokens, "token_dim": c.hidden_size, "num_transformer_submodules": 1,
            "num_attention_heads": c.num_heads, "num_layers": c.num_layers, "prompt_tuning_init": "RANDOM",
            "prompt_tuning_init_text": None, "tokenizer_name_or_path": None}


def _prompt_from(d: dict, source: str) -> PromptTuningConfig:
    if d.get("num_transformer_submodules", 1) != 1:
        raise LeanLMError(f"{source}: only decoder-only prompt tuning is supported")
    return PromptTuningConfig(num_virtual_tokens=int(d["num_virtual_tokens"]))


def _prefix_to(cfg: PrefixTuningConfig, model) -> dict:
    c = model.config
    return {"num_virtual_tokens": cfg.num_virtual_tokens, "token_dim": c.num_kv_heads * c.head_dim,
            "num_transformer_submodules": 1, "num_attention_heads": c.num_kv_heads, "num_layers": c.num_layers,
            "encoder_hidden_size": c.num_kv_heads * c.head_dim, "prefix_projection": False}


def _prefix_from(d: dict, source: str) -> PrefixTuningConfig:
    if d.get("prefix_projection"):
        raise LeanLMError(f"{source}: prefix_projection=true is not supported; train without the MLP projection")
    return PrefixTuningConfig(num_virtual_tokens=int(d["num_virtual_tokens"]))


def _virtual_tensors(model: nn.Module) -> dict[str, nn.Parameter]:
    return {"prompt_embeddings": model.prompt_embeddings}


class PeftFormat(NamedTuple):
    config: type  # our config class (subclasses too: DoRA, LoRA-FA and QLoRA configs save as LORA)
    apply: Callable  # (model, cfg) -> model
    to_peft: Callable  # (cfg, model) -> adapter_config.json fields of this type
    from_peft: Callable  # (adapter_config dict, source) -> cfg
    tensors: Callable  # model -> {peft key: parameter}


FORMATS: dict[str, PeftFormat] = {
    "LORA": PeftFormat(LoraConfig, apply_lora, _lora_to, _lora_from, _lora_tensors),
    "IA3": PeftFormat(IA3Config, apply_ia3, _ia3_to, _ia3_from, _ia3_tensors),
    "PROMPT_TUNING": PeftFormat(PromptTuningConfig, apply_prompt_tuning, _prompt_to, _prompt_from, _virtual_tensors),
    "PREFIX_TUNING": PeftFormat(PrefixTuningConfig, apply_prefix_tuning, _prefix_to, _prefix_from, _virtual_tensors),
}


def format_of(cfg) -> tuple[str, PeftFormat]:
    for kind, f in FORMATS.items():
        if isinstance(cfg, f.config):
            return kind, f
    raise LeanLMError("this model has no adapter to save; apply a method first (leanlm.peft.apply)")


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's key names."""
    return {k: v.detach().contiguous() for k, v in _adapter_params(model).items()}


def peft_config_dict(model: nn.Module, base_name: str | None = None) -> dict:
    kind, f = format_of(getattr(model, "peft_config", None))
    common = {"base_model_name_or_path": base_name, "inference_mode": True, "task_type": "CAUSAL_LM",
              "peft_version": _peft_version(), "revision": None, "modules_to_save": None}
    return {**common, "peft_type": kind, **f.to_peft(model.peft_config, model)}


def save_adapter(model: nn.Module, folder: str | Path, base_name: str | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (peft's format) atomically."""
    from safetensors.torch import save as st_save

    from leanlm.io.atomic import atomic_dir

    merged = [n for n, m in model.named_modules() if getattr(m, "merged", False)]
    if merged:
        raise LeanLMError(f"{merged[0]}: adapter is merged into the base; unmerge before saving the adapter")
    conf = peft_config_dict(model, base_name)
    tensors = {k: v.float() if v.dtype != torch.float32 else v for k, v in adapter_state(model).items()}
    why = hf_map.peft_refusal(model)
    if why:  # leanlm's own names: leanlm loads it back, peft cannot
        warnings.warn(f"{why}; the adapter is saved with leanlm's module names, which leanlm loads and peft "
                      "cannot", stacklevel=2)
    else:  # the names (and fused tensors) transformers holds: what peft loads
        conf, tensors = hf_map.to_transformers(model, conf, tensors)
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
        (tmp / "adapter_model.safetensors").write_bytes(st_save(tensors, metadata={"format": "pt"}))
    return folder


def read_adapter_config(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / "adapter_config.json"
    if not path.exists():
        raise LeanLMError(f"{folder}: no adapter_config.json; pass a folder written by save_adapter or peft")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LeanLMError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}")
    if not isinstance(d, dict) or "peft_type" not in d:
        raise LeanLMError(f"{path}: no peft_type field; is this a peft adapter config?")
    return d


def config_from_peft(d: dict, source: str = "adapter_config.json"):
    """Our method config for a peft adapter_config.json dict (errors on features we do not run)."""
    kind = d["peft_type"]
    if kind not in FORMATS:
        raise LeanLMError(f"{source}: peft_type {kind!r} is not supported; leanlm loads "
                          f"{', '.join(FORMATS)} adapters")
    return FORMATS[kind].from_peft(d, source)


def apply_config(model: nn.Module, cfg) -> nn.Module:
    return format_of(cfg)[1].apply(model, cfg)


def load_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """Put the adapter in `folder` (ours or peft's) on `model`; returns the model to use from now on."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    d = read_adapter_config(folder)
    path = folder / "adapter_model.safetensors"
    if not path.exists():
        extra = " (adapter_model.bin is a pickle; leanlm never unpickles: re-save with safe_serialization=True)" \
            if (folder / "adapter_model.bin").exists() else ""
        raise LeanLMError(f"{folder}: no adapter_model.safetensors{extra}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise LeanLMError(f"{path}: cannot read safetensors ({e})")
    d, tensors = hf_map.from_transformers(model, d, tensors)
    cfg = config_from_peft(d, str(folder / "adapter_config.json"))
    model = apply_config(model, cfg)
    own = _adapter_params(model)
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise LeanLMError(f"{path}: adapter tensors do not fit this model ({what}); "
                          "was it trained on another architecture?")
    with torch.no_grad():
        for k, p in own.items():
            t = tensors[k]
            if t.shape != p.shape:
                raise LeanLMError(f"{path}: {k} has shape {tuple(t.shape)}, the model needs {tuple(p.shape)}")
            p.copy_(t.to(p.dtype))
    return model


def _adapter_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return format_of(getattr(model, "peft_config", None))[1].tensors(model)
