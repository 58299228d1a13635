"""Prompt compression with a small model: LLMLingua's coarse-to-fine method and LongLLMLingua's
question-aware document ranking (Jiang et al. 2023, EMNLP and ACL 2024).

`compress_prompt(context, question=None, rate=0.5)` keeps about `rate` of the context's tokens:

1. Budget controller (coarse). The context is a list of segments (documents, demonstrations), or a
   string split at blank lines. Segments are ranked -- with a question, by how well each one predicts
   the question (LongLLMLingua: mean NLL of "question + We can get the answer to this question in the
   given documents." after the segment; lowest first); without one, by the segment's own perplexity
   (LLMLingua: highest first, the least predictable carry the most information). Segments are taken in
   rank order until they hold `coarse_slack` x the target token count, then kept in their original
   order (`reorder=True` puts them in rank order instead).
2. Token budget per segment. Every kept segment gets the same share of the remaining budget; with a
   question, better-ranked segments get more (LongLLMLingua's dynamic ratio: linear in rank, +-`dynamic`).
3. Iterative token-level compression (fine). The kept tokens are scored `chunk` at a time by the
   scorer's conditional surprisal -log p(x_i | compressed prefix, x_<i within the chunk); each chunk
   keeps its quota of the most surprising tokens, and only those go into the KV cache as the prefix
   the next chunk is conditioned on (rolling the cache back over the chunk's dropped tokens). Unlike
   LLMLingua, whole words are kept or dropped (a word scores its most surprising token), so a rare
   name is not cut to its first sub-word.

The question itself is never compressed. Any leanlm model is a scorer (quantized ones too; CPU is
fine): only forward passes with a KV cache are used. `contrastive=True` scores tokens by
LongLLMLingua's contrastive (question-conditioned) perplexity instead. Not implemented from
LongLLMLingua: subsequence recovery and document reordering by position bias beyond `reorder`.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from leanlm.errors import LeanLMError

RESTRICT = " We can get the answer to this question in the given documents."


def check_rate(rate) -> float:
    try:
        r = float(rate)
    except (TypeError, ValueError):
        raise LeanLMError(f"rate must be a number in (0, 1] (the fraction of tokens kept); got {rate!r}") from None
    if not 0 < r <= 1 or math.isnan(r):
        raise LeanLMError(f"rate must be in (0, 1] (the fraction of tokens kept, 0.5 = 2x); got {rate}")
    return r


def _segments(context) -> list[str]:
    if isinstance(context, str):
        segs = [s.strip("\n") for s in context.split("\n\n")]
    elif isinstance(context, (list, tuple)) and all(isinstance(s, str) for s in context):
        segs = list(context)
    else:
        raise LeanLMError("context must be a string or a list of strings")
    segs = [s for s in segs if s.strip()]
    if not segs:
        raise LeanLMError("the context is empty; give some text to compress")
    return segs


def _enc(tokenizer, text: str) -> list[int]:
    from leanlm.data.scoring import encode

    return encode(tokenizer, text, bos=False)


def rank_segments(model, tokenizer, seg_ids: list[list[int]], question: str | None, batch_size: int = 4,
                  max_tokens: int = 1024) -> list[int]:
    """Segment indices, best first (see the module doc)."""
    from leanlm.data.scoring import start_token, token_losses

    s = start_token(tokenizer)
    head = [s] if s is not None else []
    if question:
        q = _enc(tokenizer, question + RESTRICT)
        seqs = [head + ids[-max_tokens:] + q for ids in seg_ids]
        losses = token_losses(model, seqs, batch_size)
        score = [float(nll[-len(q):].mean()) for nll in losses]
        return sorted(range(len(seg_ids)), key=lambda i: (score[i], i))
    losses = token_losses(model, [head + ids[:max_tokens] for ids in seg_ids], batch_size)
    score = [float(nll.mean()) if nll.numel() else 0.0 for nll in losses]
    return sorted(range(len(seg_ids)), key=lambda i: (-score[i], i))


def _quotas(lengths: list[int], ranks: list[int], target: int, dynamic: float) -> list[float]:
    """Per-segment keep fraction summing to `target` tokens; rank 0 gets the most when dynamic > 0."""
    n = len(lengths)
    base = [1.0 + (dynamic * (1 - 2 * r / (n - 1)) if n > 1 else 0.0) for r in ranks]
    total = sum(b * l for b, l in zip(base, lengths))
    scale = target / total if total else 0.0
    fr = [min(1.0, b * scale) for b in base]
    # segments capped at 1.0 give their excess to the others, a few rounds suffice
    for _ in range(5):
        short = target - sum(f * l for f, l in zip(fr, lengths))
        room = sum(l for f, l in zip(fr, lengths) if f < 1.0)
        if short <= 1e-6 or room == 0:
            break
        fr = [min(1.0, f + short / room) if f < 1.0 else f for f in fr]
    return fr


def word_starts(tokenizer, ids: list[int]) -> list[bool]:
    """Whether each token begins a word. It does not when its text starts with a letter or digit, the
    previous token's text ends with one, and the two decode with nothing between them ("Bram" + "ble"
    is one word; " horse" starts one; a word-level tokenizer that joins tokens with spaces starts one
    at every token)."""
    pieces, pairs, out = {}, {}, []
    for k, t in enumerate(ids):
        if t not in pieces:
            pieces[t] = tokenizer.decode([t])
        if k == 0:
            out.append(True)
            continue
        a, b = ids[k - 1], t
        da, db = pieces[a], pieces[b]
        if not (da[-1:].isalnum() and db[:1].isalnum()):
            out.append(True)
            continue
        if (a, b) not in pairs:
            pairs[(a, b)] = tokenizer.decode([a, b]) != da + db
        out.append(pairs[(a, b)])
    return out


def _chunks(starts: list[bool], size: int):
    """(begin, end) spans of about `size` tokens that end where a word starts (a word is never split)."""
    b = 0
    while b < len(starts):
        e = min(b + size, len(starts))
        while e < len(starts) and not starts[e]:
            e += 1
        yield b, e
        b = e


@torch.inference_mode()
def prune_tokens(model, tokenizer, ids: list[int], keep_frac: list[float], chunk: int = 128,
                 condition: list[int] | None = None) -> list[int]:
    """Iterative token-level pruning: positions (into ids) kept, in order. keep_frac[i] is token i's
    share of the budget; each chunk keeps about round(sum of its shares) tokens (the rounding carries
    over). Whole words are kept or dropped: a word's score is the highest surprisal of its tokens, so a
    rare name is not cut to its first piece; words go in from the highest score while they fit.

    With `condition` (the question's token ids), a token's score is LongLLMLingua's contrastive
    perplexity: its surprisal after the compressed prefix minus its surprisal after the condition and
    the same prefix (a second KV cache holds condition + kept tokens), so the tokens the question makes
    more predictable are kept rather than the merely rare ones."""
    from leanlm.data.scoring import start_token

    s = start_token(tokenizer)
    head = [s] if s is not None else [ids[0]]
    max_len = len(head) + len(ids) + 1 + (len(condition) if condition else 0)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and max_len > limit:
        raise LeanLMError(f"the context has {len(ids)} tokens after the coarse step, more than the scorer's "
                          f"{limit} positions; compress less at once (split the context) or lower the rate")
    dev = next(model.parameters()).device
    starts = word_starts(tokenizer, ids)
    cache = model.new_cache(1, max_len)
    last = model(torch.tensor([head], device=dev), cache=cache)[0, -1].float()
    if condition:
        ccache = model.new_cache(1, max_len)
        clast = model(torch.tensor([head + list(condition)], device=dev), cache=ccache)[0, -1].float()
    kept, carry = [], 0.0
    for c0, c1 in _chunks(starts, chunk):
        piece = ids[c0:c1]
        want = sum(keep_frac[c0:c1]) + carry
        n_keep = max(0, min(len(piece), int(round(want))))
        if n_keep == len(piece):
            sel = list(range(len(piece)))
        elif n_keep == 0:
            sel = []
        else:
            L0 = cache.length
            logits = model(torch.tensor([piece], device=dev), cache=cache)[0].float()
            cache.length = L0  # roll back: only the kept tokens become the prefix
            prev = torch.cat([last[None], logits[:-1]])
            target = torch.tensor(piece, device=dev)
            surprisal = F.cross_entropy(prev, target, reduction="none")
            if condition:
                C0 = ccache.length
                clogits = model(torch.tensor([piece], device=dev), cache=ccache)[0].float()
                ccache.length = C0
                surprisal = surprisal - F.cross_entropy(torch.cat([clast[None], clogits[:-1]]), target,
                                                        reduction="none")
            surprisal = surprisal.tolist()
            words = []  # (score, begin, end) within the piece
            for j in range(len(piece)):
                if starts[c0 + j] or not words:
                    words.append([surprisal[j], j, j + 1])
                else:
                    words[-1][0] = max(words[-1][0], surprisal[j])
                    words[-1][2] = j + 1
            sel, used = [], 0
            for score, b, e in sorted(words, key=lambda w: (-w[0], w[1])):
                if used + e - b <= n_keep:
                    sel += range(b, e)
                    used += e - b
            sel.sort()
        carry = want - len(sel)
        if sel:
            out = model(torch.tensor([[piece[i] for i in sel]], device=dev), cache=cache)
            last = out[0, -1].float()
            if condition:
                clast = model(torch.tensor([[piece[i] for i in sel]], device=dev), cache=ccache)[0, -1].float()
        kept += [c0 + i for i in sel]
    return kept


def compress_prompt(context, question: str | None = None, rate: float = 0.5, model=None, tokenizer=None, *,
                    coarse_slack: float = 2.0, dynamic: float = 0.25, chunk: int = 128, reorder: bool = False,
                    batch_size: int = 4, contrastive: bool = False) -> dict:
    """Compress `context` (a string, or a list of documents) to about `rate` of its tokens.

    contrastive: with a question, prune tokens by LongLLMLingua's contrastive perplexity (see
    prune_tokens; about twice the scoring work) instead of plain surprisal.

    Returns {"compressed_prompt" (segments joined by blank lines), "origin_tokens", "compressed_tokens",
    "rate" (compressed / origin), "ratio" (origin / compressed), "kept_segments", "seconds"}; token
    counts are of the scorer's tokenizer. model/tokenizer: the scorer (default: leanlm's default model).
    """
    t0 = time.perf_counter()
    rate = check_rate(rate)
    if coarse_slack < 1 or chunk < 1 or not 0 <= dynamic < 1:
        raise LeanLMError("need coarse_slack >= 1, chunk >= 1 and 0 <= dynamic < 1")
    if question is not None and not isinstance(question, str):
        raise LeanLMError("question must be a string")
    if contrastive and not question:
        raise LeanLMError("contrastive pruning compares surprisal with and without the question; give a question")
    segs = _segments(context)
    if model is None:
        import leanlm

        model, tokenizer = leanlm.load()
    seg_ids = [_enc(tokenizer, s) for s in segs]
    origin = len(_enc(tokenizer, "\n\n".join(segs)))
    n_tok = sum(len(x) for x in seg_ids)
    target = rate * n_tok
    if rate >= 1:
        order, kept_segs = list(range(len(segs))), list(range(len(segs)))
        text = "\n\n".join(segs)
    else:
        order = rank_segments(model, tokenizer, seg_ids, question, batch_size) if len(segs) > 1 else [0]
        kept_segs, have = [], 0
        for i in order:
            if have >= coarse_slack * target:
                break
            kept_segs.append(i)
            have += len(seg_ids[i])
        rank_of = {i: r for r, i in enumerate(order)}
        kept_segs = sorted(kept_segs, key=lambda i: rank_of[i] if reorder else i)
        lengths = [len(seg_ids[i]) for i in kept_segs]
        ranks = sorted(range(len(kept_segs)), key=lambda j: rank_of[kept_segs[j]])
        rank_in_kept = [0] * len(kept_segs)
        for r, j in enumerate(ranks):
            rank_in_kept[j] = r
        fr = _quotas(lengths, rank_in_kept, min(target, have), dynamic if question else 0.0)
        flat, frac, owner = [], [], []
        for j, i in enumerate(kept_segs):
            flat += seg_ids[i]
            frac += [fr[j]] * len(seg_ids[i])
            owner += [j] * len(seg_ids[i])
        cond = _enc(tokenizer, question + "\n\n") if contrastive and question else None
        keep = prune_tokens(model, tokenizer, flat, frac, chunk, condition=cond)
        parts = [[] for _ in kept_segs]
        for p in keep:
            parts[owner[p]].append(flat[p])
        text = "\n\n".join(t for t in (tokenizer.decode(p).strip() for p in parts) if t)
    comp = len(_enc(tokenizer, text)) if text else 0
    return {"compressed_prompt": text, "origin_tokens": origin, "compressed_tokens": comp,
            "rate": comp / origin if origin else 1.0, "ratio": origin / comp if comp else math.inf,
            "kept_segments": kept_segs, "seconds": time.perf_counter() - t0}
