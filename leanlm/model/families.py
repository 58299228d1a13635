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

import torch

from leanlm.errors import LeanLMError
from leanlm.model import moe
from leanlm.model.layout import GEMMA, LLAMA, Layout


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
    gguf_moe: bool = False  # among families sharing a GGUF architecture, the one expert tensors mean
    # checkpoint keys <-> leanlm's state dict keys (fused q/k/v, per-expert names...). load_keys must
    # rename keys whatever their values are (the quantizing loader maps key names through it first) and
    # leave leanlm's own names unchanged (leanlm's compressed checkpoints keep them).
    load_keys: Callable[[dict, object], dict] = _identity
    save_keys: Callable[[dict, object], dict] = _identity
    # config.json fields read/written the family's own way: read_config(d, num_layers) -> ModelConfig
    # fields; write_config(cfg) -> config.json fields
    read_config: Callable[[dict, int], dict] = _nothing
    write_config: Callable[[object], dict] = _nothing
    hf_defaults: dict = field(default_factory=dict)  # config.json values transformers assumes when a key is absent


# ---- Gemma 2 / Gemma 3 (text) -------------------------------------------------------------------

def _rope_dict(p: dict | None) -> dict | None:
    p = {k: v for k, v in (p or {}).items() if k != "rope_theta"}
    return None if p.get("rope_type", p.get("type", "default")) == "default" else p


def _gemma_fields(d: dict, gemma3: bool) -> dict:
    if d.get("use_bidirectional_attention"):
        raise LeanLMError("use_bidirectional_attention=true is not supported; leanlm runs causal Gemma "
                          "(set it to false)")
    n = int(d["num_hidden_layers"])
    pattern = int(d.get("sliding_window_pattern", d.get("_sliding_window_pattern", 6 if gemma3 else 2)))
    types = d.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    out = dict(hidden_act=d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh",
               layer_types=list(types), query_pre_attn_scalar=d.get("query_pre_attn_scalar", 256),
               final_logit_softcapping=d.get("final_logit_softcapping", None if gemma3 else 30.0),
               # Gemma 3 keeps the field but transformers never applies it (its attention has no soft-cap)
               attn_logit_softcapping=None if gemma3 else d.get("attn_logit_softcapping", 50.0),
               sliding_window=d.get("sliding_window", 4096))
    if gemma3:  # per layer type RoPE: global layers 1M (+ scaling), local ones 10k
        rp = d.get("rope_parameters") or {}
        if "full_attention" in rp or "sliding_attention" in rp:
            full, local = rp.get("full_attention") or {}, rp.get("sliding_attention") or {}
        else:  # older config.json: rope_theta / rope_scaling (global), rope_local_base_freq (local)
            full = {**(d.get("rope_scaling") or {}), "rope_theta": d.get("rope_theta", 1e6)}
            local = {"rope_theta": d.get("rope_local_base_freq", 1e4)}
        out.update(rope_theta=float(full.get("rope_theta", 1e6)), rope_scaling=_rope_dict(full),
                   local_rope_theta=float(local.get("rope_theta", 1e4)), local_rope_scaling=_rope_dict(local))
    return out


def _gemma_hf(cfg) -> dict:
    d = {"hidden_activation": cfg.hidden_act, "layer_types": cfg.layer_types,
         "query_pre_attn_scalar": cfg.query_pre_attn_scalar, "sliding_window": cfg.sliding_window,
         "final_logit_softcapping": cfg.final_logit_softcapping,
         "attn_logit_softcapping": cfg.attn_logit_softcapping, "use_bidirectional_attention": False}
    if cfg.local_rope_theta is not None:
        d["rope_parameters"] = {
            "full_attention": {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta},
            "sliding_attention": {"rope_type": "default", **(cfg.local_rope_scaling or {}),
                                  "rope_theta": cfg.local_rope_theta}}
        d["rope_theta"] = d["rope_scaling"] = None
    return d


_GEMMA_FIXED = {"norm_plus_one": True, "post_norms": True, "embed_scale": True, "mlp_bias": False}
_GEMMA_DEFAULTS = {"tie_word_embeddings": True, "head_dim": 256, "rms_norm_eps": 1e-6}


# ---- Phi-3 ---------------------------------------------------------------------------------------

def _phi3_load(sd: dict, cfg) -> dict:
    """Split the checkpoint's fused qkv_proj and gate_up_proj into leanlm's q/k/v and gate/up linears."""
    sd = dict(sd)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        nh, nkv = cfg.heads(i)
        qkv = sd.get(p + "self_attn.qkv_proj.weight")
        if isinstance(qkv, torch.Tensor):  # (a name-only pass, as the quantizing loader makes, keeps it fused)
            del sd[p + "self_attn.qkv_proj.weight"]
            q, k, v = qkv.split([nh * cfg.head_dim, nkv * cfg.head_dim, nkv * cfg.head_dim])
            sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"], sd[p + "self_attn.v_proj.weight"] = q, k, v
        gu = sd.get(p + "mlp.gate_up_proj.weight")
        if isinstance(gu, torch.Tensor):
            del sd[p + "mlp.gate_up_proj.weight"]
            sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"] = gu.chunk(2)
    return sd


def _phi3_save(sd: dict, cfg) -> dict:
    """Fuse them back, where all parts are still plain weights (compressed modules keep leanlm's names)."""
    sd = dict(sd)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        for fused, parts in (("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                             ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj"))):
            keys = [f"{p}{n}.weight" for n in parts]
            if all(k in sd for k in keys) and not any(f"{p}{n}.bias" in sd for n in parts):
                sd[f"{p}{fused}.weight"] = torch.cat([sd.pop(k) for k in keys])
    return sd


def _phi3_fields(d: dict, num_layers: int) -> dict:
    rp = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind in ("su", "yarn"):  # transformers reads Phi-3's older names as LongRoPE
        kind = "longrope"
    if kind not in ("default", "longrope"):
        raise LeanLMError(f"rope type {kind!r} is not one Phi-3 runs; supported: default, longrope")
    out = {"partial_rotary_factor": float(rp.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))),
           "sliding_window": d.get("sliding_window")}
    if kind == "longrope":
        head_dim = int(d.get("head_dim") or int(d["hidden_size"]) // int(d["num_attention_heads"]))
        half = int(head_dim * out["partial_rotary_factor"]) // 2
        for key in ("short_factor", "long_factor"):
            v = rp.get(key)
            if not isinstance(v, list) or len(v) != half:
                raise LeanLMError(f"LongRoPE needs rope_parameters.{key}, a list of {half} numbers "
                                  f"(half the rotary dimension); got {v!r:.60}")
        scaling = {k: v for k, v in rp.items() if k not in ("rope_theta", "partial_rotary_factor", "type")}
        scaling["rope_type"] = "longrope"
        # Phi-3 keeps the pretraining length beside the RoPE dict; transformers prefers it there
        scaling["original_max_position_embeddings"] = int(d.get(
            "original_max_position_embeddings", rp.get("original_max_position_embeddings", 4096)))
        out["rope_scaling"] = scaling
    else:
        out["rope_scaling"] = None
    return out


def _phi3_hf(cfg) -> dict:
    rp = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta,
          "partial_rotary_factor": cfg.partial_rotary_factor, **(cfg.rope_scaling or {})}
    d = {"rope_parameters": rp, "rope_theta": None, "rope_scaling": None}
    if cfg.rope_scaling:
        d["original_max_position_embeddings"] = cfg.rope_scaling["original_max_position_embeddings"]
    return d


# ---- Qwen2 / Qwen3 / Qwen2-MoE sliding window -------------------------------------------------------

def _qwen_layer_types(d: dict, num_layers: int, alternate: bool = False) -> dict:
    """Which layers use_sliding_window windows, as transformers 5 reads it: an explicit layer_types list,
    else Qwen2/Qwen3 window the layers from max_window_layers on, Qwen2-MoE every other layer (0, 2, ...)
    below max_window_layers. No window in effect: no layer types (every layer global)."""
    if not (d.get("use_sliding_window") and d.get("sliding_window")):
        return {"layer_types": None}
    types = d.get("layer_types")
    if types is None:
        m = int(d.get("max_window_layers", 28))
        sliding = [(i % 2 == 0 and i < m) if alternate else i >= m for i in range(num_layers)]
        types = ["sliding_attention" if s else "full_attention" for s in sliding]
    return {"layer_types": list(types)}


def _qwen_write_types(cfg) -> dict:
    """Write the windowed layers out explicitly (transformers prefers layer_types over max_window_layers)."""
    if cfg.sliding_window is None:
        return {}
    return {"layer_types": ["full_attention" if cfg.window(i) is None else "sliding_attention"
                            for i in range(cfg.num_layers)]}


FAMILIES: dict[str, Family] = {f.model_type: f for f in [
    Family("llama", "LlamaForCausalLM", "llama"),
    Family("mistral", "MistralForCausalLM", "llama", gguf_sliding=True),
    Family("qwen2", "Qwen2ForCausalLM", "qwen2", fixed={"attention_bias": True, "attention_out_bias": False},
           out_bias_follows_qkv=False, sliding_flag="use_sliding_window", read_config=_qwen_layer_types,
           write_config=_qwen_write_types),
    Family("qwen3", "Qwen3ForCausalLM", "qwen3", fixed={"qk_norm": True}, sliding_flag="use_sliding_window",
           read_config=_qwen_layer_types, write_config=_qwen_write_types),
    # mixtures of experts (leanlm/model/moe.py). llama.cpp writes Mixtral as "llama" with expert tensors.
    Family("mixtral", "MixtralForCausalLM", "llama", fixed={"norm_topk_prob": True}, gguf_moe=True,
           load_keys=moe.mixtral_load_keys, save_keys=moe.mixtral_save_keys,
           read_config=lambda d, n: moe.read_moe_config(d, n, norm_default=True), write_config=moe.write_mixtral),
    Family("qwen2_moe", "Qwen2MoeForCausalLM", "qwen2moe", out_bias_follows_qkv=False,
           sliding_flag="use_sliding_window", load_keys=moe.split_fused_experts,
           read_config=lambda d, n: {**moe.read_moe_config(d, n, norm_default=False),
                                     **_qwen_layer_types(d, n, alternate=True),
                                     "attention_bias": bool(d.get("qkv_bias", True)), "attention_out_bias": False},
           write_config=lambda c: {**moe.write_moe_config(c), **_qwen_write_types(c), "qkv_bias": c.attention_bias}),
    # Qwen3-MoE: transformers windows every layer when use_sliding_window is set (no layer types)
    Family("qwen3_moe", "Qwen3MoeForCausalLM", "qwen3moe", fixed={"qk_norm": True}, sliding_flag="use_sliding_window",
           load_keys=moe.split_fused_experts, read_config=lambda d, n: moe.read_moe_config(d, n, norm_default=False),
           write_config=moe.write_moe_config),
    # GGUF (llama.cpp) names; their tensor maps (Gemma's 1 + w norms, Phi-3's fused q/k/v and gate/up) are
    # in leanlm/model/gguf_map.py.
    Family("gemma2", "Gemma2ForCausalLM", "gemma2", layout=GEMMA, fixed=_GEMMA_FIXED, hf_defaults=_GEMMA_DEFAULTS,
           read_config=lambda d, n: _gemma_fields(d, gemma3=False), write_config=_gemma_hf),
    Family("gemma3_text", "Gemma3ForCausalLM", "gemma3", layout=GEMMA, fixed={**_GEMMA_FIXED, "qk_norm": True},
           hf_defaults=_GEMMA_DEFAULTS, read_config=lambda d, n: _gemma_fields(d, gemma3=True), write_config=_gemma_hf),
    Family("phi3", "Phi3ForCausalLM", "phi3", fixed={"attention_bias": False, "attention_out_bias": False,
                                                     "mlp_bias": False},
           hf_defaults={"rms_norm_eps": 1e-5}, load_keys=_phi3_load, save_keys=_phi3_save, read_config=_phi3_fields,
           write_config=_phi3_hf),
]}


def family(model_type: str, source: str = "config") -> Family:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise LeanLMError(f"{source}: unsupported architecture model_type={model_type!r}; "
                          f"leanlm runs {', '.join(FAMILIES)}") from None


def gguf_archs() -> list[str]:
    return sorted({f.gguf_arch for f in FAMILIES.values() if f.gguf_arch})


def family_for_gguf(arch: str, sliding: bool = False, source: str = "GGUF", experts: bool = False) -> Family:
    """The family stored under a GGUF architecture name (llama.cpp writes Mistral and Mixtral as "llama":
    a sliding window or expert tensors tell them apart)."""
    out = [f for f in FAMILIES.values() if f.gguf_arch == arch]
    if not out:
        raise LeanLMError(f"{source}: unsupported architecture {arch!r}; leanlm reads GGUF {', '.join(gguf_archs())}")
    out = [f for f in out if f.gguf_moe == experts] or out
    return next((f for f in out if f.gguf_sliding == sliding), out[0])
