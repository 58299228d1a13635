"""Layer dropping (ShortGPT, Men et al., 2024): remove the blocks whose output is most similar to their
input on the calibration data (the runner's block-level hook measures each block as it passes)."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from leanlm.compress.calibrate import Method, Step, run_steps
from leanlm.compress.prune.apply import block_names
from leanlm.compress.prune.structured import drop_blocks
from leanlm.errors import LeanLMError


@dataclass
class LayerDropConfig:
    num_blocks: int = 4  # blocks removed, the most redundant (highest input/output cosine) first
    skip_last: int = 1  # never drop the last blocks (they shape the output distribution)


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

    run_steps(model, [Step("redundancy", Method(block=block), None, block_names(model))], samples, progress)
    return [sims[i] for i in range(model.config.num_layers)]


def layer_drop(model, cfg: LayerDropConfig, modules=None, samples=None, progress: bool = True):
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
    drop_blocks(model, drop)
    return {"dropped": drop, "similarity": sims}
