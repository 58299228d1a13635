"""What the data tools ask of a model: per-token losses and a mean hidden state, batched plain forward.

Sequences of a batch are right-padded; a causal model's outputs at real positions do not depend on
the padding after them, so per-token losses and the mean over real positions equal those of each
sequence run alone. Any leanlm model works (quantized ones too): only `model(ids)` and
`model(ids, return_hidden=True)` are used.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from leanlm.model.surgery import model_device


def encode(tokenizer, text: str, bos: bool = True) -> list[int]:
    """Token ids of a text without special tokens, with the tokenizer's BOS in front when it uses one
    (bos=True), so the first real token is scored too."""
    try:
        ids = list(tokenizer.encode(text, add_special=False))
    except TypeError:
        ids = list(tokenizer.encode(text))
    b = getattr(tokenizer, "bos_id", None)
    if bos and b is not None and getattr(tokenizer, "add_bos", False):
        ids = [b] + ids
    return ids


def start_token(tokenizer) -> int | None:
    """A neutral token to put before a sequence so its first token is scored: BOS, else the first EOS."""
    b = getattr(tokenizer, "bos_id", None)
    if b is not None:
        return b
    eos = getattr(tokenizer, "eos_ids", None) or []
    return eos[0] if eos else None


def _batches(seqs, batch_size):
    # longest first within the call, so padding per batch is small; results go back in input order
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        width = max(len(seqs[i]) for i in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, :len(seqs[i])] = torch.tensor(seqs[i], dtype=torch.long)
        yield idx, ids


@torch.inference_mode()
def token_losses(model, seqs: list[list[int]], batch_size: int = 8) -> list[torch.Tensor]:
    """For each sequence, the NLL (nats) of tokens 1..n-1 given the tokens before: a float tensor [n-1]."""
    out: list[torch.Tensor | None] = [None] * len(seqs)
    for i, s in enumerate(seqs):
        if len(s) < 2:
            out[i] = torch.zeros(0)
    todo = [i for i in range(len(seqs)) if out[i] is None]
    dev = model_device(model)
    for idx, ids in _batches([seqs[i] for i in todo], batch_size):
        logits = model(ids.to(dev)).float()
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:].to(dev), reduction="none").cpu()
        for r, j in enumerate(idx):
            out[todo[j]] = nll[r, :len(seqs[todo[j]]) - 1]
    return out


@torch.inference_mode()
def mean_hidden(model, seqs: list[list[int]], batch_size: int = 8) -> torch.Tensor:
    """The mean over positions of the final (normed) hidden state of each sequence: [n, hidden]."""
    if any(len(s) == 0 for s in seqs):
        raise ValueError("mean_hidden needs non-empty sequences")
    dev = model_device(model)
    out = None
    for idx, ids in _batches(seqs, batch_size):
        h = model(ids.to(dev), return_hidden=True).float().cpu()
        if out is None:
            out = torch.zeros(len(seqs), h.shape[-1])
        for r, i in enumerate(idx):
            out[i] = h[r, :len(seqs[i])].mean(0)
    return out
