"""Training on several processes with PyTorch's own engine: FSDP2 (`fully_shard`) under `torchrun`.

gloo on CPU, NCCL on GPU; the same code path as one process. `torchrun --nproc_per_node N -m leanlm
pretrain ...` sets RANK/WORLD_SIZE/MASTER_ADDR; `init()` joins the group, `shard()` wraps each decoder
block and then the whole model (FSDP2's recommended order), with an optional bf16 mixed-precision policy
(fp32 gradients reduced across ranks). The global batch is split over ranks by the training loop, and
FSDP2 averages gradients, so N processes follow one process's loss.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from leanlm.model.layout import blocks


def init() -> tuple[int, int]:
    """Join the process group when launched by torchrun; (rank, world size), (0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(model, bf16: bool = False):
    """FSDP2 over the model in place (no-op on one process); returns the model."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for blk in blocks(model):
        fully_shard(blk, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def full_state_dict(model) -> dict:
    """Every parameter whole on every rank (for saving a normal model folder from rank 0)."""
    out = {}
    for k, v in model.state_dict().items():
        out[k] = v.full_tensor() if hasattr(v, "full_tensor") else v
    return out


def mean_over_ranks(x: float) -> float:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def from_every_rank(x: float) -> list[float]:
    """x from each rank, in rank order ([x] on one process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [x]
    out = [torch.zeros(1, dtype=torch.float64) for _ in range(dist.get_world_size())]
    dist.all_gather(out, torch.tensor([x], dtype=torch.float64))
    return [float(t) for t in out]


def finish() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
