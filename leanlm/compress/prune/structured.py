"""Structured pruning that really shrinks: KV groups, MLP channels and whole blocks are removed.

Units and what removing one deletes:
  * a KV group of layer i: its k/v rows, the rows of the query heads sharing it, and the matching
    o_proj columns (GQA: query heads cannot outlive their KV head, so the group is the unit);
  * an MLP channel j: row j of gate_proj and up_proj and column j of down_proj;
  * a block: the whole residual branch (attention + MLP) of one layer.
The result is a dense Transformer with per-layer shapes in its config (layer_num_heads,
layer_num_kv_heads, layer_intermediate_size, num_layers); when every layer ends with the same
shape the uniform fields are set instead, so the model still exports as a plain HF folder.

`mask_units` zeroes the same units in place without changing shapes: the masked dense model and
the shrunk model compute the same function (tests check it).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from leanlm.errors import LeanLMError
from leanlm.model.moe import SparseMoE

IMPORTANCE = ("activation", "taylor", "magnitude")


@dataclass
class StructuredConfig:
    target: float = 0.2  # fraction of the model's parameters to remove (embeddings included)
    importance: str = "activation"  # activation (|W| x input norm) | taylor (|w * dL/dw|) | magnitude
    head_ratio: float | None = None  # fraction of KV groups removed per layer; None = same as the MLP's
    skip_first: int = 0  # keep the first / last blocks whole (LLM-Pruner skips them)
    skip_last: int = 0
    channel_multiple: int = 8  # round kept MLP widths to a multiple of this (matmul-friendly)
    taylor_samples: int = 8  # calibration sequences used for gradients (taylor only)

    def __post_init__(self):
        if not 0.0 < self.target < 0.9:
            raise LeanLMError(f"structured target {self.target}: expected a fraction of parameters in (0, 0.9)")
        if self.importance not in IMPORTANCE:
            raise LeanLMError(f"structured importance {self.importance!r}: expected one of {', '.join(IMPORTANCE)}")
        if self.head_ratio is not None and not 0.0 <= self.head_ratio < 1.0:
            raise LeanLMError(f"head_ratio {self.head_ratio}: expected a fraction in [0, 1)")


@dataclass
class LayerDropConfig:
    num_blocks: int = 4  # blocks removed, the most redundant (highest input/output cosine) first
    skip_last: int = 1  # never drop the last blocks (they shape the output distribution)


# ---------------------------------------------------------------- importance
def _group_cols(attn, g: int) -> slice:
    per = attn.nh // attn.nkv * attn.hd
    return slice(g * per, (g + 1) * per)


def _kv_rows(attn, g: int) -> slice:
    return slice(g * attn.hd, (g + 1) * attn.hd)


def attention_group_importance(attn, o_input_sq: torch.Tensor | None, kind: str,
                               grads: dict | None = None) -> torch.Tensor:
    """One score per KV group of this attention module."""
    scores = []
    for g in range(attn.nkv):
        qs, kvs = _group_cols(attn, g), _kv_rows(attn, g)
        if kind == "taylor":
            s = sum(float((p.detach()[idx] * grads[p][idx]).abs().sum()) for p, idx in (
                (attn.q_proj.weight, qs), (attn.k_proj.weight, kvs), (attn.v_proj.weight, kvs),
                (attn.o_proj.weight, (slice(None), qs))))
        else:
            w = attn.o_proj.weight.detach()[:, qs].float()
            col = w.pow(2).sum(0)  # ||W_o[:, c]||^2
            if kind == "activation":
                col = col * o_input_sq[qs].float()  # times ||X_c||^2: the column's output energy
            s = float(col.sum())
        scores.append(s)
    return torch.tensor(scores, dtype=torch.float64)


def mlp_channel_importance(mlp, down_input_sq: torch.Tensor | None, kind: str,
                           grads: dict | None = None) -> torch.Tensor:
    """One score per intermediate channel: output energy of down_proj's column (or its Taylor term)."""
    wd = mlp.down_proj.weight.detach().float()
    if kind == "taylor":
        s = (wd * grads[mlp.down_proj.weight].float()).abs().sum(0)
        for lin in (mlp.gate_proj, mlp.up_proj):
            s = s + (lin.weight.detach().float() * grads[lin.weight].float()).abs().sum(1)
        return s.double()
    col = wd.pow(2).sum(0)
    if kind == "activation":
        col = col * down_input_sq.float()
    return col.double()


def taylor_gradients(model, samples: torch.Tensor, batch: int = 2) -> dict:
    """Gradients of the next-token loss over `samples` [n, T], for first-order (Taylor) importance."""
    params = [p for blk in model.model.layers for p in blk.parameters()]
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    try:
        with torch.enable_grad():
            for i in range(0, samples.shape[0], batch):
                ids = samples[i:i + batch]
                logits = model(ids)
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
                (loss * ids.shape[0] / samples.shape[0]).backward()
        grads = {p: p.grad.detach().clone() for p in params}
    finally:
        for p, r in frozen:
            p.requires_grad_(r)
            p.grad = None
    return grads


# ---------------------------------------------------------------- planning
def layer_params(cfg, i: int) -> tuple[int, int]:
    """(attention params per KV group, MLP params per channel) of layer i (biases ignored)."""
    nh, nkv = cfg.heads(i)
    per_group = cfg.hidden_size * cfg.head_dim * (2 * nh // nkv + 2)
    return per_group, 3 * cfg.hidden_size


def plan(model, cfg: StructuredConfig) -> tuple[list[int], list[int]]:
    """KV groups and MLP channels to remove per layer so that about cfg.target of all params go.

    Heads are removed at head_ratio (default: the MLP ratio) per pruned layer, rounded to whole
    groups; the MLP ratio is then solved so the total lands on the target.
    """
    mc = model.config
    total = model.num_parameters()
    layers = [i for i in range(mc.num_layers) if cfg.skip_first <= i < mc.num_layers - cfg.skip_last]
    if not layers:
        raise LeanLMError(f"structured: skip_first={cfg.skip_first} and skip_last={cfg.skip_last} leave no block to prune")
    want = cfg.target * total
    prunable = sum(layer_params(mc, i)[0] * mc.heads(i)[1] + layer_params(mc, i)[1] * mc.intermediate(i)
                   for i in layers)
    if want > 0.95 * prunable:
        raise LeanLMError(f"structured target {cfg.target}: the pruned blocks hold only {prunable / total:.0%} "
                          "of the parameters; lower the target or skip fewer blocks")
    ratio = want / prunable
    head_ratio = ratio if cfg.head_ratio is None else cfg.head_ratio
    groups = [0] * mc.num_layers
    for i in layers:
        groups[i] = min(mc.heads(i)[1] - 1, int(math.floor(head_ratio * mc.heads(i)[1] + 0.5)))
    removed_attn = sum(layer_params(mc, i)[0] * groups[i] for i in layers)
    mlp_total = sum(layer_params(mc, i)[1] * mc.intermediate(i) for i in layers)
    mlp_ratio = max(0.0, (want - removed_attn) / mlp_total)
    if mlp_ratio >= 0.95:
        raise LeanLMError(f"structured target {cfg.target} with head_ratio {head_ratio}: the MLPs would lose "
                          f"{mlp_ratio:.0%}; lower the target or raise head_ratio")
    channels = [0] * mc.num_layers
    for i in layers:
        inter = mc.intermediate(i)
        keep = int(round(inter * (1 - mlp_ratio) / cfg.channel_multiple)) * cfg.channel_multiple
        channels[i] = inter - max(cfg.channel_multiple, min(inter, keep))
    return groups, channels


def keep_sets(scores_attn: list[torch.Tensor], scores_mlp: list[torch.Tensor], groups: list[int],
              channels: list[int]) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Keep the highest-scoring units; kept indices stay in their original order."""
    heads, chans = [], []
    for sa, sm, g, c in zip(scores_attn, scores_mlp, groups, channels):
        heads.append(sorted(torch.topk(sa, len(sa) - g).indices.tolist()))
        chans.append(torch.topk(sm, len(sm) - c).indices.sort().values)
    return heads, chans


# ---------------------------------------------------------------- masking and shrinking
def mask_units(model, keep_groups: list[list[int]], keep_channels: list[torch.Tensor]) -> None:
    """Zero the removed units' output columns in place (same function as the shrunk model)."""
    with torch.no_grad():
        for blk, kg, kc in zip(model.model.layers, keep_groups, keep_channels):
            attn, mlp = blk.self_attn, blk.mlp
            for g in range(attn.nkv):
                if g not in kg:
                    attn.o_proj.weight[:, _group_cols(attn, g)] = 0
            drop = torch.ones(mlp.down_proj.in_features, dtype=torch.bool)
            drop[kc] = False
            mlp.down_proj.weight[:, drop] = 0


def _slice_linear(lin: nn.Linear, rows=None, cols=None) -> nn.Linear:
    w = lin.weight.detach()
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if lin.bias is not None:
            new.bias.copy_(lin.bias.detach() if rows is None else lin.bias.detach()[rows])
    return new


def _uniformize(cfg):
    """Per-layer lists collapse to the uniform fields when every layer agrees."""
    n = cfg.num_layers
    nh = [cfg.heads(i)[0] for i in range(n)]
    nkv = [cfg.heads(i)[1] for i in range(n)]
    inter = [cfg.intermediate(i) for i in range(n)]
    if len(set(nh)) == 1 and len(set(nkv)) == 1 and len(set(inter)) == 1 and n > 0:
        return dataclasses.replace(cfg, num_heads=nh[0], num_kv_heads=nkv[0], intermediate_size=inter[0],
                                   layer_num_heads=None, layer_num_kv_heads=None, layer_intermediate_size=None)
    return dataclasses.replace(cfg, layer_num_heads=nh, layer_num_kv_heads=nkv, layer_intermediate_size=inter)


def shrink_block(blk, kg: list[int], kc: torch.Tensor) -> None:
    """Keep KV groups `kg` and MLP channels `kc` of one block: smaller Linear modules, in place."""
    attn, mlp = blk.self_attn, blk.mlp
    if len(kg) == 0 or len(kc) == 0:
        raise LeanLMError("structured: a layer would lose every head or channel; drop the block instead")
    if len(kg) < attn.nkv:
        qrows = torch.cat([torch.arange(attn.nh * attn.hd)[_group_cols(attn, g)] for g in kg])
        kvrows = torch.cat([torch.arange(attn.nkv * attn.hd)[_kv_rows(attn, g)] for g in kg])
        per = attn.nh // attn.nkv
        attn.q_proj = _slice_linear(attn.q_proj, rows=qrows)
        attn.k_proj = _slice_linear(attn.k_proj, rows=kvrows)
        attn.v_proj = _slice_linear(attn.v_proj, rows=kvrows)
        attn.o_proj = _slice_linear(attn.o_proj, cols=qrows)
        attn.nkv, attn.nh = len(kg), len(kg) * per
    if len(kc) < mlp.down_proj.in_features:
        mlp.gate_proj = _slice_linear(mlp.gate_proj, rows=kc)
        mlp.up_proj = _slice_linear(mlp.up_proj, rows=kc)
        mlp.down_proj = _slice_linear(mlp.down_proj, cols=kc)


def sync_config(model):
    """Rewrite model.config's per-layer shapes from the modules (after shrink_block / drop)."""
    blocks = model.model.layers
    model.config = _uniformize(dataclasses.replace(
        model.config, num_layers=len(blocks), layer_num_heads=[b.self_attn.nh for b in blocks],
        layer_num_kv_heads=[b.self_attn.nkv for b in blocks],
        layer_intermediate_size=[model.config.intermediate_size if isinstance(b.mlp, SparseMoE)
                                 else b.mlp.down_proj.in_features for b in blocks]))
    return model


def shrink(model, keep_groups: list[list[int]], keep_channels: list[torch.Tensor]):
    """Remove every unit not kept, in place: smaller Linear modules and a per-layer config."""
    for blk, kg, kc in zip(model.model.layers, keep_groups, keep_channels):
        shrink_block(blk, kg, kc)
    return sync_config(model)


def drop_blocks(model, drop: list[int]):
    """Delete whole blocks in place; later blocks are renumbered (the KV cache indexes by layer)."""
    cfg = model.config
    drop = sorted(set(drop))
    if any(not 0 <= i < cfg.num_layers for i in drop) or len(drop) >= cfg.num_layers:
        raise LeanLMError(f"layer drop {drop}: the model has blocks 0..{cfg.num_layers - 1} and must keep one")
    kept = [i for i in range(cfg.num_layers) if i not in drop]
    model.model.layers = nn.ModuleList(model.model.layers[i] for i in kept)
    for new_i, blk in enumerate(model.model.layers):
        blk.self_attn.layer = new_i
        if isinstance(blk.mlp, SparseMoE):
            blk.mlp.layer = new_i
    if cfg.num_experts:  # which of the kept blocks are mixtures of experts, renumbered
        moe = [new_i for new_i, old in enumerate(kept) if cfg.is_moe_layer(old)]
        model.config = dataclasses.replace(cfg, moe_layers=None if len(moe) == len(kept) else moe)
    return sync_config(model)
