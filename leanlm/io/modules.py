"""The module types and state codecs a checkpoint may hold, registered by the rooms that define them.

leanlm/io never imports a compression method. A room registers what it adds when it is imported:
`register_module_type(cls)` for a module class that replaces a Linear or Embedding (it has
`config() -> dict` and is rebuilt with `cls(**config)` before its tensors are assigned), and
`register_state_codec(key, pack, unpack)` for a transform of the saved tensors (sparse bit-packing).
`leanlm.load` and `leanlm.save` (leanlm/api.py, above both rooms) import the compress package first, so
the compressed types are known whenever a checkpoint's config.json has `leanlm_compression`.

state_for_save(model) -> (tensors, meta): the state dict, packed by every codec, and a JSON-able meta
    for config.json's "leanlm_compression" (empty when nothing is compressed):
    {"format": "leanlm", "version": 1, "modules": {"<full module name>": {"type": "QuantLinear", ...}},
     "sparse": {...}}
restore(model, tensors, meta, source) -> tensors: swaps the listed modules of a (meta-device) model for
    empty modules of the recorded type and shape, unpacks the codecs' tensors, and returns the tensors
    to assign with load_state_dict(assign=True).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from leanlm.errors import LeanLMError
from leanlm.model.surgery import replace_module

FORMAT, VERSION = "leanlm", 1

MODULE_TYPES: dict[str, type] = {}  # class name -> class
# meta key -> (pack(tensors) -> (tensors, {key: ...} or {}), unpack(tensors, meta, source) -> tensors)
STATE_CODECS: dict[str, tuple[Callable, Callable]] = {}


def register_module_type(cls: type) -> type:
    """Make `cls` loadable from checkpoints by its class name (usable as a class decorator)."""
    MODULE_TYPES[cls.__name__] = cls
    return cls


def register_state_codec(key: str, pack: Callable, unpack: Callable) -> None:
    STATE_CODECS[key] = (pack, unpack)


def compressed_modules(model: nn.Module) -> dict[str, nn.Module]:
    types = tuple(MODULE_TYPES.values())
    return {n: m for n, m in model.named_modules() if isinstance(m, types)} if types else {}


def state_for_save(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = dict(model.state_dict())
    mods = compressed_modules(model)
    meta: dict = {}
    if mods:
        meta = {"format": FORMAT, "version": VERSION,
                "modules": {n: {"type": type(m).__name__, **m.config()} for n, m in mods.items()}}
    for pack, _ in STATE_CODECS.values():
        tensors, part = pack(tensors)
        if part:
            meta.update(part)
            meta.setdefault("format", FORMAT)
            meta.setdefault("version", VERSION)
    return tensors, meta


def _known() -> str:
    return ", ".join(sorted(MODULE_TYPES)) or "none registered: import leanlm's compress package first, as leanlm.load does"


def restore(model: nn.Module, tensors: dict[str, torch.Tensor], meta: dict,
            source: str = "checkpoint") -> dict[str, torch.Tensor]:
    if not isinstance(meta, dict):
        raise LeanLMError(f"{source}: leanlm_compression in config.json is not a mapping; re-save the model")
    if meta.get("format", FORMAT) != FORMAT or int(meta.get("version", VERSION)) > VERSION:
        raise LeanLMError(f"{source}: compression format {meta.get('format')} v{meta.get('version')} is newer "
                          "than this leanlm understands; upgrade leanlm")
    device = next(iter(model.parameters())).device
    for name, cfg in (meta.get("modules") or {}).items():
        cfg = dict(cfg)
        tname = cfg.pop("type", None)
        if tname not in MODULE_TYPES:
            raise LeanLMError(f"{source}: module {name} has unknown compressed type {tname!r} (known: {_known()}); "
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
                new = MODULE_TYPES[tname](**cfg)
        except (TypeError, ValueError) as e:
            raise LeanLMError(f"{source}: bad settings for {name} ({e}); re-save the model")
        replace_module(model, name, new)
    for key in meta:
        if key in ("format", "version", "modules"):
            continue
        if key not in STATE_CODECS:
            raise LeanLMError(f"{source}: leanlm_compression has {key!r} tensors but no codec for them is registered "
                              "(import leanlm's compress package first, as leanlm.load does)")
        if meta[key]:
            tensors = STATE_CODECS[key][1](tensors, meta, source)
    return tensors
