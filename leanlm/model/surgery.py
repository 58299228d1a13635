"""Module surgery, the one way every room selects and replaces modules of a model.

`select_modules` picks modules by type and by name pattern or layout group; `replace_module` swaps one
in place (a transform rewrites modules in place, as torchao's quantize_ does). A replacement that has
`on_install(model, name)` is told where it went (an int8 embedding re-points a tied output head).
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
    if hasattr(new, "on_install"):
        new.on_install(model, name)


def select_modules(model: nn.Module, targets: list[str], ignore: list[str] = (), layer_types=(nn.Linear,),
                   group: str | None = None) -> list[str]:
    """Names of modules of the given types matching any target regex (re.search) and no ignore regex;
    with `group` (a layout group: attn_in, attn_out, mlp_in, mlp_out, router) only that group's linears."""
    allowed = None
    if group is not None:
        from leanlm.model.layout import all_block_linears

        allowed = set(all_block_linears(model, group))
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, layer_types) or (allowed is not None and name not in allowed):
            continue
        if any(re.search(t, name) for t in targets) and not any(re.search(i, name) for i in ignore):
            out.append(name)
    return out


def model_device(model) -> torch.device:
    """Where the model's parameters live (inputs are moved there); the CPU for a model with none."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")
