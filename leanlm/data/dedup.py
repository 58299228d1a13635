"""Deduplication: exact (hash of the normalized text) and near-duplicate (MinHash + LSH, datasketch).

One streaming pass, first occurrence kept. A record is an exact duplicate when its normalized text
(Unicode NFKC, lower case, runs of whitespace as one space) hashes like an earlier kept record's. It is
a near duplicate when an earlier kept record among LSH's candidates (datasketch's `MinHashLSH`) has
Jaccard similarity at least `threshold` with it. Shingles are word n-grams (`ngram` words) of the
normalized text; a text shorter than `ngram` words is one shingle.

`verify="exact"` (default): LSH runs at a lower threshold (`threshold - lsh_margin`, weighted against
false negatives) to gather candidates, and each candidate's Jaccard is computed exactly from the two
shingle sets (as 32-bit hashes), so nothing below the threshold is removed and pairs just above it
are rarely missed. `verify="estimate"`: LSH at the threshold and the MinHash estimate decides
(smaller memory; pairs near the threshold are missed or taken about half the time).

Memory: the text is never kept; per kept record we keep its 16-byte exact hash, its MinHash
signature (4 bytes per permutation, 512 bytes at the default 128), with "exact" its shingle hashes
(4 bytes per word), plus datasketch's LSH tables: memory grows with the kept records, not the input.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from dataclasses import dataclass

import numpy as np

from leanlm.errors import LeanLMError

_WS = re.compile(r"\s+")


@dataclass
class DedupConfig:
    threshold: float = 0.8  # Jaccard similarity at or above which a record is a near duplicate
    num_perm: int = 128
    ngram: int = 5  # words per shingle
    exact: bool = True
    near: bool = True
    seed: int = 1
    verify: str = "exact"  # or "estimate"
    lsh_margin: float = 0.15

    def check(self) -> None:
        if not 0 < self.threshold <= 1:
            raise LeanLMError(f"--threshold must be in (0, 1] (got {self.threshold})")
        if self.num_perm < 16:
            raise LeanLMError(f"--num-perm must be at least 16 (got {self.num_perm})")
        if self.ngram < 1:
            raise LeanLMError(f"--ngram must be at least 1 (got {self.ngram})")
        if self.verify not in ("exact", "estimate"):
            raise LeanLMError(f"--verify must be exact or estimate (got {self.verify!r})")
        if not (self.exact or self.near):
            raise LeanLMError("nothing to do: both exact and near-duplicate removal are off")


def normalize(text: str) -> str:
    return _WS.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def shingles(text: str, n: int) -> set[bytes]:
    """Word n-grams of the normalized text, as UTF-8 bytes (the set MinHash estimates Jaccard over)."""
    words = normalize(text).split(" ")
    if len(words) <= n:
        return {" ".join(words).encode("utf-8")}
    return {" ".join(words[i:i + n]).encode("utf-8") for i in range(len(words) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class Deduplicator:
    """Feed texts in order with `check(key, text)`: None for a new text (remembered), or
    (reason, key of the earlier record, Jaccard estimate) for a duplicate (not remembered)."""

    def __init__(self, cfg: DedupConfig | None = None):
        try:
            from datasketch import MinHash, MinHashLSH
        except ImportError:
            raise LeanLMError("deduplication needs datasketch: pip install 'leanlm[data]'") from None

        self.cfg = cfg or DedupConfig()
        self.cfg.check()
        self._MinHash = MinHash
        self.hashes: dict[bytes, str] = {}
        exact = self.cfg.verify == "exact"
        lsh_t = max(0.05, self.cfg.threshold - self.cfg.lsh_margin) if exact else self.cfg.threshold
        self.lsh = MinHashLSH(threshold=lsh_t, num_perm=self.cfg.num_perm,
                              weights=(0.2, 0.8) if exact else (0.5, 0.5)) if self.cfg.near else None
        self.sigs: dict[str, np.ndarray] = {}
        self.sets: dict[str, np.ndarray] = {}
        # one MinHash's permutations, reused for every record (datasketch draws them from the seed)
        self._proto = MinHash(num_perm=self.cfg.num_perm, seed=self.cfg.seed)

    def minhash(self, text: str, sh=None):
        m = self._MinHash(num_perm=self.cfg.num_perm, seed=self.cfg.seed, permutations=self._proto.permutations,
                          scheme=self._proto.scheme)
        m.update_batch(list(sh if sh is not None else shingles(text, self.cfg.ngram)))
        return m

    def check(self, key: str, text: str):
        norm = normalize(text)
        h = hashlib.blake2b(norm.encode("utf-8"), digest_size=16).digest()
        if self.cfg.exact and h in self.hashes:
            return "exact_duplicate", self.hashes[h], 1.0
        m = hs = None
        if self.cfg.near:
            sh = shingles(text, self.cfg.ngram)
            m = self.minhash(text, sh)
            if self.cfg.verify == "exact":
                hs = np.unique(np.fromiter((zlib.crc32(x) for x in sh), dtype=np.uint32, count=len(sh)))
            best, best_j = None, -1.0
            for other in self.lsh.query(m):
                if hs is not None:
                    o = self.sets[other]
                    inter = len(np.intersect1d(hs, o, assume_unique=True))
                    j = inter / (len(hs) + len(o) - inter)
                else:  # estimate from the stored signature: fraction of equal minimum hashes
                    j = float(np.mean(self.sigs[other] == m.hashvalues.astype(np.uint32)))
                if j > best_j:
                    best, best_j = other, j
            if best is not None and best_j >= self.cfg.threshold:
                return "near_duplicate", best, best_j
        self.hashes.setdefault(h, key)
        if m is not None and key not in self.sigs:
            self.lsh.insert(key, m)
            if hs is not None:
                self.sets[key] = hs
            else:
                self.sigs[key] = m.hashvalues.astype(np.uint32)  # datasketch's hash values fit in 32 bits
        return None


def dedup(path, output, cfg: DedupConfig | None = None, field=None, txt_unit="file", progress=True) -> dict:
    """Stream `path` (file or folder), write the first occurrence of each text to `output` (JSONL) and
    each duplicate, with the record it duplicates, to the dropped sidecar. Returns the summary."""
    import time

    from leanlm.data.records import scan, sink

    d = Deduplicator(cfg)
    t0 = time.perf_counter()
    with sink(output, path) as s, scan(path, "dedup", field, txt_unit, progress) as records:
        for rec in records:
            if rec.error:
                s.drop(rec, rec.error)
                continue
            dup = d.check(rec.where, rec.text)
            if dup is None:
                s.keep(rec)
            else:
                reason, of, j = dup
                s.drop(rec, reason, duplicate_of=of, jaccard=round(j, 4))
    out = s.summary()
    secs = time.perf_counter() - t0
    out.update({"seconds": secs, "records_per_s": out["records"] / secs if secs else 0.0,
                "threshold": d.cfg.threshold, "verify": d.cfg.verify, "num_perm": d.cfg.num_perm, "ngram": d.cfg.ngram})
    return out
