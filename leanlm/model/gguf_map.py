"""GGUF tensor names <-> leanlm's state-dict keys, per GGUF architecture, declared beside the family table.

llama.cpp names a block's tensors by role (attn_q, ffn_norm, post_ffw_norm, ...); the layout
(leanlm/model/layout.py) says which leanlm module plays each role, so one role table serves every
family. What differs per architecture is data in `MAPS`:
- permute_qk: llama.cpp's converter permutes q/k rows for the "llama" architecture only;
- norm_shift: llama.cpp stores Gemma's RMSNorm weights as 1 + w (leanlm keeps w, as transformers does);
- fused_qkv / fused_gate_up: Phi-3's attn_qkv and its ffn_up holding gate and up;
- mixtures of experts: ffn_gate_inp (router), 3-D ffn_{gate,up,down}_exps split per expert, the
  shared expert's *_shexp tensors and ffn_gate_inp_shexp;
- config: the architecture's own metadata keys -> config.json fields (read through the family's reader).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from leanlm.model.layout import EMBED, FINAL_NORM, HEAD, Layout, block_prefix

TOP = {"token_embd": EMBED, "output_norm": FINAL_NORM, "output": HEAD}
# llama.cpp block tensor name -> layout role (attribute of Layout), relative to the block
BLOCK_ROLES = {"attn_norm": "attn_norm", "ffn_norm": "mlp_norm", "post_attention_norm": "attn_post_norm",
               "post_ffw_norm": "mlp_post_norm", "attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o",
               "attn_q_norm": "q_norm", "attn_k_norm": "k_norm"}
MLP_ROLES = {"ffn_gate": "gate", "ffn_up": "up", "ffn_down": "down"}  # inside an MLP (dense, expert, shared)
ROPE_FREQS = "rope_freqs"  # per-dimension RoPE frequency divisors (llama3 scaling), not a module


def _none(get) -> dict:
    return {}


@dataclass(frozen=True)
class GGUFMap:
    permute_qk: bool = False
    norm_shift: float = 0.0
    fused_qkv: bool = False
    fused_gate_up: bool = False
    # metadata getter (key without the "arch." prefix, default) -> extra config.json fields
    config: Callable = field(default=_none)
    export: bool = False  # leanlm's GGUF writer covers this architecture (dense models)


def _layer_types(get, n: int, default_pattern: int) -> list[str]:
    """llama.cpp's sliding-window pattern: per-layer booleans, or n (layer i slides unless i % n == n - 1;
    0: all slide)."""
    pattern = get("attention.sliding_window_pattern")
    if isinstance(pattern, list):
        return ["sliding_attention" if p else "full_attention" for p in pattern]
    p = int(pattern if pattern is not None else default_pattern)
    return ["sliding_attention" if p == 0 or i % p < p - 1 else "full_attention" for i in range(n)]


def _attn_scalar(get, big: tuple[int, int]) -> int:
    # llama.cpp scales queries by 1/sqrt(key_length), except the 27B sizes (hidden / heads)
    n, hidden, heads = get("block_count"), get("embedding_length"), get("attention.head_count")
    return hidden // heads if (n, hidden) == big else get("attention.key_length")


def _gemma2(get) -> dict:
    n = get("block_count")
    return {"hidden_activation": "gelu_pytorch_tanh", "sliding_window": get("attention.sliding_window", 4096),
            "layer_types": _layer_types(get, n, 2),
            "final_logit_softcapping": get("final_logit_softcapping", 30.0),
            "attn_logit_softcapping": get("attn_logit_softcapping", 50.0),
            "query_pre_attn_scalar": _attn_scalar(get, (46, 4608))}


def _gemma3(get) -> dict:
    # no sliding_window key: every layer global; local layers' base: rope.freq_base_swa, else 10000
    n, window = get("block_count"), get("attention.sliding_window")
    types = _layer_types(get, n, 6) if window else ["full_attention"] * n
    return {"hidden_activation": "gelu_pytorch_tanh", "sliding_window": window, "layer_types": types,
            "query_pre_attn_scalar": _attn_scalar(get, (62, 5376)),
            "rope_local_base_freq": float(get("rope.freq_base_swa", 10000.0)),
            "final_logit_softcapping": get("final_logit_softcapping")}


def moe_fields(get, norm_default: bool) -> dict:
    """llama.cpp's expert metadata -> config.json's MoE fields (read by the family's MoE reader). Top-k
    weights are renormalized as llama.cpp does per architecture unless the file says (expert_weights_norm)."""
    n = get("expert_count")
    if not n:
        return {}
    return {"num_experts": n, "num_local_experts": n, "num_experts_per_tok": get("expert_used_count"),
            "moe_intermediate_size": get("expert_feed_forward_length"),
            "shared_expert_intermediate_size": get("expert_shared_feed_forward_length", 0),
            "norm_topk_prob": bool(get("expert_weights_norm", norm_default))}


def _phi3(get) -> dict:
    head = get("attention.key_length") or get("embedding_length") // get("attention.head_count")
    return {"partial_rotary_factor": get("rope.dimension_count", head) / head}


MAPS: dict[str, GGUFMap] = {
    "llama": GGUFMap(permute_qk=True, config=lambda get: moe_fields(get, True), export=True),  # Mixtral: experts
    "qwen2": GGUFMap(export=True),
    "qwen3": GGUFMap(export=True),
    "gemma2": GGUFMap(norm_shift=1.0, config=_gemma2),
    "gemma3": GGUFMap(norm_shift=1.0, config=_gemma3),
    "phi3": GGUFMap(fused_qkv=True, fused_gate_up=True, config=_phi3),
    "qwen2moe": GGUFMap(config=lambda get: moe_fields(get, False)),
    "qwen3moe": GGUFMap(config=lambda get: moe_fields(get, True)),
}

_BLK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_EXPS = {"ffn_gate_exps": "gate", "ffn_up_exps": "up", "ffn_down_exps": "down"}
_SHEXP = {"ffn_gate_shexp": "gate", "ffn_up_shexp": "up", "ffn_down_shexp": "down"}


def gguf_map(arch: str) -> GGUFMap:
    return MAPS[arch]


def supported_names() -> str:
    return (", ".join(f"{k}.weight" for k in TOP) + f", {ROPE_FREQS}.weight and blk.N.{{"
            + ",".join([*BLOCK_ROLES, *MLP_ROLES, "attn_qkv", "ffn_gate_inp", *_EXPS, *_SHEXP,
                        "ffn_gate_inp_shexp"]) + "}.{weight,bias}")


def to_leanlm(name: str, w: torch.Tensor, cfg, lay: Layout, m: GGUFMap) -> list[tuple[str, torch.Tensor]] | None:
    """One GGUF tensor (already dequantized, q/k rows unpermuted) -> leanlm (key, tensor) pairs, or None
    for a name this map does not know."""
    top = name.rsplit(".", 1)
    if len(top) == 2 and top[0] in TOP:
        return [(f"{TOP[top[0]]}.{top[1]}", _shift(name, w, m))]
    g = _BLK.match(name)
    if not g:
        return None
    i, role, kind = int(g.group(1)), g.group(2), g.group(3)
    p = block_prefix(i)
    nh, nkv = cfg.heads(i)
    if role in BLOCK_ROLES:
        rel = getattr(lay, BLOCK_ROLES[role])
        return None if rel is None else [(f"{p}{rel}.{kind}", _shift(name, w, m))]
    moe = cfg.is_moe_layer(i)
    mlp = f"{p}{lay.mlp}."
    if role == "ffn_up" and m.fused_gate_up and w.shape[0] == 2 * cfg.intermediate(i):
        gate, up = w.chunk(2)
        return [(f"{mlp}{lay.gate}.{kind}", gate), (f"{mlp}{lay.up}.{kind}", up)]
    if role in MLP_ROLES and not moe:
        return [(f"{mlp}{getattr(lay, MLP_ROLES[role])}.{kind}", w)]
    if role == "attn_qkv" and m.fused_qkv:
        q, k, v = w.split([nh * cfg.head_dim, nkv * cfg.head_dim, nkv * cfg.head_dim])
        return [(f"{p}{getattr(lay, r)}.{kind}", t) for r, t in (("q", q), ("k", k), ("v", v))]
    if not moe:
        return None
    if role == "ffn_gate_inp":
        return [(f"{mlp}{lay.router}.{kind}", w)]
    if role in _EXPS:  # [experts, out, in]: one matrix per expert
        leaf = getattr(lay, _EXPS[role])
        return [(f"{mlp}{lay.experts}.{e}.{leaf}.{kind}", w[e]) for e in range(w.shape[0])]
    if role in _SHEXP:
        return [(f"{mlp}{lay.shared_expert}.{getattr(lay, _SHEXP[role])}.{kind}", w)]
    if role == "ffn_gate_inp_shexp":  # llama.cpp keeps the shared expert's gate as a vector
        return [(f"{mlp}{lay.shared_expert_gate}.{kind}", w.reshape(1, -1))]
    return None


def _shift(name: str, w: torch.Tensor, m: GGUFMap) -> torch.Tensor:
    return w - m.norm_shift if m.norm_shift and name.endswith("norm.weight") else w


def to_gguf(key: str, cfg, lay: Layout, m: GGUFMap) -> str | None:
    """The GGUF name of a leanlm state-dict key of a dense model (the export direction), or None."""
    obj, _, kind = key.rpartition(".")
    for g, mod in TOP.items():
        if obj == mod:
            return f"{g}.{kind}"
    mt = re.match(r"^(.*?\.)(\d+)\.(.+)$", obj)
    if not mt or block_prefix(int(mt.group(2))) != mt.group(1) + mt.group(2) + ".":
        return None
    i, rel = int(mt.group(2)), mt.group(3)
    for g, role in BLOCK_ROLES.items():
        if getattr(lay, role) is not None and getattr(lay, role) == rel:
            return f"blk.{i}.{g}.{kind}"
    for g, role in MLP_ROLES.items():
        if f"{lay.mlp}.{getattr(lay, role)}" == rel:
            return f"blk.{i}.{g}.{kind}"
    return None
