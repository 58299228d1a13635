"""Recipe steps for pruning: `how(model, cfg, modules, samples)` functions run by leanlm.compress.recipe.

Magnitude, Wanda and SparseGPT hand their pure functions (methods.py) to the one runner,
leanlm.compress.calibrate.run_steps, as `Method` objects (OWL's per-block sparsities: owl.py).
Structured pruning uses the runner's block-level hook to measure each block on the calibration inputs
it receives (layer dropping does too: layerdrop.py).
"""
from __future__ import annotations

import dataclasses

import torch

from leanlm.compress.calibrate import Method, Step, run_steps
from leanlm.compress.prune import structured as st
from leanlm.compress.prune.methods import SOLVERS, PruneConfig
from leanlm.errors import LeanLMError
from leanlm.model.layout import base_model, block_index, block_prefix, blocks, layout_of


def block_of(name: str) -> int:
    i = block_index(name)
    if i is None:
        raise LeanLMError(f"{name}: pruning works on decoder-block layers ({block_prefix(0)}...); add it to ignore")
    return i


def block_names(model) -> list[str]:
    """One module name per block (a block-level step runs on the blocks its modules fall in)."""
    lay = layout_of(model)
    return [block_prefix(i) + lay.o for i in range(len(blocks(model)))]


def method(kind: str) -> Method:
    init, acc, solve = SOLVERS[kind]
    return Method(init=init, accumulate=acc, solve=solve, needs_data=kind != "magnitude")


def prune(model, cfg: PruneConfig, modules: list[str], samples=None, progress: bool = True, kind: str | None = None):
    """Unstructured / N:M pruning of `modules` with magnitude, Wanda or SparseGPT (uniform or OWL); the
    method is the config's (`MagnitudeConfig`, `WandaConfig`, `SparseGPTConfig`) unless `kind` says."""
    kind = kind or cfg.kind
    if kind != "magnitude" and samples is None:
        raise LeanLMError(f"{kind} needs calibration samples; pass --calib or use magnitude pruning")
    m = method(kind)
    if not cfg.owl:
        run_steps(model, [Step(kind, m, cfg, list(modules))], samples, progress)
        return {}
    if samples is None:
        raise LeanLMError("owl needs calibration samples (it weighs blocks by activation outliers)")
    from leanlm.compress.prune.owl import owl_sparsities

    per_block = owl_sparsities(model, cfg, modules, samples, progress)
    steps = []
    for b, s in sorted(per_block.items()):
        names = [n for n in modules if block_of(n) == b]
        steps.append(Step(f"{kind}-block{b}", m, dataclasses.replace(cfg, sparsity=s, owl=False), names))
    run_steps(model, steps, samples, progress)
    return per_block


# ---------------------------------------------------------------- structured
def structured_prune(model, cfg: st.StructuredConfig, modules=None, samples=None, progress: bool = True):
    """Remove KV groups and MLP channels (of each dense MLP, each expert and each shared expert) by
    importance so about cfg.target of the parameters go."""
    groups, channels = st.plan(model, cfg)
    if cfg.importance in ("taylor", "magnitude"):
        grads = None
        if cfg.importance == "taylor":
            if samples is None:
                raise LeanLMError("taylor importance needs calibration samples (it uses gradients of the loss)")
            grads = st.taylor_gradients(model, samples[: cfg.taylor_samples])
        sa, sm = st.importance(model, cfg.importance, grads)
        del grads
        st.shrink(model, *st.keep_sets(sa, sm, groups, channels))
        return {"groups_removed": groups, "channels_removed": channels}
    if samples is None:
        raise LeanLMError("activation importance needs calibration samples; pass --calib or use importance: magnitude")

    lay, mcfg = layout_of(model), base_model(model).config

    def block(ctx, c):
        i, blk = ctx.index, ctx.block
        if groups[i] == 0 and not any(channels[i].values()):
            return
        mlps = lay.mlp_prefixes(mcfg, i)
        o = block_prefix(i) + lay.o
        downs = {p: block_prefix(i) + p + lay.down for p in mlps}
        sq = {n: torch.zeros(ctx.layer(n).in_features, dtype=torch.float64) for n in [o, *downs.values()]}

        def fn(name, x):
            sq[name] += x.double().pow(2).sum(0)
        ctx.collect(list(sq), fn)  # an expert sees only the tokens routed to it (none: magnitude scores)
        sa = st.attention_group_importance(blk, lay, sq[o], "activation")
        sm = {p: st.mlp_channel_importance(blk, lay, p, sq[d], "activation") for p, d in downs.items()}
        kg, kc = st.keep_sets([sa], [sm], [groups[i]], [channels[i]])
        st.shrink_block(blk, lay, kg[0], kc[0])  # the runner then feeds the shrunk block's outputs onward

    run_steps(model, [Step("structured", Method(block=block), cfg, block_names(model))], samples, progress)
    st.sync_config(model)
    return {"groups_removed": groups, "channels_removed": channels}
