"""Many LoRA adapters in one batch (S-LoRA, Punica): the base matmul once, each row's low-rank delta by adapter.

`LoraPool(model, slots, max_rank)` wraps every block linear in a `MultiLoraLinear` holding the
stacked A [slots+1, r, in] and B [slots+1, out, r] of the adapters currently in the pool (slot 0 is
"no adapter", all zeros). Before each forward the engine says which adapter every input token runs
with (`set_rows`); a layer computes y = W x for the whole batch, then for each adapter present adds
scaling * B_a (A_a x) to its rows only (a segmented gather: one pair of small matmuls per adapter in
the batch, like Punica's SGMV).

Adapters are registered by index (from a peft folder or tensors: `register`), kept on the CPU, and
copied into a pool slot when a sequence needs them (`acquire`); a slot whose adapter no running
sequence uses is reused least-recently-used first. Plain LoRA and rsLoRA adapters; DoRA and (IA)3
change the base output itself, so they are served one per server (`leanlm serve --adapter`).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from leanlm.errors import LeanLMError


class _Rows:
    """Shared by every MultiLoraLinear of a model: the pool slot of each input token for this forward."""

    def __init__(self):
        self.slots: torch.Tensor | None = None  # [tokens] slot ids, or None: no adapter anywhere
        self.groups: list[tuple[int, torch.Tensor]] = []  # (slot, token indices) per adapter present


class MultiLoraLinear(nn.Module):
    def __init__(self, base: nn.Module, slots: int, rank: int, rows: _Rows):
        super().__init__()
        w = base.weight
        self.base_layer, self.rows = base, rows
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        dt = w.dtype if w.dtype.is_floating_point else torch.float32
        self.register_buffer("lora_A", torch.zeros(slots + 1, rank, self.in_features, dtype=dt), persistent=False)
        self.register_buffer("lora_B", torch.zeros(slots + 1, self.out_features, rank, dtype=dt), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if not self.rows.groups:
            return y
        shape = y.shape
        x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, shape[-1])
        for slot, idx in self.rows.groups:  # scaling is folded into B when the slot is filled
            xa = x2.index_select(0, idx).to(self.lora_A.dtype)
            d = (xa @ self.lora_A[slot].T) @ self.lora_B[slot].T
            y2 = y2.index_put((idx,), d.to(y2.dtype), accumulate=True)  # ~100x faster than index_add on CPU
        return y2.view(shape)


@dataclass
class Adapter:
    name: str
    rank: int
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A [r, in], scaling * B [out, r])
    path: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))


def read_lora(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(peft config dict, tensors) of a LoRA adapter folder, checked to be one the pool can serve."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from leanlm.peft.io import config_from_peft, read_adapter_config
    from leanlm.peft.lora import LoraConfig

    folder = Path(folder)
    d = read_adapter_config(folder)
    cfg = config_from_peft(d, str(folder / "adapter_config.json"))
    if not isinstance(cfg, LoraConfig):
        raise LeanLMError(f"{folder}: a {d['peft_type']} adapter; several adapters in one batch are LoRA only "
                          "(serve it alone with --adapter)")
    if cfg.use_dora:
        raise LeanLMError(f"{folder}: a DoRA adapter rescales the base output; serve it alone with --adapter")
    if cfg.rank_pattern or cfg.alpha_pattern:
        raise LeanLMError(f"{folder}: per-module ranks or alphas (rank_pattern / alpha_pattern) are not served "
                          "in a shared batch; serve it alone with --adapter")
    path = folder / "adapter_model.safetensors"
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise LeanLMError(f"{path}: cannot read safetensors ({e})")
    return {"r": cfg.r, "scaling": cfg.scaling}, tensors


def lora_weights(folder: str | Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int, float]:
    """({module name: (A, B)}, rank, scaling) of a peft LoRA folder (read off the engine thread)."""
    from leanlm.peft.io import PREFIX

    conf, tensors = read_lora(folder)
    weights = {}
    for k, t in tensors.items():
        if not k.startswith(PREFIX) or not k.endswith((".lora_A.weight", ".lora_B.weight")):
            raise LeanLMError(f"{folder}: unexpected tensor {k} in a LoRA adapter")
        mod, _, which = k[len(PREFIX):-len(".weight")].rpartition(".")
        weights.setdefault(mod, [None, None])[which == "lora_B"] = t
    if any(a is None or b is None for a, b in weights.values()):
        raise LeanLMError(f"{folder}: a LoRA layer lacks its A or B tensor")
    return {m: (a, b) for m, (a, b) in weights.items()}, conf["r"], conf["scaling"]


class LoraPool:
    """Stacked LoRA weights for `slots` adapters at once, filled on demand with LRU reuse."""

    def __init__(self, model: nn.Module, slots: int = 8, max_rank: int = 16):
        from leanlm.model.layout import all_block_linears
        from leanlm.model.surgery import replace_module

        if slots < 1 or max_rank < 1:
            raise LeanLMError("LoRA pool: slots and max rank must be at least 1")
        self.slots, self.max_rank = slots, max_rank
        self.rows = _Rows()
        self.layers: dict[str, MultiLoraLinear] = {}
        for name in all_block_linears(model):
            base = model.get_submodule(name)
            if not hasattr(base, "weight") or base.weight.dim() != 2:
                raise LeanLMError(f"LoRA pool: {name} is not a dense linear layer")
            layer = MultiLoraLinear(base, slots, max_rank, self.rows)
            replace_module(model, name, layer)
            self.layers[name] = layer
        self.adapters: dict[int, Adapter] = {}
        self.slot_of: dict[int, int] = {}  # adapter index -> slot (1..slots)
        self.pins: dict[int, int] = {}  # adapter index -> running sequences using it
        self.lru: OrderedDict[int, None] = OrderedDict()  # filled slots' adapters, least recent first
        self.loads = 0

    # ---- registry ----------------------------------------------------------------------------------
    def register(self, index: int, name: str, weights: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 rank: int, scaling: float, path: str | None = None) -> None:
        """Add an adapter: weights maps module names to (A [r, in], B [out, r]) as trained."""
        if index < 1 or index in self.adapters:
            raise LeanLMError(f"LoRA pool: adapter index {index} is taken")
        if rank > self.max_rank:
            raise LeanLMError(f"LoRA adapter '{name}' has rank {rank}; this server takes at most {self.max_rank} "
                              "(raise --max-lora-rank)")
        unknown = sorted(set(weights) - set(self.layers))
        if unknown:
            raise LeanLMError(f"LoRA adapter '{name}' targets {unknown[0]}, not a block linear of this model")
        out = {}
        for mod, (a, b) in weights.items():
            layer = self.layers[mod]
            if a.shape != (rank, layer.in_features) or b.shape != (layer.out_features, rank):
                raise LeanLMError(f"LoRA adapter '{name}': {mod} has A {tuple(a.shape)} / B {tuple(b.shape)}, the "
                                  f"model needs [{rank}, {layer.in_features}] / [{layer.out_features}, {rank}]")
            out[mod] = (a.detach().float().contiguous(), (b.detach().float() * scaling).contiguous())
        self.adapters[index] = Adapter(name, rank, out, path)

    def register_folder(self, index: int, name: str, folder: str | Path) -> None:
        weights, rank, scaling = lora_weights(folder)
        self.register(index, name, weights, rank, scaling, str(folder))

    def unregister(self, index: int) -> None:
        if self.pins.get(index):
            raise LeanLMError(f"LoRA adapter '{self.adapters[index].name}' is serving {self.pins[index]} "
                              "requests; unload it when they finish")
        slot = self.slot_of.pop(index, None)
        if slot is not None:
            self.lru.pop(index, None)
            self._fill(slot, None)
        self.adapters.pop(index, None)

    # ---- the engine's side ---------------------------------------------------------------------
    def known(self, index: int) -> bool:
        return index in self.adapters

    def acquire(self, index: int) -> bool:
        """Pin the adapter in a slot for one more sequence (loading it, evicting an idle one); False if full."""
        if index not in self.slot_of:
            used = set(self.slot_of.values())
            free = [s for s in range(1, self.slots + 1) if s not in used]
            if free:
                slot = free[0]
            else:
                idle = next((a for a in self.lru if not self.pins.get(a)), None)
                if idle is None:
                    return False
                slot = self.slot_of.pop(idle)
                del self.lru[idle]
            self._fill(slot, self.adapters[index])
            self.slot_of[index] = slot
            self.loads += 1
        self.lru[index] = None
        self.lru.move_to_end(index)
        self.pins[index] = self.pins.get(index, 0) + 1
        return True

    def release(self, index: int) -> None:
        n = self.pins.get(index, 0) - 1
        if n > 0:
            self.pins[index] = n
        else:
            self.pins.pop(index, None)

    def release_all(self) -> None:
        self.pins.clear()

    def set_rows(self, adapters: torch.Tensor | None) -> None:
        """The adapter index of every input token of the next forward (0: none), flat."""
        self.rows.groups = []
        if adapters is None:
            return
        present = sorted(set(adapters.tolist()) - {0})
        for a in present:
            slot = self.slot_of.get(a)
            if slot is None:
                raise LeanLMError(f"LoRA pool: adapter {a} is not in a slot; acquire it first")
            self.rows.groups.append((slot, (adapters == a).nonzero().flatten()))

    def _fill(self, slot: int, adapter: Adapter | None) -> None:
        with torch.no_grad():
            for name, layer in self.layers.items():
                layer.lora_A[slot].zero_()
                layer.lora_B[slot].zero_()
                if adapter is not None and name in adapter.weights:
                    a, b = adapter.weights[name]
                    layer.lora_A[slot, :adapter.rank] = a.to(layer.lora_A.dtype)
                    layer.lora_B[slot, :, :adapter.rank] = b.to(layer.lora_B.dtype)
