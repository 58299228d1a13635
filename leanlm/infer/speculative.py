"""Speculative decoding: a cheap proposer drafts k tokens, the target model checks them in one forward.

Proposers:
  * DraftModel      - a smaller model sharing the tokenizer (e.g. a 4-bit copy of the target);
  * LayerSkip       - self-speculative: the target itself with some layers skipped (Draft & Verify);
  * PromptLookup    - no model: the tokens that followed the last occurrence of the current n-gram
                      in the context (prompt lookup decoding / Inference with Reference).
Greedy: a draft token is kept while it equals the target's argmax, so the output is exactly the
target's greedy output. Sampling: the standard rule (Leviathan et al. 2023; Chen et al. 2023) keeps
draft token x with probability min(1, p(x)/q(x)) and on rejection samples from norm(max(0, p - q)),
which leaves the output distribution equal to sampling from the target alone.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from leanlm.errors import LeanLMError
from leanlm.infer.generate import fuse_for_inference
from leanlm.infer.sampling import GenerationConfig, make_generator, sample_probs
from leanlm.model.layout import EMBED, HEAD, blocks, embedding, with_blocks
from leanlm.model.layout import head as head_module
from leanlm.model.surgery import replace_module


@dataclass
class SpecStats:
    proposed: int = 0
    accepted: int = 0
    rounds: int = 0
    generated: int = 0
    seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_round(self) -> float:
        return self.generated / self.rounds if self.rounds else 0.0

    def as_dict(self) -> dict:
        return {"proposed": self.proposed, "accepted": self.accepted, "rounds": self.rounds,
                "generated": self.generated, "acceptance_rate": round(self.acceptance_rate, 4),
                "tokens_per_round": round(self.tokens_per_round, 3), "seconds": round(self.seconds, 3)}


class _CachedLM:
    """A model plus a static KV cache that remembers which tokens it holds (for rollback)."""

    def __init__(self, model, max_len: int):
        self.model = model
        self.cache = model.new_cache(1, max_len)
        self.tokens: list[int] = []

    def logits_after(self, ids: list[int], extra: list[int] = ()) -> torch.Tensor:
        """Logits [len(extra)+1, V] predicting the token after ids, then after each of `extra` appended.

        Reuses the cached common prefix (at least one token is always recomputed).
        """
        common = 0
        for a, b in zip(self.tokens, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)
        self.cache.length = common  # roll back: later slots are overwritten
        feed = list(ids[common:]) + list(extra)
        out = self.model(torch.tensor([feed], device=self.cache.k[0].device), cache=self.cache)[0]
        self.tokens = list(ids) + list(extra)
        return out[len(feed) - len(extra) - 1:].float()


class DraftModel:
    """Propose with a separate (cheaper) model that shares the target's vocabulary."""

    def __init__(self, draft, max_len: int):
        self.lm = _CachedLM(draft, max_len)

    def seed_from(self, target: "_CachedLM") -> bool:
        """Start from the target's prompt K/V instead of prefilling the draft (the draft only proposes,
        so this cannot change the output). Only when the caches have the same geometry, e.g. for a
        quantized copy of the target, whose own K/V differ from the target's by rounding noise."""
        mine, theirs = self.lm.cache, target.cache
        if len(mine.k) != len(theirs.k) or any(a.shape != b.shape or a.dtype != b.dtype
                                               for a, b in zip(mine.k, theirs.k)):
            return False
        n = theirs.length
        for a, b in zip(mine.k + mine.v, theirs.k + theirs.v):
            a[:, :, :n] = b[:, :, :n]
        mine.length, self.lm.tokens = n, list(target.tokens[:n])
        return True

    def propose(self, ids: list[int], k: int, cfg: GenerationConfig, gen) -> tuple[list[int], torch.Tensor | None]:
        drafts, qs = [], []
        ctx = list(ids)
        logits = self.lm.logits_after(ctx)[-1]
        for i in range(k):
            if cfg.greedy:
                t = int(logits.argmax())
            else:
                q = sample_probs(logits[None], cfg)[0]
                t = int(torch.multinomial(q, 1, generator=gen))
                qs.append(q)
            drafts.append(t)
            if i + 1 < k:
                ctx.append(t)
                logits = self.lm.logits_after(ctx)[-1]
        return drafts, (torch.stack(qs) if qs else None)


def skip_layers_view(model, skip: list[int]):
    """The same model (shared weights) running only the layers not in `skip`."""
    n = len(blocks(model))
    if any(i < 0 or i >= n for i in skip) or len(set(skip)) >= n:
        raise LeanLMError(f"skip layers {skip} must be distinct layer indices in [0, {n}) leaving at least one")
    return with_blocks(model, [i for i in range(n) if i not in set(skip)])


def quantized_draft(model, bits: int = 4, group_size: int = 32, sym: bool = False, head: str = "fp32"):
    """A weight-only RTN-quantized copy of the model to use as a draft.

    The decoder layers' Linears become QuantLinear (PyTorch's int4 CPU kernel, fused q/k/v and gate/up
    at decode). Defaults match GGUF Q4_1 (asymmetric, groups of 32), so a model loaded from a Q4_1
    file gets back its own grid. `head`: "fp32" (default) keeps the output head, so on such a model the
    draft proposes what the target would (acceptance ~1.0); "int8" stores the (tied) embedding as
    int8 rows with one scale each and runs the head from it with the int8 kernel: a cheaper draft
    step, but the rounded head changes the argmax often enough (acceptance 0.83-0.92 measured on
    SmolLM2-135M) that it did not win overall (docs/bench/serving.md); "int4" runs a separate 4-bit
    head (group 32) and accepts far less.
    """
    from leanlm.compress.quant import QuantEmbedding, RTNConfig
    from leanlm.compress.quant.rtn import rtn_solve

    if head not in ("fp32", "int8", "int4"):
        raise ValueError(f"head must be fp32, int8 or int4, got {head!r}")
    draft = copy.deepcopy(model)
    cfg = RTNConfig(bits=bits, group_size=group_size, sym=sym)
    out_head = head_module(draft)
    for name, mod in list(draft.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.Linear) and child is not out_head:
                setattr(mod, child_name, rtn_solve(None, child, cfg))
    tied = draft.config.tie_word_embeddings
    if head == "int8" and tied:
        # the int8 table replaces the embedding; its on_install points the tied head at it
        replace_module(draft, EMBED, QuantEmbedding.from_embedding(embedding(draft)))
    elif head != "fp32":
        hb = 8 if head == "int8" else 4
        hcfg = RTNConfig(bits=hb, group_size=0 if hb == 8 else 32, sym=hb == 8)
        replace_module(draft, HEAD, rtn_solve(None, out_head, hcfg))  # an untied copy: the embedding stays fp32
    return draft


def default_skip_layers(num_layers: int) -> list[int]:
    """Every other layer of the second half except the last (about a quarter of the layers)."""
    return list(range(num_layers // 2, num_layers - 1, 2))


class LayerSkip(DraftModel):
    def __init__(self, model, max_len: int, skip: list[int] | None = None):
        self.skip = default_skip_layers(model.config.num_layers) if skip is None else list(skip)
        super().__init__(skip_layers_view(model, self.skip), max_len)


class PromptLookup:
    """Draft the continuation of the most recent earlier occurrence of the context's last n-gram."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, ids: list[int], k: int, cfg, gen) -> tuple[list[int], None]:
        n_ids = len(ids)
        for n in range(min(self.max_ngram, n_ids - 1), self.min_ngram - 1, -1):
            tail = ids[n_ids - n:]
            for start in range(n_ids - n - 1, -1, -1):  # most recent match first
                if ids[start:start + n] == tail:
                    cont = ids[start + n:start + n + k]
                    if cont:
                        return cont, None
        return [], None


def accept_greedy(logits: torch.Tensor, drafts: list[int]) -> list[int]:
    """Greedy verification: the drafts while they equal the target's argmax, then the target's own token
    (logits [len(drafts) + 1, V]), so the output is exactly the target's greedy output."""
    best = logits.argmax(-1).tolist()
    new = []
    for i, x in enumerate(drafts):
        if x != best[i]:
            break
        new.append(x)
    new.append(best[len(new)])
    return new


def accept_reject(p: torch.Tensor, q: torch.Tensor | None, drafts: list[int], gen) -> list[int]:
    """The speculative sampling rule. p [k+1, V] target probs, q [k, V] draft probs (None: the draft
    was deterministic, q is one-hot). Returns the accepted drafts plus one token from the target."""
    out = []
    for i, x in enumerate(drafts):
        qx = 1.0 if q is None else float(q[i, x])
        px = float(p[i, x])
        u = float(torch.rand((), generator=gen))
        if u * qx < px:  # u < min(1, p/q)
            out.append(x)
            continue
        if q is None:
            resid = p[i].clone()
            resid[x] = 0
        else:
            resid = (p[i] - q[i]).clamp_min(0)
        if float(resid.sum()) <= 0:  # p == q up to rounding: any draw from p is right
            resid = p[i]
        out.append(int(torch.multinomial(resid / resid.sum(), 1, generator=gen)))
        return out
    out.append(int(torch.multinomial(p[len(drafts)], 1, generator=gen)))
    return out


@torch.inference_mode()
def generate_speculative(model, prompt_ids: list[int], cfg: GenerationConfig | None = None, *, draft=None,
                         prompt_lookup: bool = False, skip_layers: list[int] | None = None, self_speculative=False,
                         num_draft: int = 4, max_ngram: int = 3, stop_ids=None, share_prefill: bool = True,
                         **overrides) -> tuple[list[int], SpecStats]:
    """Generate with speculative decoding; returns (new token ids, SpecStats).

    Pick one proposer: draft=<model> | prompt_lookup=True | self_speculative=True (skip_layers, or
    a default quarter of the layers). cfg/overrides as leanlm.infer.sampling.GenerationConfig
    (max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids, ignore_eos); stop_ids (e.g. the
    tokenizer's eos_ids) is used when the config names no stop_token_ids. share_prefill: a draft
    (or the layer-skipping view) whose KV cache has the target's shape starts from the target's
    prompt K/V instead of prefilling the prompt itself.
    """
    cfg = replace(cfg or GenerationConfig(), **overrides)
    if stop_ids is not None and cfg.stop_token_ids is None:
        cfg = replace(cfg, stop_token_ids=list(stop_ids))
    if cfg.repetition_penalty != 1.0:
        raise LeanLMError("speculative decoding does not support repetition_penalty; leave it at 1.0")
    if not prompt_ids:
        raise LeanLMError("speculative decoding needs a non-empty prompt")
    chosen = (draft is not None) + bool(prompt_lookup) + bool(self_speculative or skip_layers)
    if chosen != 1:
        raise LeanLMError("pick exactly one proposer: draft=MODEL, prompt_lookup=True or self_speculative=True")
    if num_draft < 1:
        raise LeanLMError("num_draft must be at least 1")
    if draft is not None and draft.config.vocab_size != model.config.vocab_size:
        raise LeanLMError(f"the draft model's vocabulary ({draft.config.vocab_size}) differs from the target's "
                          f"({model.config.vocab_size}); use a draft with the same tokenizer")
    max_len = len(prompt_ids) + cfg.max_new_tokens + num_draft + 1
    fuse_for_inference(model)  # as plain generation does, so speed-ups compare like with like
    if draft is not None:
        fuse_for_inference(draft)
        proposer = DraftModel(draft, max_len)
    elif prompt_lookup:
        proposer = PromptLookup(max_ngram)
    else:
        proposer = LayerSkip(model, max_len, skip_layers)
    stop = set() if cfg.ignore_eos else set(cfg.stop_token_ids or [])
    target = _CachedLM(model, max_len)
    gen = make_generator(cfg.seed)
    if gen is None and not cfg.greedy:
        gen = torch.Generator()
        gen.manual_seed(int(torch.seed()) % (1 << 63))
    stats, t0 = SpecStats(), time.perf_counter()
    ids, out = list(prompt_ids), []
    if isinstance(proposer, DraftModel) and share_prefill and len(ids) > 1:
        target.logits_after(ids[:-1])  # the target's prefill, minus the last token (fed with the drafts)
        proposer.seed_from(target)
    while len(out) < cfg.max_new_tokens:
        k = min(num_draft, cfg.max_new_tokens - len(out) - 1)
        drafts, q = proposer.propose(ids, k, cfg, gen) if k > 0 else ([], None)
        drafts = drafts[:k]
        logits = target.logits_after(ids, drafts)  # [len(drafts)+1, V]
        if cfg.greedy:
            new = accept_greedy(logits, drafts)
        else:
            p = sample_probs(logits, cfg)
            new = accept_reject(p, q, drafts, gen)
        stats.rounds += 1
        stats.proposed += len(drafts)
        stats.accepted += len(new) - 1
        for t in new:
            out.append(t)
            ids.append(t)
            if t in stop or len(out) >= cfg.max_new_tokens:
                stats.generated, stats.seconds = len(out), time.perf_counter() - t0
                return out, stats
    stats.generated, stats.seconds = len(out), time.perf_counter() - t0
    return out, stats
