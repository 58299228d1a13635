"""KV-cache compression under a fixed budget: StreamingLLM, H2O and Scissorhands-style eviction.

`EvictingKVCache` implements the model's cache protocol (begin/update/end) for one sequence and
keeps at most `budget` keys per layer and KV head after every step (the queries of a step see the
kept keys plus the step's own tokens, as in the papers). Keys keep the RoPE rotation of their
original position; queries use their true position.

  * streaming    - StreamingLLM (Xiao et al. 2023): the first `sink` tokens + the most recent ones.
  * h2o          - H2O (Zhang et al. 2023): the most recent `recent` tokens + the heavy hitters, the
                   tokens with the largest attention received, summed over all queries so far.
  * scissorhands - Scissorhands-style (Liu et al. 2023): persistence of importance. A token scores
                   one point each time a query gives it more than the average attention (1/keys),
                   scores decay with a history window, and when the cache is over budget the
                   lowest scoring old tokens are dropped in a batch (down to `budget - drop`).
H2O and Scissorhands need attention probabilities: the cache captures each layer's query projection
output (named by the family's layout) with a forward hook (attach/detach) and recomputes
softmax(qK^T) for the kept keys.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from leanlm.errors import LeanLMError
from leanlm.model.layout import blocks, layout_of
from leanlm.model.rope import apply_rope

@dataclass
class FullConfig:
    budget: int = 0  # unused: every key is kept (the reference)


@dataclass
class StreamingConfig:
    budget: int = 256
    sink: int = 4  # first tokens always kept (attention sinks)


@dataclass
class H2OConfig:
    budget: int = 256
    recent: int | None = None  # most recent tokens always kept (default budget / 2)


@dataclass
class ScissorhandsConfig:
    budget: int = 256
    recent: int | None = None
    history: int = 64  # importance decays over this many steps
    drop: int | None = None  # tokens dropped at once when over budget (default budget / 8)


def evicting_cache(model, cfg) -> "EvictingKVCache":
    return EvictingKVCache(model, next(k for k, (c, _) in POLICIES.items() if type(cfg) is c), **asdict(cfg))


# policy name -> (config dataclass, make the cache); leanlm.options.method_config checks the fields
POLICIES = {"full": (FullConfig, evicting_cache), "streaming": (StreamingConfig, evicting_cache),
            "h2o": (H2OConfig, evicting_cache), "scissorhands": (ScissorhandsConfig, evicting_cache)}


def make_cache(model, policy: str, **fields) -> "EvictingKVCache":
    """The evicting cache of a policy by name, its fields checked (one line for an unknown policy or field)."""
    from leanlm.options import method_config

    cfg, make = method_config(POLICIES, policy, fields, "KV eviction policy")
    return make(model, cfg)


class EvictingKVCache:
    def __init__(self, model, policy: str, budget: int, sink: int = 4, recent: int | None = None,
                 history: int = 64, drop: int | None = None):
        if policy not in POLICIES:
            raise LeanLMError(f"unknown KV eviction policy {policy!r}; use one of {', '.join(POLICIES)}")
        if policy != "full" and budget < 2:
            raise LeanLMError(f"KV budget {budget} is too small; keep at least 2 tokens")
        self.model, self.cfg, self.policy, self.budget = model, model.config, policy, budget
        self.layout = layout_of(model)
        self.sink = min(sink, budget // 2)
        self.recent = budget // 2 if recent is None else min(recent, budget - 1)
        self.decay = 1.0 - 1.0 / max(history, 1)
        self.drop = max(1, budget // 8) if drop is None else drop
        L = self.cfg.num_layers
        self.k: list[torch.Tensor | None] = [None] * L
        self.v: list[torch.Tensor | None] = [None] * L
        self.pos: list[torch.Tensor | None] = [None] * L  # [1, nkv, kept] original positions
        self.score: list[torch.Tensor | None] = [None] * L  # [1, nkv, kept]
        self.seen, self.pending = 0, 0
        self._q: dict[int, torch.Tensor] = {}
        self._hooks = []
        self._rope = None

    # ---- q capture ----------------------------------------------------------------------------
    @property
    def needs_attention(self) -> bool:
        return self.policy in ("h2o", "scissorhands")

    def attach(self) -> "EvictingKVCache":
        if self.needs_attention and not self._hooks:
            lay = self.layout
            for block in blocks(self.model):
                attn = block.get_submodule(lay.attn)

                def hook(mod, inp, out, i=attn.layer):
                    self._q[i] = out
                self._hooks.append(block.get_submodule(lay.q).register_forward_hook(hook))
        return self

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc):
        self.detach()

    # ---- cache protocol -----------------------------------------------------------------------
    def begin(self, T: int, positions, window):
        if window is not None:
            raise LeanLMError("KV eviction does not support sliding-window models")
        self.pending = T
        positions = torch.arange(self.seen, self.seen + T).unsqueeze(0)
        if self.needs_attention:
            if not self._hooks:
                raise LeanLMError("EvictingKVCache: call attach() (or use `with`) before the forward for "
                                  f"policy {self.policy!r}")
            self._rope = self.model.rope.lookup(positions, self.seen + T - 1, self.model.dtype)
        kept = 0 if self.k[0] is None else self.k[0].shape[2]
        if T == 1:
            return positions, None
        if kept == 0:
            return positions, "causal"
        m = torch.ones(T, kept + T, dtype=torch.bool)
        m[:, kept:] = torch.ones(T, T, dtype=torch.bool).tril()
        return positions, m[None, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        T, nkv = k.shape[2], k.shape[1]
        new_pos = torch.arange(self.seen, self.seen + T).expand(1, nkv, T)
        if self.k[layer] is None:
            k_all, v_all, pos = k, v, new_pos
            score = torch.zeros(1, nkv, T)
        else:
            k_all = torch.cat([self.k[layer], k], 2)
            v_all = torch.cat([self.v[layer], v], 2)
            pos = torch.cat([self.pos[layer], new_pos], 2)
            score = torch.cat([self.score[layer], torch.zeros(1, nkv, T)], 2)
        if self.needs_attention:
            score = self._accumulate(layer, k_all, score, T)
        self._evict(layer, k_all, v_all, pos, score)
        return k_all, v_all

    def end(self):
        self.seen += self.pending
        self.pending = 0
        self._q.clear()

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    # ---- scoring and eviction -----------------------------------------------------------------
    def _accumulate(self, layer: int, k_all: torch.Tensor, score: torch.Tensor, T: int) -> torch.Tensor:
        lay, block = self.layout, blocks(self.model)[layer]
        attn = block.get_submodule(lay.attn)
        q = self._q[layer].view(1, T, attn.nh, attn.hd)
        if self.cfg.qk_norm:
            q = block.get_submodule(lay.q_norm)(q)
        cos, sin = self._rope
        q = apply_rope(q.transpose(1, 2), cos, sin).float()  # [1, H, T, D]
        nkv, L = k_all.shape[1], k_all.shape[2]
        g = attn.nh // nkv
        logits = (q.reshape(1, nkv, g * T, attn.hd) @ k_all.float().transpose(-1, -2)) / math.sqrt(attn.hd)
        logits = logits.view(1, nkv, g, T, L)
        if T > 1:  # causal among the step's own tokens
            causal = torch.ones(T, L, dtype=torch.bool)
            causal[:, L - T:] = torch.ones(T, T, dtype=torch.bool).tril()
            logits = logits.masked_fill(~causal, -math.inf)
        probs = logits.softmax(-1)  # [1, nkv, g, T, L]
        if self.policy == "h2o":
            return score + probs.sum((2, 3))
        n_vis = torch.arange(L - T + 1, L + 1).view(1, 1, 1, T, 1)  # keys each query sees
        hits = (probs > 1.0 / n_vis).float().sum((2, 3))
        return score * self.decay ** T + hits

    def _evict(self, layer, k_all, v_all, pos, score) -> None:
        L = k_all.shape[2]
        keep = None
        if self.policy != "full" and L > self.budget:
            target = self.budget
            if self.policy == "scissorhands":
                target = max(self.recent + 1, self.budget - self.drop)
            keep = self._choose(pos, score, target)
        if keep is None:
            self.k[layer], self.v[layer], self.pos[layer], self.score[layer] = k_all, v_all, pos, score
            return
        idx = keep.unsqueeze(-1).expand(-1, -1, -1, k_all.shape[-1])
        self.k[layer] = k_all.gather(2, idx)
        self.v[layer] = v_all.gather(2, idx)
        self.pos[layer] = pos.gather(2, keep)
        self.score[layer] = score.gather(2, keep)

    def _choose(self, pos: torch.Tensor, score: torch.Tensor, target: int) -> torch.Tensor:
        """Indices [1, nkv, target] (in order) of the keys to keep."""
        L = pos.shape[2]
        if self.policy == "streaming":
            idx = torch.cat([torch.arange(self.sink), torch.arange(L - (target - self.sink), L)])
            return idx.expand(1, pos.shape[1], -1)
        recent = min(self.recent, target - 1)
        old = L - recent
        pick = score[:, :, :old].topk(target - recent, dim=-1).indices
        idx = torch.cat([pick, torch.arange(old, L).expand(1, pos.shape[1], -1)], -1)
        return idx.sort(-1).values


@torch.inference_mode()
def evict_perplexity(model, ids: torch.Tensor | list[int], policy: str, budget: int, chunk: int = 1,
                     **kw) -> float:
    """Perplexity of ids (one sequence) when the KV cache is compressed to `budget` tokens as it goes.

    Tokens are fed `chunk` at a time; a query sees the kept keys plus its chunk's earlier tokens.
    """
    ids = torch.as_tensor(ids).reshape(1, -1)
    if ids.shape[1] < 2:
        raise LeanLMError("perplexity needs at least 2 tokens")
    cache = make_cache(model, policy, budget=budget if policy != "full" else ids.shape[1], **kw)
    nll, n = 0.0, 0
    with cache:
        for s in range(0, ids.shape[1] - 1, chunk):
            x = ids[:, s:min(s + chunk, ids.shape[1] - 1)]
            y = ids[:, s + 1:s + 1 + x.shape[1]]
            logits = model(x, cache=cache).float()
            nll += float(torch.nn.functional.cross_entropy(logits[0], y[0], reduction="sum"))
            n += y.shape[1]
    return math.exp(nll / n)
