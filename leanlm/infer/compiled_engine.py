"""Piecewise compiled engine steps (vLLM's piecewise compilation, in plain torch.compile). Opt-in: on the
2-core CPU it measured no faster than the eager step (docs/bench/serving.md, section 9).

An engine step packs a changing number of tokens (decodes, prefill chunks, speculative checks) and its
attention reads the paged pool through block tables planned in Python at every step: no static graph
covers it. So each block is cut around attention (`Block.attn_in`, `Block.attn_core`, `Block.attn_out`
in leanlm/model/transformer.py) and only the two outer pieces are compiled:

  * before attention: input norm, the fused q/k/v matmul, q/k norms, RoPE;
  * after attention: the output projection, norms, residual adds, the MLP (SwiGLU/GeGLU fused).

Both run on the step's tokens flattened to one row [1, N, hidden] with N unbacked (`mark_unbacked`:
not specialised at 1 either), so one graph per piece serves every step size; and the block is an
argument: with dynamo's inlining of nn.Modules (torch's default) its parameters are graph inputs,
so the same graph serves every layer of the same shape. Attention over the blocks (`PagedKVCache.attend`) runs eagerly between them. The
embedding, RoPE lookup, final norm and head stay eager (a few ops per step, not per layer).

Eager is the reference and the fallback: a compile that fails is retried once on an emptied cache
directory (compiled.py's on-disk cache), then leanlm says why in one line and the engine runs eagerly.
"""
from __future__ import annotations

import sys

import torch

from leanlm.infer import compiled


def _attn_in(block, x, cos, sin):
    return block.attn_in(x, cos, sin)


def _attn_out(block, x, y):
    return block.attn_out(x, y)


def engine_compile_unsupported(model, cache, adapters=None, virtual=None) -> str | None:
    """Why the engine cannot take the piecewise compiled step for this model and cache (None: it can)."""
    from leanlm.model.layout import blocks
    from leanlm.model.moe import SparseMoE

    why = compiled.compile_unsupported(model)
    if why is not None:
        return why
    if adapters is not None or virtual is not None:
        return "adapters run eagerly"
    if not getattr(cache, "blockwise", False):
        return "attention='dense' runs eagerly"
    if any(isinstance(m, SparseMoE) for b in blocks(model) for m in b.modules()):
        return "MoE routing is data-dependent"
    return None


def _flat(t: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> [1, H, B*T, D], always laid out as [1, B*T, H, D] (one stride pattern: no recompile)."""
    B, H, T, D = t.shape
    return t.transpose(1, 2).reshape(1, B * T, H, D).transpose(1, 2)


def _unflat(t: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """[1, H, B*T, D] -> [B, H, T, D] (a view)."""
    if B == 1:
        return t
    return t[0].unflatten(1, (B, T)).transpose(0, 1)


def _dynamic(t: torch.Tensor, dim: int) -> None:
    """The step size: symbolic from the first call on and never specialised (mark_dynamic would give N = 1
    a graph of its own)."""
    torch._dynamo.decorators.mark_unbacked(t, dim)


class PiecewiseForward:
    """forward(inputs, cache) -> final hidden states [B*T, hidden], like
    `model(**inputs, cache=cache, return_hidden=True).reshape(B*T, -1)`, with the blocks' pieces compiled."""

    def __init__(self, model, mode: str | None = None):
        self.model, self.mode = model, mode
        self.failed: str | None = None
        self.calls = 0  # compiled steps run
        self._fns = None
        self._retried = False
        self._cache_used = False

    def _compiled(self):
        if self._fns is None:
            import torch._dynamo
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()  # raises at once when there is no working C++ compiler
            d = compiled._use_cache_dir()
            self._cache_used = d is not None and any(d.iterdir())
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            kw = dict(fullgraph=True, mode=self.mode)
            self._fns = torch.compile(_attn_in, **kw), torch.compile(_attn_out, **kw)
        return self._fns

    def forward(self, inputs: dict, cache) -> torch.Tensor:
        if self.failed is None:
            try:
                out = self._forward(inputs, cache)
                self.calls += 1
                return out
            except Exception as e:  # a compiler failure: run eagerly (below)
                if self.calls:
                    raise  # it compiled and ran before: a real error, not a compiler problem
                if self._cache_used and not self._retried and self._clear_cache():
                    self._retried = True
                    return self.forward(inputs, cache)
                self.fail(e)
        h = self.model(**inputs, cache=cache, return_hidden=True)
        return h.reshape(-1, h.shape[-1])

    def _forward(self, inputs: dict, cache) -> torch.Tensor:
        from leanlm.model.layout import FINAL_NORM, blocks

        pre, post = self._compiled()
        model = self.model
        ids = inputs.get("input_ids")
        x = model.embed(ids) if ids is not None else inputs["inputs_embeds"]
        B, T, hidden = x.shape
        cfg = model.config
        window = cfg.sliding_window if cfg.layer_types is None else cfg.window(0)
        positions, _ = cache.begin(T, None, window)  # the blockwise cache masks in attend(): no mask here
        positions = positions.reshape(1, -1)
        max_pos = int(positions.max())
        cos, sin = model.rope.lookup(positions, max_pos, x.dtype)  # [1, 1, N, D]
        local = (cos, sin)
        if model.rope_local is not None:
            local = model.rope_local.lookup(positions, max_pos, x.dtype)
        x = x.reshape(1, B * T, hidden)
        _dynamic(x, 1)
        for t in (cos, sin, *local):
            _dynamic(t, 2)
        for block in blocks(model):
            c, s = local if block.local else (cos, sin)
            q, k, v = pre(block, x, c, s)
            y = _flat(block.attn_core(_unflat(q, B, T), _unflat(k, B, T), _unflat(v, B, T), None, cache))
            _dynamic(y, 2)
            x = post(block, x, y)
        cache.end()
        x = model.get_submodule(FINAL_NORM)(x)
        return x.reshape(B * T, hidden)

    def _clear_cache(self) -> bool:
        if not compiled.clear_cache():
            return False
        self._fns = None
        return True

    def fail(self, e: BaseException) -> None:
        self.failed = compiled.failure_summary(e)
        print(f"leanlm: compiled engine step unavailable ({self.failed}); running eagerly", file=sys.stderr)
