"""The one calibration runner: walks the model block by block, hooks target layers, calls methods' pure functions.

For each decoder block: (1) for each recipe step with targets in the block, either call the
method's block-level hook (AWQ's scale search, SmoothQuant's smoothing, structured pruning) or
register forward hooks on the target Linear modules, run the block on every calibration sample
feeding inputs to `accumulate`, then `solve` each layer; (2) rerun the (now compressed) block to
produce the next block's inputs. Only one block's activations live at a time. Methods that need no
data (RTN, NF4) are solved directly, and a recipe made only of them skips calibration altogether.

A method is a `Method` of pure functions:
    init(layer, cfg) -> state            accumulate(state, x2d)          (x2d: [tokens, in_features])
    solve(state, layer, cfg) -> nn.Module | None   (None: the weight was changed in place)
    block(ctx: BlockContext, cfg)        optional, replaces the per-layer pass for that step
Layers that receive the very same input tensor (q/k/v, gate/up) share one state when
`shares_stats` is set, so a Hessian is accumulated once per distinct input.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from leanlm.errors import LeanLMError
from leanlm.model.layout import block_prefix, blocks
from leanlm.model.surgery import replace_module
from leanlm.model.transformer import plain_layout


@dataclass
class Method:
    init: Callable | None = None
    accumulate: Callable | None = None
    solve: Callable | None = None  # (state, layer, cfg) -> module or None; state is None when needs_data is False
    block: Callable | None = None
    needs_data: bool = True
    shares_stats: bool = True
    layer_types: tuple = (nn.Linear,)
    replaces: bool = False  # solve swaps the layer for a new module (quantization); pruning edits in place


@dataclass
class Step:
    """One recipe step resolved against a model: which method, its config, which modules."""
    name: str
    method: Method
    cfg: Any
    modules: list[str] = field(default_factory=list)


class _Stop(Exception):
    pass




@dataclass
class BlockContext:
    """What a block-level method sees: the block, its calibration inputs, and ways to run it."""
    model: nn.Module
    block: nn.Module
    index: int
    inputs: list  # per sample: (x, cos, sin, mask)
    modules: list[str]  # full names of this step's targets inside the block

    def layer(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def replace(self, name: str, new: nn.Module):
        replace_module(self.model, name, new)

    @torch.no_grad()
    def run(self, keep: bool = True) -> list | None:
        outs = []
        for x, cos, sin, mask in self.inputs:
            y = self.block(x, cos, sin, mask, None)
            if keep:
                outs.append(y)
        return outs if keep else None

    @torch.no_grad()
    def collect(self, names: list[str], fn: Callable[[str, torch.Tensor], None]):
        """Run the block once over all samples, calling fn(name, x2d) with each named module's input."""
        hooks = []
        for n in names:
            def hook(mod, args, n=n):
                x = args[0]
                fn(n, x.reshape(-1, x.shape[-1]))
            hooks.append(self.model.get_submodule(n).register_forward_pre_hook(hook))
        try:
            self.run(keep=False)
        finally:
            for h in hooks:
                h.remove()

    def capture(self, names: list[str], max_tokens: int | None = None) -> dict[str, torch.Tensor]:
        """Inputs of the named modules concatenated over samples ([tokens, in]), optionally subsampled."""
        got: dict[str, list] = {n: [] for n in names}
        per = None if max_tokens is None else max(1, max_tokens // max(1, len(self.inputs)))

        def fn(n, x):
            got[n].append(x if per is None or x.shape[0] <= per else x[:: max(1, x.shape[0] // per)][:per])
        self.collect(names, fn)
        # a module that never ran (a MoE expert no token was routed to) gets no rows
        return {n: torch.cat(v) if v else torch.zeros(0, self.layer(n).in_features) for n, v in got.items()}


@torch.no_grad()
def capture_block_inputs(model: nn.Module, samples: torch.Tensor) -> list:
    """Run the embedding and grab what the first block receives, one entry per sample."""
    first = blocks(model)[0]
    got = []

    def hook(mod, args):
        x, cos, sin, mask = args[:4]
        got.append((x.detach(), cos, sin, mask))
        raise _Stop

    h = first.register_forward_pre_hook(hook)
    try:
        for row in samples:
            try:
                model(row.unsqueeze(0))
            except _Stop:
                pass
    finally:
        h.remove()
    return got


def _solve_layers(model, step: Step, names: list[str], states: dict | None, alias: dict | None = None):
    for n in names:
        layer = model.get_submodule(n)
        state = None
        if states is not None:
            state = states[alias.get(n, n)] if alias else states[n]
        new = step.method.solve(state, layer, step.cfg)
        if isinstance(new, nn.Module) and new is not layer:
            replace_module(model, n, new)


@torch.no_grad()
def _per_layer_pass(ctx: BlockContext, step: Step, names: list[str]):
    m = step.method
    states = {n: m.init(ctx.layer(n), step.cfg) for n in names}
    alias: dict[str, str] = {}
    seen: dict = {}  # (address, shape) -> (first module that got it, the tensor), within one sample

    def fn(n, x):
        if n in alias:
            return
        if m.shares_stats:
            # same storage, same shape: the very same input (seen holds a reference, so no address reuse)
            key = (x.data_ptr(), tuple(x.shape))
            first = seen.get(key)
            if first is not None and first[0] != n:
                alias[n] = first[0]
                return
            seen[key] = (n, x)
        m.accumulate(states[n], x)

    hooks = []
    for n in names:
        def hook(mod, args, n=n):
            x = args[0]
            fn(n, x.reshape(-1, x.shape[-1]))
        hooks.append(ctx.layer(n).register_forward_pre_hook(hook))
    try:
        for x, cos, sin, mask in ctx.inputs:
            seen.clear()
            ctx.block(x, cos, sin, mask, None)
    finally:
        for h in hooks:
            h.remove()
    _solve_layers(ctx.model, step, names, states, alias)


def _progress(enabled: bool):
    if not enabled:
        return None
    from leanlm.report import progress  # rich, on stderr (stdout stays clean for --json)

    return progress()


@torch.no_grad()
def run_steps(model: nn.Module, steps: list[Step], samples: torch.Tensor | None = None,
              progress: bool = True) -> dict:
    """Apply resolved steps to the model in place, block by block. Returns {"blocks": n, "calibrated": bool}."""
    plain_layout(model)  # weights row-major again after a generation (see Transformer.plain_layout)
    needs_data = any(s.method.needs_data and s.modules for s in steps)
    nblocks = len(blocks(model))
    prefixes = [block_prefix(i) for i in range(nblocks)]
    outside = [(s, [n for n in s.modules if not any(n.startswith(p) for p in prefixes)]) for s in steps]
    for s, names in outside:
        if names and s.method.needs_data:
            raise LeanLMError(f"method {s.name!r} needs calibration data and works on decoder blocks only; "
                              f"{names[0]} is outside them: add it to the step's ignore list")
    if needs_data and samples is None:
        raise LeanLMError("this recipe needs calibration samples (GPTQ/AWQ/SmoothQuant/...); pass --calib or use RTN")
    inputs = capture_block_inputs(model, samples) if needs_data else None
    bar = _progress(progress)
    task = None
    if bar is not None:
        bar.start()
        task = bar.add_task("compress", total=nblocks)
    try:
        for i, block in enumerate(blocks(model)):
            if bar is not None:
                bar.update(task, description=f"block {i + 1}/{nblocks}")
            ctx = BlockContext(model, block, i, inputs, [])
            for s in steps:
                names = [n for n in s.modules if n.startswith(prefixes[i])]
                if not names:
                    continue
                ctx.modules = names
                if s.method.block is not None:
                    s.method.block(ctx, s.cfg)
                elif s.method.needs_data:
                    _per_layer_pass(ctx, s, names)
                else:
                    _solve_layers(model, s, names, None)
            if needs_data and i + 1 < nblocks:
                outs = ctx.run(keep=True)  # the compressed block's outputs feed the next block
                inputs = [(y,) + tuple(inp[1:]) for y, inp in zip(outs, inputs)]
            if bar is not None:
                bar.advance(task)
    finally:
        if bar is not None:
            bar.stop()
    for s, names in outside:
        if names:
            _solve_layers(model, s, names, None)
    return {"blocks": nblocks, "calibrated": needs_data}
