"""Continuous-batching engine over a paged KV cache (Orca, vLLM, SARATHI), token ids only.

Each `step()` schedules up to `max_batch_tokens` new tokens, first come first served: running
sequences first (one decode token each, or the next chunk of an unfinished prefill), then waiting
requests (their prompt in chunks). Requests join and leave between steps. When a running sequence
needs a block and none is free, the most recently arrived running sequence is preempted: its blocks
are released and it is re-queued at the front to be recomputed (prompt + tokens generated so far).
Full blocks are registered by content hash (the hash chains the whole prefix), so a new request
whose prompt starts with the same blocks reuses them (prefix caching, ref-counted, LRU eviction).
Sliding-window layers keep only their window's blocks (leanlm/infer/paged.py): a prefix is shared up
to the longest cached length whose window the local layers still hold.
A request may ask for speculative decoding (SamplingParams.speculative: a draft model given to the engine,
layer skipping or prompt lookup): its decode steps then check 1 + k tokens in the packed step and keep
the accepted ones (leanlm/infer/engine_spec.py); requests with and without it share every step.
"""
from __future__ import annotations

import itertools
import sys
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from leanlm.errors import LeanLMError
from leanlm.infer.engine_spec import SpecParams, SpecState, Speculator
from leanlm.infer.paged import OutOfBlocks, PagedKVCache
from leanlm.infer.sampling import SamplingConfig, select


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # return the sampled token's logprob and this many top alternatives
    repetition_penalty: float = 1.0
    speculative: SpecParams | None = None  # speculative decoding for this request (leanlm.infer.engine_spec)

    def sampling_config(self) -> SamplingConfig:
        return SamplingConfig(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              repetition_penalty=self.repetition_penalty, seed=self.seed)


@dataclass
class VirtualTokens:
    """An adapter's virtual tokens in front of every sequence: prompt tuning gives their input embeddings
    (`embeds` [n, hidden]); prefix tuning gives their K/V per layer (`keys`/`values`: [n, kv_heads, head_dim])."""
    n: int
    embeds: torch.Tensor | None = None
    keys: list[torch.Tensor] | None = None
    values: list[torch.Tensor] | None = None


@dataclass
class StepOutput:
    request_id: str
    token: int | None  # None when the request ended without a new token (abort)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None  # with finish_reason "error": what went wrong
    # speculative decoding: the draft tokens checked and accepted in the round that produced this token
    # (on the round's first output; 0 on the others and without speculation)
    draft_proposed: int = 0
    draft_accepted: int = 0


class StepError(Exception):
    """A step raised; the sequences of its batch were finished with reason "error" (their blocks freed)."""

    def __init__(self, request_ids: list[str], cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.request_ids, self.cause = request_ids, cause


@dataclass
class Sequence:
    id: str
    prompt: list[int]
    params: SamplingParams
    arrival: float
    output: list[int] = field(default_factory=list)
    num_computed: int = 0
    status: str = "waiting"
    finish_reason: str | None = None
    block_keys: list = field(default_factory=list)  # content keys of the full blocks hashed so far
    generator: torch.Generator | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    num_cached_prompt: int = 0
    num_preemptions: int = 0
    adapter: int = 0  # index of the LoRA adapter this sequence runs with (0: none / the model's own)
    virtual: list[int] = field(default_factory=list)  # ids < 0 standing for an adapter's virtual tokens
    spec: SpecState | None = None  # speculative decoding's state (params.speculative set)

    @property
    def tokens(self) -> list[int]:
        return self.virtual + self.prompt + self.output


def sample_next(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None,
                seen: list[int] | None = None) -> int:
    """logits [V] -> token id, with the shared sampler (leanlm.infer.sampling)."""
    cfg = p.sampling_config()
    mask = None
    if cfg.repetition_penalty != 1.0 and seen:
        mask = torch.zeros(1, logits.numel(), dtype=torch.bool)
        mask[0, seen] = True
    return int(select(logits[None], cfg, generator, mask)[0])


class Engine:
    """engine.add_request(ids, SamplingParams()) then engine.step() until not has_unfinished()."""

    def __init__(self, model, *, block_size: int = 16, num_blocks: int | None = None,
                 max_batch_tokens: int = 256, max_num_seqs: int = 32, prefix_caching: bool = True,
                 eos_ids: tuple[int, ...] = (), max_model_len: int | None = None, adapters=None,
                 trim_windows: bool = True, attention: str = "blocks", draft=None,
                 layer_skip: bool | list[int] | None = None, compile: bool = False):
        from leanlm.infer.generate import fuse_for_inference
        from leanlm.model.layout import HEAD, base_model, embedding
        from leanlm.model.surgery import model_device

        cfg = model.config
        fuse_for_inference(model)  # one matmul for q/k/v and for gate/up, as plain generation does
        # Prompt/prefix tuning wrap the model: the engine runs the base model and places the adapter's
        # virtual tokens itself (ids -1..-n at the start of every sequence, in its paged blocks).
        vt = getattr(model, "virtual_tokens", None)
        self.virtual: VirtualTokens | None = vt() if callable(vt) else None
        model = base_model(model) if self.virtual is not None else model
        self.model, self.cfg = model, cfg
        self.head, self.embed = model.get_submodule(HEAD), embedding(model)
        # Many LoRA adapters in one batch: `adapters` maps an adapter index to a pool slot (acquire/release)
        # and is told, before each forward, the adapter index of every input token (set_rows).
        self.adapters = adapters
        self.block_size = block_size
        self.max_model_len = max_model_len or cfg.max_position_embeddings
        if num_blocks is None:  # room for max_num_seqs full contexts, capped at ~1 GiB of K/V
            per_tok = sum(2 * cfg.heads(i)[1] * cfg.head_dim for i in range(cfg.num_layers))
            per_tok *= torch.finfo(model.dtype).bits // 8
            want = max_num_seqs * -(-self.max_model_len // block_size)
            num_blocks = max(4, min(want, (1 << 30) // (per_tok * block_size)))
        # Sliding-window layers hold at most their window (+ a block + a step's tokens) per sequence: their
        # pool needs room for max_num_seqs of those, not of full contexts.
        windows = {cfg.window(i) for i in range(cfg.num_layers)} - {None}
        local_blocks = None
        if windows and trim_windows:
            w = max(windows)  # every local group gets this pool size: the widest window must fit
            per_seq = min(-(-self.max_model_len // block_size), -(-(w - 1 + max_batch_tokens) // block_size) + 1)
            local_blocks = min(num_blocks, max(per_seq, max_num_seqs * per_seq))
        self.cache = PagedKVCache(cfg, num_blocks, block_size, dtype=model.dtype, device=model_device(model),
                                  local_blocks=local_blocks, trim_windows=trim_windows, attention=attention)
        self.max_batch_tokens, self.max_num_seqs = max_batch_tokens, max_num_seqs
        self.prefix_caching = prefix_caching
        # speculative decoding: prompt lookup always; a draft model and layer skipping when given
        self.spec = Speculator(model, draft=draft, layer_skip=layer_skip, num_blocks=self.cache.num_blocks,
                               block_size=block_size, prefix_caching=prefix_caching, device=self.cache.device,
                               target_cache=self.cache, adapters=adapters)
        self.eos_ids = tuple(eos_ids)
        # compile: the blocks' non-attention pieces through torch.compile (leanlm/infer/compiled_engine.py)
        self.compiled = None
        if compile:
            from leanlm.infer.compiled_engine import PiecewiseForward, engine_compile_unsupported

            why = engine_compile_unsupported(model, self.cache, adapters, self.virtual)
            if why is None:
                self.compiled = PiecewiseForward(model)
            else:
                print(f"leanlm: compiled engine step unavailable ({why}); running eagerly", file=sys.stderr)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.seqs: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self.stats = dict(steps=0, prompt_tokens=0, generation_tokens=0, prefix_hit_tokens=0,
                          preemptions=0, requests_finished=0, batch_tokens=0, draft_proposed=0,
                          draft_accepted=0)

    # ---- requests -----------------------------------------------------------------------------
    @property
    def num_virtual(self) -> int:
        return self.virtual.n if self.virtual is not None else 0

    def add_request(self, prompt: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, adapter: int = 0) -> str:
        params = params or SamplingParams()
        nv = self.num_virtual
        if not prompt:
            raise LeanLMError("engine: empty prompt; pass at least one token id")
        if len(prompt) + nv >= self.max_model_len:
            raise LeanLMError(f"engine: prompt has {len(prompt)} tokens (+{nv} virtual), the context holds "
                              f"{self.max_model_len}; shorten the prompt")
        if max(prompt) >= self.cfg.vocab_size or min(prompt) < 0:
            raise LeanLMError(f"engine: token id out of range [0, {self.cfg.vocab_size})")
        if params.max_tokens < 1:
            raise LeanLMError("engine: max_tokens must be at least 1")
        if params.seed is not None and not 0 <= params.seed < 1 << 63:
            raise LeanLMError(f"engine: seed must be in [0, 2^63), got {params.seed}")
        if params.speculative is not None:
            self.spec.check(params, nv)
        if adapter and (self.adapters is None or not self.adapters.known(adapter)):
            raise LeanLMError(f"engine: no LoRA adapter with index {adapter} is loaded")
        total = min(len(prompt) + nv + params.max_tokens, self.max_model_len)
        for g, need in zip(self.cache.groups, self.cache.blocks_for(total, self.max_batch_tokens)):
            if need > g.alloc.num_blocks:
                raise LeanLMError(f"engine: request needs {need} KV blocks, the cache has "
                                  f"{g.alloc.num_blocks}; lower max_tokens or raise num_blocks")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.seqs:
            raise LeanLMError(f"engine: request id {rid!r} already in use")
        gen = None
        if params.temperature > 0:
            gen = torch.Generator()
            gen.manual_seed(params.seed if params.seed is not None else torch.seed())
        seq = Sequence(rid, list(prompt), params, time.perf_counter(), generator=gen, adapter=adapter,
                       virtual=list(range(-1, -nv - 1, -1)),
                       spec=Speculator.start(params) if params.speculative is not None else None)
        self.seqs[rid] = seq
        self.waiting.append(seq)
        return rid

    def abort(self, request_id: str) -> bool:
        seq = self.seqs.get(request_id)
        if seq is None or seq.status == "finished":
            return False
        self._finish(seq, "abort")
        return True

    def reset(self) -> None:
        """Drop every request and rebuild the block bookkeeping (after a failure left it unknown)."""
        for seq in self.seqs.values():
            seq.status, seq.finish_reason = "finished", "abort"
        self.waiting.clear()
        self.running.clear()
        self.seqs.clear()
        self.cache.reset()
        self.spec.reset()
        if self.adapters is not None:
            self.adapters.release_all()

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.status == "running":
            self.running.remove(seq)
            self._release_adapter(seq)
        elif seq.status == "waiting":
            self.waiting.remove(seq)
        if seq.id in self.cache.lengths:
            self.cache.free_sequence(seq.id)
        self.spec.free(seq.id)
        seq.status, seq.finish_reason, seq.finish_time = "finished", reason, time.perf_counter()
        self.seqs.pop(seq.id, None)
        self.stats["requests_finished"] += 1

    def _release_adapter(self, seq: Sequence) -> None:
        if seq.adapter:
            self.adapters.release(seq.adapter)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release_adapter(seq)
        self.cache.free_sequence(seq.id)
        self.spec.free(seq.id)
        if seq.spec is not None:
            seq.spec.want = 0  # it was planned this step, then lost its blocks: no drafts
        seq.num_computed, seq.block_keys, seq.status = 0, [], "waiting"
        seq.num_preemptions += 1
        self.stats["preemptions"] += 1
        self.waiting.appendleft(seq)

    # ---- prefix cache -------------------------------------------------------------------------
    def _key(self, seq: Sequence, i: int, prev):
        """Block i's content key: its tokens, chained to the previous block's key (prev; None for block 0)."""
        toks = seq.tokens[i * self.block_size:(i + 1) * self.block_size]
        parent = hash(prev) if i else ("adapter", seq.adapter)  # K/V depend on the adapter
        return (parent, tuple(toks))

    def _admit(self, seq: Sequence) -> None:
        """Give a waiting sequence its block tables, sharing cached prefix blocks when possible."""
        keys = []
        if self.prefix_caching:
            # keep at least one token to compute: its logits give the next token
            for i in range((len(seq.tokens) - 1) // self.block_size):
                keys.append(self._key(seq, i, keys[-1] if keys else None))
        seq.num_computed = self.cache.add_sequence(seq.id, keys)
        seq.block_keys = keys[:seq.num_computed // self.block_size]
        if seq.num_preemptions == 0:
            seq.num_cached_prompt = seq.num_computed
            self.stats["prefix_hit_tokens"] += seq.num_computed

    def _register_blocks(self, seq: Sequence) -> None:
        if not self.prefix_caching:
            return
        for i in range(len(seq.block_keys), seq.num_computed // self.block_size):
            key = self._key(seq, i, seq.block_keys[-1] if i else None)
            seq.block_keys.append(key)
            self.cache.register(seq.id, i, key)

    # ---- scheduling ---------------------------------------------------------------------------
    def _schedule(self) -> list[tuple[Sequence, int]]:
        budget, batch = self.max_batch_tokens, []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(len(seq.tokens) - seq.num_computed, budget)
            if seq.spec is not None and len(seq.tokens) - seq.num_computed == 1:
                n += self.spec.plan(seq, budget - 1, self.max_model_len)  # room for the drafts it checks
            while True:
                try:
                    self.cache.ensure(seq.id, seq.num_computed + n)
                    break
                except OutOfBlocks:
                    victim = self.running[-1]  # latest arrival loses its blocks (FCFS priority)
                    self._preempt(victim)
                    if victim is seq:
                        break
            if seq.status != "running":
                break  # seq itself was the last running one; nothing after it remains
            batch.append((seq, n))
            budget -= n
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.adapter and not self.adapters.acquire(seq.adapter):
                break  # every adapter slot is pinned by running sequences: wait for one to finish
            self._admit(seq)
            try:
                self._place_prefix(seq)
                n = min(len(seq.tokens) - seq.num_computed, budget)
                self.cache.ensure(seq.id, seq.num_computed + n)
            except OutOfBlocks:
                self.cache.free_sequence(seq.id)
                seq.num_computed, seq.block_keys = 0, []
                self._release_adapter(seq)
                break
            self.waiting.popleft()
            seq.status = "running"
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        return batch

    def _place_prefix(self, seq: Sequence) -> None:
        """Prefix tuning: write the adapter's fixed K/V into the sequence's first slots (no forward)."""
        v = self.virtual
        if v is None or v.keys is None or seq.num_computed >= v.n:
            return
        self.cache.ensure(seq.id, v.n)
        self.cache.write_kv(seq.id, seq.num_computed, v.n, v.keys, v.values)
        seq.num_computed = v.n

    def _inputs(self, ids: torch.Tensor) -> dict:
        """Forward arguments for a step's ids; prompt tuning's virtual ids (< 0) become its embeddings."""
        ids = ids.to(self.cache.device)
        if self.virtual is None or self.virtual.embeds is None or not bool((ids < 0).any()):
            return {"input_ids": ids}
        x = self.embed(ids.clamp(min=0))
        virt = ids < 0
        x[virt] = self.virtual.embeds.to(x.dtype)[-ids[virt] - 1]
        return {"inputs_embeds": x}

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        batch = self._schedule()
        if not batch:
            if self.waiting and not self.running:
                seq = self.waiting[0]
                raise LeanLMError(f"engine: request {seq.id} does not fit in {self.cache.num_blocks} KV blocks")
            return []
        try:
            return self._run(batch)
        except Exception as e:  # fail this step's requests only; the engine stays consistent for the rest
            self.cache.cancel_step()
            self.spec.cancel_step()
            for seq, _ in batch:
                if seq.status != "finished":
                    self._finish(seq, "error")
            self.stats["step_errors"] = self.stats.get("step_errors", 0) + 1
            raise StepError([s.id for s, _ in batch], e) from e

    def _run(self, batch: list[tuple[Sequence, int]]) -> list[StepOutput]:
        if any(s.spec is not None and s.spec.want for s, _ in batch):
            batch = self.spec.propose(batch)  # speculating sequences check 1 + len(drafts) tokens
        layout = "rows" if all(n == 1 for _, n in batch) else "packed"
        B, T = self.cache.prepare([(s.id, n) for s, n in batch], layout)
        if layout == "packed":
            ids = torch.tensor([t for s, n in batch for t in self._fed(s, n)])[None]
        else:
            ids = torch.tensor([[s.tokens[s.num_computed]] for s, _ in batch])
        if self.adapters is not None:  # the adapter index of every input token, flat (rows layout: T == 1)
            self.adapters.set_rows(torch.tensor([s.adapter for s, n in batch for _ in range(n)]))
        qi = self.cache.query_index().tolist()
        if self.compiled is not None:
            hidden = self.compiled.forward(self._inputs(ids), self.cache)
        else:
            hidden = self.model(**self._inputs(ids), cache=self.cache, return_hidden=True).reshape(B * T, -1)
        self.stats["steps"] += 1
        self.stats["batch_tokens"] += sum(n for _, n in batch)
        outs = []
        now = time.perf_counter()
        sampling, rows = [], []  # (batch index, first logits row, rows), the hidden rows to run the head on
        for j, (seq, n) in enumerate(batch):
            if seq.spec is not None and seq.spec.drafts:  # every checked position gives logits
                sampling.append((j, len(rows), n))
                rows.extend(range(qi[j] - n + 1, qi[j] + 1))
                continue
            seq.num_computed += n
            if seq.spec is not None:  # planned drafts that were not found: give back the blocks set aside
                self.cache.truncate(seq.id, seq.num_computed)
            self._register_blocks(seq)
            if seq.num_computed == len(seq.tokens):
                sampling.append((j, len(rows), 1))
                rows.append(qi[j])
        if not sampling:
            return outs
        logits = self.model.logits(hidden[torch.tensor(rows, device=hidden.device)]).float()
        for j, r, n in sampling:
            seq = batch[j][0]
            if n == 1:
                new = [sample_next(logits[r], seq.params, seq.generator, seq.prompt + seq.output)]
                proposed = 0
            else:  # speculation: keep the accepted drafts, roll the cache back to them
                proposed = len(seq.spec.drafts)
                new = self.spec.verify(seq, logits[r:r + n])
                kept = seq.num_computed + len(new)  # the fed token plus the accepted drafts
                self.cache.truncate(seq.id, kept)
                seq.num_computed = kept
                self._register_blocks(seq)
                self.spec.rollback(seq, kept)
                self.stats["draft_proposed"] += proposed
                self.stats["draft_accepted"] += len(new) - 1
            for i, tok in enumerate(new):
                o = self._emit(seq, tok, logits[r + i], now)
                if i == 0:
                    o.draft_proposed, o.draft_accepted = proposed, len(new) - 1
                outs.append(o)
                if o.finished:
                    break
        return outs

    def _fed(self, seq: Sequence, n: int) -> list[int]:
        """The n tokens a sequence feeds this step: its next uncomputed tokens, then its drafts."""
        toks = seq.tokens[seq.num_computed:seq.num_computed + n]
        if seq.spec is not None and seq.spec.drafts:
            toks = toks + seq.spec.drafts
        return toks

    def _emit(self, seq: Sequence, tok: int, logits: torch.Tensor, now: float) -> StepOutput:
        """Append a generated token (logits: the target's, that chose it) and finish the sequence on a stop."""
        p = seq.params
        lp, top = None, None
        if p.logprobs is not None:
            logp = torch.log_softmax(logits, -1)
            lp = float(logp[tok])
            if p.logprobs > 0:
                v, ix = logp.topk(min(p.logprobs, logp.numel()))
                top = list(zip(ix.tolist(), v.tolist()))
        if not seq.output:
            self.stats["prompt_tokens"] += len(seq.prompt)
        if seq.first_token_time is None:
            seq.first_token_time = now
        seq.output.append(tok)
        self.stats["generation_tokens"] += 1
        reason = None
        if (tok in self.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            reason = "stop"
        elif len(seq.output) >= p.max_tokens or len(seq.tokens) >= self.max_model_len:
            reason = "length"
        if reason:
            self._finish(seq, reason)
        return StepOutput(seq.id, tok, lp, top, reason is not None, reason)

    # ---- convenience --------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[list[int]]:
        """Run prompts to completion together; returns the generated ids of each prompt."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        rids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        out: dict[str, list[int]] = {r: [] for r in rids}
        while self.has_unfinished():
            for o in self.step():
                if o.token is not None:
                    out[o.request_id].append(o.token)
        return [out[r] for r in rids]
