"""What a model family looks like, declared once: every other room asks this file.

A `Layout` names the modules of a decoder block by role (the q/k/v/o projections, the MLP's gate/up/
down, the norms, a MoE router and its experts), says which norm feeds which linears (AWQ and
SmoothQuant fold scales into that norm), groups the linears (attention in/out, MLP in/out, router),
and gives the block prefix and the "all linear" set. Compression, PEFT, pruning, KV policies and
speculative decoding ask the layout for names; they never spell `q_proj` themselves.

Names here are leanlm's module names (they follow transformers' Llama names, so most Hugging Face
checkpoints load with an identity key map); how a family's checkpoint keys differ (fused q/k/v,
Mixtral's `block_sparse_moe.experts.N.w1`) is its key map in leanlm/model/families.py.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch.nn as nn

BLOCKS = "model.layers"  # the ModuleList of decoder blocks
EMBED = "model.embed_tokens"
FINAL_NORM = "model.norm"
HEAD = "lm_head"

_BLOCK_RE = re.compile(rf"^{re.escape(BLOCKS)}\.(\d+)\.")


@dataclass(frozen=True)
class Layout:
    """Module names inside one decoder block, by role, relative to the block."""
    attn: str = "self_attn"
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    q_norm: str = "self_attn.q_norm"  # present only when the config has qk_norm
    k_norm: str = "self_attn.k_norm"
    mlp: str = "mlp"
    # inside one MLP (the dense MLP, each expert, the shared expert): its three linears
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    attn_norm: str = "input_layernorm"  # feeds q/k/v
    mlp_norm: str = "post_attention_layernorm"  # feeds the MLP (or the router and the experts)
    attn_post_norm: str | None = None  # normalizes the attention output before the residual add (Gemma)
    mlp_post_norm: str | None = None  # normalizes the MLP output before the residual add (Gemma)
    # mixture of experts (inside `mlp`)
    router: str = "gate"
    experts: str = "experts"
    shared_expert: str = "shared_expert"
    shared_expert_gate: str = "shared_expert_gate"
    # How transformers holds some of these linears in memory (the names peft adapters use there).
    # fused: (one nn.Linear, the linears whose output rows it stacks), relative to the block (Phi-3's
    # qkv_proj is q, k, v). stacked_experts: (a 3-D parameter [experts, rows, in] of the MoE block's
    # experts module, the expert linears whose rows each slice stacks), in the order transformers
    # registers them. router_param: the router is a bare parameter of that name, not an nn.Linear.
    fused: tuple[tuple[str, tuple[str, ...]], ...] = ()
    stacked_experts: tuple[tuple[str, tuple[str, ...]], ...] = ()
    router_param: str | None = None

    # ---- names -----------------------------------------------------------------------------------
    def mlp_prefixes(self, cfg, layer: int) -> list[str]:
        """Relative prefixes of every gate/up/down MLP in a block: the dense MLP, or each expert and the
        shared expert of a MoE block."""
        if not cfg.is_moe_layer(layer):
            return [f"{self.mlp}."]
        out = [f"{self.mlp}.{self.experts}.{e}." for e in range(cfg.num_experts)]
        if cfg.shared_expert_intermediate_size:
            out.append(f"{self.mlp}.{self.shared_expert}.")
        return out

    def groups(self, cfg, layer: int) -> dict[str, list[str]]:
        """The block's linears by group, relative to the block: attn_in (read the attention norm),
        attn_out, mlp_in (read the MLP norm), mlp_out, router (read the MLP norm, stay small)."""
        mlps = self.mlp_prefixes(cfg, layer)
        router = []
        if cfg.is_moe_layer(layer):
            router.append(f"{self.mlp}.{self.router}")
            if cfg.shared_expert_intermediate_size:
                router.append(f"{self.mlp}.{self.shared_expert_gate}")
        return {"attn_in": [self.q, self.k, self.v], "attn_out": [self.o],
                "mlp_in": [p + n for p in mlps for n in (self.gate, self.up)],
                "mlp_out": [p + self.down for p in mlps], "router": router}

    def target(self, cfg, layer: int, word: str) -> list[str] | None:
        """The block's linears a target word names (TARGET_WORDS), relative to the block; None when `word`
        is not a target word (it is then a module name)."""
        g = self.groups(cfg, layer)
        if word in g:
            return g[word]
        if word == "attention":
            return g["attn_in"] + g["attn_out"]
        if word == "mlp":
            return g["mlp_in"] + g["mlp_out"]
        scope, _, role = word.partition(".")
        if scope not in ("experts", "shared_expert") or role not in ("", "gate", "up", "down"):
            return None
        if not cfg.is_moe_layer(layer):
            return []
        if scope == "experts":
            prefixes = [f"{self.mlp}.{self.experts}.{e}." for e in range(cfg.num_experts)]
        else:
            prefixes = [f"{self.mlp}.{self.shared_expert}."] if cfg.shared_expert_intermediate_size else []
        roles = [getattr(self, role)] if role else self.mlp_leaves()
        return [p + n for p in prefixes for n in roles]

    def linears(self, cfg, layer: int) -> list[str]:
        """Every linear of a block, relative to it."""
        return [n for names in self.groups(cfg, layer).values() for n in names]

    def smoothing(self, cfg, layer: int) -> list[tuple[str, str, list[str]]]:
        """(module whose output feeds the linears, how a per-channel scale folds into it, the linears it
        feeds), relative to the block. how = "norm" (the norm's weight) or "rows" (an up projection's
        rows, feeding the matching down projection). Every linear reading the norm is listed, the
        router too: a scale folded into the norm must be undone in all of them."""
        g = self.groups(cfg, layer)
        out = [(self.attn_norm, "norm", g["attn_in"]), (self.mlp_norm, "norm", g["mlp_in"] + g["router"])]
        out += [(p + self.up, "rows", [p + self.down]) for p in self.mlp_prefixes(cfg, layer)]
        return out

    def all_linear(self) -> list[str]:
        """Leaf names of the block linears that PEFT's "all linear" targets (routers excluded)."""
        return sorted({n.rpartition(".")[2] for n in (self.q, self.k, self.v, self.o)} |
                      {self.gate, self.up, self.down})

    def leaf(self, role: str) -> str:
        """The last name part of a role's module ("k" -> "k_proj"): what peft-style suffix targets match."""
        return getattr(self, role).rpartition(".")[2]

    def attention_leaves(self) -> list[str]:
        return [n.rpartition(".")[2] for n in (self.q, self.k, self.v, self.o)]

    def mlp_leaves(self) -> list[str]:
        return [self.gate, self.up, self.down]


# Target words (`leanlm finetune --targets`): the layout groups, plus attention / mlp (every MLP linear:
# the dense MLP, or the experts and the shared expert), experts and shared_expert, and one of their
# three linears (experts.gate, experts.up, experts.down, shared_expert.down...).
TARGET_WORDS = ("attention", "attn_in", "attn_out", "mlp", "mlp_in", "mlp_out", "router", "experts",
                "experts.gate", "experts.up", "experts.down", "shared_expert", "shared_expert.gate",
                "shared_expert.up", "shared_expert.down")

LLAMA = Layout()
# Mixtral, Qwen2-MoE, Qwen3-MoE: transformers 5 keeps the experts as two 3-D parameters and the router as
# a bare weight (peft reaches them with target_parameters).
MOE = Layout(stacked_experts=(("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))),
             router_param="weight")
# Phi-3: the checkpoint (and transformers) fuse q/k/v and gate/up; leanlm splits them on load.
PHI3 = Layout(fused=(("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                     ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj"))))
# Gemma 2/3: four norms per block; transformers' `post_attention_layernorm` normalizes the attention
# *output* there, and `pre_feedforward_layernorm` is the one feeding the MLP.
GEMMA = Layout(mlp_norm="pre_feedforward_layernorm", attn_post_norm="post_attention_layernorm",
               mlp_post_norm="post_feedforward_layernorm")


def layout_of(model_or_cfg) -> Layout:
    """The layout of a model (or a ModelConfig)."""
    from leanlm.model.families import family

    cfg = getattr(model_or_cfg, "config", model_or_cfg)
    return family(cfg.model_type).layout


def block_prefix(i: int) -> str:
    return f"{BLOCKS}.{i}."


def block_index(name: str) -> int | None:
    """The block number of a full module name, or None outside the blocks."""
    m = _BLOCK_RE.match(name)
    return int(m.group(1)) if m else None


def blocks(model) -> nn.ModuleList:
    return base_model(model).get_submodule(BLOCKS)


def base_model(model) -> nn.Module:
    """The Transformer under a PEFT wrapper (prompt/prefix tuning wrap the model)."""
    return getattr(model, "base_model", model)


def embedding(model) -> nn.Module:
    return base_model(model).get_submodule(EMBED)


def head(model) -> nn.Module:
    """The output head module (for code that swaps or skips it; computing logits is model.logits(hidden))."""
    return base_model(model).get_submodule(HEAD)


def block_pattern() -> str:
    """A regex matching the full name of every module inside the decoder blocks."""
    return rf"^{re.escape(BLOCKS)}\.\d+\."


def set_blocks(model, new: nn.ModuleList) -> None:
    """Replace the model's list of decoder blocks (dropping or reordering blocks)."""
    parent, _, child = BLOCKS.rpartition(".")
    setattr(base_model(model).get_submodule(parent), child, new)


def with_blocks(model, keep: list[int]):
    """A shallow view of the model that runs only the blocks `keep` (weights shared, nothing copied)."""
    import copy

    view = copy.copy(model)
    view._modules = dict(model._modules)
    owner, parts = view, BLOCKS.split(".")
    for p in parts[:-1]:  # copy every module on the path to the block list, so the original is untouched
        child = copy.copy(owner._modules[p])
        child._modules = dict(child._modules)
        owner._modules[p] = child
        owner = child
    owner._modules[parts[-1]] = nn.ModuleList(blocks(model)[i] for i in keep)
    return view


def all_linear_any_family() -> list[str]:
    """Leaf names of the "all linear" set of every family, for hooks that see module names before the
    model's family is known (QLoRA's quantize-on-load)."""
    from leanlm.model.families import FAMILIES

    return sorted({n for f in FAMILIES.values() for n in f.layout.all_linear()})


def block_linears(model, layer: int, group: str | None = None) -> list[str]:
    """Full names of a block's linears, optionally one group of them."""
    lay, cfg = layout_of(model), base_model(model).config
    rel = lay.groups(cfg, layer)[group] if group else lay.linears(cfg, layer)
    return [block_prefix(layer) + n for n in rel]


def all_block_linears(model, group: str | None = None) -> list[str]:
    return [n for i in range(len(blocks(model))) for n in block_linears(model, i, group)]


def target_linears(model, word: str) -> list[str] | None:
    """Full names of the linears a target word (TARGET_WORDS) names in every block; None when `word` is
    not a target word."""
    lay, cfg = layout_of(model), base_model(model).config
    if lay.target(cfg, 0, word) is None:
        return None
    return [block_prefix(i) + n for i in range(len(blocks(model))) for n in lay.target(cfg, i, word)]


@dataclass(frozen=True)
class HFLinear:
    """A linear, or a stack of expert linears, as transformers holds it and leanlm's linears that make it.
    param None: an nn.Linear `name`; else the parameter `param` of module `name`. parts: per expert (one
    for a plain linear), leanlm's full names whose output rows it stacks, in order."""
    name: str
    param: str | None
    parts: tuple[tuple[str, ...], ...]


def hf_linears(model) -> list[HFLinear]:
    """Every linear transformers holds differently from leanlm (fused, stacked experts, a bare router
    weight), with full names; other linears have the same name in both."""
    lay, cfg = layout_of(model), base_model(model).config
    out = []
    for i in range(len(blocks(model))):
        p = block_prefix(i)
        out += [HFLinear(p + fused, None, (tuple(p + n for n in parts),)) for fused, parts in lay.fused]
        if not cfg.is_moe_layer(i):
            continue
        ex = f"{p}{lay.mlp}.{lay.experts}"
        out += [HFLinear(ex, param, tuple(tuple(f"{ex}.{e}.{r}" for r in roles) for e in range(cfg.num_experts)))
                for param, roles in lay.stacked_experts]
        if lay.router_param:
            router = f"{p}{lay.mlp}.{lay.router}"
            out.append(HFLinear(router, lay.router_param, ((router,),)))
    return out
