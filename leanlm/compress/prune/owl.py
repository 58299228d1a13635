"""OWL (Yin et al., 2024): outlier-weighted layerwise sparsity. Blocks with more outlier weights (Wanda
score > M x the block's mean) keep more of them; `prune` (apply.py) runs it when a config sets `owl: true`."""
from __future__ import annotations

import torch

from leanlm.compress.calibrate import Method, Step, run_steps
from leanlm.compress.prune.apply import block_of
from leanlm.compress.prune.methods import PruneConfig, wanda_accumulate, wanda_init, wanda_score


def owl_sparsities(model, cfg: PruneConfig, modules: list[str], samples, progress: bool = True) -> dict[int, float]:
    """Per-block sparsities: blocks with more outlier weights keep more.

    Per-block sparsity spans target +- lambda linearly in the outlier ratio, shifted so the mean is the target.
    """
    ids = {id(model.get_submodule(n)): block_of(n) for n in modules}
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
