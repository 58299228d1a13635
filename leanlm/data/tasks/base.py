"""Task: deterministic train/test records plus exact answer checking by greedy generation."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    make: Callable[[str, int], list[dict]]  # (split, n) -> [{"prompt", "completion"}]
    normalize: Callable[[str], str] = lambda s: s.strip()
    max_new_tokens: int = 16

    def records(self, split: str, n: int) -> list[dict]:
        return self.make(split, n)

    def correct(self, output: str, answer: str) -> bool:
        return self.normalize(output) == self.normalize(answer)


@torch.no_grad()
def accuracy(model, tokenizer, task: Task, records: list[dict], batch_size: int = 16,
             return_outputs: bool = False):
    """Exact-match accuracy of greedy answers to the records' prompts (chat template applied)."""
    from leanlm.infer.generate import generate
    from leanlm.infer.sampling import GenerationConfig

    was = model.training
    model.eval()
    outs = []
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        msgs = [[{"role": "user", "content": r["prompt"]}] for r in chunk]
        cfg = GenerationConfig(max_new_tokens=task.max_new_tokens)
        outs += generate(model, tokenizer, msgs, cfg)
    model.train(was)
    acc = sum(task.correct(o, r["completion"]) for o, r in zip(outs, records)) / max(len(records), 1)
    return (acc, outs) if return_outputs else acc
