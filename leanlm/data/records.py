"""Streaming records for the data tools: read .txt / .jsonl files or a folder of them one record at a
time, and write the kept records (JSONL) plus a reason for every dropped one, atomically.

Memory stays constant in the size of the corpus: a .jsonl file is read line by line, a .txt file one
record at a time (`txt_unit`: the whole file, each paragraph, or each line). A record that cannot be
used (not UTF-8, bad JSON, not an object, no text field, empty text) is never dropped silently: it
comes out with `error` set, and the tools write it to the dropped sidecar with that reason and count it.
"""
from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from leanlm.data.text import record_text
from leanlm.errors import LeanLMError

SUFFIXES = (".txt", ".jsonl")
TXT_UNITS = ("file", "paragraph", "line")


@dataclass
class Record:
    source: str
    line: int  # 1-based line of a JSONL record or of the start of a .txt unit
    data: dict | None  # the JSON object (a .txt unit becomes {"text": ..., "source": ...})
    text: str | None
    error: str | None = None  # why the record is unusable: not_utf8, bad_json, not_object, missing_field, empty
    detail: str = ""
    nbytes: int = 0

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def input_files(path: str | Path) -> list[Path]:
    """The .txt / .jsonl files of `path` (a file, or a folder searched recursively, in sorted order)."""
    path = Path(path)
    if not path.exists():
        raise LeanLMError(f"{path}: no such file or folder; give a .txt or .jsonl file or a folder of them")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            raise LeanLMError(f"{path}: folder holds no .txt or .jsonl files")
        return files
    if path.suffix.lower() not in SUFFIXES:
        raise LeanLMError(f"{path}: not a .txt or .jsonl file; give text or JSONL (one object per line)")
    return [path]


def _json_record(src: str, lineno: int, raw: bytes, field_name: str | None) -> Record:
    n = len(raw)
    try:
        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
        return Record(src, lineno, None, None, "not_utf8", f"byte {e.start} is not UTF-8", n)
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return Record(src, lineno, None, None, "bad_json", f"{e.msg} at column {e.colno}", n)
    if not isinstance(obj, dict):
        return Record(src, lineno, None, None, "not_object", f"a JSON {type(obj).__name__}", n)
    if field_name is not None:
        text = obj.get(field_name)
        if not isinstance(text, str):
            return Record(src, lineno, obj, None, "missing_field", f"no text field {field_name!r}", n)
    else:
        try:
            text = record_text(obj, src, lineno)
        except LeanLMError as e:
            return Record(src, lineno, obj, None, "missing_field", str(e).split(": ", 2)[-1], n)
    if not text.strip():
        return Record(src, lineno, obj, text, "empty", "the text is empty", n)
    return Record(src, lineno, obj, text, None, "", n)


def _txt_record(src: str, lineno: int, raw: bytes) -> Record:
    try:
        text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
        return Record(src, lineno, None, None, "not_utf8", f"byte {e.start} is not UTF-8", len(raw))
    text = text.strip("\n")
    rec = Record(src, lineno, {"text": text, "source": src}, text, None, "", len(raw))
    if not text.strip():
        rec.error, rec.detail = "empty", "the text is empty"
    return rec


def _iter_txt(path: Path, unit: str) -> Iterator[Record]:
    src = str(path)
    if unit == "file":
        yield _txt_record(src, 1, path.read_bytes())
        return
    buf, start = [], 1
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if unit == "line":
                if raw.strip():
                    yield _txt_record(src, lineno, raw)
                continue
            if raw.strip():
                if not buf:
                    start = lineno
                buf.append(raw)
            elif buf:
                yield _txt_record(src, start, b"".join(buf))
                buf = []
    if buf:
        yield _txt_record(src, start, b"".join(buf))


def iter_records(path: str | Path, field: str | None = None, txt_unit: str = "file") -> Iterator[Record]:
    """Every record of a .txt / .jsonl file or a folder of them, one at a time, bad ones flagged.

    field: the JSONL text field (default: "text", else "messages" contents, else "prompt" + "completion").
    Blank JSONL lines and blank .txt lines between units are not records."""
    if txt_unit not in TXT_UNITS:
        raise LeanLMError(f"txt unit must be one of {', '.join(TXT_UNITS)} (got {txt_unit!r})")
    for p in input_files(path):
        if p.suffix.lower() == ".jsonl":
            with open(p, "rb") as f:
                for lineno, raw in enumerate(f, 1):
                    if raw.strip():
                        yield _json_record(str(p), lineno, raw, field)
        else:
            yield from _iter_txt(p, txt_unit)


def total_bytes(path: str | Path) -> int:
    return sum(p.stat().st_size for p in input_files(path))


@contextlib.contextmanager
def scan(path, description: str, field=None, txt_unit="file", progress: bool = True):
    """iter_records with a rich progress bar (on stderr) over the input's bytes."""
    from leanlm.report import progress as bar

    pb = bar(disable=not progress)
    with pb:
        task = pb.add_task(description, total=total_bytes(path))

        def gen():
            for rec in iter_records(path, field, txt_unit):
                yield rec
                pb.advance(task, rec.nbytes)

        yield gen()


@dataclass
class Sink:
    """Kept records go to `output` (JSONL, every field of the input record kept); dropped ones go to
    `output.dropped.jsonl` as {"source", "line", "reason", ...details, "record"}. Both are written to
    temporary files and renamed into place only when the run completes."""
    output: Path
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)

    @property
    def dropped_path(self) -> Path:
        return dropped_path(self.output)

    def keep(self, rec: Record, extra: dict | None = None) -> None:
        obj = dict(rec.data) if extra else rec.data
        if extra:
            obj.update(extra)
        self._out.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self.kept += 1

    def drop(self, rec: Record, reason: str, **info) -> None:
        row = {"source": rec.source, "line": rec.line, "reason": reason}
        if rec.detail and "detail" not in info:
            row["detail"] = rec.detail
        row.update(info)
        if rec.data is not None:
            row["record"] = rec.data
        self._dropped.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.dropped[reason] += 1

    def summary(self) -> dict:
        total = self.kept + sum(self.dropped.values())
        out = {"records": total, "kept": self.kept, "dropped": total - self.kept}
        out.update({f"dropped_{k}": v for k, v in sorted(self.dropped.items())})
        out.update({"output": str(self.output), "dropped_file": str(self.dropped_path)})
        return out


def dropped_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".dropped.jsonl") if output.suffix != ".jsonl" else \
        output.with_name(output.stem + ".dropped.jsonl")


@contextlib.contextmanager
def sink(output: str | Path, inputs: str | Path | None = None):
    from leanlm.io.atomic import atomic_open

    output = Path(output)
    if inputs is not None and output.exists():
        for p in input_files(inputs):
            if p.resolve() == output.resolve():
                raise LeanLMError(f"{output}: is also an input; write the output to another file")
    s = Sink(output)
    with atomic_open(output) as out, atomic_open(s.dropped_path) as dropped:
        s._out, s._dropped = out, dropped
        yield s
