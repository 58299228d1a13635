"""GGUF tensor names <-> leanlm's state-dict keys, per GGUF architecture, declared beside the family table.

llama.cpp names a block's tensors by role (attn_q, ffn_norm, post_ffw_norm, ...); the layout
(leanlm/model/layout.py) says which leanlm module plays each role, so one role table serves every
family. What differs per architecture is data in `MAPS`:
- permute_qk: llama.cpp's converter permutes q/k rows for the "llama" architecture only;
- norm_shift: llama.cpp stores Gemma's RMSNorm weights as 1 + w (leanlm keeps w, as transformers does);
- fused_qkv / fused_gate_up: Phi-3's attn_qkv and its ffn_up holding gate and up;
- mixtures of experts: ffn_gate_inp (router), 3-D ffn_{gate,up,down}_exps split per expert, the
  shared expert's *_shexp tensors and ffn_gate_inp_shexp;
- config: the architecture's own metadata keys -> config.json fields (read through the family's reader);
- export: what llama.cpp's implementation of the architecture fixes (activation, RoPE kinds, MoE top-k
  renormalization, required tensors) and the metadata it reads, so the writer (leanlm/io/gguf_export.py)
  refuses a model the architecture would run differently (`export_fields`, `export_plan` below).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from leanlm.errors import LeanLMError
from leanlm.model.layout import EMBED, FINAL_NORM, HEAD, Layout, block_prefix

TOP = {"token_embd": EMBED, "output_norm": FINAL_NORM, "output": HEAD}
# llama.cpp block tensor name -> layout role (attribute of Layout), relative to the block
BLOCK_ROLES = {"attn_norm": "attn_norm", "ffn_norm": "mlp_norm", "post_attention_norm": "attn_post_norm",
               "post_ffw_norm": "mlp_post_norm", "attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o",
               "attn_q_norm": "q_norm", "attn_k_norm": "k_norm"}
MLP_ROLES = {"ffn_gate": "gate", "ffn_up": "up", "ffn_down": "down"}  # inside an MLP (dense, expert, shared)
ROPE_FREQS = "rope_freqs"  # per-dimension RoPE frequency divisors (llama3 scaling), not a module
# Phi-3's LongRoPE factors (tensor -> the rope_scaling field it holds); llama.cpp takes the long ones when
# its context is longer than rope.scaling.original_context_length (transformers: when the sequence is)
LONGROPE = {"rope_factors_long.weight": "long_factor", "rope_factors_short.weight": "short_factor"}


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
    # ---- export: how llama.cpp runs the architecture (src/models/<arch>.cpp) ----
    act: str = "silu"  # the MLP's activation (Gemma: GELU, tanh approximation)
    rope_kinds: tuple[str, ...] = ("default", "linear", "yarn")  # RoPE scalings llama.cpp applies here
    rope_freqs: bool = False  # llama3 / per-dimension scaling as the rope_freqs tensor (the "llama" arch)
    moe_norm: bool | None = None  # llama.cpp renormalizes the top-k router weights (fixed per arch)
    shared_expert: bool = False  # every MoE block has the shared expert (qwen2moe), None allowed otherwise
    output_required: bool = False  # output.weight must exist even when tied (qwen2moe)
    tied_only: bool = False  # the output head is always token_embd (gemma2)
    fields: Callable = field(default=_none)  # cfg -> the architecture's own metadata {key: value}


def _layer_types(get, n: int, default_pattern: int) -> list[str]:
    """llama.cpp's sliding-window pattern: per-layer booleans, or n (layer i slides unless i % n == n - 1;
    0: all slide)."""
    pattern = get("attention.sliding_window_pattern")
    if isinstance(pattern, list):
        return ["sliding_attention" if p else "full_attention" for p in pattern]
    p = int(pattern if pattern is not None else default_pattern)
    return ["sliding_attention" if p == 0 or i % p < p - 1 else "full_attention" for i in range(n)]


def _attn_scalar(get, big_layers: int) -> int:
    # llama.cpp scales queries by 1/sqrt(key_length), except at the 27B sizes' layer count (hidden / heads)
    n, hidden, heads = get("block_count"), get("embedding_length"), get("attention.head_count")
    return hidden // heads if n == big_layers else get("attention.key_length")


def _gemma2(get) -> dict:
    n = get("block_count")
    return {"hidden_activation": "gelu_pytorch_tanh", "sliding_window": get("attention.sliding_window", 4096),
            "layer_types": _layer_types(get, n, 2),
            "final_logit_softcapping": get("final_logit_softcapping", 30.0),
            "attn_logit_softcapping": get("attn_logit_softcapping", 50.0),
            "query_pre_attn_scalar": _attn_scalar(get, 46)}


def _gemma3(get) -> dict:
    # no sliding_window key: every layer global; local layers' base: rope.freq_base_swa, else 10000
    n, window = get("block_count"), get("attention.sliding_window")
    types = _layer_types(get, n, 6) if window else ["full_attention"] * n
    return {"hidden_activation": "gelu_pytorch_tanh", "sliding_window": window, "layer_types": types,
            "query_pre_attn_scalar": _attn_scalar(get, 62),
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
    out = {"partial_rotary_factor": get("rope.dimension_count", head) / head}
    long, short = get("tensor:rope_factors_long.weight"), get("tensor:rope_factors_short.weight")
    if long is not None and short is not None:
        orig = int(get("rope.scaling.original_context_length"))
        rs = {"rope_type": "longrope", "long_factor": [float(x) for x in long],
              "short_factor": [float(x) for x in short], "original_max_position_embeddings": orig}
        factor = get("context_length") / orig
        default = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))
        attn = get("rope.scaling.attn_factor")
        if attn is not None and abs(attn - default) > 1e-6 * default:  # else transformers' own default
            rs["attention_factor"] = float(attn)
        out["rope_scaling"] = rs
    return out


# ---- export metadata: what each llama.cpp architecture reads besides the common keys ----
def _gemma_scale_check(cfg, big_layers: int) -> None:
    # llama.cpp scales queries by 1/sqrt(head_dim), or 1/sqrt(hidden / heads) for its 27B layer count
    want = cfg.hidden_size // cfg.num_heads if cfg.num_layers == big_layers else cfg.head_dim
    if cfg.query_pre_attn_scalar is not None and float(cfg.query_pre_attn_scalar) != float(want):
        raise LeanLMError(f"query_pre_attn_scalar={cfg.query_pre_attn_scalar}, but llama.cpp scales this "
                          f"architecture's queries by 1/sqrt({want})")


def _swa_fields(cfg, default_pattern: int) -> dict:
    """The sliding window and, where the layers differ from llama.cpp's default pattern for the
    architecture (layer i slides unless i % n == n - 1), the per-layer pattern."""
    sliding = [cfg.window(i) is not None for i in range(cfg.num_layers)]
    if not any(sliding):
        return {}
    n = default_pattern
    default = [i % n < n - 1 for i in range(cfg.num_layers)]
    out = {"attention.sliding_window": int(cfg.sliding_window)}
    if sliding != default:
        out["attention.sliding_window_pattern"] = sliding
    return out


def _gemma2_fields(cfg) -> dict:
    _gemma_scale_check(cfg, 46)
    if cfg.attn_logit_softcapping is None or cfg.final_logit_softcapping is None:
        raise LeanLMError("llama.cpp's gemma2 always soft-caps attention scores and logits; this model leaves "
                          "one uncapped")
    out = {"attn_logit_softcapping": float(cfg.attn_logit_softcapping),
           "final_logit_softcapping": float(cfg.final_logit_softcapping)}
    out.update(_swa_fields(cfg, 2))
    if "attention.sliding_window" not in out:  # llama.cpp's gemma2 windows by default: say no layer slides
        out.update({"attention.sliding_window": int(cfg.sliding_window or 4096),
                    "attention.sliding_window_pattern": [False] * cfg.num_layers})
    return out


def _gemma3_fields(cfg) -> dict:
    _gemma_scale_check(cfg, 62)
    if cfg.attn_logit_softcapping is not None:
        raise LeanLMError("llama.cpp's gemma3 has no attention soft-capping")
    if cfg.local_rope_scaling:
        raise LeanLMError("llama.cpp's gemma3 scales RoPE on the global layers only; this model scales the "
                          "sliding layers' RoPE too")
    out = _swa_fields(cfg, 6)
    if out:
        out["rope.freq_base_swa"] = float(cfg.local_rope_theta if cfg.local_rope_theta is not None
                                          else cfg.rope_theta)
    if cfg.final_logit_softcapping is not None:
        out["final_logit_softcapping"] = float(cfg.final_logit_softcapping)
    return out


def _phi3_fields(cfg) -> dict:
    # llama.cpp reads Phi-3's window but runs every layer global (its converter writes 0 for none)
    out = {"attention.sliding_window": int(cfg.sliding_window or 0),
           "rope.scaling.original_context_length": int(cfg.max_position_embeddings)}
    if cfg.rope_type == "longrope":  # the factors are tensors (LONGROPE)
        rs = cfg.rope_scaling
        orig = int(rs["original_max_position_embeddings"])
        factor = cfg.max_position_embeddings / orig
        attn = rs.get("attention_factor")
        if attn is None:
            attn = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))
        out.update({"rope.scaling.original_context_length": orig, "rope.scaling.attn_factor": float(attn)})
    return out


def _moe_export_fields(cfg) -> dict:
    if not cfg.num_experts:
        return {}
    out = {"expert_count": cfg.num_experts, "expert_used_count": cfg.num_experts_per_tok,
           "expert_feed_forward_length": cfg.expert_width(0), "expert_weights_norm": bool(cfg.norm_topk_prob)}
    if cfg.shared_expert_intermediate_size:
        out["expert_shared_feed_forward_length"] = cfg.shared_expert_width(0)
    return out


def _dense_swa(cfg) -> dict:
    """Mistral / Qwen windows: written so leanlm reads the model back (the pattern where only some layers
    slide); llama.cpp's llama/qwen2/qwen3 architectures run every layer global (the same within the window)."""
    sliding = [cfg.window(i) is not None for i in range(cfg.num_layers)]
    if not any(sliding):
        return {}
    out = {"attention.sliding_window": int(cfg.sliding_window)}
    if not all(sliding):
        out["attention.sliding_window_pattern"] = sliding
    return out


def _qwen(get) -> dict:
    pattern = get("attention.sliding_window_pattern")
    return {"layer_types": _layer_types(get, 0, 0)} if isinstance(pattern, list) else {}


MAPS: dict[str, GGUFMap] = {
    "llama": GGUFMap(permute_qk=True, config=lambda get: moe_fields(get, True), rope_kinds=(
        "default", "linear", "yarn", "llama3", "freq_factors"), rope_freqs=True, moe_norm=True,
        fields=lambda c: {**_dense_swa(c), **_moe_export_fields(c)}),  # Mixtral: "llama" with experts
    "qwen2": GGUFMap(config=_qwen, fields=_dense_swa),
    "qwen3": GGUFMap(config=_qwen, fields=_dense_swa),
    "gemma2": GGUFMap(norm_shift=1.0, config=_gemma2, act="gelu_pytorch_tanh", rope_kinds=("default", "linear"),
                      tied_only=True, fields=_gemma2_fields),
    "gemma3": GGUFMap(norm_shift=1.0, config=_gemma3, act="gelu_pytorch_tanh", rope_kinds=("default", "linear"),
                      fields=_gemma3_fields),
    "phi3": GGUFMap(fused_qkv=True, fused_gate_up=True, config=_phi3, rope_kinds=("default", "longrope"),
                    fields=_phi3_fields),
    "qwen2moe": GGUFMap(config=lambda get: {**moe_fields(get, False), **_qwen(get)}, moe_norm=False, shared_expert=True,
                        output_required=True, fields=lambda c: {**_dense_swa(c), **_moe_export_fields(c)}),
    "qwen3moe": GGUFMap(config=lambda get: moe_fields(get, True), moe_norm=True,
                        fields=lambda c: {**_dense_swa(c), **_moe_export_fields(c)}),
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


# ---- export -------------------------------------------------------------------------------------
def export_fields(cfg, m: GGUFMap) -> dict:
    """The metadata llama.cpp reads for this model, keys without the "<arch>." prefix; raises LeanLMError
    (one line, no source) when the architecture in llama.cpp would compute something else."""
    from leanlm.model.rope import rope_dim

    if cfg.hidden_act != m.act:
        raise LeanLMError(f"hidden_act={cfg.hidden_act!r}, but llama.cpp runs this architecture with {m.act!r}")
    if cfg.rope_type not in m.rope_kinds:
        raise LeanLMError(f"{cfg.rope_type} RoPE scaling has no GGUF form llama.cpp reads for this architecture "
                          f"(it reads {', '.join(m.rope_kinds)})")
    if cfg.num_experts:
        if m.moe_norm is None:
            raise LeanLMError("llama.cpp's architecture for this family has no experts")
        if cfg.moe_layers is not None and len(cfg.moe_layers) != cfg.num_layers:
            raise LeanLMError("some blocks are dense MLPs (mlp_only_layers); llama.cpp puts experts in every block")
        if bool(cfg.norm_topk_prob) != m.moe_norm:
            raise LeanLMError(f"norm_topk_prob={cfg.norm_topk_prob}, but llama.cpp "
                              f"{'always' if m.moe_norm else 'never'} renormalizes this architecture's top-k weights")
        if bool(cfg.shared_expert_intermediate_size) != m.shared_expert:
            raise LeanLMError("llama.cpp's architecture " + ("needs" if m.shared_expert else "has no")
                              + " shared expert in every block")
    if m.tied_only and not cfg.tie_word_embeddings:
        raise LeanLMError("the output head differs from the embedding; llama.cpp's architecture ties them")
    out = {"context_length": cfg.max_position_embeddings, "embedding_length": cfg.hidden_size,
           "block_count": cfg.num_layers, "feed_forward_length": cfg.intermediate_size,
           "attention.head_count": cfg.num_heads, "attention.head_count_kv": cfg.num_kv_heads,
           "attention.key_length": cfg.head_dim, "attention.value_length": cfg.head_dim,
           "rope.dimension_count": rope_dim(cfg), "rope.freq_base": float(cfg.rope_theta),
           "attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps), "vocab_size": cfg.vocab_size}
    rs = cfg.rope_scaling or {}
    if cfg.rope_type in ("linear", "yarn"):
        out["rope.scaling.type"] = cfg.rope_type
        out["rope.scaling.factor"] = float(rs["factor"])
        if cfg.rope_type == "yarn":
            out["rope.scaling.original_context_length"] = int(rs.get("original_max_position_embeddings")
                                                              or cfg.max_position_embeddings)
    out.update(m.fields(cfg))
    return out


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the file and the leanlm state-dict keys it holds."""
    name: str
    keys: tuple[str, ...]
    join: str = "one"  # "one"; "rows": parts' rows stacked (fused); "experts": 3-D, one slice each; "vector"
    permute: int = 0  # the "llama" architecture's q/k rows, permuted by this many heads
    shift: float = 0.0  # added to every value (Gemma's norms are stored as 1 + w)
    head: bool = False  # the matrix llama.cpp computes the logits with
    float32: bool = False  # kept F32 whatever the type, as llama.cpp's converter keeps it (the router)


def export_plan(cfg, lay: Layout, m: GGUFMap, present: set[str]) -> list[GGUFTensor]:
    """Every GGUF tensor of a model, from the keys its state dict has (biases and q/k norms are there or
    not). Raises LeanLMError when only some of a fused tensor's parts exist."""
    out: list[GGUFTensor] = []

    def add(name: str, rels: list[str], join: str = "one", permute: int = 0, **kw) -> None:
        for kind in ("weight", "bias"):
            keys = tuple(f"{r}.{kind}" for r in rels)
            have = [k in present for k in keys]
            if not any(have):
                continue
            if not all(have):
                raise LeanLMError(f"{keys[have.index(False)]} is missing; GGUF's {name}.{kind} needs "
                                  f"{', '.join(keys)}")
            shift = m.norm_shift if name.endswith("norm") and kind == "weight" else 0.0
            out.append(GGUFTensor(f"{name}.{kind}", keys, join, permute, shift, **kw))

    tied = f"{HEAD}.weight" not in present
    add("token_embd", [EMBED], head=tied and not m.output_required)
    add("output_norm", [FINAL_NORM])
    add("output", [HEAD], head=True)
    if tied and m.output_required:
        out.append(GGUFTensor("output.weight", (f"{EMBED}.weight",), head=True))
    for i in range(cfg.num_layers):
        p, (nh, nkv) = block_prefix(i), cfg.heads(i)
        for g, role in BLOCK_ROLES.items():
            rel = getattr(lay, role)
            if rel is None or (m.fused_qkv and role in ("q", "k", "v")):
                continue
            perm = {"q": nh, "k": nkv}.get(role, 0) if m.permute_qk else 0
            add(f"blk.{i}.{g}", [p + rel], permute=perm)
        if m.fused_qkv:
            add(f"blk.{i}.attn_qkv", [p + lay.q, p + lay.k, p + lay.v], "rows")
        mlp = f"{p}{lay.mlp}."
        if not cfg.is_moe_layer(i):
            if m.fused_gate_up:
                add(f"blk.{i}.ffn_up", [mlp + lay.gate, mlp + lay.up], "rows")
                add(f"blk.{i}.ffn_down", [mlp + lay.down])
            else:
                for g, role in MLP_ROLES.items():
                    add(f"blk.{i}.{g}", [mlp + getattr(lay, role)])
            continue
        add(f"blk.{i}.ffn_gate_inp", [mlp + lay.router], float32=True)
        for g, role in _EXPS.items():
            add(f"blk.{i}.{g}", [f"{mlp}{lay.experts}.{e}.{getattr(lay, role)}" for e in range(cfg.num_experts)],
                "experts")
        for g, role in _SHEXP.items():
            add(f"blk.{i}.{g}", [f"{mlp}{lay.shared_expert}.{getattr(lay, role)}"])
        add(f"blk.{i}.ffn_gate_inp_shexp", [mlp + lay.shared_expert_gate], "vector")
    return out
