"""Save/load hooks for compressed models, called by leanlm.io.checkpoint.

state_for_save(model) -> (tensors, meta): the state dict (quantized modules contribute their
    packed buffers, e.g. `...q_proj.qweight` uint8 and `...q_proj.scales` fp16; sparse weights
    are bit-packed by leanlm.compress.prune.storage when it is present) and a JSON-able meta that
    goes into config.json under "leanlm_compression" (empty dict when nothing is compressed).
restore(model, tensors, meta) -> tensors: swaps the listed Linear modules of a (meta-device)
    model for empty quantized modules of the recorded type and shape, unpacks sparse tensors,
    and returns the tensors to assign with load_state_dict(assign=True).

meta = {"format": "leanlm", "version": 1,
        "modules": {"model.layers.0.self_attn.q_proj": {"type": "QuantLinear", "bits": 4, ...}},
        "sparse": {...}}
"""
from __future__ import annotations

import torch
import torch.nn as nn

from leanlm.errors import LeanLMError

FORMAT, VERSION = "leanlm", 1


def module_types() -> dict[str, type]:
    """Compressed module classes by name (quantized, low-rank); each has config() -> dict and cls(**config)."""
    from leanlm.compress import lowrank
    from leanlm.compress.quant import MODULE_TYPES

    return {**MODULE_TYPES, **lowrank.MODULE_TYPES}


def compressed_modules(model: nn.Module) -> dict[str, nn.Module]:
    types = tuple(module_types().values())
    return {n: m for n, m in model.named_modules() if isinstance(m, types)}


def state_for_save(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = dict(model.state_dict())
    mods = compressed_modules(model)
    meta: dict = {}
    if mods:
        meta = {"format": FORMAT, "version": VERSION,
                "modules": {n: {"type": type(m).__name__, **m.config()} for n, m in mods.items()}}
    try:
        from leanlm.compress.prune.storage import pack_state
    except ImportError:
        pack_state = None
    if pack_state is not None:
        tensors, smeta = pack_state(tensors)
        if smeta:
            meta.update(smeta)
            meta.setdefault("format", FORMAT)
            meta.setdefault("version", VERSION)
    return tensors, meta


def restore(model: nn.Module, tensors: dict[str, torch.Tensor], meta: dict,
            source: str = "checkpoint") -> dict[str, torch.Tensor]:
    from leanlm.model.surgery import replace_module

    if not isinstance(meta, dict):
        raise LeanLMError(f"{source}: leanlm_compression in config.json is not a mapping; re-save the model")
    if meta.get("format", FORMAT) != FORMAT or int(meta.get("version", VERSION)) > VERSION:
        raise LeanLMError(f"{source}: compression format {meta.get('format')} v{meta.get('version')} is newer "
                          "than this leanlm understands; upgrade leanlm")
    types = module_types()
    device = next(iter(model.parameters())).device
    for name, cfg in (meta.get("modules") or {}).items():
        cfg = dict(cfg)
        tname = cfg.pop("type", None)
        if tname not in types:
            raise LeanLMError(f"{source}: module {name} has unknown compressed type {tname!r}; "
                              "upgrade leanlm or re-save the model")
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise LeanLMError(f"{source}: compressed module {name} does not exist in this architecture; "
                              "config.json and leanlm_compression disagree")
        if not isinstance(old, (nn.Linear, nn.Embedding)):
            raise LeanLMError(f"{source}: {name} is not a linear or embedding layer; cannot hold a {tname}")
        try:
            with torch.device(device):
                new = types[tname](**cfg)
        except (TypeError, ValueError) as e:
            raise LeanLMError(f"{source}: bad settings for {name} ({e}); re-save the model")
        replace_module(model, name, new)
    if meta.get("sparse"):
        from leanlm.compress.prune.storage import unpack_state

        tensors = unpack_state(tensors, meta, source)
    return tensors
