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
    fraction: float = 0.0  # > 0: remove round(fraction x blocks) instead of num_blocks (recipes for any depth)

    def __post_init__(self):
        if not 0.0 <= self.fraction < 1.0:
            raise LeanLMError(f"layerdrop fraction {self.fraction}: expected a fraction of the blocks in [0, 1)")

    def blocks_to_drop(self, n: int) -> int:
        return max(1, round(self.fraction * n)) if self.fraction > 0 else self.num_blocks


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
    k = cfg.blocks_to_drop(n)
    if not 0 < k < n - cfg.skip_last:
        what = f"fraction {cfg.fraction} ({k} blocks)" if cfg.fraction > 0 else f"num_blocks {k}"
        raise LeanLMError(f"layerdrop {what}: the model has {n} blocks "
                          f"(the last {cfg.skip_last} are kept); pick 1..{n - cfg.skip_last - 1}")
    sims = block_redundancy(model, samples, progress)
    order = sorted(range(n - cfg.skip_last), key=lambda i: -sims[i])
    drop = sorted(order[:k])
    drop_blocks(model, drop)
    return {"dropped": drop, "similarity": sims}
