"""LoRA adapters served by name (vLLM's --enable-lora API): `"model": NAME` picks one per request.

Adapters given at start-up (`--lora NAME=PATH`) and loaded at run time (POST /v1/load_lora_adapter,
only from folders under the server's --lora-dir) live in the engine's LoraPool; requests of different
adapters share one batch. /v1/models lists each adapter with its `parent`, the base model.
"""
# no `from __future__ import annotations`: FastAPI resolves the routes' body types from annotations
import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

from leanlm.errors import LeanLMError
from leanlm.serve import schema


@dataclass
class Entry:
    index: int
    path: str
    created: int = field(default_factory=lambda: int(time.time()))


class LoraRegistry:
    """Adapter names -> pool indices. Indices are never reused (prefix-cache keys include them)."""

    def __init__(self, pool, lora_dir: str | Path | None = None):
        self.pool = pool
        self.lora_dir = Path(lora_dir).resolve() if lora_dir else None
        self.adapters: dict[str, Entry] = {}
        self._next = 1

    def add_at_start(self, name: str, path: str | Path) -> None:
        """Before the engine thread runs: register directly."""
        idx = self._take(name)
        self.pool.register_folder(idx, name, path)
        self.adapters[name] = Entry(idx, str(path))

    def _take(self, name: str) -> int:
        if name in self.adapters:
            raise LeanLMError(f"a LoRA adapter named '{name}' is already loaded")
        idx, self._next = self._next, self._next + 1
        return idx

    def allowed(self, path: str) -> Path:
        """The resolved folder if it is under --lora-dir; PermissionError otherwise."""
        if self.lora_dir is None:
            raise PermissionError("loading adapters at run time is off; start the server with --lora-dir DIR")
        p = Path(path)
        p = (p if p.is_absolute() else self.lora_dir / p).resolve()
        if not p.is_relative_to(self.lora_dir):
            raise PermissionError(f"'{path}' is outside the server's adapter directory")
        return p


def _unregister(engine, pool, index: int) -> None:
    """On the engine thread: refuse while a queued or running request uses the adapter."""
    busy = sum(s.adapter == index for s in engine.seqs.values())
    if busy:
        raise LeanLMError(f"the adapter is serving {busy} requests; unload it when they finish")
    pool.unregister(index)


def add_routes(app, srv, reg: LoraRegistry, APIError) -> None:
    """POST /v1/load_lora_adapter and /v1/unload_lora_adapter on the FastAPI app."""
    from leanlm.peft.multi_lora import lora_weights

    aeng = srv.aengine
    errors = schema.error_responses(400, 401, 403, 404)

    @app.post("/v1/load_lora_adapter", response_model=schema.LoraStatus, responses=errors)
    async def load_lora_adapter(req: schema.LoadLoraRequest):
        if req.lora_name in reg.adapters or req.lora_name == srv.model_name:
            raise APIError(400, f"a model named '{req.lora_name}' is already served", "lora_name")
        try:
            folder = reg.allowed(req.lora_path)
        except PermissionError as e:
            raise APIError(403, str(e), "lora_path", "forbidden", type_="permission_error")
        if not (folder / "adapter_config.json").is_file():
            raise APIError(404, f"no adapter (adapter_config.json) in '{req.lora_path}'", "lora_path", "not_found")
        try:
            weights, rank, scaling = await asyncio.to_thread(lora_weights, folder)
            idx = reg._take(req.lora_name)
            await asyncio.to_thread(aeng.call, lambda eng: reg.pool.register(
                idx, req.lora_name, weights, rank, scaling, str(folder)))
        except LeanLMError as e:
            raise APIError(400, str(e), "lora_path")
        reg.adapters[req.lora_name] = Entry(idx, str(folder))
        return {"status": "loaded", "lora_name": req.lora_name}

    @app.post("/v1/unload_lora_adapter", response_model=schema.LoraStatus, responses=errors)
    async def unload_lora_adapter(req: schema.UnloadLoraRequest):
        entry = reg.adapters.get(req.lora_name)
        if entry is None:
            raise APIError(404, f"no LoRA adapter named '{req.lora_name}' is loaded", "lora_name", "not_found")
        try:
            await asyncio.to_thread(aeng.call, lambda eng: _unregister(eng, reg.pool, entry.index))
        except LeanLMError as e:
            raise APIError(400, str(e), "lora_name", "adapter_in_use")
        reg.adapters.pop(req.lora_name, None)
        return {"status": "unloaded", "lora_name": req.lora_name}
