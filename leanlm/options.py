"""One way to pick a method and build its config, shared by every room's method table.

Each room keeps one dict `name -> (config dataclass, apply function)` (compress: quant, prune, lowrank;
peft: METHODS; infer: KV policies). `method_config(table, name, fields, what)` looks the name up and
builds the config with `build_config`: unknown names, unknown fields, wrong types and values the
config's `validate()` / `__post_init__` rejects all stop with one line naming the method and field.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Callable

from leanlm.errors import LeanLMError

RESERVED = ("method", "targets", "ignore")


def _check_type(value, tp) -> bool:
    if isinstance(tp, str):
        tp = {"int": int, "float": float, "bool": bool, "str": str}.get(tp.split(" |")[0].strip(), object)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_check_type(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    return True


def build_config(cls, fields: dict, where: Callable, field_lines: dict | None = None):
    """Instantiate the config dataclass, checking names and types; `where(key)` says where the value came
    from ('file:line' in a recipe, the method name in the API)."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for k, v in fields.items():
        if k not in known:
            raise LeanLMError(f"{where(k)}: unknown field {k!r} for this method; known fields: "
                              f"{', '.join(n for n in known if n not in RESERVED)}")
        if not _check_type(v, hints.get(k, object)):
            raise LeanLMError(f"{where(k)}: field {k!r} = {v!r} has the wrong type (expected {hints.get(k)})")
    try:
        cfg = cls(**fields)
        if hasattr(cfg, "validate"):
            cfg.validate()
    except (ValueError, TypeError, LeanLMError) as e:
        bad = next((k for k in fields if k in str(e)), None)
        raise LeanLMError(f"{where(bad)}: bad value: {e}")
    return cfg


def method_entry(table: dict, name: str, what: str):
    """The (config class, apply) entry of `name`, or one line listing the known names."""
    if name not in table:
        raise LeanLMError(f"unknown {what} {name!r}; known: {', '.join(sorted(table))}")
    return table[name]


def method_config(table: dict, name: str, fields: dict, what: str):
    """-> (config, apply) for `name` with the user's `fields`, validated."""
    cls, fn = method_entry(table, name, what)[:2]
    return build_config(cls, dict(fields), lambda key=None: f"{what} {name!r}"), fn
