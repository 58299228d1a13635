"""Speculative decoding inside the engine: per-request proposers whose K/V live in paged pools.

A request asks for it with `SamplingParams(speculative=SpecParams(method, k))`. When such a sequence
has one token left to compute (a decode step, or the last token of its prompt), the engine feeds that
token plus up to k draft tokens, and the target checks them all in the step's packed forward, like a
prefill chunk mixed with the other sequences' decodes. The accepted drafts plus one token of the target
are emitted; the target's cache is cut back to the kept tokens (`PagedKVCache.truncate`: the blocks
past the end go back to the pool). Greedy keeps a draft while it equals the target's argmax, so the
output is the plain engine's; sampling uses `leanlm.infer.speculative.accept_reject` (Leviathan et al.
2023), so the output distribution is the target's.

Methods:
  draft          a draft model given to the Engine (same vocabulary); its K/V in a PagedKVCache of the
                 draft's shape with the engine's block size and block count (its own allocator, its own
                 prefix cache under the target's block keys; a sequence never holds more draft blocks than
                 target blocks, so the pool cannot run out before the target's). A draft whose K/V have the
                 target's geometry (a quantized copy) starts from a copy of the target's prompt K/V instead
                 of prefilling the prompt (only the proposals can change, never the output);
  layer_skip     the target with some layers skipped (weights shared), its K/V in a pool like the draft's
                 (of the target's shape: the skipped layers' slices stay unused);
  prompt_lookup  no model: `leanlm.infer.speculative.PromptLookup`'s continuation of the last n-gram.
The draft length adapts per sequence within [1, k_max]: one more after a round whose drafts were all
accepted, one fewer after a round with a rejection.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from leanlm.errors import LeanLMError
from leanlm.infer.paged import OutOfBlocks, PagedKVCache
from leanlm.infer.sampling import sample_probs
from leanlm.infer.speculative import PromptLookup, accept_greedy, accept_reject, default_skip_layers, skip_layers_view

METHODS = ("draft", "prompt_lookup", "layer_skip")
MAX_K = 32


@dataclass(frozen=True)
class SpecParams:
    """A request's speculation: `method` (METHODS), `k` draft tokens in the first round, at most `k_max`
    (None: 2k, at most MAX_K) once the length adapts; adaptive=False keeps k."""
    method: str
    k: int = 4
    k_max: int | None = None
    adaptive: bool = True

    @property
    def longest(self) -> int:
        return self.k_max if self.k_max is not None else min(2 * self.k, MAX_K) if self.adaptive else self.k


@dataclass
class SpecState:
    """One sequence's speculation: the current draft length and this round's drafts (q: the draft's
    probabilities when it sampled them; None for deterministic drafts)."""
    k: int
    want: int = 0
    drafts: list[int] = field(default_factory=list)
    q: torch.Tensor | None = None
    proposed: int = 0
    accepted: int = 0
    rounds: int = 0


class PagedDraft:
    """A proposing model and its own paged K/V (the sequences' tokens so far, plus this round's drafts)."""

    def __init__(self, model, cfg, num_blocks: int, block_size: int, dtype, device, target_cache=None):
        self.model = model
        self.cache = PagedKVCache(cfg, num_blocks, block_size, dtype=dtype, device=device)
        self.registered: dict[object, int] = {}  # sequence -> its blocks registered in the prefix cache
        # A draft whose K/V have the target's geometry (a quantized copy, the layer-skipping view) starts from
        # the target's K/V of the prompt instead of prefilling it (only proposals change, never the output).
        self.share_prefill = target_cache is not None and self._same_geometry(target_cache)
        self.target_cache = target_cache

    def _same_geometry(self, other: PagedKVCache) -> bool:
        mine = self.cache
        return (len(mine.groups) == len(other.groups) == 1 and mine.groups[0].window is None
                and other.groups[0].window is None and len(mine.k) == len(other.k)
                and all(a.shape[1:] == b.shape[1:] and a.dtype == b.dtype for a, b in zip(mine.k, other.k)))

    def _copy_from_target(self, seq_id, start: int, end: int) -> None:
        """Copy the target's K/V of positions [start, end) into this pool (both single-group caches)."""
        def slots(cache):
            table = torch.tensor(cache.tables[seq_id])
            pos = torch.arange(start, end)
            return (table[pos // cache.block_size] * cache.block_size + pos % cache.block_size).to(cache.device)
        src, dst = slots(self.target_cache), slots(self.cache)
        for i in range(len(self.cache.k)):
            self.cache.k[i][dst] = self.target_cache.k[i][src]
            self.cache.v[i][dst] = self.target_cache.v[i][src]
        self.cache.lengths[seq_id] = end

    def free(self, seq_id) -> None:
        if seq_id in self.cache.lengths:
            self.cache.free_sequence(seq_id)
        self.registered.pop(seq_id, None)

    def _logits(self, feed: list[tuple[object, list[int]]]) -> torch.Tensor:
        """One forward over [(seq id, new tokens)] -> logits [len(feed), V] after each one's last token."""
        layout = "rows" if all(len(t) == 1 for _, t in feed) else "packed"
        B, T = self.cache.prepare([(s, len(t)) for s, t in feed], layout)
        if layout == "packed":
            ids = torch.tensor([x for _, t in feed for x in t])[None]
        else:
            ids = torch.tensor([t[:1] for _, t in feed])
        qi = self.cache.query_index()
        h = self.model(input_ids=ids.to(self.cache.device), cache=self.cache, return_hidden=True)
        return self.model.logits(h.reshape(B * T, -1)[qi.to(h.device)]).float()

    def propose(self, items: list[tuple[object, int]], prefix_caching: bool) -> None:
        """Draft items' [(sequence, k)] next tokens into sequence.spec (drafts, q), k forwards at most."""
        bs = self.cache.block_size
        live = []
        for seq, k in items:
            toks = seq.tokens
            new = seq.id not in self.cache.lengths
            if new:
                keys = seq.block_keys[:(len(toks) - 1) // bs] if prefix_caching else []
                self.cache.add_sequence(seq.id, keys)
                self.registered[seq.id] = self.cache.lengths[seq.id] // bs
            try:  # the draft feeds every token but its last draft
                self.cache.ensure(seq.id, len(toks) + k - 1)
            except OutOfBlocks:
                continue  # no drafts this round (the target decodes one token as usual)
            if new and self.share_prefill and self.cache.lengths[seq.id] < seq.num_computed:
                self._copy_from_target(seq.id, self.cache.lengths[seq.id], seq.num_computed)
            live.append((seq, k))
            seq.spec.q = []
        feed = [(s.id, s.tokens[self.cache.lengths[s.id]:]) for s, _ in live]
        r = 0
        while live:
            logits = self._logits(feed)
            for (seq, _), row in zip(live, logits):
                p = seq.params
                if p.temperature <= 0:
                    t = int(row.argmax())
                else:
                    q = sample_probs(row[None], p.sampling_config())[0]
                    t = int(torch.multinomial(q, 1, generator=seq.generator))
                    seq.spec.q.append(q)
                seq.spec.drafts.append(t)
            r += 1
            live = [(s, k) for s, k in live if k > r]
            feed = [(s.id, s.spec.drafts[-1:]) for s, _ in live]
        for seq, _ in items:
            seq.spec.q = torch.stack(seq.spec.q) if seq.spec.q else None

    def rollback(self, seq, kept: int, prefix_caching: bool) -> None:
        """The target kept its first `kept` tokens: keep as many of the draft's (its K/V of rejected drafts
        go), and register its full blocks of kept tokens under the target's keys."""
        if seq.id not in self.cache.lengths:
            return
        self.cache.truncate(seq.id, min(self.cache.lengths[seq.id], kept))
        if prefix_caching:
            full = min(self.cache.lengths[seq.id] // self.cache.block_size, len(seq.block_keys))
            for i in range(self.registered[seq.id], full):
                self.cache.register(seq.id, i, seq.block_keys[i])
            self.registered[seq.id] = max(self.registered[seq.id], full)


class Speculator:
    """The engine's proposers and the per-round logic (plan, propose, verify, roll back)."""

    def __init__(self, target, *, draft=None, layer_skip=None, num_blocks: int, block_size: int,
                 prefix_caching: bool, device, target_cache=None, adapters=None):
        from leanlm.infer.generate import fuse_for_inference

        dtype = target.dtype
        self.prefix_caching = prefix_caching
        self.models: dict[str, PagedDraft] = {}
        if draft is not None:
            if draft.config.vocab_size != target.config.vocab_size:
                raise LeanLMError(f"engine: the draft model's vocabulary ({draft.config.vocab_size}) differs from "
                                  f"the target's ({target.config.vocab_size}); use a draft with the same tokenizer")
            fuse_for_inference(draft)
            self.models["draft"] = PagedDraft(draft, draft.config, num_blocks, block_size, draft.dtype, device,
                                              target_cache)
        if layer_skip is not None and layer_skip is not False:
            if adapters is not None:
                raise LeanLMError("engine: layer_skip speculation runs the target's own layers, which LoRA adapters "
                                  "by name wrap; serve one or the other")
            n = target.config.num_layers
            skip = default_skip_layers(n) if layer_skip is True else list(layer_skip)
            self.models["layer_skip"] = PagedDraft(skip_layers_view(target, skip), target.config, num_blocks,
                                                   block_size, dtype, device, target_cache)
        self.lookup = PromptLookup()

    @property
    def methods(self) -> list[str]:
        return ["prompt_lookup", *self.models]

    def check(self, params, num_virtual: int) -> None:
        sp = params.speculative
        if sp.method not in METHODS:
            raise LeanLMError(f"engine: unknown speculative method {sp.method!r}; use one of {', '.join(METHODS)}")
        if sp.method not in self.methods:
            how = {"draft": "a draft model (Engine(draft=...), leanlm serve --draft DIR)",
                   "layer_skip": "layer skipping turned on (Engine(layer_skip=True), leanlm serve --layer-skip)"}
            raise LeanLMError(f"engine: speculative method {sp.method!r} needs {how[sp.method]}; this engine "
                              f"offers {', '.join(self.methods)}")
        if not 1 <= sp.k <= MAX_K or not sp.k <= sp.longest <= MAX_K:
            raise LeanLMError(f"engine: speculative k must be in [1, {MAX_K}] and k_max in [k, {MAX_K}], "
                              f"got k={sp.k}, k_max={sp.k_max}")
        if params.repetition_penalty != 1.0:
            raise LeanLMError("engine: speculative decoding does not support repetition_penalty; leave it at 1.0")
        if num_virtual and sp.method != "prompt_lookup":
            raise LeanLMError("engine: a draft model cannot see prompt/prefix tuning's virtual tokens; use "
                              "prompt_lookup or no speculation with this adapter")

    @staticmethod
    def start(params) -> SpecState:
        return SpecState(k=params.speculative.k)

    def plan(self, seq, budget: int, max_model_len: int) -> int:
        """How many drafts the sequence may check this step (0: a plain decode)."""
        st = seq.spec
        st.want = max(0, min(st.k, budget, seq.params.max_tokens - len(seq.output) - 1,
                             max_model_len - len(seq.tokens) - 1))
        return st.want

    def propose(self, batch: list[tuple[object, int]]) -> list[tuple[object, int]]:
        """Fill the planned sequences' drafts; returns the batch with their token counts (1 + drafts)."""
        by_model: dict[str, list] = {}
        for seq, _ in batch:
            st = seq.spec
            if st is None or not st.want:
                continue
            st.drafts, st.q = [], None
            method = seq.params.speculative.method
            if method == "prompt_lookup":
                st.drafts = self.lookup.propose(seq.prompt + seq.output, st.want, None, None)[0][:st.want]
            else:
                by_model.setdefault(method, []).append((seq, st.want))
        for method, items in by_model.items():
            self.models[method].propose(items, self.prefix_caching)
        out = []
        for seq, n in batch:
            if seq.spec is not None and seq.spec.want:
                n = 1 + len(seq.spec.drafts)
                seq.spec.want = 0
            out.append((seq, n))
        return out

    def verify(self, seq, logits: torch.Tensor) -> list[int]:
        """Logits [1 + drafts, V] of the target -> the accepted drafts plus one target token."""
        st, p = seq.spec, seq.params
        drafts = st.drafts
        if p.temperature <= 0:
            new = accept_greedy(logits, drafts)
        else:
            new = accept_reject(sample_probs(logits, p.sampling_config()), st.q, drafts, seq.generator)
        a = len(new) - 1
        st.proposed, st.accepted, st.rounds = st.proposed + len(drafts), st.accepted + a, st.rounds + 1
        sp = p.speculative
        if sp.adaptive and a < len(drafts):
            st.k = max(1, st.k - 1)
        elif sp.adaptive and len(drafts) >= st.k:  # every draft of a full-length round accepted
            st.k = min(st.k + 1, sp.longest)
        st.drafts, st.q = [], None
        return new

    def rollback(self, seq, kept: int) -> None:
        m = self.models.get(seq.params.speculative.method)
        if m is not None:
            m.rollback(seq, kept, self.prefix_caching)

    def free(self, seq_id) -> None:
        for m in self.models.values():
            m.free(seq_id)

    def cancel_step(self) -> None:
        for m in self.models.values():
            m.cache.cancel_step()

    def reset(self) -> None:
        for m in self.models.values():
            m.cache.reset()
            m.registered.clear()

    def check_whole(self) -> None:
        for m in self.models.values():
            m.cache.check_whole()
