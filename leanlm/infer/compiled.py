"""A compiled decode step (gpt-fast style): one `torch.compile`d graph per model, batch size and cache size.

Eager decoding dispatches a dozen PyTorch ops per layer from Python at every token; at batch 1 on a
small model that overhead, not the weight reads, sets the speed. Here the whole decode step (embedding,
every block, the head) is traced once by dynamo and compiled by inductor into C++/OpenMP kernels
(RMSNorm, RoPE, SwiGLU and the residual adds fused; the packed int4/int8 matmuls called as they are).

Nothing may recompile per token, so nothing in the step depends on a Python value that changes:
- the KV cache is the static `KVCache` generation already uses (preallocated K/V, rounded up to a
  bucket of `bucket(n)` slots so one graph serves many prompt/answer lengths);
- the step writes its keys and values with `index_copy_` at a slot given as a tensor and attends to
  all `max_len` slots under a mask (slot index <= current slot, and the row's valid slots);
- RoPE positions are tensors (the row's count of valid slots), and the cache tells forward its
  largest position (`max_position`) so no tensor value is read.
Prefill stays eager (its length changes with every prompt; its large matmuls are not dispatch-bound)
and fills the same cache. The eager path is the reference: tests compare the two token for token.

Inductor's on-disk cache lives under ~/.cache/leanlm/compile/<key> (key: torch, Python, the machine
and leanlm's model code), so a second start skips the C++ compilation; a compile that fails is tried
once more on an emptied cache directory, then leanlm says why in one line and decodes eagerly.
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import sys
import weakref
from pathlib import Path

import torch

MIN_BUCKET = 256
# compile=None (auto) decodes eagerly unless the step for this shape is already compiled in this process: on
# 2 CPU cores compiling the default model's step takes ~48 s (8-10 s from the on-disk cache) and pays that
# back only after 800-10,000 tokens (docs/bench/decode.md), so compiling is opt-in (--compile).
DISABLE_ENV = "LEANLM_NO_COMPILE"  # any non-empty value other than "0": decode eagerly (like --no-compile)


def bucket(n: int) -> int:
    """Cache slots for n positions: a power of two, at least MIN_BUCKET (one compiled graph per bucket)."""
    size = MIN_BUCKET
    while size < n:
        size *= 2
    return size


def compile_disabled_by_env() -> bool:
    return os.environ.get(DISABLE_ENV, "") not in ("", "0")


@functools.cache
def _code_hash() -> str:
    """leanlm's model, RoPE and quantized-kernel code, this file and the engine's compiled step: a change
    makes a new cache."""
    from leanlm.compress.quant import qlinear
    from leanlm.model import rope, transformer

    h = hashlib.sha256()
    # the engine's compiled step is read as a file, not imported: it imports this module
    for path in (transformer.__file__, rope.__file__, qlinear.__file__, __file__,
                 Path(__file__).with_name("compiled_engine.py")):
        h.update(Path(path).read_bytes())
    return h.hexdigest()[:12]


def compile_cache_dir() -> Path:
    """Inductor's cache for leanlm, keyed by torch, Python, CPU and leanlm's code (stale ones are never read)."""
    from leanlm.io.registry import cache_dir

    py = "py" + "".join(platform.python_version_tuple()[:2])
    key = f"torch{torch.__version__.replace('+', '_')}-{py}-{platform.machine()}-{_code_hash()}"
    return cache_dir() / "compile" / key


_SET_BY_US: list = []  # the TORCHINDUCTOR_CACHE_DIR value leanlm set, if any


def _use_cache_dir() -> Path | None:
    """Point inductor at leanlm's cache (None: the user chose another with TORCHINDUCTOR_CACHE_DIR)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    d = compile_cache_dir()
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # inductor writes its default into the environment itself: only another value is the user's choice
    if chosen and chosen not in _SET_BY_US and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        return None
    d.mkdir(parents=True, exist_ok=True)
    if chosen and chosen != str(d):  # LEANLM_CACHE moved within the process: forget what the old dir held
        from torch._inductor.utils import clear_inductor_caches

        clear_inductor_caches()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(d)
    _SET_BY_US.append(str(d))
    return d


def clear_cache() -> bool:
    """Empty leanlm's inductor cache (a corrupt entry must be rebuilt, never trusted) and dynamo's compiled
    code; False (nothing done) if the cache directory in use is not leanlm's."""
    d = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR", ""))
    if not d.is_dir() or d.parent.name != "compile" or d.parent.parent.name != "leanlm":
        return False
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True, exist_ok=True)
    import torch._dynamo

    torch._dynamo.reset()
    return True


class StepCache:
    """The cache protocol (begin/update/end) over a KVCache's tensors for one compiled decode step.

    slot: long [1], the cache slot the new token goes to; valid: bool [B, max_len], the slots holding
    real tokens (left padding excluded; slots from the prompt's end on are all valid)."""

    def __init__(self, k: list, v: list, slot: torch.Tensor, valid: torch.Tensor):
        self.k, self.v, self.slot, self.valid = k, v, slot, valid
        self.max_len = k[0].shape[2]
        self.max_position = self.max_len - 1  # RoPE tables cover every slot: forward reads no tensor value
        self.idx = torch.arange(self.max_len, device=slot.device)
        self.seen = (self.idx <= slot)[None, :] & valid  # [B, max_len]

    def begin(self, T: int, positions, window: int | None):
        if positions is None:  # position = number of real tokens before this slot
            positions = self.seen.sum(-1, keepdim=True) - 1  # [B, 1]
        return positions, self.window_mask(window)

    def window_mask(self, window: int | None):
        m = self.seen
        if window is not None:
            m = m & (self.slot - self.idx < window)[None, :]
        return m[:, None, None, :]  # [B, 1, 1, max_len]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        self.k[layer].index_copy_(2, self.slot, k)
        self.v[layer].index_copy_(2, self.slot, v)
        return self.k[layer], self.v[layer]

    def end(self):
        pass


def _step(model, ids, slot, valid, k, v):
    return model(ids, cache=StepCache(k, v, slot, valid))[:, -1]


class CompiledDecoder:
    """decode(cache, ids [B, 1]) -> logits [B, vocab], advancing the cache: compiled, or eager after a failure."""

    def __init__(self, model, mode: str | None = None):
        self.model, self.mode = model, mode
        self.failed: str | None = None
        self._fn = None
        self._valid: dict = {}
        self._warm: set = set()
        self._retried = False
        self._cache_used = False

    def _compiled(self):
        if self._fn is None:
            import torch._dynamo
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()  # raises at once when there is no working C++ compiler
            d = _use_cache_dir()
            self._cache_used = d is not None and any(d.iterdir())
            # One graph per (model, batch, cache bucket) in a process: allow more than dynamo's default 8.
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            self._fn = torch.compile(_step, fullgraph=True, dynamic=False, mode=self.mode)
        return self._fn

    def _valid_of(self, cache) -> torch.Tensor:
        if cache.valid is not None:
            return cache.valid
        key = (cache.batch, cache.max_len)
        if key not in self._valid:
            self._valid[key] = torch.ones(cache.batch, cache.max_len, dtype=torch.bool)
        return self._valid[key]

    def decode(self, cache, ids: torch.Tensor) -> torch.Tensor:
        if self.failed is not None:
            return self.model(ids, cache=cache)[:, -1]
        model = self.model
        key = (ids.shape[0], cache.max_len, model.dtype)
        if key not in self._warm:
            # RoPE tables for every slot, built eagerly: the compiled step only indexes them.
            model.rope.lookup(torch.zeros(1, 1, dtype=torch.long), cache.max_len - 1, model.dtype)
            if model.rope_local is not None:
                model.rope_local.lookup(torch.zeros(1, 1, dtype=torch.long), cache.max_len - 1, model.dtype)
        slot = torch.tensor([cache.length])
        if cache.length >= cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; asked for {cache.length + 1}")
        try:
            logits = self._compiled()(model, ids, slot, self._valid_of(cache), cache.k, cache.v)
        except Exception as e:  # any compiler failure: decode eagerly (below)
            if key in self._warm:
                raise  # it compiled and ran before: a real error, not a compiler problem
            if self._cache_used and not self._retried and self._clear_cache():
                self._retried = True
                return self.decode(cache, ids)
            self.fail(e)
            return self.model(ids, cache=cache)[:, -1]
        self._warm.add(key)
        cache.length += 1
        return logits

    def _clear_cache(self) -> bool:
        if not clear_cache():
            return False
        self._fn = None
        return True

    def fail(self, e: BaseException) -> None:
        self.failed = failure_summary(e)
        print(f"leanlm: compiled decode unavailable ({self.failed}); decoding eagerly", file=sys.stderr)


def failure_summary(e: BaseException) -> str:
    """One line saying why compiling failed: the exception type and its first line."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return f"{type(e).__name__}: {first}"


_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compile_unsupported(model, kv_bits=None) -> str | None:
    """Why this model cannot take the compiled step (None: it can)."""
    from leanlm.model.transformer import Transformer

    if compile_disabled_by_env():
        return f"{DISABLE_ENV} is set"
    if not isinstance(model, Transformer):
        return "not a plain leanlm Transformer (adapters decode eagerly)"
    if kv_bits:
        return "quantized KV cache"
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return "forward hooks"
    if model.model.norm.weight.device.type != "cpu":
        return "CPU only"
    return None


def decoder_for(model) -> CompiledDecoder:
    """The model's compiled decoder (one per model, kept while the model lives)."""
    dec = _DECODERS.get(model)
    if dec is None:
        dec = _DECODERS[model] = CompiledDecoder(model)
    return dec


def compiled_decoder(model, kv_bits=None) -> CompiledDecoder | None:
    """The model's compiled decoder, or None where the model cannot take one (decode eagerly)."""
    if compile_unsupported(model, kv_bits) is not None:
        return None
    dec = decoder_for(model)
    return None if dec.failed else dec


def auto_decoder(model, compile: bool | None, batch: int, max_len: int, kv_bits=None) -> CompiledDecoder | None:
    """The decoder a generation should use: compile True (where supported), False (never) or None (auto:
    only where this model's step for this shape was already compiled in the process)."""
    if compile is False:
        return None
    if compile is None:
        dec = _DECODERS.get(model)
        if dec is None or (batch, bucket(max_len), model.dtype) not in dec._warm:
            return None
    return compiled_decoder(model, kv_bits)

