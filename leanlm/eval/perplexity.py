"""Perplexity and bits per byte with the standard sliding window.

This is the method of transformers' guide "Perplexity of fixed-length models": windows of `ctx`
tokens start every `stride` tokens; a window scores only the tokens that the previous window did not
score (so each token is scored once, with at least ctx - stride tokens of context once the first
window is full), and a token is scored only when it has context in its window (the text's first
token never is; with stride == ctx, neither is each window's first). Windows are batched; right
padding of the last, shorter window cannot change the other positions of a causal model.

bits_per_byte = total NLL (nats) / ln 2 / UTF-8 bytes of the text: unlike perplexity it does not
depend on the tokenizer, so models with different vocabularies compare.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from leanlm.errors import LeanLMError


def sliding_windows(n_tokens: int, ctx: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) of each window; tokens first_target..end-1 are scored in it."""
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + ctx, n_tokens)
        windows.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def _model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _target_logits(model, ids: torch.Tensor, keep_from: int) -> torch.Tensor:
    """Logits of positions keep_from.. of a batch. A leanlm Transformer skips the output head on the rest."""
    from leanlm.model.transformer import Transformer

    if isinstance(model, Transformer):
        hidden = model(ids, return_hidden=True)
        return model.logits(hidden[:, keep_from:])
    out = model(ids)
    logits = out.logits if hasattr(out, "logits") else out  # transformers' models return an output object
    return logits[:, keep_from:]


def _resolve_ids(tokenizer, text, tokens, add_bos):
    if tokens is not None:
        ids = tokens.flatten().tolist() if isinstance(tokens, torch.Tensor) else [int(t) for t in tokens]
        if text is None and tokenizer is not None and hasattr(tokenizer, "decode"):
            text = tokenizer.decode(ids)
    else:
        if text is None:
            raise LeanLMError("perplexity needs a text or token ids; give text=... or tokens=...")
        if tokenizer is None:
            raise LeanLMError("perplexity of a text needs the model's tokenizer")
        try:
            ids = list(tokenizer.encode(text, add_special=False))
        except TypeError:  # a tokenizer whose encode takes only the text
            ids = list(tokenizer.encode(text))
    if add_bos is None:
        add_bos = bool(getattr(tokenizer, "add_bos", False))
    if add_bos:
        bos = getattr(tokenizer, "bos_id", None)
        if bos is None:
            raise LeanLMError("add_bos=True but the tokenizer has no BOS token; use add_bos=False")
        if not ids or ids[0] != bos:
            ids = [bos] + ids
    return ids, text


def perplexity(model, tokenizer=None, text: str | None = None, ctx: int = 512, stride: int = 256,
               batch_size: int = 4, progress: bool = True, tokens=None, add_bos: bool | None = None) -> dict:
    """Sliding-window perplexity of `text` (or of pre-tokenised `tokens`) under `model`.

    model(ids [B, T]) must return logits [B, T, V] (a leanlm Transformer, or a transformers model).
    Returns {"perplexity", "bits_per_byte", "tokens" (number scored), "nll" (total, nats), "bytes"}.
    With `tokens` and no `text`, bytes come from tokenizer.decode(tokens) (None without a tokenizer,
    and then bits_per_byte is None). add_bos=None follows tokenizer.add_bos (False if absent).
    """
    if ctx < 2:
        raise LeanLMError(f"--ctx must be at least 2 tokens (got {ctx})")
    if not 1 <= stride <= ctx:
        raise LeanLMError(f"--stride must be between 1 and --ctx={ctx} (got {stride}); a larger stride would skip tokens")
    if batch_size < 1:
        raise LeanLMError(f"batch_size must be at least 1 (got {batch_size})")
    ids, text = _resolve_ids(tokenizer, text, tokens, add_bos)
    if len(ids) < 2:
        raise LeanLMError(f"the text has {len(ids)} token(s); perplexity needs at least 2")
    n_bytes = len(text.encode("utf-8")) if text is not None else None

    windows = sliding_windows(len(ids), ctx, stride)
    # windows of one length batch together; only the last window can be shorter
    all_ids = torch.tensor(ids, dtype=torch.long)
    device = _model_device(model)
    nll, scored = 0.0, 0
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("perplexity"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=Console(stderr=True), disable=not progress, transient=True)
    with bar, torch.inference_mode():
        task = bar.add_task("windows", total=len(windows))
        i = 0
        while i < len(windows):
            length = windows[i][1] - windows[i][0]
            group = [windows[i]]
            while (len(group) < batch_size and i + len(group) < len(windows)
                   and windows[i + len(group)][1] - windows[i + len(group)][0] == length):
                group.append(windows[i + len(group)])
            batch = torch.stack([all_ids[b:e] for b, e, _ in group]).to(device)
            # the earliest position whose logits any window of the group needs
            keep_from = min(t - b for b, _, t in group) - 1
            logits = _target_logits(model, batch, keep_from).float()
            for row, (b, e, t) in enumerate(group):
                lg = logits[row, t - b - 1 - keep_from: e - b - 1 - keep_from]
                tgt = batch[row, t - b: e - b]
                nll += float(F.cross_entropy(lg, tgt, reduction="sum"))
                scored += e - t
            i += len(group)
            bar.advance(task, len(group))
    bpb = nll / math.log(2) / n_bytes if n_bytes else None
    return {"perplexity": math.exp(nll / scored), "bits_per_byte": bpb, "tokens": scored, "nll": nll,
            "bytes": n_bytes}
