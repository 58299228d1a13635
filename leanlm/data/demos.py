"""Demonstration selection for few-shot prompts: k nearest examples by the model's own embedding, or
k random ones, or a fixed first k.

The embedding of a text is the mean over its tokens of the model's final (normed) hidden state
(leanlm.data.scoring.mean_hidden); neighbours are ranked by cosine similarity to the query. The pool
is embedded once (`DemoSelector`), each query costs one forward of its own tokens.
"""
from __future__ import annotations

import random

import torch

from leanlm.errors import LeanLMError

STRATEGIES = ("knn", "random", "fixed")


def embed(model, tokenizer, texts: list[str], max_tokens: int = 256, batch_size: int = 8) -> torch.Tensor:
    """Unit-normalized mean hidden states of `texts`: [n, hidden]."""
    from leanlm.data.scoring import encode, mean_hidden

    seqs = []
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise LeanLMError(f"demonstration {i}: the text is empty; give every example some text")
        seqs.append(encode(tokenizer, t)[:max_tokens])
    return torch.nn.functional.normalize(mean_hidden(model, seqs, batch_size), dim=-1)


class DemoSelector:
    """Pick k demonstrations from `pool` (a list of texts, or dicts with `key` giving the text) for a query."""

    def __init__(self, model, tokenizer, pool: list, key: str = "prompt", max_tokens: int = 256):
        if not pool:
            raise LeanLMError("the demonstration pool is empty; give at least one example")
        self.model, self.tok, self.pool, self.key, self.max_tokens = model, tokenizer, pool, key, max_tokens
        self._emb = None

    def _text(self, ex):
        if isinstance(ex, str):
            return ex
        if isinstance(ex, dict) and isinstance(ex.get(self.key), str):
            return ex[self.key]
        raise LeanLMError(f"a demonstration has no text field {self.key!r}: {ex!r:.80}")

    @property
    def embeddings(self) -> torch.Tensor:
        if self._emb is None:
            self._emb = embed(self.model, self.tok, [self._text(e) for e in self.pool], self.max_tokens)
        return self._emb

    def select(self, query: str, k: int, strategy: str = "knn", seed: int = 0) -> list:
        """The k examples for `query`: knn (most similar first), random (seeded by `seed`), or fixed
        (the first k of the pool, the same for every query)."""
        if strategy not in STRATEGIES:
            raise LeanLMError(f"unknown demonstration strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if k < 0:
            raise LeanLMError(f"k must be >= 0 (got {k})")
        k = min(k, len(self.pool))
        if strategy == "fixed":
            return self.pool[:k]
        if strategy == "random":
            return random.Random(seed).sample(self.pool, k)
        q = embed(self.model, self.tok, [query], self.max_tokens)[0]
        sims = self.embeddings @ q
        return [self.pool[int(i)] for i in torch.argsort(sims, descending=True, stable=True)[:k]]


def few_shot_messages(demos: list[dict], prompt: str, prompt_key: str = "prompt",
                      answer_key: str = "completion") -> list[dict]:
    """Chat messages: each demonstration as a user/assistant turn, then the question."""
    msgs = []
    for d in demos:
        msgs += [{"role": "user", "content": d[prompt_key]}, {"role": "assistant", "content": d[answer_key]}]
    return msgs + [{"role": "user", "content": prompt}]
