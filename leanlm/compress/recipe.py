"""YAML recipes: a list of steps, each `{method: NAME, <config fields>, targets: [regex], ignore: [regex]}`.

    - method: gptq
      bits: 4
      group_size: 128
      ignore: ['layers\\.(0|29)\\.']
    - method: rtn
      bits: 8
      group_size: 0
      targets: ['layers\\.(0|29)\\.']

A file may also be a mapping with a `steps:` list, and then may name its calibration set with
`calib: SPEC` (leanlm/data/calib.py's syntax, e.g. `packaged:mix` or `packaged:code=0.5,mine.jsonl=0.5`;
file paths relative to the working directory); `leanlm compress --calib` overrides it. Methods come from plain dicts:
`leanlm.compress.quant.METHODS`, `leanlm.compress.prune.METHODS` and
`leanlm.compress.lowrank.METHODS`; each maps a name to `(ConfigDataclass, how)` where `how` is a
`calibrate.Method` (run block by block by the one runner) or a callable
`how(model, cfg, modules, samples) -> None` for whole-model transforms. Every step is validated
against the model (unknown method, unknown field, bad value, target matching nothing) before any
work starts; errors name the recipe file and line. Targets are regexes searched in full module names
(the family's names: leanlm/model/layout.py); the default targets every Linear inside the decoder
blocks (so the output head and the embedding stay in full precision, and so do MoE routers: the
layout's router group).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch.nn as nn

from leanlm.compress.calibrate import Method, Step, run_steps
from leanlm.errors import LeanLMError
from leanlm.model.layout import EMBED, HEAD, all_block_linears, block_pattern
from leanlm.model.surgery import select_modules
from leanlm.model.transformer import plain_layout
from leanlm.options import RESERVED, build_config, method_entry  # noqa: F401  (build_config: recipe's API)

DEFAULT_TARGETS = [block_pattern()]
RECIPE_DIR = Path(__file__).parent / "recipes"
PATTERN = re.compile(r"^w(\d)a16-([a-z0-9]+)-g(\d+)(-e8)?(-datafree)?$")
EMBED8_TARGETS = [rf"^{re.escape(EMBED)}$"]


@dataclass
class RawStep:
    method: str
    fields: dict
    targets: list[str]
    ignore: list[str]
    line: int
    field_lines: dict = field(default_factory=dict)


@dataclass
class Recipe:
    source: str
    steps: list[RawStep]
    calib: str | None = None  # calibration spec named by the recipe file (None: the caller's / the default)

    @property
    def needs_data(self) -> bool:
        """Whether any step uses calibration samples (whole-model callables may set needs_data=False)."""
        reg = registry()
        return any(needs_data(*reg[s.method], s.fields) for s in self.steps if s.method in reg)


def needs_data(cls, how, fields: dict | None = None) -> bool:
    """A Method says so itself; a whole-model function's config class says so (`needs_data`, default True,
    or `step_needs_data(fields)` when it depends on the step's fields, e.g. distill's `data: generated`)."""
    if isinstance(how, Method):
        return how.needs_data
    if fields is not None and hasattr(cls, "step_needs_data"):
        return cls.step_needs_data(fields)
    return getattr(cls, "needs_data", True)


def registry() -> dict:
    from leanlm.compress import lowrank, prune, qat, quant, recover

    return {**quant.METHODS, **prune.METHODS, **lowrank.METHODS, **recover.METHODS, **qat.METHODS}


def builtin_names() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def _pattern_recipe(name: str) -> Recipe | None:
    m = PATTERN.match(name)
    if not m:
        return None
    bits, method, g = int(m.group(1)), m.group(2), int(m.group(3))
    fields = {"bits": bits, "group_size": g}
    if m.group(5):  # -datafree: QAT on text the model writes itself (LLM-QAT), no calibration data
        if method != "qat":
            raise LeanLMError(f"recipe name {name!r}: -datafree applies to qat recipes only "
                              f"(w{bits}a16-qat-g{g}-datafree); {method} calibrates on data")
        fields["data"] = "generated"
    steps = [RawStep(method, fields, list(DEFAULT_TARGETS), [], 1)]
    if m.group(4):  # -e8: the embedding as int8 rows; a tied output head then runs from them (int8 kernel)
        steps.append(RawStep("rtn", {"bits": 8, "group_size": 0}, list(EMBED8_TARGETS), [], 1))
    return Recipe(f"recipe name {name!r}", steps)


def load_recipe(name_or_path: str) -> Recipe:
    """A built-in name, a `w{bits}a16-{method}-g{size}[-e8][-datafree]` name, or a YAML file path.

    `-e8` adds a step that stores the embedding as int8 rows (one scale each, like GGUF's Q8_0
    embedding); with tied embeddings the output head then runs from that table with the int8 kernel.
    `-datafree` (qat only) trains on text the model generates itself instead of calibration samples.
    A `+distill` suffix on any name adds a last step that recovers the compressed model by distillation
    from the model as it was before the recipe (leanlm/compress/recover.py)."""
    if name_or_path.endswith("+distill"):
        base = load_recipe(name_or_path[: -len("+distill")])
        line = max((s.line for s in base.steps), default=0) + 1
        return Recipe(f"{base.source} + distill", base.steps + [RawStep("distill", {}, list(DEFAULT_TARGETS), [], line)],
                      base.calib)
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise LeanLMError(f"{p}: no such recipe file; pass an existing YAML file or a built-in name "
                              f"({', '.join(builtin_names())}, or w{{bits}}a16-{{method}}-g{{size}}[-e8])")
        return parse_recipe(p.read_text(), str(p))
    builtin = RECIPE_DIR / f"{name_or_path}.yaml"
    if builtin.exists():
        return parse_recipe(builtin.read_text(), str(builtin))
    r = _pattern_recipe(name_or_path)
    if r is not None:
        return r
    raise LeanLMError(f"unknown recipe {name_or_path!r}: not a file, not a built-in "
                      f"({', '.join(builtin_names())}), and not of the form w{{bits}}a16-{{method}}-g{{size}}[-e8]")


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    import yaml

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise LeanLMError(f"{where}: not valid YAML ({getattr(e, 'problem', e)}); fix the recipe")
    calib = None
    if isinstance(data, dict) and "steps" in data:
        node = next(v for k, v in root.value if k.value == "steps")
        calib = data.get("calib")
        if calib is not None and (not isinstance(calib, str) or not calib.strip()):
            line = next(k.start_mark.line + 1 for k, _ in root.value if k.value == "calib")
            raise LeanLMError(f"{source}:{line}: calib must be a calibration spec string, e.g. "
                              "'packaged:mix' or 'packaged:code=0.5,mine.jsonl=0.5'")
        data = data["steps"]
    else:
        node = root
    if not isinstance(data, list) or not data:
        raise LeanLMError(f"{source}: a recipe is a non-empty list of steps ({{method: NAME, ...}}), "
                          "or a mapping with a 'steps:' list")
    steps = []
    for item, n in zip(data, node.value):
        line = n.start_mark.line + 1
        if not isinstance(item, dict) or "method" not in item:
            raise LeanLMError(f"{source}:{line}: each step is a mapping with a 'method:' key")
        field_lines = {k.value: k.start_mark.line + 1 for k, _ in n.value}
        targets, ignore = item.get("targets", DEFAULT_TARGETS), item.get("ignore", [])
        for key, val in (("targets", targets), ("ignore", ignore)):
            if isinstance(val, str):
                val = [val]
            if not isinstance(val, list) or not all(isinstance(v, str) for v in val):
                raise LeanLMError(f"{source}:{field_lines.get(key, line)}: {key} must be a list of regexes")
            for v in val:
                try:
                    re.compile(v)
                except re.error as e:
                    raise LeanLMError(f"{source}:{field_lines.get(key, line)}: bad regex {v!r} in {key} ({e})")
            if key == "targets":
                targets = val
            else:
                ignore = val
        fields = {k: v for k, v in item.items() if k not in RESERVED}
        steps.append(RawStep(str(item["method"]), fields, targets, ignore, line, field_lines))
    return Recipe(source, steps, calib)


def resolve(recipe: Recipe, model) -> list[tuple[Step, object]]:
    """Validate every step against the model; return [(Step, how)] ready to run."""
    reg = registry()
    out = []
    replaced: dict[str, int] = {}  # module -> line of the step that swaps it for a quantized module
    for s in recipe.steps:
        def where(key=None, s=s):
            return f"{recipe.source}:{s.field_lines.get(key, s.line)}" if key else f"{recipe.source}:{s.line}"
        if s.method not in reg:
            raise LeanLMError(f"{where('method')}: unknown method {s.method!r}; known: {', '.join(sorted(reg))}")
        cls, how = reg[s.method]
        fields = dict(s.fields)
        names = {f.name for f in dataclasses.fields(cls)}
        if "targets" in names:
            fields["targets"] = s.targets
        if "ignore" in names:
            fields["ignore"] = s.ignore
        cfg = build_config(cls, fields, where)
        layer_types = how.layer_types if isinstance(how, Method) else (nn.Linear,)
        modules = select_modules(model, s.targets, s.ignore, layer_types)
        if s.targets == DEFAULT_TARGETS:  # by default MoE routers stay in full precision (tiny; a flip reroutes)
            routers = set(all_block_linears(model, "router"))
            modules = [n for n in modules if n not in routers]
        if not modules:
            key = "targets" if "targets" in s.field_lines else "method"
            raise LeanLMError(f"{where(key)}: targets {s.targets} (ignoring {s.ignore}) match no layer of this "
                              f"model; module names look like {all_block_linears(model)[0]}")
        emb = [n for n in modules if isinstance(model.get_submodule(n), nn.Embedding)]
        if emb and getattr(cfg, "bits", 8) != 8:
            raise LeanLMError(f"{where('bits')}: {emb[0]} is an embedding; embeddings quantize to 8 bits only "
                              "(give it its own step with bits: 8)")
        if model.config.tie_word_embeddings and HEAD in modules:
            raise LeanLMError(f"{where('targets')}: {HEAD} is tied to the embedding in this model; "
                              f"add '{HEAD}' to the step's ignore list")
        if isinstance(how, Method) and how.replaces:
            clash = next((n for n in modules if n in replaced), None)
            if clash:
                raise LeanLMError(f"{where('targets')}: {clash} is already quantized by the step at line "
                                  f"{replaced[clash]}; give each layer to one quantization step (targets/ignore)")
            replaced.update({n: s.line for n in modules})
        out.append((Step(s.method, how if isinstance(how, Method) else None, cfg, modules), how))
    return out


def apply_recipe(model, recipe: Recipe, samples=None, progress: bool = True) -> list[Step]:
    """Validate all steps, then run them in order: runs of Method steps share one block-by-block walk."""
    resolved = resolve(recipe, model)
    plain_layout(model)  # weights row-major again after a generation (see Transformer.plain_layout)
    original = None  # the model before the recipe, for steps that learn from it (distill)
    if any(getattr(how, "wants_original", False) for _, how in resolved):
        import copy

        original = copy.deepcopy(model).eval()
    batch: list[Step] = []
    for step, how in resolved:
        if isinstance(how, Method):
            batch.append(step)
            continue
        if batch:
            run_steps(model, batch, samples, progress)
            batch = []
        if getattr(how, "wants_original", False):
            how(model, step.cfg, step.modules, samples, original=original)
        else:
            how(model, step.cfg, step.modules, samples)
    if batch:
        run_steps(model, batch, samples, progress)
    return [s for s, _ in resolved]
