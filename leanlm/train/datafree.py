"""Data-free distillation text (LLM-QAT, Liu et al. 2023): the full-precision model writes its own training data.

Each sequence starts from one token drawn uniformly from the vocabulary; the model then continues it
greedily for the first `greedy` tokens and by sampling from its full softmax (temperature 1, no top-k/top-p)
afterwards, LLM-QAT's hybrid: greedy openings keep the text coherent, sampling keeps it diverse. Rows stop
at an end-of-sequence id (kept as the last token) or at `length` tokens. The draws come from one seeded
torch.Generator, so the same model, count, length, seed and batch give the same token ids.

Generation runs the model with its own KV cache (one prefill of the first token, then one decode step per
token; plain forward, no inference-time fusion, so the model is left exactly as it was). The result is
cached on disk under the leanlm cache (LEANLM_CACHE) in one safetensors file named by a fingerprint of the
model's weights and every generation setting: a rerun with the same model and settings reads it back
instead of generating again.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from leanlm.errors import LeanLMError

VERSION = 1  # bump when the generation procedure changes (invalidates cached texts)


@dataclass
class GenerationSpec:
    count: int = 64  # sequences
    length: int = 256  # tokens per sequence, the random first token included
    greedy: int = 4  # tokens after the first one chosen greedily, then sampled
    seed: int = 0
    batch: int = 8

    def validate(self) -> None:
        if self.count < 1 or self.batch < 1:
            raise LeanLMError(f"generated text: count and batch must be >= 1 (got {self.count}, {self.batch})")
        if self.length < 2:
            raise LeanLMError(f"generated text: length must be >= 2 tokens (got {self.length})")
        if self.greedy < 0:
            raise LeanLMError(f"generated text: greedy must be >= 0 (got {self.greedy})")


def weights_fingerprint(model) -> str:
    """A hash of every tensor of the model's state dict (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous().cpu().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def fingerprint(model, spec: GenerationSpec, stop_ids: list[int]) -> str:
    h = hashlib.sha256(json.dumps([VERSION, weights_fingerprint(model), asdict(spec), sorted(stop_ids)]).encode())
    return h.hexdigest()[:20]


@torch.no_grad()
def generate_batch(model, rows: int, spec: GenerationSpec, gen: torch.Generator,
                   stop_ids: list[int]) -> list[list[int]]:
    """`rows` sequences: a uniform first token, `spec.greedy` greedy tokens, then samples; each row cut
    after its first stop id."""
    was = model.training
    model.eval()
    try:
        V = model.config.vocab_size
        dev = next(model.parameters()).device  # the draws stay on the CPU generator, whatever the device
        first = torch.randint(0, V, (rows, 1), generator=gen).to(dev)
        cache = model.new_cache(rows, spec.length)
        logits = model(first, cache=cache)[:, -1]
        toks = [first]
        for i in range(spec.length - 1):
            if i < spec.greedy:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                nxt = torch.multinomial(torch.softmax(logits.float(), -1).cpu(), 1, generator=gen).to(dev)
            toks.append(nxt)
            if i < spec.length - 2:
                logits = model(nxt, cache=cache)[:, -1]
    finally:
        model.train(was)
    out = []
    for row in torch.cat(toks, 1).cpu().tolist():
        cut = next((j for j, t in enumerate(row) if j > 0 and t in stop_ids), None)
        out.append(row if cut is None else row[:cut + 1])
    return out


def _cache_path(key: str) -> Path:
    from leanlm.io.registry import cache_dir

    return cache_dir() / "generated" / f"{key}.safetensors"


def _save(path: Path, seqs: list[list[int]], meta: dict) -> None:
    from safetensors.torch import save as st_save

    from leanlm.io.atomic import atomic_write_bytes

    lens = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, st_save({"ids": ids, "lengths": lens}, metadata={k: str(v) for k, v in meta.items()}))


def _load(path: Path, key: str) -> list[list[int]] | None:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("fingerprint") != key:
                return None
            ids, lens = f.get_tensor("ids").tolist(), f.get_tensor("lengths").tolist()
    except (OSError, SafetensorError):  # a damaged cache file is regenerated, not trusted
        return None
    out, o = [], 0
    for n in lens:
        out.append(ids[o:o + n])
        o += n
    return out


def self_generated(model, spec: GenerationSpec, stop_ids: list[int] | None = None, cache: bool = True,
                   progress: bool = True) -> tuple[list[dict], bool]:
    """LLM-QAT's data-free training examples from `model`: ([{"input_ids", "labels"}], read_from_cache).
    Every token is a label (the first, random one has no prediction anyway)."""
    spec.validate()
    stop_ids = list(stop_ids or [])
    key = fingerprint(model, spec, stop_ids)
    path = _cache_path(key)
    seqs = _load(path, key) if cache else None
    hit = seqs is not None
    if seqs is None:
        gen = torch.Generator().manual_seed(spec.seed)
        seqs, bar = [], None
        if progress:
            from leanlm.report import progress as make_bar

            bar = make_bar()
            bar.start()
            task = bar.add_task("teacher writes its own data", total=spec.count)
        try:
            for i in range(0, spec.count, spec.batch):
                seqs += generate_batch(model, min(spec.batch, spec.count - i), spec, gen, stop_ids)
                if bar is not None:
                    bar.update(task, advance=min(spec.batch, spec.count - i))
        finally:
            if bar is not None:
                bar.stop()
        if cache:
            _save(path, seqs, {"fingerprint": key, **asdict(spec)})
    return [{"input_ids": s, "labels": list(s)} for s in seqs if len(s) > 1], hit
