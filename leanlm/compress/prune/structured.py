"""Structured pruning that really shrinks: KV groups, MLP channels and whole blocks are removed.

Units and what removing one deletes:
  * a KV group of layer i: its k/v rows, the rows of the query heads sharing it, and the matching
    columns of the attention output (GQA: query heads cannot outlive their KV head, so the group is
    the unit);
  * an MLP channel j: row j of the gate and up projections and column j of the down projection
    of one MLP, named by its prefix in the block (the dense MLP; in a MoE block each expert and the
    shared expert, the router untouched). Every expert of a layer keeps the same number of channels
    (each chooses its own by its own scores), so the layer's experts keep one width;
  * a block: the whole residual branch (attention + MLP) of one layer.
Module names come from the family's layout (leanlm/model/layout.py).
The result is a Transformer with per-layer shapes in its config (layer_num_heads, layer_num_kv_heads,
layer_intermediate_size, layer_moe_intermediate_size, layer_shared_expert_intermediate_size,
num_layers); when every layer ends with the same
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
from leanlm.model.layout import Layout, base_model, blocks, layout_of, set_blocks
from leanlm.model.surgery import replace_module
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


# ---------------------------------------------------------------- importance
def _group_cols(attn, g: int) -> slice:
    per = attn.nh // attn.nkv * attn.hd
    return slice(g * per, (g + 1) * per)


def _kv_rows(attn, g: int) -> slice:
    return slice(g * attn.hd, (g + 1) * attn.hd)


def mlp_widths(blk, lay: Layout, cfg, layer: int) -> dict[str, int]:
    """{prefix of each gate/up/down MLP in the block (the dense MLP, or each expert and the shared
    expert): its width}, read from the modules."""
    return {p: blk.get_submodule(p + lay.down).in_features for p in lay.mlp_prefixes(cfg, layer)}


def attention_group_importance(blk, lay: Layout, o_input_sq: torch.Tensor | None, kind: str,
                               grads: dict | None = None) -> torch.Tensor:
    """One score per KV group of this block's attention."""
    attn = blk.get_submodule(lay.attn)
    q, k, v, o = (blk.get_submodule(getattr(lay, r)).weight for r in ("q", "k", "v", "o"))
    scores = []
    for g in range(attn.nkv):
        qs, kvs = _group_cols(attn, g), _kv_rows(attn, g)
        if kind == "taylor":
            s = sum(float((p.detach()[idx] * grads[p][idx]).abs().sum()) for p, idx in (
                (q, qs), (k, kvs), (v, kvs), (o, (slice(None), qs))))
        else:
            w = o.detach()[:, qs].float()
            col = w.pow(2).sum(0)  # ||W_o[:, c]||^2
            if kind == "activation":
                col = col * o_input_sq[qs].float()  # times ||X_c||^2: the column's output energy
            s = float(col.sum())
        scores.append(s)
    return torch.tensor(scores, dtype=torch.float64)


def mlp_channel_importance(blk, lay: Layout, prefix: str, down_input_sq: torch.Tensor | None, kind: str,
                           grads: dict | None = None) -> torch.Tensor:
    """One score per intermediate channel of the MLP at `prefix`: output energy of the down projection's
    column (or its Taylor term)."""
    down = blk.get_submodule(prefix + lay.down).weight
    wd = down.detach().float()
    col = wd.pow(2).sum(0)
    if kind == "taylor":
        s = (wd * grads[down].float()).abs().sum(0)
        for role in (lay.gate, lay.up):
            w = blk.get_submodule(prefix + role).weight
            s = s + (w.detach().float() * grads[w].float()).abs().sum(1)
        return (s if s.any() else col).double()  # an expert no token reached: no gradient, its magnitude
    if kind == "activation" and down_input_sq.any():  # (an expert no token reached: its magnitude)
        col = col * down_input_sq.float()
    return col.double()


def importance(model, kind: str, grads: dict | None = None) -> tuple[list[torch.Tensor], list[dict]]:
    """Weight-only scores (magnitude or taylor) of every block: (KV-group scores, {MLP prefix: channel
    scores})."""
    lay, cfg = layout_of(model), base_model(model).config
    sa = [attention_group_importance(b, lay, None, kind, grads) for b in blocks(model)]
    sm = [{p: mlp_channel_importance(b, lay, p, None, kind, grads) for p in lay.mlp_prefixes(cfg, i)}
          for i, b in enumerate(blocks(model))]
    return sa, sm


def taylor_gradients(model, samples: torch.Tensor, batch: int = 2) -> dict:
    """Gradients of the next-token loss over `samples` [n, T], for first-order (Taylor) importance."""
    params = [p for blk in blocks(model) for p in blk.parameters()]
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
        # a MoE expert no token was routed to gets no gradient: zeros (its score falls back to magnitude)
        grads = {p: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params}
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


def plan(model, cfg: StructuredConfig) -> tuple[list[int], list[dict[str, int]]]:
    """KV groups and MLP channels to remove per layer so that about cfg.target of all params go:
    (groups per layer, {MLP prefix: channels} per layer).

    Heads are removed at head_ratio (default: the MLP ratio) per pruned layer, rounded to whole
    groups; the MLP ratio is then solved so the total lands on the target. Every MLP of a layer (each
    expert, the shared expert) loses the same share of its channels.
    """
    mc = model.config
    lay = layout_of(model)
    widths = [mlp_widths(b, lay, mc, i) for i, b in enumerate(blocks(model))]
    total = model.num_parameters()
    layers = [i for i in range(mc.num_layers) if cfg.skip_first <= i < mc.num_layers - cfg.skip_last]
    if not layers:
        raise LeanLMError(f"structured: skip_first={cfg.skip_first} and skip_last={cfg.skip_last} leave no block to prune")
    want = cfg.target * total
    prunable = sum(layer_params(mc, i)[0] * mc.heads(i)[1] + layer_params(mc, i)[1] * sum(widths[i].values())
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
    mlp_total = sum(layer_params(mc, i)[1] * sum(widths[i].values()) for i in layers)
    mlp_ratio = max(0.0, (want - removed_attn) / mlp_total)
    if mlp_ratio >= 0.95:
        raise LeanLMError(f"structured target {cfg.target} with head_ratio {head_ratio}: the MLPs would lose "
                          f"{mlp_ratio:.0%}; lower the target or raise head_ratio")
    channels = [{p: 0 for p in w} for w in widths]
    for i in layers:
        for p, inter in widths[i].items():
            mult = min(cfg.channel_multiple, inter)  # a narrow expert keeps at least one multiple (or all)
            keep = int(round(inter * (1 - mlp_ratio) / mult)) * mult
            channels[i][p] = inter - max(mult, min(inter, keep))
    return groups, channels


def keep_sets(scores_attn: list[torch.Tensor], scores_mlp: list, groups: list[int],
              channels: list) -> tuple[list[list[int]], list[dict[str, torch.Tensor]]]:
    """Keep the highest-scoring units; kept indices stay in their original order. scores_mlp[i] and
    channels[i] are {MLP prefix: scores} and {MLP prefix: channels to remove}; a block with one MLP
    may give a tensor and an int."""
    heads, chans = [], []
    for sa, sm, g, c in zip(scores_attn, scores_mlp, groups, channels):
        heads.append(sorted(torch.topk(sa, len(sa) - g).indices.tolist()))
        if not isinstance(sm, dict):
            sm = {None: sm}
        if not isinstance(c, dict):
            if len(sm) != 1:
                raise LeanLMError("keep_sets: a block with several MLPs needs channels per MLP prefix")
            c = {next(iter(sm)): c}
        chans.append({p: torch.topk(s, len(s) - c[p]).indices.sort().values for p, s in sm.items()})
    return heads, chans


def _per_prefix(blk, lay: Layout, cfg, layer: int, kc) -> dict[str, torch.Tensor]:
    """keep_sets' {prefix: kept} for block `layer` (a bare tensor or None key: its one MLP)."""
    prefixes = lay.mlp_prefixes(cfg, layer)
    if isinstance(kc, dict) and None not in kc:
        return kc
    one = kc[None] if isinstance(kc, dict) else kc
    if len(prefixes) != 1:
        raise LeanLMError(f"structured: block {layer} has {len(prefixes)} MLPs; give kept channels per prefix")
    return {prefixes[0]: one}


# ---------------------------------------------------------------- masking and shrinking
def mask_units(model, keep_groups: list[list[int]], keep_channels: list) -> None:
    """Zero the removed units' output columns in place (same function as the shrunk model)."""
    lay, cfg = layout_of(model), base_model(model).config
    with torch.no_grad():
        for i, (blk, kg, kc) in enumerate(zip(blocks(model), keep_groups, keep_channels)):
            attn, o = blk.get_submodule(lay.attn), blk.get_submodule(lay.o)
            for g in range(attn.nkv):
                if g not in kg:
                    o.weight[:, _group_cols(attn, g)] = 0
            for p, kept in _per_prefix(blk, lay, cfg, i, kc).items():
                down = blk.get_submodule(p + lay.down)
                drop = torch.ones(down.in_features, dtype=torch.bool)
                drop[kept] = False
                down.weight[:, drop] = 0


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


def _fill(values: list) -> list[int]:
    """Per-layer widths where None marks a layer without that kind of MLP: filled with a width some
    layer has, so a list whose real entries agree collapses to one value."""
    real = [v for v in values if v is not None]
    return [real[0] if v is None else v for v in values] if real else []


def _uniform_or_list(scalar: str, per_layer: str, values: list) -> dict:
    """{scalar field: the value} when every layer agrees, else {per-layer field: the list}."""
    if not values:
        return {per_layer: None}
    if len(set(values)) == 1:
        return {scalar: values[0], per_layer: None}
    return {per_layer: values}


def _uniformize(cfg, nh: list[int], nkv: list[int], dense: list, expert: list, shared: list):
    """The config with these per-layer shapes (None: the layer has no such MLP); per-layer lists
    collapse to the uniform fields when every layer agrees. Experts follow intermediate_size when the
    config has no moe_intermediate_size (Mixtral: every block is MoE)."""
    if cfg.num_experts and cfg.moe_intermediate_size is None:
        dense = [e if d is None else d for d, e in zip(dense, expert)]
        expert = []
    kw = {**_uniform_or_list("num_heads", "layer_num_heads", nh),
          **_uniform_or_list("num_kv_heads", "layer_num_kv_heads", nkv),
          **_uniform_or_list("intermediate_size", "layer_intermediate_size", _fill(dense)),
          **_uniform_or_list("moe_intermediate_size", "layer_moe_intermediate_size", _fill(expert)),
          **_uniform_or_list("shared_expert_intermediate_size", "layer_shared_expert_intermediate_size",
                           _fill(shared))}
    if kw.get("layer_num_heads") or kw.get("layer_num_kv_heads"):  # heads: both lists or neither
        kw.update(layer_num_heads=nh, layer_num_kv_heads=nkv)
    return dataclasses.replace(cfg, **kw)


def _slice(blk, name: str, rows=None, cols=None) -> None:
    replace_module(blk, name, _slice_linear(blk.get_submodule(name), rows=rows, cols=cols))


def shrink_mlp(blk, lay: Layout, prefix: str, kc: torch.Tensor) -> None:
    """Keep channels `kc` of the MLP at `prefix` (relative to the block): smaller Linear modules, in place."""
    if len(kc) < blk.get_submodule(prefix + lay.down).in_features:
        _slice(blk, prefix + lay.gate, rows=kc)
        _slice(blk, prefix + lay.up, rows=kc)
        _slice(blk, prefix + lay.down, cols=kc)


def shrink_block(blk, lay: Layout, kg: list[int], kc: dict[str, torch.Tensor]) -> None:
    """Keep KV groups `kg` and, of each MLP prefix in `kc`, its kept channels, in one block."""
    attn = blk.get_submodule(lay.attn)
    if len(kg) == 0 or any(len(k) == 0 for k in kc.values()):
        raise LeanLMError("structured: a layer would lose every head or channel; drop the block instead")
    if len(kg) < attn.nkv:
        qrows = torch.cat([torch.arange(attn.nh * attn.hd)[_group_cols(attn, g)] for g in kg])
        kvrows = torch.cat([torch.arange(attn.nkv * attn.hd)[_kv_rows(attn, g)] for g in kg])
        per = attn.nh // attn.nkv
        _slice(blk, lay.q, rows=qrows)
        _slice(blk, lay.k, rows=kvrows)
        _slice(blk, lay.v, rows=kvrows)
        _slice(blk, lay.o, cols=qrows)
        attn.nkv, attn.nh = len(kg), len(kg) * per
    for p, kept in kc.items():
        shrink_mlp(blk, lay, p, kept)


def sync_config(model):
    """Rewrite model.config's per-layer shapes from the modules (after shrink_block / drop)."""
    lay, bl = layout_of(model), blocks(model)
    attn = [b.get_submodule(lay.attn) for b in bl]
    cfg = model.config
    dense, expert, shared = [], [], []
    for i, b in enumerate(bl):
        w = mlp_widths(b, lay, cfg, i)
        moe = cfg.is_moe_layer(i)
        experts = {v for p, v in w.items() if f".{lay.experts}." in p}
        if len(experts) > 1:
            raise LeanLMError(f"structured: the experts of block {i} have different widths {sorted(experts)}; "
                              "every expert of a layer must keep the same number of channels")
        dense.append(None if moe else next(iter(w.values())))
        expert.append(experts.pop() if moe else None)
        shared.append(next((v for p, v in w.items() if f".{lay.shared_expert}." in p), None) if moe else None)
    model.config = _uniformize(dataclasses.replace(model.config, num_layers=len(bl)), [a.nh for a in attn],
                               [a.nkv for a in attn], dense, expert, shared)
    return model


def shrink(model, keep_groups: list[list[int]], keep_channels: list):
    """Remove every unit not kept, in place: smaller Linear modules and a per-layer config."""
    lay, cfg = layout_of(model), base_model(model).config
    for i, (blk, kg, kc) in enumerate(zip(blocks(model), keep_groups, keep_channels)):
        shrink_block(blk, lay, kg, _per_prefix(blk, lay, cfg, i, kc))
    return sync_config(model)


def drop_blocks(model, drop: list[int]):
    """Delete whole blocks in place; later blocks are renumbered (the KV cache indexes by layer)."""
    cfg = model.config
    drop = sorted(set(drop))
    if any(not 0 <= i < cfg.num_layers for i in drop) or len(drop) >= cfg.num_layers:
        raise LeanLMError(f"layer drop {drop}: the model has blocks 0..{cfg.num_layers - 1} and must keep one")
    kept = [i for i in range(cfg.num_layers) if i not in drop]
    set_blocks(model, nn.ModuleList(blocks(model)[i] for i in kept))
    lay = layout_of(model)
    for new_i, blk in enumerate(blocks(model)):
        blk.get_submodule(lay.attn).layer = new_i
        for moe_block in (m for m in blk.modules() if isinstance(m, SparseMoE)):
            moe_block.layer = new_i
    changes = {"num_layers": len(kept)}
    if cfg.num_experts:  # which of the kept blocks are mixtures of experts, renumbered
        moe = [new_i for new_i, old in enumerate(kept) if cfg.is_moe_layer(old)]
        changes["moe_layers"] = None if len(moe) == len(kept) else moe
    if cfg.layer_types is not None:  # Gemma's local / global pattern follows the kept blocks
        changes["layer_types"] = [cfg.layer_types[i] for i in kept]
    model.config = dataclasses.replace(cfg, **changes)
    return sync_config(model)
