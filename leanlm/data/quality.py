"""Quality filtering: length and repetition heuristics, and perplexity under a reference model.

Each bound is a value ("300") or a percentile of the input ("p90": the 90th percentile of that score
over the input's usable records). Percentile bounds take two passes over the input: the first computes
every score and keeps one float per record and score (the text is not kept), the second re-reads the
input and writes the records. With value bounds only, one pass.

Scores:
- words: whitespace-separated words.
- repetition: 1 - (distinct word 3-grams / word 3-grams), 0 for text without repeats (Gopher-style
  duplicate n-gram share).
- perplexity: exp(mean NLL) of the first `max_tokens` tokens under the reference model (BOS first
  when the tokenizer uses one), batched plain forward (leanlm.data.scoring).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from leanlm.errors import LeanLMError

SCORES = ("words", "repetition", "perplexity")


def words(text: str) -> float:
    return float(len(text.split()))


def repetition(text: str, n: int = 3) -> float:
    w = text.lower().split()
    grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def parse_bound(value, name: str):
    """"p90" -> ("percentile", 90.0); "12.5" -> ("value", 12.5); None -> None."""
    if value is None:
        return None
    s = str(value).strip().lower()
    try:
        if s.startswith("p"):
            q = float(s[1:])
            if not 0 <= q <= 100:
                raise ValueError
            return ("percentile", q)
        return ("value", float(s))
    except ValueError:
        raise LeanLMError(f"--{name.replace('_', '-')}: {value!r} is neither a number nor a percentile "
                          "like p90 (0-100)") from None


@dataclass
class FilterConfig:
    min_words: str | float | None = None
    max_words: str | float | None = None
    max_repetition: str | float | None = None
    min_perplexity: str | float | None = None
    max_perplexity: str | float | None = None
    max_tokens: int = 256  # tokens scored per record for perplexity
    batch_size: int = 8

    def bounds(self) -> dict:
        """{(score, "min"|"max"): (kind, number)} for the bounds that are set."""
        out = {}
        for key in ("min_words", "max_words", "max_repetition", "min_perplexity", "max_perplexity"):
            b = parse_bound(getattr(self, key), key)
            if b is not None:
                side, score = key.split("_", 1)
                out[(score, side)] = b
        if not out:
            raise LeanLMError("no filter given; set at least one of --min-words, --max-words, --max-repetition, "
                              "--min-perplexity, --max-perplexity")
        if self.max_tokens < 2 or self.batch_size < 1:
            raise LeanLMError("--max-tokens must be at least 2 and --batch-size at least 1")
        return out


class PerplexityScorer:
    """Perplexity of texts under a model, `batch_size` at a time."""

    def __init__(self, model, tokenizer, max_tokens: int = 256, batch_size: int = 8):
        self.model, self.tok, self.max_tokens, self.batch_size = model, tokenizer, max_tokens, batch_size

    def __call__(self, texts: list[str]) -> list[float]:
        from leanlm.data.scoring import encode, token_losses

        seqs = [encode(self.tok, t)[: self.max_tokens] for t in texts]
        out = []
        for nll in token_losses(self.model, seqs, self.batch_size):
            out.append(math.exp(float(nll.mean())) if nll.numel() else float("nan"))
        return out


def _scores_of_batch(texts, needed, scorer) -> list[dict]:
    rows = [{} for _ in texts]
    for r, t in zip(rows, texts):
        if "words" in needed:
            r["words"] = words(t)
        if "repetition" in needed:
            r["repetition"] = repetition(t)
    if "perplexity" in needed:
        for r, p in zip(rows, scorer(texts)):
            r["perplexity"] = p
    return rows


def _iter_scored(records, needed, scorer, batch_size):
    """(record, scores or None) in input order; usable records are scored `batch_size` at a time."""
    buf = []
    for rec in records:
        buf.append(rec)
        if sum(r.error is None for r in buf) >= batch_size:
            yield from _flush(buf, needed, scorer)
            buf = []
    yield from _flush(buf, needed, scorer)


def _flush(buf, needed, scorer):
    good = [r for r in buf if r.error is None]
    scores = iter(_scores_of_batch([r.text for r in good], needed, scorer) if good else [])
    for r in buf:
        yield r, (next(scores) if r.error is None else None)


def _verdict(sc: dict, limits: dict):
    for (score, side), limit in limits.items():
        v = sc[score]
        if math.isnan(v):
            return f"{score}_unscored", limit
        if (side == "min" and v < limit) or (side == "max" and v > limit):
            return f"{score}_{'below_min' if side == 'min' else 'above_max'}", limit
    return None


def filter_records(path, output, cfg: FilterConfig, model=None, tokenizer=None, field=None, txt_unit="file",
                   progress=True) -> dict:
    """Write the records of `path` that pass every bound to `output`; the others go to the dropped
    sidecar with the score and the limit they broke. Returns the summary (with the limits used)."""
    from leanlm.data.records import scan, sink

    bounds = cfg.bounds()
    needed = {s for s, _ in bounds}
    scorer = None
    if "perplexity" in needed:
        if model is None:
            raise LeanLMError("a perplexity bound needs a reference model")
        scorer = PerplexityScorer(model, tokenizer, cfg.max_tokens, cfg.batch_size)
    limits = {k: v for k, (kind, v) in bounds.items() if kind == "value"}
    stored = None
    if any(kind == "percentile" for kind, _ in bounds.values()):
        stored = {s: [] for s in needed}
        with scan(path, "scoring", field, txt_unit, progress) as records:
            for _, sc in _iter_scored(records, needed, scorer, cfg.batch_size):
                if sc is not None:
                    for s in needed:
                        stored[s].append(sc[s])
        for (score, side), (kind, q) in bounds.items():
            if kind == "percentile":
                vals = np.array(stored[score], dtype=float)
                vals = vals[~np.isnan(vals)]
                limits[(score, side)] = float(np.percentile(vals, q)) if len(vals) else math.nan
    with sink(output, path) as s, scan(path, "filter", field, txt_unit, progress) as records:
        if stored is None:
            pairs = _iter_scored(records, needed, scorer, cfg.batch_size)
        else:
            pos = iter(range(len(next(iter(stored.values())))))

            def row():
                i = next(pos)
                return {k: stored[k][i] for k in needed}

            pairs = ((r, row() if r.error is None else None) for r in records)
        for rec, sc in pairs:
            if rec.error:
                s.drop(rec, rec.error)
                continue
            v = _verdict(sc, limits)
            if v is None:
                s.keep(rec)
            else:
                s.drop(rec, v[0], scores={k: round(x, 4) for k, x in sc.items()}, limit=v[1])
    out = s.summary()
    out.update({f"limit_{side}_{score}": v for (score, side), v in limits.items()})
    return out
