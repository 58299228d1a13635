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

from leanlm.errors import LeanLMError
from leanlm.model.layout import blocks

DEVICES = ("auto", "cpu", "cuda")


def add_device_argument(p) -> None:
    p.add_argument("--device", default="auto", choices=list(DEVICES),
                   help="auto: cuda:LOCAL_RANK when CUDA is visible (NCCL under torchrun), else the CPU (gloo)")


def device_for(choice: str = "auto") -> torch.device:
    """The device this process trains on: cuda:LOCAL_RANK (torchrun sets it; 0 alone) when CUDA is visible
    and `choice` is auto or cuda, else the CPU. Each rank owns one GPU, as NCCL expects."""
    if choice not in DEVICES:
        raise LeanLMError(f"--device {choice!r}: choose one of {', '.join(DEVICES)}")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise LeanLMError("--device cuda: no CUDA device is visible to this process")
    index = int(os.environ.get("LOCAL_RANK", "0"))
    if index >= torch.cuda.device_count():
        raise LeanLMError(f"LOCAL_RANK {index} but only {torch.cuda.device_count()} CUDA devices are visible")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def init(device: torch.device | None = None) -> tuple[int, int]:
    """Join the process group when launched by torchrun (NCCL for a CUDA device, gloo for the CPU);
    (rank, world size), (0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        cuda = device is not None and device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
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


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def full_state_dict(model) -> dict:
    """Every parameter whole on every rank, on the CPU (for saving a normal model folder from rank 0).
    A collective under FSDP2: every rank must call it."""
    out = {}
    for k, v in model.state_dict().items():
        out[k] = (v.full_tensor() if hasattr(v, "full_tensor") else v).cpu()
    return out


def unsharded(model, plain):
    """The trained weights of the sharded `model` loaded into `plain`, an unsharded copy of it taken
    before sharding (rank 0 keeps one to save from; other ranks pass None and get None). A collective."""
    state = full_state_dict(model) if world_size() > 1 else None
    if state is None:
        return model
    if plain is not None:
        plain.load_state_dict(state)
    return plain


def _comm_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_over_ranks(x: float) -> float:
    if world_size() == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return float(t)


def mean_over_ranks(x: float) -> float:
    return sum_over_ranks(x) / world_size()


def from_every_rank(x: float) -> list[float]:
    """x from each rank, in rank order ([x] on one process)."""
    if world_size() == 1:
        return [x]
    dev = _comm_device()
    out = [torch.zeros(1, dtype=torch.float64, device=dev) for _ in range(dist.get_world_size())]
    dist.all_gather(out, torch.tensor([x], dtype=torch.float64, device=dev))
    return [float(t) for t in out]


def finish() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
