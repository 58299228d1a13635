"""Plain generation: prefill, then decode with a preallocated static KV cache.

`generate_tokens` is the id-level loop (no tokenizer). Prompts of different lengths are left-padded
into one batch; the cache's validity mask keeps padding out of attention and RoPE positions.
`generate` and `stream` add text: tokenization, stop strings and incremental decoding.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from leanlm.infer.compiled import auto_decoder, bucket
from leanlm.infer.sampling import GenerationConfig, make_generator, select


def fuse_for_inference(model) -> None:
    """One matmul for q/k/v and for gate/up (a no-op once done; adapter wrappers fuse their base)."""
    target = getattr(model, "base_model", model)
    if hasattr(target, "fuse_projections"):
        target.fuse_projections()


@torch.inference_mode()
def generate_tokens(model, prompts: list[list[int]], cfg: GenerationConfig,
                    should_stop: Callable[[int, list[int]], bool] | None = None) -> Iterator[list[int | None]]:
    """Yield, per decode step, the new token of each row (None for rows already finished)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    fuse_for_inference(model)
    B = len(prompts)
    P = max(len(p) for p in prompts)
    stop_ids = set(cfg.stop_token_ids or [])
    if cfg.ignore_eos:
        stop_ids = set()
    pad = next(iter(stop_ids), 0)
    ids = torch.full((B, P), pad, dtype=torch.long)
    valid = torch.zeros(B, P, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        valid[i, P - len(p):] = True
    valid = None if bool(valid.all()) else valid
    dec = auto_decoder(model, cfg.compile, B, P + cfg.max_new_tokens, cfg.kv_bits)
    if cfg.kv_bits:
        from leanlm.infer.kv_quant import QuantizedKVCache

        cache = QuantizedKVCache(model.config, B, P + cfg.max_new_tokens, bits=cfg.kv_bits, dtype=model.dtype,
                                 valid=valid)
    else:
        # a compiled decoder's cache is rounded up to a bucket: one graph serves many lengths
        cache = model.new_cache(B, P + cfg.max_new_tokens if dec is None else bucket(P + cfg.max_new_tokens),
                                valid=valid)
    gen = make_generator(cfg.seed)
    seen = None
    if cfg.repetition_penalty != 1.0:
        seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool)
        for i, p in enumerate(prompts):
            seen[i, p] = True
    logits = model(ids, cache=cache, last_only=True)[:, -1]
    done = [False] * B
    outs: list[list[int]] = [[] for _ in range(B)]
    for _ in range(cfg.max_new_tokens):
        nxt = select(logits, cfg, gen, seen)
        step: list[int | None] = []
        for i in range(B):
            if done[i]:
                step.append(None)
                continue
            t = int(nxt[i])
            outs[i].append(t)
            step.append(t)
            if t in stop_ids or (should_stop is not None and should_stop(i, outs[i])):
                done[i] = True
        yield step
        if all(done):
            return
        if seen is not None:
            seen[torch.arange(B), nxt] = True
        if dec is None:
            logits = model(nxt.unsqueeze(1), cache=cache)[:, -1]
        else:
            logits = dec.decode(cache, nxt.unsqueeze(1))


def _stop_checker(tokenizer, stops: list[str]):
    if not stops:
        return None
    tail = max(len(s) for s in stops) + 8  # tokens are at least one char; a few spare for merges

    def check(_row: int, ids: list[int]) -> bool:
        text = tokenizer.decode(ids[-tail:])
        return any(s in text for s in stops)

    return check


def _finish(tokenizer, ids: list[int], stop_ids: set[int], stops: list[str]) -> str:
    if ids and ids[-1] in stop_ids:
        ids = ids[:-1]
    text = tokenizer.decode(ids)
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return text[:cut] if cut >= 0 else text


def _prepare(tokenizer, prompts, cfg: GenerationConfig, chat: bool):
    if cfg.stop_token_ids is None:
        cfg.stop_token_ids = list(tokenizer.eos_ids)
    single = isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict))
    items = [prompts] if single else list(prompts)
    ids = []
    for p in items:
        if chat or not isinstance(p, str):
            msgs = [{"role": "user", "content": p}] if isinstance(p, str) else p
            msgs = [msgs] if isinstance(msgs, dict) else msgs
            ids.append(tokenizer.encode_chat(msgs))
        else:
            ids.append(tokenizer.encode(p))
    return single, ids


def generate(model, tokenizer, prompts, cfg: GenerationConfig | None = None, chat: bool = False, **kw):
    """Text in, text out. `prompts`: a string, a list of strings, or chat messages. kw: GenerationConfig fields."""
    cfg = cfg or GenerationConfig(**kw)
    single, ids = _prepare(tokenizer, prompts, cfg, chat)
    outs = [[] for _ in ids]
    for step in generate_tokens(model, ids, cfg, _stop_checker(tokenizer, cfg.stop_strings)):
        for i, t in enumerate(step):
            if t is not None:
                outs[i].append(t)
    texts = [_finish(tokenizer, o, set(cfg.stop_token_ids), cfg.stop_strings) for o in outs]
    return texts[0] if single else texts


def stream(model, tokenizer, prompt, cfg: GenerationConfig | None = None, chat: bool = False,
           **kw) -> Iterator[str]:
    """Yield text pieces as they are generated (one prompt)."""
    cfg = cfg or GenerationConfig(**kw)
    _, ids = _prepare(tokenizer, prompt, cfg, chat)
    stop_ids, stops = set(cfg.stop_token_ids), cfg.stop_strings
    out: list[int] = []
    sent = 0
    hold = max((len(s) for s in stops), default=0)
    for step in generate_tokens(model, ids, cfg, _stop_checker(tokenizer, stops)):
        t = step[0]
        if t is None:
            break
        out.append(t)
        text = _finish(tokenizer, out, stop_ids, stops)
        finished = t in stop_ids or any(s in tokenizer.decode(out) for s in stops)
        # Hold back an incomplete UTF-8 sequence and anything that may be the start of a stop string.
        safe = len(text) if finished else max(sent, len(text) - hold)
        if not finished and text.endswith("\ufffd"):
            safe = min(safe, len(text) - 1)
        if safe > sent:
            yield text[sent:safe]
            sent = safe
    text = _finish(tokenizer, out, stop_ids, stops)
    if len(text) > sent:
        yield text[sent:]
