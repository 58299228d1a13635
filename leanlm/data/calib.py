"""Calibration sets: one or several weighted sources, windows drawn in proportion, seeded.

A calibration spec (`leanlm compress --calib SPEC`, or `calib: SPEC` in a recipe file) is

    SOURCE[=WEIGHT][,SOURCE[=WEIGHT]...]

SOURCE is a .txt / .jsonl file, or `packaged:NAME` for a part of the packaged calibration mix:
`prose` (Shakespeare's *The Tempest* + KJV Genesis, the old single default, also `packaged:calib`),
`code` (Python standard-library modules), `docs` (libjpeg / zlib / xz technical documentation),
`chat` (single-turn conversations, rendered with the chat template of the model being compressed),
or `mix` (the default mix below). WEIGHT is a positive number (default 1); weights are relative.
Paths holding ',' or '=' cannot be named in a spec. `n` windows are shared out by the largest-remainder
rule in proportion to the weights, each source's windows are drawn as `calibration_windows` draws
them (seed + the source's position), and with several sources the rows are shuffled (same seed).

Records of a .jsonl file that hold `messages` are rendered with the tokenizer's chat template when it
has one (special tokens included, as the model sees chat); other records are their text, records
separated by a blank line. The packaged evaluation texts (eval.txt, tech.txt) are refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from leanlm.data.text import (
    HELD_OUT,
    PACKAGED,
    TEXTS_DIR,
    _content_text,
    _encode,
    read_text,
    read_texts,
    record_text,
)
from leanlm.errors import LeanLMError

PARTS = {"prose": "calib.txt", "calib": "calib.txt", "code": "code.txt", "docs": "docs.txt", "chat": "chat.jsonl"}
DEFAULT_MIX = "packaged:prose=0.3,packaged:code=0.2,packaged:docs=0.25,packaged:chat=0.25"


@dataclass(frozen=True)
class CalibSource:
    name: str    # as written in the spec ("packaged:code", "my.jsonl")
    path: Path
    weight: float


def _held_out_path(path: Path) -> bool:
    for held_out in HELD_OUT:
        eval_path = TEXTS_DIR / PACKAGED[held_out]
        if eval_path.exists() and path.exists() and path.resolve() == eval_path.resolve():
            return True
    return False


def _source_path(name: str) -> Path:
    if name.startswith("packaged:"):
        part = name[len("packaged:"):]
        if part in HELD_OUT:
            raise LeanLMError(f"--calib {name}: is a held-out evaluation text; calibrating on it would leak into "
                              f"the evaluation; use packaged:{', packaged:'.join(sorted(set(PARTS) | {'mix'}))}")
        if part not in PARTS:
            raise LeanLMError(f"--calib {name}: no packaged calibration text {part!r}; choose one of "
                              f"{', '.join(sorted(set(PARTS) | {'mix'}))}")
        path = TEXTS_DIR / PARTS[part]
        if not path.is_file():
            raise LeanLMError(f"{path}: packaged calibration text is missing; reinstall leanlm "
                              "(or run `python benchmarks/make_calib.py` in a source checkout)")
        return path
    path = Path(name)
    if not path.exists():
        raise LeanLMError(f"--calib {name}: no such file; give a .txt or .jsonl text file or packaged:NAME")
    if _held_out_path(path):
        raise LeanLMError(f"{name}: is leanlm's evaluation text; calibrating on it would leak into the "
                          "evaluation; give another text (or none for the packaged calibration mix)")
    return path


def parse_calib(spec: str | Path | None) -> list[CalibSource]:
    """The sources of a calibration spec (None: the default mix); a bad spec is one LeanLMError line."""
    if spec is None:
        spec = DEFAULT_MIX
    if isinstance(spec, Path):
        return [CalibSource(str(spec), _source_path(str(spec)), 1.0)]
    items = [s.strip() for s in str(spec).split(",")]
    if not any(items) or not all(items):
        raise LeanLMError(f"--calib {spec!r}: empty source; write SOURCE[=WEIGHT][,SOURCE[=WEIGHT]...]")
    out = []
    for item in items:
        name, weight = item, 1.0
        if "=" in item:
            name, _, w = item.rpartition("=")
            name = name.strip()
            try:
                weight = float(w)
            except ValueError:
                raise LeanLMError(f"--calib {item!r}: weight {w!r} is not a number; write SOURCE=WEIGHT, e.g. "
                                  "packaged:code=0.3") from None
            if not math.isfinite(weight) or weight <= 0:
                raise LeanLMError(f"--calib {item!r}: weight must be a positive number (got {w})")
        if name == "packaged:mix":
            for sub in parse_calib(DEFAULT_MIX):
                out.append(CalibSource(sub.name, sub.path, sub.weight * weight))
            continue
        out.append(CalibSource(name, _source_path(name), weight))
    names = [s.name for s in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise LeanLMError(f"--calib {spec!r}: {dup} is named twice; give each source once with its weight")
    return out


def allocate(n: int, weights: list[float]) -> list[int]:
    """Split n windows in proportion to weights (largest remainder; ties to the earlier source)."""
    total = sum(weights)
    exact = [n * w / total for w in weights]
    counts = [math.floor(e) for e in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def source_ids(tokenizer, path: Path) -> torch.Tensor:
    """The token ids of one calibration source (chat records rendered with the chat template)."""
    if path.suffix.lower() == ".jsonl" and getattr(tokenizer, "chat_template", None) \
            and hasattr(tokenizer, "apply_chat_template"):
        import json

        docs = read_texts(path)  # validates the file, every record
        lines = [ln for ln in path.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]
        ids = []
        for lineno, (line, doc) in enumerate(zip(lines, docs), 1):
            rec = json.loads(line)
            msgs = rec.get("messages") if isinstance(rec, dict) else None
            if isinstance(msgs, list):
                msgs = [{"role": m.get("role", "user"), "content": _content_text(m["content"], path, lineno)}
                        for m in msgs]
                ids += _encode(tokenizer, tokenizer.apply_chat_template(msgs, add_generation_prompt=False))
            else:
                ids += _encode(tokenizer, record_text(rec, path, lineno) + "\n\n")
        return torch.tensor(ids, dtype=torch.long)
    return torch.tensor(_encode(tokenizer, read_text(path)), dtype=torch.long)


def calibration_windows(ids: torch.Tensor, n: int, seq_len: int, seed: int, source: str) -> torch.Tensor:
    """`n` windows of `seq_len` ids: disjoint (random slots of a grid with a random offset) when the ids
    hold at least `n` of them, otherwise independent random windows that overlap."""
    total = ids.numel()
    if total < seq_len:
        raise LeanLMError(f"{source}: has {total} tokens, fewer than seq_len={seq_len}; give a longer text "
                          "or a shorter sequence length")
    g = torch.Generator().manual_seed(seed)
    slots = total // seq_len
    if n <= slots:
        offset = int(torch.randint(0, total - slots * seq_len + 1, (1,), generator=g))
        starts = offset + torch.randperm(slots, generator=g)[:n] * seq_len
    else:
        starts = torch.randint(0, total - seq_len + 1, (n,), generator=g)
    return torch.stack([ids[s: s + seq_len] for s in starts.tolist()])


def calibration_plan(spec, n: int) -> list[dict]:
    """[{"source", "weight" (normalised), "samples"}] for a spec and n windows (what --json reports)."""
    sources = parse_calib(spec)
    total = sum(s.weight for s in sources)
    counts = allocate(n, [s.weight for s in sources])
    return [{"source": s.name, "weight": s.weight / total, "samples": k} for s, k in zip(sources, counts)]


def calibration_samples(tokenizer, n: int, seq_len: int, path: str | Path | None = None,
                        seed: int = 0) -> torch.Tensor:
    """`n` windows of `seq_len` token ids from a calibration spec (module docstring): LongTensor [n, seq_len].

    `path` None means the packaged default mix; a Path is one file; a string is a spec (a single
    file name is a spec of one source). Tokenised without special tokens (chat records: the chat
    template's own). Same seed, same samples.
    """
    if n < 1 or seq_len < 1:
        raise LeanLMError(f"calibration needs n >= 1 samples of seq_len >= 1 tokens (got n={n}, seq_len={seq_len})")
    sources = parse_calib(path)
    counts = allocate(n, [s.weight for s in sources])
    rows = []
    for i, (src, k) in enumerate(zip(sources, counts)):
        if k:
            rows.append(calibration_windows(source_ids(tokenizer, src.path), k, seq_len, seed + i, src.name))
    x = torch.cat(rows)
    if len(sources) > 1:
        x = x[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
    return x
