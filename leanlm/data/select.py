"""Data selection under a budget: DSIR, IFD, length and diversity.

- dsir (Xie et al. 2023, "Data Selection for Language Models via Importance Resampling"): each text is
  a bag of hashed word unigrams and bigrams (`buckets` hash buckets, crc32); a target and a raw
  distribution over the buckets are estimated from the target text and from the input pool (counts
  plus `smoothing`); a record's log importance weight is sum_b count_b(x) * (log p_target[b] -
  log p_raw[b]); `budget` records are drawn without replacement in proportion to the weights (Gumbel
  top-k with `seed`; `noise=False` takes the top-k weights). By default (`length_norm`) the log weight
  is divided by the record's number of n-grams: the paper's sum grows with length, so with a small
  target text long records of any domain sink and short ones float (on a pool of 120 packaged
  paragraphs, 28 of 40 picks were on target with the sum, 39 with the mean); `length_norm=False` is the
  paper's weight. The mean is then scaled by the pool's average n-gram count, so the resampling sees
  weights on the paper's scale for a record of average length.
- ifd (Li et al. 2023, "From Quantity to Quality", Cherry LLM): for an instruction record (messages or
  prompt + completion), the model's mean cross-entropy on the answer given the instruction (the chat
  template, as fine-tuning sees it) divided by its mean cross-entropy on the answer alone. High IFD:
  the instruction helps little, the example is hard. Records with IFD >= 1 (the instruction does not
  help at all) are dropped as the paper does; the rest are taken from the highest IFD down. With
  `clusters` K > 0 the records are first grouped by k-means (K groups, k-center seeds) on the model's
  mean hidden state of each record's text (instruction and answer), and the picks go round the groups,
  each giving its highest remaining IFD: on a pool that mixes kinds of task, plain IFD ranks the kinds (the hard kind fills the
  budget), while IFD within clusters ranks the examples of every kind (docs/bench/data.md).
- length: the longest records first (words of the answer for instruction records, else of the text).
- diversity: greedy k-center on the model's mean final hidden state of each record (L2 on unit
  vectors), starting from the first record: each pick is the record farthest from those picked.

Passes over the input: dsir three (raw counts, weights, writing), the others two (scores, writing).
Between passes one float per record is kept (diversity: one hidden-state vector per record).
"""
from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from leanlm.errors import LeanLMError

METHODS = ("dsir", "ifd", "length", "diversity")
_WORD = re.compile(r"\w+")


def parse_budget(budget) -> tuple[str, float]:
    """"200" -> ("count", 200); "0.1" -> ("fraction", 0.1)."""
    s = str(budget).strip()
    try:
        if "." in s or "e" in s.lower():
            f = float(s)
            if not 0 < f <= 1:
                raise ValueError
            return ("fraction", f)
        n = int(s)
        if n < 1:
            raise ValueError
        return ("count", n)
    except ValueError:
        raise LeanLMError(f"--budget: {budget!r} is neither a count >= 1 nor a fraction in (0, 1] like 0.1") from None


def budget_count(budget, n_usable: int) -> int:
    kind, v = parse_budget(budget)
    return min(n_usable, int(v) if kind == "count" else max(1, round(v * n_usable)))


# ---------------------------------------------------------------- DSIR
def hashed_ngrams(text: str, buckets: int) -> np.ndarray:
    """Bucket ids of the text's lower-cased word unigrams and bigrams (crc32 mod buckets)."""
    w = _WORD.findall(text.lower())
    feats = w + [f"{a} {b}" for a, b in zip(w, w[1:])]
    return np.fromiter((zlib.crc32(f.encode("utf-8")) % buckets for f in feats), dtype=np.int64, count=len(feats))


def ngram_counts(texts, buckets: int) -> np.ndarray:
    c = np.zeros(buckets, dtype=np.float64)
    for t in texts:
        c += np.bincount(hashed_ngrams(t, buckets), minlength=buckets)
    return c


def log_ratio(target_counts: np.ndarray, raw_counts: np.ndarray, smoothing: float = 1.0) -> np.ndarray:
    """log p_target - log p_raw per bucket, each distribution smoothed by `smoothing` per bucket."""
    pt = (target_counts + smoothing) / (target_counts.sum() + smoothing * len(target_counts))
    pr = (raw_counts + smoothing) / (raw_counts.sum() + smoothing * len(raw_counts))
    return np.log(pt) - np.log(pr)


def dsir_log_weight(text: str, ratio: np.ndarray, length_norm: bool = False) -> float:
    f = hashed_ngrams(text, len(ratio))
    w = float(ratio[f].sum())
    return w / max(len(f), 1) if length_norm else w


def gumbel_top_k(log_w: np.ndarray, k: int, seed: int = 0, noise: bool = True) -> np.ndarray:
    """Indices of k items drawn without replacement with probability proportional to exp(log_w)."""
    g = np.random.default_rng(seed).gumbel(size=len(log_w)) if noise else 0.0
    return np.argsort(-(log_w + g), kind="stable")[:k]


# ---------------------------------------------------------------- IFD
def instruction_pair(tokenizer, rec: dict, where: str, max_tokens: int) -> tuple[list, list, list]:
    """(ids, labels) of the templated conversation and the answer ids alone (with a start token)."""
    from leanlm.data.instruct import IGNORE, record_example
    from leanlm.data.scoring import start_token

    if "messages" not in rec and "prompt" not in rec and "completion" not in rec:
        raise LeanLMError(f"{where}: IFD needs instruction records ('messages' or 'prompt' + 'completion')")
    ex = record_example(tokenizer, rec, where)
    ids, labels = ex["input_ids"][:max_tokens], ex["labels"][:max_tokens]
    answer = [t for t, lab in zip(ids, labels) if lab != IGNORE]
    s = start_token(tokenizer)
    return ids, labels, ([s] if s is not None else []) + answer


def ifd_scores(model, tokenizer, pairs, batch_size: int = 8) -> list[dict]:
    """{"loss_with", "loss_alone", "ifd"} for each (ids, labels, answer) of instruction_pair."""
    from leanlm.data.instruct import IGNORE
    from leanlm.data.scoring import token_losses

    cond = token_losses(model, [p[0] for p in pairs], batch_size)
    alone = token_losses(model, [p[2] for p in pairs], batch_size)
    out = []
    for (ids, labels, ans), c, a in zip(pairs, cond, alone):
        mask = torch.tensor([lab != IGNORE for lab in labels[1:]], dtype=torch.bool)
        if not mask.any() or a.numel() == 0:
            out.append({"loss_with": math.nan, "loss_alone": math.nan, "ifd": math.nan})
            continue
        lw, la = float(c[mask].mean()), float(a.mean())
        out.append({"loss_with": lw, "loss_alone": la, "ifd": lw / la if la > 0 else math.nan})
    return out


# ---------------------------------------------------------------- diversity
def k_center(emb: torch.Tensor, k: int) -> list[int]:
    """Greedy k-center (farthest-point) on unit-normalized rows, starting from row 0."""
    x = torch.nn.functional.normalize(emb.float(), dim=-1)
    picked = [0]
    dist = (x - x[0]).norm(dim=-1)
    for _ in range(1, min(k, len(x))):
        i = int(dist.argmax())
        picked.append(i)
        dist = torch.minimum(dist, (x - x[i]).norm(dim=-1))
    return picked


def kmeans(emb: torch.Tensor, k: int, iters: int = 25) -> torch.Tensor:
    """Cluster label of each row: Lloyd's k-means on unit-normalized rows from k-center seeds
    (deterministic, no sampling)."""
    x = torch.nn.functional.normalize(emb.float(), dim=-1)
    centers = x[k_center(x, k)].clone()
    labels = torch.zeros(len(x), dtype=torch.long)
    for step in range(iters):
        new = torch.cdist(x, centers).argmin(1)
        if step and torch.equal(new, labels):  # assignments settled
            break
        labels = new
        for c in range(len(centers)):
            members = labels == c
            if members.any():
                centers[c] = x[members].mean(0)
    return labels


def round_robin(order: list[int], labels: torch.Tensor, k: int) -> list[int]:
    """The first k of `order` (best first) taken in turn from each label's queue."""
    queues: dict[int, list[int]] = {}
    for i in order:
        queues.setdefault(int(labels[i]), []).append(i)
    picked, lists = [], [q for _, q in sorted(queues.items())]
    while len(picked) < k and any(lists):
        for q in lists:
            if q and len(picked) < k:
                picked.append(q.pop(0))
    return picked


# ---------------------------------------------------------------- runner
@dataclass
class SelectConfig:
    method: str = "dsir"
    budget: str = "0.1"
    target: str | None = None  # dsir: target text (.txt/.jsonl or packaged:NAME)
    buckets: int = 10_000
    smoothing: float = 1.0
    noise: bool = True
    length_norm: bool = True  # dsir: mean log weight per n-gram instead of the sum
    seed: int = 0
    max_tokens: int = 512
    batch_size: int = 8
    clusters: int = 0  # ifd: rank within this many k-means groups of the records' hidden states

    def check(self) -> None:
        if self.method not in METHODS:
            raise LeanLMError(f"unknown selection method {self.method!r}; choose one of {', '.join(METHODS)}")
        parse_budget(self.budget)
        if self.method == "dsir" and not self.target:
            raise LeanLMError("dsir needs --target: a .txt/.jsonl file (or packaged:NAME) of the kind of text wanted")
        if self.clusters < 0 or (self.clusters and self.method != "ifd"):
            raise LeanLMError("--clusters is a count >= 1 and applies to --method ifd")
        if self.buckets < 16 or self.smoothing <= 0 or self.max_tokens < 2 or self.batch_size < 1:
            raise LeanLMError("need --buckets >= 16, --smoothing > 0, --max-tokens >= 2, --batch-size >= 1")


def _target_texts(target: str) -> list[str]:
    from leanlm.data.text import packaged_text, read_texts

    if target.startswith("packaged:"):
        return [packaged_text(target.split(":", 1)[1])]
    return read_texts(target)


def _score_pass(path, cfg, model, tokenizer, field, txt_unit, progress):
    """Scores of the usable records in input order (and their count): floats, or for diversity [n, H]."""
    from leanlm.data.records import scan
    from leanlm.data.scoring import encode, mean_hidden

    m = cfg.method
    if m == "dsir":
        with scan(path, "dsir: raw counts", field, txt_unit, progress) as records:
            raw = ngram_counts((r.text for r in records if r.error is None), cfg.buckets)
        ratio = log_ratio(ngram_counts(_target_texts(cfg.target), cfg.buckets), raw, cfg.smoothing)
    if m in ("ifd", "diversity") and model is None:
        raise LeanLMError(f"{m} selection needs a model")
    scores, buf, extra = [], [], []

    def flush():
        if m == "ifd":
            rows = ifd_scores(model, tokenizer, buf, cfg.batch_size)
            scores.extend(r["ifd"] for r in rows)
            extra.extend(rows)
        elif m == "diversity":
            scores.append(mean_hidden(model, buf, cfg.batch_size))
        buf.clear()

    with scan(path, f"{m}: scoring", field, txt_unit, progress) as records:
        for r in records:
            if r.error is not None:
                continue
            if m == "dsir":
                f = hashed_ngrams(r.text, cfg.buckets)
                w = float(ratio[f].sum())
                scores.append(w / max(len(f), 1) if cfg.length_norm else w)
                extra.append(len(f))
            elif m == "length":
                ans = None
                if isinstance(r.data, dict) and isinstance(r.data.get("completion"), str):
                    ans = r.data["completion"]
                elif isinstance(r.data, dict) and isinstance(r.data.get("messages"), list):
                    ans = " ".join(str(x.get("content", "")) for x in r.data["messages"]
                                   if isinstance(x, dict) and x.get("role") == "assistant")
                scores.append(float(len((ans if ans is not None else r.text).split())))
            elif m == "ifd":
                if r.data is None or ("messages" not in r.data and "prompt" not in r.data):
                    raise LeanLMError(f"{r.where}: IFD needs instruction records ('messages' or 'prompt' + "
                                      "'completion'); this one has neither")
                buf.append(instruction_pair(tokenizer, r.data, r.where, cfg.max_tokens))
            else:
                ids = encode(tokenizer, r.text)
                buf.append(ids[: cfg.max_tokens] or [0])
            if len(buf) >= cfg.batch_size * 4:
                flush()
        if buf:
            flush()
    if m == "diversity":
        return torch.cat(scores) if scores else torch.zeros(0, 1), extra
    scores = np.array(scores, dtype=np.float64)
    if m == "dsir":
        if cfg.length_norm and extra:
            scores = scores * float(np.mean(extra))
        extra = []
    return scores, extra


def choose(method: str, scores, k: int, seed: int = 0, noise: bool = True, labels=None) -> tuple[list[int], dict]:
    """Indices (into the usable records) to keep, and {index: reason} for those excluded before ranking.
    labels: ifd's cluster of each record (picks go round the clusters)."""
    excluded = {}
    if method == "diversity":
        return k_center(scores, k), excluded
    if method == "dsir":
        return [int(i) for i in gumbel_top_k(scores, k, seed, noise)], excluded
    if method == "ifd":
        for i, v in enumerate(scores):
            if math.isnan(v):
                excluded[i] = "ifd_unscored"
            elif v >= 1:
                excluded[i] = "ifd_at_least_1"
    eligible = [i for i in range(len(scores)) if i not in excluded]
    eligible.sort(key=lambda i: -scores[i])
    if labels is not None:
        return round_robin(eligible, labels, k), excluded
    return eligible[:k], excluded


def select(path, output, cfg: SelectConfig, model=None, tokenizer=None, field=None, txt_unit="file",
           progress=True) -> dict:
    """Write the `budget` records chosen by `cfg.method` to `output` in input order; the others go to
    the dropped sidecar with their score and rank (reason not_selected, or why they were excluded)."""
    from leanlm.data.records import scan, sink

    cfg.check()
    scores, extra = _score_pass(path, cfg, model, tokenizer, field, txt_unit, progress)
    n = len(scores)
    if n == 0:
        raise LeanLMError(f"{path}: no usable records to select from")
    k = budget_count(cfg.budget, n)
    labels = None
    if cfg.clusters:  # a second model pass: the records' mean hidden states
        from dataclasses import replace

        emb, _ = _score_pass(path, replace(cfg, method="diversity"), model, tokenizer, field, txt_unit, progress)
        labels = kmeans(emb, cfg.clusters)
    picked, excluded = choose(cfg.method, scores, k, cfg.seed, cfg.noise, labels)
    rank = {i: r for r, i in enumerate(picked)}
    with sink(output, path) as s, scan(path, "writing", field, txt_unit, progress) as records:
        i = -1
        for rec in records:
            if rec.error:
                s.drop(rec, rec.error)
                continue
            i += 1
            info = {}
            if cfg.method != "diversity":
                info["score"] = round(float(scores[i]), 6)
            if extra:
                info.update({k2: round(v, 6) for k2, v in extra[i].items() if k2 != "ifd"})
            if labels is not None:
                info["cluster"] = int(labels[i])
            if i in rank:
                s.keep(rec)
            else:
                s.drop(rec, excluded.get(i, "not_selected"), **info)
    out = s.summary()
    out.update({"method": cfg.method, "budget": k, "usable": n})
    return out
