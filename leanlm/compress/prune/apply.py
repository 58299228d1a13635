"""Recipe steps for pruning: `how(model, cfg, modules, samples)` callables run by leanlm.compress.recipe.

Calibration-based steps hand their pure functions (methods.py) to the one runner,
leanlm.compress.calibrate.run_steps, as `Method` objects; OWL runs it twice (statistics of the dense
model first, then pruning with per-block sparsities). Structured pruning and layer dropping use the
runner's block-level hook to measure each block on the calibration inputs it receives.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from leanlm.compress.calibrate import Method, Step, run_steps
from leanlm.compress.prune import structured as st
from leanlm.compress.prune.methods import SOLVERS, PruneConfig, wanda_accumulate, wanda_init, wanda_score
from leanlm.errors import LeanLMError
from leanlm.model.layout import base_model, block_index, block_prefix, blocks, layout_of


def _block_of(name: str) -> int:
    i = block_index(name)
    if i is None:
        raise LeanLMError(f"{name}: pruning works on decoder-block layers ({block_prefix(0)}...); add it to ignore")
    return i


def _block_names(model) -> list[str]:
    """One module name per block (a block-level step runs on the blocks its modules fall in)."""
    lay = layout_of(model)
    return [block_prefix(i) + lay.o for i in range(len(blocks(model)))]


def _method(kind: str) -> Method:
    init, acc, solve = SOLVERS[kind]
    return Method(init=init, accumulate=acc, solve=solve, needs_data=kind != "magnitude")


def owl_sparsities(model, cfg: PruneConfig, modules: list[str], samples, progress: bool = True) -> dict[int, float]:
    """OWL (Yin et al., 2024): blocks with more outlier weights (Wanda score > M x the block's mean) keep more.

    Per-block sparsity spans target +- lambda linearly in the outlier ratio, shifted so the mean is the target.
    """
    ids = {id(model.get_submodule(n)): _block_of(n) for n in modules}
    scores: dict[int, list[torch.Tensor]] = {}

    def observe(state, layer, c):
        scores.setdefault(ids[id(layer)], []).append(wanda_score(layer.weight, state).float().flatten())
        return None

    ratios: dict[int, float] = {}

    def finish_block(ctx, c):  # block hook after the observing step: reduce and free the block's scores
        b = ctx.index
        if b in scores:
            s = torch.cat(scores.pop(b))
            ratios[b] = float((s > cfg.owl_m * s.mean()).float().mean())

    observe_m = Method(init=wanda_init, accumulate=wanda_accumulate, solve=observe)
    reduce_m = Method(block=finish_block, needs_data=True)
    run_steps(model, [Step("owl-stats", observe_m, cfg, modules), Step("owl-reduce", reduce_m, cfg, modules)],
              samples, progress)
    blocks = sorted(ratios)
    r = torch.tensor([ratios[b] for b in blocks], dtype=torch.float64)
    span = float(r.max() - r.min())
    dens = (r - r.min()) / span * (2 * cfg.owl_lambda) if span > 0 else torch.zeros_like(r)
    dens = dens - dens.mean() + (1 - cfg.sparsity)
    return {b: float(min(max(1 - d, 0.0), 0.99)) for b, d in zip(blocks, dens.tolist())}


def prune(model, cfg: PruneConfig, modules: list[str], samples=None, progress: bool = True, kind: str = "wanda"):
    """Unstructured / N:M pruning of `modules` with magnitude, Wanda or SparseGPT (uniform or OWL)."""
    if kind != "magnitude" and samples is None:
        raise LeanLMError(f"{kind} needs calibration samples; pass --calib or use magnitude pruning")
    method = _method(kind)
    if not cfg.owl:
        run_steps(model, [Step(kind, method, cfg, list(modules))], samples, progress)
        return {}
    if samples is None:
        raise LeanLMError("owl needs calibration samples (it weighs blocks by activation outliers)")
    per_block = owl_sparsities(model, cfg, modules, samples, progress)
    steps = []
    for b, s in sorted(per_block.items()):
        names = [n for n in modules if _block_of(n) == b]
        steps.append(Step(f"{kind}-block{b}", method, dataclasses.replace(cfg, sparsity=s, owl=False), names))
    run_steps(model, steps, samples, progress)
    return per_block


def _how(kind: str):
    def how(model, cfg, modules, samples=None, progress: bool = True):
        return prune(model, cfg, modules, samples, progress, kind=kind)
    how.needs_data = kind != "magnitude"
    how.__name__ = f"{kind}_prune"
    return how


magnitude_prune, wanda_prune, sparsegpt_prune = _how("magnitude"), _how("wanda"), _how("sparsegpt")


# ---------------------------------------------------------------- structured
def structured_prune(model, cfg: st.StructuredConfig, modules=None, samples=None, progress: bool = True):
    """Remove KV groups and MLP channels by importance so about cfg.target of the parameters go."""
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
        if groups[i] == 0 and channels[i] == 0:
            return
        mlp = st.dense_mlp(lay, mcfg, i)
        o, d = block_prefix(i) + lay.o, block_prefix(i) + mlp + lay.down
        sq = {o: torch.zeros(ctx.layer(o).in_features, dtype=torch.float64),
              d: torch.zeros(ctx.layer(d).in_features, dtype=torch.float64)}

        def fn(name, x):
            sq[name] += x.double().pow(2).sum(0)
        ctx.collect([o, d], fn)
        sa = st.attention_group_importance(blk, lay, sq[o], "activation")
        sm = st.mlp_channel_importance(blk, lay, mlp, sq[d], "activation")
        kg, kc = st.keep_sets([sa], [sm], [groups[i]], [channels[i]])
        st.shrink_block(blk, lay, kg[0], kc[0], mlp)  # the runner then feeds the shrunk block's outputs onward

    run_steps(model, [Step("structured", Method(block=block), cfg, _block_names(model))], samples, progress)
    st.sync_config(model)
    return {"groups_removed": groups, "channels_removed": channels}


structured_prune.needs_data = True


def block_redundancy(model, samples, progress: bool = True) -> list[float]:
    """Mean cosine similarity between each block's input and output hidden states (ShortGPT's 1 - BI)."""
    sims: dict[int, float] = {}

    def block(ctx, c):
        tot, n = 0.0, 0
        for (x, *_), y in zip(ctx.inputs, ctx.run(keep=True)):
            cs = F.cosine_similarity(x.float(), y.float(), dim=-1)
            tot += float(cs.sum())
            n += cs.numel()
        sims[ctx.index] = tot / max(n, 1)

    run_steps(model, [Step("redundancy", Method(block=block), None, _block_names(model))], samples, progress)
    return [sims[i] for i in range(model.config.num_layers)]


def layer_drop(model, cfg: st.LayerDropConfig, modules=None, samples=None, progress: bool = True):
    """Drop the cfg.num_blocks blocks whose output is most similar to their input."""
    if samples is None:
        raise LeanLMError("layer dropping needs calibration samples to measure block redundancy")
    n = model.config.num_layers
    if not 0 < cfg.num_blocks < n - cfg.skip_last:
        raise LeanLMError(f"layerdrop num_blocks {cfg.num_blocks}: the model has {n} blocks "
                          f"(the last {cfg.skip_last} are kept); pick 1..{n - cfg.skip_last - 1}")
    sims = block_redundancy(model, samples, progress)
    order = sorted(range(n - cfg.skip_last), key=lambda i: -sims[i])
    drop = sorted(order[: cfg.num_blocks])
    st.drop_blocks(model, drop)
    return {"dropped": drop, "similarity": sims}


layer_drop.needs_data = True
