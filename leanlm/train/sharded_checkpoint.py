"""Sharded training checkpoints through `torch.distributed.checkpoint` (DCP): each process writes its own
shards, and a checkpoint resumes at any world size (saved by 2 processes, resumed by 1, or the reverse).

Format, and why: DCP's default `FileSystemReader` keeps its `.metadata` as a Python pickle and reads it
with `pickle.load` (torch 2.13), and leanlm never unpickles files. DCP's safetensors storage
(`HuggingFaceStorageWriter(save_distributed=True)` / `HuggingFaceStorageReader`) has no pickle anywhere:
each rank writes one safetensors file whose JSON header records where its chunks sit in the whole
tensors, and the reader rebuilds the layout from those headers. A checkpoint folder `step-NNNNNNN/`:

    dcp/shard-0000R-model-00001-of-00001.safetensors   one per saving rank: trainable parameters
                                                        ("param/NAME") and optimizer state tensors
                                                        ("optim/NAME::KEY"), each rank its own shards
    state.json      leanlm's manifest: format, world size, tensor names, shard files, step, data position,
                    optimizer scalars and settings, training config
    rng.safetensors rank 0's torch CPU generator

The loader refuses a folder without the manifest, or whose shard files differ from the ones it lists (a
DCP folder written by another tool, or an incomplete one). Writes are atomic: the ranks write into a
temporary folder that rank 0 renames once every rank is done.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch

from leanlm.errors import LeanLMError
from leanlm.train.checkpoint import optimizer_parts, restore_scalars_and_groups, trainable_named

FORMAT = "leanlm-sharded-1"


def _dist():
    import torch.distributed as dist

    on = dist.is_available() and dist.is_initialized()
    return (dist.get_rank(), dist.get_world_size(), dist.barrier) if on else (0, 1, lambda: None)


def _flat(params: dict, opt_tensors: dict) -> dict[str, torch.Tensor]:
    flat = {f"param/{n}": p.detach() for n, p in params.items()}
    flat.update({f"optim/{k}": v for k, v in opt_tensors.items()})
    return flat


def _quiet():
    """DCP warns that it runs without a process group on one process: that is intended here."""
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.filterwarnings("ignore", message=".*(process group|single process|distributed is disabled).*")
    return ctx


def save_sharded_checkpoint(folder: str | Path, model, optimizer, state: dict, keep_last: int = 2) -> Path:
    """Every rank calls this (a collective). Returns the checkpoint folder."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save as st_save
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    from leanlm.io.atomic import atomic_write_bytes, atomic_write_text

    rank, world, barrier = _dist()
    folder = Path(folder)
    _resharded(model)
    params = trainable_named(model)
    opt_tensors, opt_scalars, groups = optimizer_parts(optimizer, params)
    flat = _flat(params, opt_tensors)
    path = folder / f"step-{state['step']:07d}"
    tmp = folder / f".{path.name}.partial"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "dcp").mkdir(parents=True)
    barrier()
    ctx = _quiet()
    try:
        dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(tmp / "dcp"), save_distributed=True))
    finally:
        ctx.__exit__(None, None, None)
    barrier()
    if rank == 0:
        files = sorted(f.name for f in (tmp / "dcp").glob("*.safetensors"))
        manifest = {"format": FORMAT, "world_size": world, "tensors": sorted(flat), "files": files, **state,
                    "optimizer_groups": groups, "optimizer_scalars": opt_scalars}
        atomic_write_bytes(tmp / "rng.safetensors", st_save({"torch_cpu": torch.get_rng_state()}))
        atomic_write_text(tmp / "state.json", json.dumps(manifest, indent=1))
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        for o in (sorted(folder.glob("step-*"))[:-keep_last] if keep_last else []):
            shutil.rmtree(o, ignore_errors=True)
    barrier()
    return path


def _resharded(model) -> None:
    """FSDP2 keeps the root's parameters gathered after a forward (an evaluation before the save): their
    gathered copies are not the sharded parameters the optimizer holds. Reshard first."""
    if hasattr(model, "reshard"):
        model.reshard()


def _materialize_state(optimizer, params: dict) -> None:
    """A fresh optimizer has no state tensors to load into: take one step at learning rate 0 on zero
    gradients, which creates them (laid out like the parameters, sharded under FSDP2) and moves nothing;
    the loaded checkpoint then overwrites every value, counters included."""
    if optimizer.state and any(optimizer.state.values()):
        return
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    for p in params.values():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr


def load_sharded_checkpoint(path: str | Path, model, optimizer) -> dict:
    """Every rank calls this (a collective). Restores parameters, optimizer state and RNG whatever the
    world size the checkpoint was written at; returns the saved state (step, position, ...)."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LeanLMError(f"{path}: no readable leanlm manifest state.json ({e}); only checkpoints leanlm wrote "
                          "are read")
    if state.get("format") != FORMAT:
        raise LeanLMError(f"{path}: checkpoint format {state.get('format')!r}, expected {FORMAT!r}; "
                          "only checkpoints leanlm wrote are read")
    files = sorted(f.name for f in (path / "dcp").glob("*.safetensors")) if (path / "dcp").is_dir() else []
    if files != state.get("files"):
        raise LeanLMError(f"{path}: the shard files ({len(files)}) differ from the manifest's "
                          f"({len(state.get('files') or [])}); the checkpoint is incomplete or not leanlm's")
    _resharded(model)
    params = trainable_named(model)
    if set(state["optimizer_scalars"]) or any(k.startswith("optim/") for k in state["tensors"]):
        _materialize_state(optimizer, params)
    opt_tensors, _, _ = optimizer_parts(optimizer, params)
    flat = _flat(params, opt_tensors)
    if set(flat) != set(state["tensors"]):
        diff = sorted(set(flat) ^ set(state["tensors"]))[:3]
        raise LeanLMError(f"{path}: checkpoint's tensors differ from the model's and optimizer's ({diff}); "
                          "resume with the same model, method and optimizer")
    ctx = _quiet()
    try:
        with torch.no_grad():
            dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(path / "dcp")))
    finally:
        ctx.__exit__(None, None, None)
    restore_scalars_and_groups(optimizer, params, state)
    torch.set_rng_state(load_file(str(path / "rng.safetensors"))["torch_cpu"])
    return state
