"""Teacher signals for distillation: a frozen online teacher, the pair check, and a top-k logit cache.

Online: the teacher runs on the same batch in the same step, without gradients.
Offline: the teacher's top-k log-probabilities at every position of every training example are
computed once and written to one safetensors file (atomically); later runs (other epochs, other
losses, resumed runs) read them back instead of running the teacher. The rest of the distribution
(the mass outside the top k) is spread evenly over the other tokens, so every divergence stays finite.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from leanlm.errors import LeanLMError

PROBE = "Hello, world! 12345 \n\tdef f(x): return x ** 2  # héllo ünïcode 東京"


def freeze(model):
    """The model in eval mode with every parameter frozen (a teacher never trains)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def check_pair(student, s_tok, teacher, t_tok, s_name: str = "student", t_name: str = "teacher") -> None:
    """Stop before any work when teacher and student cannot be distilled token by token: another
    vocabulary size or another tokenizer (the same text must give the same ids)."""
    sv, tv = student.config.vocab_size, teacher.config.vocab_size
    if sv != tv:
        raise LeanLMError(f"{t_name} has a vocabulary of {tv} tokens and {s_name} {sv}; token-level distillation "
                          "needs the same vocabulary (pick a teacher of the same model family)")
    if s_tok is None or t_tok is None:
        return
    if s_tok.vocab_size != t_tok.vocab_size or s_tok.encode(PROBE, add_special=False) != t_tok.encode(
            PROBE, add_special=False):
        raise LeanLMError(f"{t_name} and {s_name} tokenize text differently; token-level distillation needs the "
                          "same tokenizer (pick a teacher of the same model family)")


# ---------------------------------------------------------------- offline top-k cache
def _key(ids: list[int]) -> str:
    return hashlib.sha1(torch.tensor(ids, dtype=torch.int64).numpy().tobytes()).hexdigest()


def cache_fingerprint(teacher_name: str, data: list[dict], k: int, temperature: float) -> str:
    h = hashlib.sha256(json.dumps([teacher_name, k, temperature]).encode())
    for ex in data:
        h.update(torch.tensor(ex["input_ids"], dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


class TopKCache:
    """The teacher's top-k log-probabilities (at one temperature) for every position of a dataset."""

    def __init__(self, index: dict[str, int], offsets: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                 vocab: int, temperature: float):
        self.index, self.offsets, self.values, self.indices = index, offsets, values, indices
        self.vocab, self.temperature = vocab, temperature
        self.k = values.shape[1]

    @classmethod
    @torch.no_grad()
    def build(cls, teacher, data: list[dict], k: int, temperature: float, batch_size: int = 4,
              progress: bool = True) -> "TopKCache":
        freeze(teacher)
        uniq: dict[str, list[int]] = {}
        for ex in data:
            uniq.setdefault(_key(ex["input_ids"]), ex["input_ids"])
        keys = list(uniq)
        vals, idxs, lens = [], [], []
        bar = None
        if progress:
            from leanlm.report import progress as make_bar
            bar = make_bar()
            bar.start()
            task = bar.add_task("teacher top-k", total=len(keys))
        try:
            for i in range(0, len(keys), batch_size):
                rows = [uniq[key] for key in keys[i:i + batch_size]]
                T = max(len(r) for r in rows)
                ids = torch.zeros(len(rows), T, dtype=torch.long)
                for j, r in enumerate(rows):
                    ids[j, :len(r)] = torch.tensor(r)
                logits = teacher(ids).float() / temperature
                lp = F.log_softmax(logits, -1)
                top = lp.topk(k, -1)
                for j, r in enumerate(rows):
                    vals.append(top.values[j, :len(r)].half())
                    idxs.append(top.indices[j, :len(r)].to(torch.int32))
                    lens.append(len(r))
                if bar is not None:
                    bar.update(task, advance=len(rows))
        finally:
            if bar is not None:
                bar.stop()
        offsets = torch.tensor([0] + lens).cumsum(0)
        return cls({key: n for n, key in enumerate(keys)}, offsets, torch.cat(vals), torch.cat(idxs),
                   teacher.config.vocab_size, temperature)

    def save(self, path: str | Path, fingerprint: str) -> None:
        from safetensors.torch import save as st_save

        from leanlm.io.atomic import atomic_write_bytes

        meta = {"fingerprint": fingerprint, "vocab": str(self.vocab), "temperature": repr(self.temperature),
                "keys": json.dumps(sorted(self.index, key=self.index.get))}
        blob = st_save({"offsets": self.offsets, "values": self.values, "indices": self.indices}, metadata=meta)
        atomic_write_bytes(Path(path), blob)

    @classmethod
    def load(cls, path: str | Path, fingerprint: str) -> "TopKCache | None":
        """The cache at path when it was made for this teacher, data, k and temperature; else None."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            return None
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("fingerprint") != fingerprint:
                return None
            t = {n: f.get_tensor(n) for n in ("offsets", "values", "indices")}
        keys = json.loads(meta["keys"])
        return cls({key: n for n, key in enumerate(keys)}, t["offsets"], t["values"], t["indices"],
                   int(meta["vocab"]), float(meta["temperature"]))

    def compact(self, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached top-k (log-probabilities [n, k], token ids [n, k]) at the n labelled positions of a batch,
        in the order of leanlm.train.losses.labelled."""
        vals, idxs = [], []
        for b in range(ids.shape[0]):
            keep = (labels[b, 1:] != -100).nonzero().flatten()
            if keep.numel() == 0:
                continue
            key = self._find(ids[b], int(keep.max()) + 2)  # the example reaches at least its last label
            o = int(self.offsets[key])
            vals.append(self.values[o + keep].float())
            idxs.append(self.indices[o + keep].long())
        if not vals:
            return torch.zeros(0, self.k), torch.zeros(0, self.k, dtype=torch.long)
        return torch.cat(vals), torch.cat(idxs)

    def expand(self, v: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        """Teacher "logits" [n, V] from top-k rows: the temperature times the log-probabilities (top k as
        cached, the rest of the mass spread evenly over the other tokens), so that the loss's division by
        the temperature gives back the cached distribution."""
        rest = (1 - v.exp().sum(-1)).clamp_min(1e-12)
        fill = torch.log(rest / max(1, self.vocab - self.k))
        out = fill[:, None].expand(-1, self.vocab).clone()
        out.scatter_(1, i, v)
        return out * self.temperature

    def _find(self, row: torch.Tensor, n: int) -> int:
        # the example's own length is unknown after padding: try the longest prefix first
        for m in range(row.shape[0], n - 1, -1):
            key = self.index.get(_key(row[:m].tolist()))
            if key is not None:
                return key
        raise LeanLMError("a training example is missing from the teacher's top-k cache; delete the cache file "
                          "and run again")
