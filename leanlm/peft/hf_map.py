"""Adapters between leanlm's linears and the ones transformers holds fused (what peft adapters name).

leanlm splits Phi-3's fused q/k/v and gate/up linears into separate ones, and holds each MoE
expert as its own gate/up/down linears; transformers 5 keeps the fused linears, stores the experts as
two 3-D parameters (gate and up stacked [E, 2I, H], down [E, H, I]) and the router
as a bare weight, which peft 0.21 adapts through `target_parameters`. The layout says which is which
(`leanlm.model.layout.hf_linears`); this file moves adapter tensors across, exactly:

- transformers -> leanlm (`from_transformers`): a fused LoRA (one A, B over the stacked rows) splits
  into one LoRA per part sharing A, with B split by rows (DoRA's magnitude by rows too); (IA)3's
  output scale splits by rows, its input scale (feed-forward) is copied to each part. peft's expert
  LoRA keeps, per expert e, rows e*r..e*r+r of A and columns e, e+E, ... of B.
- leanlm -> transformers (`to_transformers`): parts whose A are equal (an adapter that came from
  peft) fuse back to rank r, A shared and B stacked; otherwise by rank concatenation: A stacked
  (rank = the sum of the parts'), B block-diagonal, parts without an adapter contribute zero rows of
  B. A part's scaling stays exact through a per-module alpha (peft's alpha_pattern), or is folded into
  B when the parts' scalings differ.

peft 0.21 cannot put DoRA on `target_parameters`, and has no (IA)3 for them: such adapters on the
experts or the router keep leanlm's per-expert names (leanlm loads them; peft cannot), and
`save_adapter` says so in one line.
"""
from __future__ import annotations

import math
import re

import torch

from leanlm.errors import LeanLMError
from leanlm.model.layout import HFLinear, hf_linears
from leanlm.peft.lora import matches

PREFIX = "base_model.model."


SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector", ".ia3_l")


def _module_of(key: str) -> str:
    """The module name of an adapter tensor key."""
    for suffix in SUFFIXES:
        if key.endswith(suffix):
            return key[len(PREFIX):-len(suffix)]
    raise LeanLMError(f"adapter tensor {key}: not a LoRA, DoRA or (IA)3 tensor")


class _Rows(dict):
    """Output rows of a model's linears by name, through any adapter or quantized wrapper."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def __missing__(self, name: str) -> int:
        from leanlm.peft.lora import base_weight

        m = self.model.get_submodule(name)
        m = getattr(m, "base_layer", m)
        self[name] = n = m.out_features if hasattr(m, "out_features") else base_weight(m).shape[0]
        return n


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9)


def _is_target(key: str, targets) -> bool:
    return any(key == t or key.endswith("." + t) for t in targets or ())


def _pattern(patterns: dict, name: str, default):
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _param_prefixes(fused: list[HFLinear], targeted) -> dict[tuple[str, str], str]:
    """(module, param) -> the key prefix peft gives its LoRA. peft nests one ParamWrapper per targeted
    parameter of a module in registration order, so the first one sits under a `.base_layer` per later
    targeted parameter of the same module."""
    out = {}
    by_module: dict[str, list[str]] = {}
    for f in fused:
        if f.param is not None and (f.name, f.param) in targeted:
            by_module.setdefault(f.name, []).append(f.param)
    for module, params in by_module.items():
        for i, param in enumerate(params):
            out[(module, param)] = module + ".base_layer" * (len(params) - 1 - i)
    return out


def _rows(parts: tuple[str, ...], sizes: dict[str, int]) -> list[int]:
    return [sizes[p] for p in parts]


# ---------------------------------------------------------------- transformers -> leanlm
def from_transformers(model, d: dict, tensors: dict) -> tuple[dict, dict]:
    """A peft adapter made on the transformers model -> the same adapter in leanlm's module names
    (config dict with explicit target lists and per-module rank/alpha, tensors renamed and split)."""
    fused = hf_linears(model)
    kind = d.get("peft_type")
    if not fused or kind not in ("LORA", "IA3"):
        return d, tensors
    sizes = _Rows(model)
    params = {(f.name, f.param) for f in fused if f.param is not None
              and _is_target(f"{f.name}.{f.param}", d.get("target_parameters"))}
    prefixes = _param_prefixes(fused, params)
    tensors = dict(tensors)
    out: dict[str, torch.Tensor] = {}
    ranks, alphas, feedforward = {}, {}, []
    base_r, base_alpha = d.get("r", 8), d.get("lora_alpha", 8)

    for f in fused:
        if f.param is not None and (f.name, f.param) not in params:
            continue
        head = PREFIX + (prefixes[(f.name, f.param)] if f.param is not None else f.name)
        if kind == "IA3":
            t = tensors.pop(head + ".ia3_l", None)
            if t is None:
                continue
            parts = f.parts[0]
            if t.shape[0] == 1:  # a feed-forward module: its input scale applies to every part
                for p in parts:
                    out[f"{PREFIX}{p}.ia3_l"] = t.clone()
                    feedforward.append(p)
            else:
                for p, piece in zip(parts, t.split(_rows(parts, sizes))):
                    out[f"{PREFIX}{p}.ia3_l"] = piece.clone()
            continue
        a, b = tensors.pop(head + ".lora_A.weight", None), tensors.pop(head + ".lora_B.weight", None)
        if a is None or b is None:
            continue
        n_exp = len(f.parts)
        r = a.shape[0] // n_exp
        key = f"{f.name}.{f.param}" if f.param is not None else f.name
        alpha = _pattern(d.get("alpha_pattern"), key, base_alpha)
        a_e = a.reshape(n_exp, r, a.shape[1])
        b_e = b.reshape(b.shape[0], r, n_exp)
        mag = tensors.pop(head + ".lora_magnitude_vector", None)
        for e, parts in enumerate(f.parts):
            rows = _rows(parts, sizes)
            for i, (p, piece) in enumerate(zip(parts, b_e[..., e].split(rows))):
                out[f"{PREFIX}{p}.lora_A.weight"] = a_e[e].clone()
                out[f"{PREFIX}{p}.lora_B.weight"] = piece.clone()
                if mag is not None:
                    out[f"{PREFIX}{p}.lora_magnitude_vector"] = mag.split(rows)[i].clone()
                ranks[p], alphas[p] = r, alpha
    if any(k.startswith(PREFIX) and (".base_layer." in k) for k in tensors):
        bad = next(k for k in tensors if ".base_layer." in k)
        raise LeanLMError(f"adapter tensor {bad}: a parameter target this model's layout does not know")
    # the other modules keep their names; their rank from A, their alpha from peft's patterns
    for k, t in tensors.items():
        if k.endswith(".lora_A.weight"):
            name = k[len(PREFIX):-len(".lora_A.weight")]
            ranks[name], alphas[name] = t.shape[0], _pattern(d.get("alpha_pattern"), name, base_alpha)
        elif k.endswith(".ia3_l") and t.shape[0] == 1 and (t.shape[1] > 1 or matches(
                _module_of(k), d.get("feedforward_modules") or [])):  # [1, in]: a feed-forward (input) scale
            feedforward.append(_module_of(k))
    out.update(tensors)
    names = sorted({_module_of(k) for k in out})
    d = {k: v for k, v in d.items() if k not in ("target_parameters", "rank_pattern", "alpha_pattern")}
    d["target_modules"] = names
    if kind == "IA3":
        d["feedforward_modules"] = sorted(feedforward)
    else:
        d["rank_pattern"] = {re.escape(n): r for n, r in ranks.items() if r != base_r}
        d["alpha_pattern"] = {re.escape(n): a for n, a in alphas.items() if not _same(a, base_alpha)}
    return d, out


# ---------------------------------------------------------------- leanlm -> transformers
def _fuse_lora(model, parts: tuple[str, ...], sizes: dict):
    """(A [R, in], B [rows, R], scaling, magnitude or None) of one fused linear from its parts' LoRAs
    (None when no part has one)."""
    from leanlm.peft.lora import LoraLinear

    mods = {p: model.get_submodule(p) for p in parts}
    lora = {p: m for p, m in mods.items() if isinstance(m, LoraLinear)}
    if not lora:
        return None
    first = next(iter(lora.values()))
    scalings = {m.scaling for m in lora.values()}
    shared = len(lora) == len(parts) and len(scalings) == 1 and all(
        m.r == first.r and torch.equal(m.lora_A.weight, first.lora_A.weight) for m in lora.values())
    if shared:
        a = first.lora_A.weight.detach()
        b = torch.cat([m.lora_B.weight.detach() for m in lora.values()])
        scale, fold = first.scaling, None
    else:
        a = torch.cat([m.lora_A.weight.detach() for m in lora.values()])
        b = torch.zeros(sum(sizes[p] for p in parts), a.shape[0], dtype=a.dtype)
        fold = len(scalings) > 1  # parts' scalings differ: fold each into its rows of B, scaling 1
        row = col = 0
        for p in parts:
            m = lora.get(p)
            if m is not None:
                b[row:row + sizes[p], col:col + m.r] = m.lora_B.weight.detach() * (m.scaling if fold else 1)
                col += m.r
            row += sizes[p]
        scale = 1.0 if fold else first.scaling
    mag = None
    if first.use_dora:
        from leanlm.peft.lora import base_weight

        mag = torch.cat([m.lora_magnitude_vector.detach() if p in lora else
                         torch.linalg.norm(base_weight(m), dim=1).detach() for p, m in mods.items()])
    return a, b, scale, mag


def _alpha_for(scale: float, r: int, rslora: bool) -> float:
    return scale * (math.sqrt(r) if rslora else r)


def peft_refusal(model) -> str | None:
    """Why peft cannot load this model's adapter on the transformers model (None when it can)."""
    from leanlm.peft.ia3 import IA3Linear
    from leanlm.peft.lora import LoraLinear

    for f in hf_linears(model):
        mods = [model.get_submodule(p) for parts in f.parts for p in parts]
        if f.param is not None:
            if any(isinstance(m, LoraLinear) and m.use_dora for m in mods):
                return (f"DoRA on {f.name}: peft 0.21 adapts transformers' fused expert / router parameters "
                        "only with plain LoRA (target_parameters has no DoRA)")
            if any(isinstance(m, IA3Linear) for m in mods):
                return f"(IA)3 on {f.name}: peft 0.21 has no (IA)3 for transformers' fused expert / router parameters"
        ia3 = [m for m in mods if isinstance(m, IA3Linear)]
        if ia3 and any(m.is_feedforward for m in ia3):
            if len(ia3) != len(mods) or not all(m.is_feedforward and torch.equal(m.ia3_l, ia3[0].ia3_l) for m in ia3):
                return (f"(IA)3 on part of {f.name}: a feed-forward (input) scale on the fused linear scales "
                        "every part alike; give all its parts one scale")
    return None


def to_transformers(model, conf: dict, tensors: dict) -> tuple[dict, dict]:
    """leanlm's adapter (peft config dict + tensors in leanlm's names) -> the one peft makes on the
    transformers model. Raises LeanLMError (peft_refusal) when peft cannot express it."""
    fused = hf_linears(model)
    kind = conf.get("peft_type")
    if not fused or kind not in ("LORA", "IA3"):
        return conf, tensors
    why = peft_refusal(model)
    if why:
        raise LeanLMError(why)
    from leanlm.peft.ia3 import IA3Linear
    from leanlm.peft.lora import LoraLinear

    sizes = _Rows(model)
    adapted = {n: m for n, m in model.named_modules() if isinstance(m, (LoraLinear, IA3Linear))}
    rslora = bool(conf.get("use_rslora"))
    tensors = dict(tensors)
    out, modules, params, feedforward, ranks, alphas = {}, [], [], [], {}, {}
    for f in fused:
        parts_all = [p for parts in f.parts for p in parts]
        if not any(p in adapted for p in parts_all):
            continue
        for p in parts_all:
            for suffix in (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector", ".ia3_l"):
                tensors.pop(PREFIX + p + suffix, None)
        (params if f.param is not None else modules).append((f.name, f.param))
        if kind == "IA3":
            parts = f.parts[0]
            mods = [model.get_submodule(p) for p in parts]
            if any(getattr(m, "is_feedforward", False) for m in mods):
                out[f"{PREFIX}{f.name}.ia3_l"] = mods[0].ia3_l.detach().clone()
                feedforward.append(f.name)
            else:
                out[f"{PREFIX}{f.name}.ia3_l"] = torch.cat([
                    m.ia3_l.detach() if isinstance(m, IA3Linear) else torch.ones(sizes[p], 1)
                    for p, m in zip(parts, mods)])
            continue
        fused_e = [_fuse_lora(model, parts, sizes) for parts in f.parts]
        rank = max(x[0].shape[0] for x in fused_e if x is not None)
        scales = {x[2] for x in fused_e if x is not None}
        a_list, b_list, mags = [], [], []
        for parts, x in zip(f.parts, fused_e):
            rows = sum(sizes[p] for p in parts)
            if x is None:  # an expert without an adapter: zeros
                x = (torch.zeros(rank, a_list[0].shape[1] if a_list else model.get_submodule(parts[0]).in_features),
                     torch.zeros(rows, rank), next(iter(scales)), None)
            a, b, s, mag = x
            if a.shape[0] < rank:  # pad with zero rank (exact)
                a = torch.cat([a, torch.zeros(rank - a.shape[0], a.shape[1], dtype=a.dtype)])
                b = torch.cat([b, torch.zeros(b.shape[0], rank - b.shape[1], dtype=b.dtype)], 1)
            if len(scales) > 1:  # experts' scalings differ: fold them into B
                b = b * s
            a_list.append(a)
            b_list.append(b)
            mags.append(mag)
        scale = next(iter(scales)) if len(scales) == 1 else 1.0
        key = f"{f.name}.{f.param}" if f.param is not None else f.name
        ranks[key], alphas[key] = rank, _alpha_for(scale, rank, rslora)
        a_cat = torch.cat(a_list)  # [E*R, in]: expert e's rows e*R..e*R+R
        b_cat = torch.stack(b_list, -1).reshape(b_list[0].shape[0], rank * len(b_list))  # column r*E + e
        out[(f.name, f.param, "A")] = a_cat
        out[(f.name, f.param, "B")] = b_cat
        if mags[0] is not None:
            out[(f.name, f.param, "M")] = mags[0]
    prefixes = _param_prefixes(fused, set(params))
    final = {}
    for k, v in out.items():
        if isinstance(k, str):
            final[k] = v
            continue
        name, param, what = k
        head = PREFIX + (prefixes[(name, param)] if param is not None else name)
        final[head + {"A": ".lora_A.weight", "B": ".lora_B.weight", "M": ".lora_magnitude_vector"}[what]] = v.float()
    # modules transformers holds as leanlm does keep their names
    for k, v in tensors.items():
        final[k] = v
        if k.endswith((".lora_A.weight", ".ia3_l")):
            name = _module_of(k)
            modules.append((name, None))
            if k.endswith(".lora_A.weight"):
                m = adapted[name]
                ranks[name], alphas[name] = m.r, _alpha_for(m.scaling, m.r, rslora)
            elif adapted[name].is_feedforward:
                feedforward.append(name)
    conf = dict(conf)
    conf["target_modules"] = sorted(n for n, _ in modules)
    if kind == "IA3":
        conf["feedforward_modules"] = sorted(feedforward)
        return conf, final
    conf["target_parameters"] = sorted(f"{n}.{p}" for n, p in params) or None
    if params:
        conf["lora_dropout"] = 0.0  # peft refuses dropout on parameter targets; it only acts in training
    base_r, base_alpha = conf["r"], conf["lora_alpha"]
    conf["rank_pattern"] = {re.escape(k): r for k, r in ranks.items() if r != base_r}
    conf["alpha_pattern"] = {re.escape(k): a for k, a in alphas.items() if not _same(a, base_alpha)}
    return conf, final
