"""Mixture of experts: Mixtral, Qwen2-MoE and Qwen3-MoE blocks, their config fields and checkpoint keys.

A `SparseMoE` replaces a block's MLP: a router (`gate`, an nn.Linear hidden -> experts) picks the
top-k experts of each token, and `experts` is a ModuleList of ordinary gate/up/down MLPs (plain
nn.Linear each), so quantization, pruning and LoRA treat an expert like any MLP. Each expert runs on
the tokens routed to it only (tokens grouped by expert, results scattered back with index_add), never
every expert on every token. Qwen2-MoE adds an always-on shared expert scaled by a sigmoid gate.

Routing follows transformers: softmax over all experts (in fp32), top-k, then the k weights are
renormalized to sum to 1 when `norm_topk_prob` (always for Mixtral; a config field for the Qwens).

Router load (tokens per expert, per layer) is recorded only inside `with router_stats(model) as s:`;
outside it the cost is one attribute test per block.
"""
from __future__ import annotations

import re
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from leanlm.errors import LeanLMError


class SparseMoE(nn.Module):
    """forward(x [..., hidden]) -> [..., hidden]. `make_mlp(width)` builds one gate/up/down MLP."""

    def __init__(self, cfg, layer: int, make_mlp):
        super().__init__()
        if not 0 < cfg.num_experts_per_tok <= cfg.num_experts:
            raise LeanLMError(f"num_experts_per_tok={cfg.num_experts_per_tok} must be in 1..num_experts="
                              f"{cfg.num_experts}")
        width = cfg.expert_width(layer)
        self.num_experts, self.top_k, self.norm_topk_prob = cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.layer = layer
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(make_mlp(width) for _ in range(cfg.num_experts))
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = make_mlp(cfg.shared_expert_width(layer))
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
        self.counts: torch.Tensor | None = None  # tokens per expert while router_stats is on

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, hidden] -> (weights [N, k] in x's dtype, expert ids [N, k])."""
        probs = F.softmax(self.gate(x).float(), dim=-1)
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            w = w / w.sum(-1, keepdim=True)
        return w.to(x.dtype), idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        w, idx = self.route(x)
        if self.counts is not None:
            self.counts += torch.bincount(idx.flatten(), minlength=self.num_experts).to(self.counts)
        out = self._one_token(x, w, idx) if x.shape[0] == 1 else self._grouped(x, w, idx)
        if hasattr(self, "shared_expert"):
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.reshape(shape)

    def _one_token(self, x, w, idx):
        """Batch-1 decode: no sorting, just the k chosen experts. Each gets its own row of the input
        (calibration hooks tell inputs apart by storage)."""
        xs = x.expand(self.top_k, -1).clone()
        out = None
        for j, e in enumerate(idx[0].tolist()):
            y = self.experts[e](xs[j:j + 1]) * w[:, j:j + 1]
            out = y if out is None else out + y
        return out

    def _grouped(self, x, w, idx):
        """Tokens sorted by expert; each expert runs once on its contiguous slice; index_add back."""
        flat = idx.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        tok = order // self.top_k
        xs = x[tok]
        ws = w.flatten()[order].unsqueeze(-1)
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n:
                out.index_add_(0, tok[start:start + n], self.experts[e](xs[start:start + n]) * ws[start:start + n])
            start += n
        return out


def moe_blocks(model) -> list[SparseMoE]:
    return [m for m in model.modules() if isinstance(m, SparseMoE)]


@contextmanager
def router_stats(model):
    """Record tokens per expert in every MoE block while inside: yields {layer: counts [experts]}
    (int64 tensors, updated in place as the model runs; each of a token's top-k picks counts once, and
    the pad positions of a left-padded batch count too)."""
    mods = moe_blocks(model)
    if not mods:
        raise LeanLMError("router_stats: the model has no mixture-of-experts blocks")
    stats = {}
    for m in mods:
        m.counts = torch.zeros(m.num_experts, dtype=torch.int64)
        stats[m.layer] = m.counts
    try:
        yield stats
    finally:
        for m in mods:
            m.counts = None


def load_summary(counts: torch.Tensor) -> dict:
    """Balance of one layer's counts: share per expert, max/mean (1 = perfectly balanced), unused experts."""
    c = counts.double()
    total = float(c.sum())
    share = (c / total) if total else c
    return {"tokens": int(total), "share": [round(float(s), 4) for s in share],
            "max_over_mean": float(c.max() / c.mean()) if total else 0.0, "unused": int((c == 0).sum())}


# ---- config.json fields ------------------------------------------------------------------------------
# Ignored on purpose: router_aux_loss_coef and output_router_logits (the training-time load-balancing
# loss; leanlm's fine-tuning trains adapters, not routers), router_jitter_noise (training-only noise).

def read_moe_config(d: dict, num_layers: int, norm_default: bool) -> dict:
    """ModelConfig fields of a transformers MoE config.json (Mixtral names experts num_local_experts,
    the Qwens num_experts; Qwen3-MoE in transformers 5 writes num_local_experts too)."""
    n = int(d.get("num_local_experts", d.get("num_experts")) or 0)
    if not n:
        return {}
    step = int(d.get("decoder_sparse_step", 1) or 1)
    dense = set(d.get("mlp_only_layers") or [])
    layers = [i for i in range(num_layers) if i not in dense and (i + 1) % step == 0]
    moe_inter = d.get("moe_intermediate_size")
    return {"num_experts": n, "num_experts_per_tok": int(d["num_experts_per_tok"]),
            "moe_intermediate_size": None if moe_inter is None else int(moe_inter),
            "shared_expert_intermediate_size": int(d.get("shared_expert_intermediate_size") or 0),
            "norm_topk_prob": bool(d.get("norm_topk_prob", norm_default)),
            "moe_layers": None if len(layers) == num_layers else layers}


def write_moe_config(cfg, experts_key: str = "num_experts") -> dict:
    """The transformers config.json fields of a Qwen-MoE-style config (Mixtral: see write_mixtral)."""
    layers = range(cfg.num_layers)
    return {experts_key: cfg.num_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
            "moe_intermediate_size": cfg.moe_intermediate_size or cfg.intermediate_size,
            "shared_expert_intermediate_size": cfg.shared_expert_intermediate_size,
            "norm_topk_prob": cfg.norm_topk_prob, "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i in layers if not cfg.is_moe_layer(i)]}


def write_mixtral(cfg) -> dict:
    if cfg.moe_layers is not None or cfg.shared_expert_intermediate_size:
        raise LeanLMError("a Mixtral config cannot express dense layers or a shared expert")
    if cfg.moe_intermediate_size not in (None, cfg.intermediate_size):
        raise LeanLMError("a Mixtral config has one intermediate_size: the experts' width")
    if not cfg.norm_topk_prob:
        raise LeanLMError("Mixtral always renormalizes the top-k router weights (norm_topk_prob)")
    return {"num_local_experts": cfg.num_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
            "router_jitter_noise": 0.0}


# ---- checkpoint keys ------------------------------------------------------------------------------
# Hub checkpoints (and transformers' save_pretrained) store one tensor per expert linear; transformers 5
# keeps experts in memory as fused 3-D tensors (experts.gate_up_proj [E, 2I, H], experts.down_proj
# [E, H, I]); leanlm holds one nn.Linear per expert. Both stored forms load.
_FUSED = re.compile(r"^(.*\.experts)\.(gate_up_proj|down_proj)$")
_MIXTRAL_IN = [(re.compile(r"\.block_sparse_moe\."), ".mlp."), (re.compile(r"(\.experts\.\d+)\.w1\."), r"\1.gate_proj."),
               (re.compile(r"(\.experts\.\d+)\.w3\."), r"\1.up_proj."), (re.compile(r"(\.experts\.\d+)\.w2\."), r"\1.down_proj.")]
_MIXTRAL_OUT = [(re.compile(r"(\.layers\.\d+)\.mlp\."), r"\1.block_sparse_moe."),
                (re.compile(r"(\.experts\.\d+)\.gate_proj\."), r"\1.w1."),
                (re.compile(r"(\.experts\.\d+)\.up_proj\."), r"\1.w3."), (re.compile(r"(\.experts\.\d+)\.down_proj\."), r"\1.w2.")]


def _rename(key: str, rules) -> str:
    for pat, rep in rules:
        key = pat.sub(rep, key)
    return key


def split_fused_experts(sd: dict, cfg=None) -> dict:
    """Fused 3-D expert tensors -> one gate/up/down weight per expert; other keys unchanged."""
    out = {}
    for k, v in sd.items():
        m = _FUSED.match(k)
        if m is None or not isinstance(v, torch.Tensor) or v.dim() != 3:
            out[k] = v
            continue
        base, what = m.groups()
        for e in range(v.shape[0]):
            if what == "down_proj":
                out[f"{base}.{e}.down_proj.weight"] = v[e]
            else:
                gate, up = v[e].chunk(2, dim=0)
                out[f"{base}.{e}.gate_proj.weight"], out[f"{base}.{e}.up_proj.weight"] = gate, up
    return out


def mixtral_load_key(key: str) -> str:
    return _rename(key, _MIXTRAL_IN)


def mixtral_load_keys(sd: dict, cfg=None) -> dict:
    return split_fused_experts({mixtral_load_key(k): v for k, v in sd.items()})


def mixtral_save_keys(sd: dict, cfg=None) -> dict:
    return {_rename(k, _MIXTRAL_OUT): v for k, v in sd.items()}
