"""Training checkpoints: safetensors for tensors, JSON for everything else, never pickle.

A checkpoint is a folder `step-NNNNNNN/` written with `atomic_dir` (temp folder + one rename), so an
interrupted save leaves the previous checkpoint untouched; `latest_checkpoint` only sees complete ones.
Contents: trainable.safetensors (the trainable parameters by name), optimizer.safetensors (per-parameter
state, keyed by parameter name), rng.safetensors (torch CPU generator), state.json (step, data position,
optimizer hyper-parameters, schedule, log position).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from leanlm.errors import LeanLMError


def trainable_named(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def optimizer_parts(optimizer, params: dict) -> tuple[dict, dict, list]:
    """(per-parameter state tensors "name::key", per-parameter scalars, param-group settings)."""
    ids = {id(p): n for n, p in params.items()}
    opt_tensors, opt_scalars = {}, {}
    for p, st in optimizer.state.items():
        name = ids.get(id(p))
        if name is None:
            continue
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0:
                opt_tensors[f"{name}::{k}"] = v.detach()
            else:
                opt_scalars[f"{name}::{k}"] = float(v)
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
              for g in optimizer.param_groups]
    return opt_tensors, opt_scalars, groups


def save_checkpoint(folder: str | Path, model, optimizer, state: dict, keep_last: int = 2) -> Path:
    from safetensors.torch import save as st_save

    from leanlm.io.atomic import atomic_dir

    folder = Path(folder)
    params = trainable_named(model)
    opt_tensors, opt_scalars, groups = optimizer_parts(optimizer, params)
    opt_tensors = {k: v.contiguous() for k, v in opt_tensors.items()}
    full = {**state, "optimizer_groups": groups, "optimizer_scalars": opt_scalars}
    path = folder / f"step-{state['step']:07d}"
    with atomic_dir(path) as tmp:
        (tmp / "trainable.safetensors").write_bytes(st_save({n: p.detach().contiguous() for n, p in params.items()}))
        (tmp / "optimizer.safetensors").write_bytes(st_save(opt_tensors) if opt_tensors else st_save({}))
        (tmp / "rng.safetensors").write_bytes(st_save({"torch_cpu": torch.get_rng_state()}))
        (tmp / "state.json").write_text(json.dumps(full, indent=1))
    old = sorted(folder.glob("step-*"))[:-keep_last] if keep_last else []
    for o in old:
        shutil.rmtree(o, ignore_errors=True)
    return path


def latest_checkpoint(folder: str | Path) -> Path | None:
    folder = Path(folder)
    done = [p for p in sorted(folder.glob("step-*")) if (p / "state.json").exists()]
    return done[-1] if done else None


def _like(p, full: torch.Tensor) -> torch.Tensor:
    """A whole tensor laid out like parameter p: sharded the same way when p is an FSDP2 DTensor (a
    one-process checkpoint resumed under torchrun), as it is otherwise."""
    if hasattr(p, "device_mesh") and full.shape == p.shape:
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full, p.device_mesh, p.placements)
    return full


def load_checkpoint(path: str | Path, model, optimizer) -> dict:
    """Restore trainable parameters, optimizer state and RNG; returns the saved state dict. Reads both
    formats: this file's, and the sharded one (leanlm/train/sharded_checkpoint.py)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "state.json").exists():
        raise LeanLMError(f"{path}: not a leanlm training checkpoint (no state.json)")
    state = json.loads((path / "state.json").read_text())
    if state.get("format") is not None:
        from leanlm.train.sharded_checkpoint import load_sharded_checkpoint

        return load_sharded_checkpoint(path, model, optimizer)
    params = trainable_named(model)
    saved = load_file(str(path / "trainable.safetensors"))
    if set(saved) != set(params):
        diff = sorted(set(saved) ^ set(params))[:3]
        raise LeanLMError(f"{path}: checkpoint's trainable parameters differ from the model's ({diff}); "
                          "resume with the same method and options")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(_like(p, saved[n]))
    opt = load_file(str(path / "optimizer.safetensors"))
    by_name = {n: p for n, p in params.items()}
    optimizer.state.clear() if hasattr(optimizer.state, "clear") else None
    for key, v in opt.items():
        name, k = key.split("::")
        optimizer.state.setdefault(by_name[name], {})[k] = _like(by_name[name], v.clone())
    restore_scalars_and_groups(optimizer, by_name, state)
    torch.set_rng_state(load_file(str(path / "rng.safetensors"))["torch_cpu"])
    return state


def restore_scalars_and_groups(optimizer, by_name: dict, state: dict) -> None:
    for key, v in state.pop("optimizer_scalars").items():
        name, k = key.split("::")
        # torch's Adam keeps `step` as a 0-dim float tensor
        optimizer.state.setdefault(by_name[name], {})[k] = torch.tensor(v)
    for g, saved_g in zip(optimizer.param_groups, state.pop("optimizer_groups")):
        for k, v in saved_g.items():
            g[k] = tuple(v) if k == "betas" else v
