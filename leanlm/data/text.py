"""Text for evaluation and calibration: the packaged texts, user .txt / .jsonl files, calibration windows.

The packaged evaluation texts (Austen; "tech": Python's HOWTO documentation, a held-out technical
text) and the calibration texts (the mix of leanlm/data/calib.py: Shakespeare + KJV Genesis, Python
standard-library code, libjpeg/zlib/xz documentation, chat turns) come from different works
(texts/SOURCES.md), and calibration refuses the evaluation texts, so a compression method never
calibrates on what it is measured on.
"""
from __future__ import annotations

import json
from pathlib import Path


from leanlm.errors import LeanLMError

TEXTS_DIR = Path(__file__).resolve().parent / "texts"
PACKAGED = {"eval": "eval.txt", "calib": "calib.txt", "tech": "tech.txt"}
HELD_OUT = ("eval", "tech")  # evaluation texts: never calibration data


def packaged_path(name: str) -> Path:
    """Path of a packaged text: "eval" (held-out literary evaluation text), "calib" (calibration text)
    or "tech" (held-out technical evaluation text)."""
    if name not in PACKAGED:
        raise LeanLMError(f"no packaged text {name!r}; choose one of {', '.join(PACKAGED)}")
    path = TEXTS_DIR / PACKAGED[name]
    if not path.is_file():
        raise LeanLMError(f"{path}: packaged text is missing; reinstall leanlm "
                          "(or run `python benchmarks/make_texts.py` in a source checkout)")
    return path


def packaged_text(name: str) -> str:
    """The packaged "eval", "calib" or "tech" text as a string."""
    return packaged_path(name).read_text(encoding="utf-8")


def _content_text(content, path, lineno) -> str:
    """A chat message's content: a string, or a list of parts ({"type": "text", "text": ...})."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") if isinstance(p, dict) else p for p in content]
        if all(isinstance(p, str) for p in parts):
            return "".join(parts)
    raise LeanLMError(f"{path}: line {lineno}: a message's 'content' is neither text nor a list of text parts")


def record_text(rec, path="<record>", lineno: int = 0) -> str:
    """The text of one JSONL record: "text", or "messages" contents, or "prompt" + "completion"."""
    if not isinstance(rec, dict):
        raise LeanLMError(f"{path}: line {lineno} is a JSON {type(rec).__name__}, not an object; "
                          "each line must be an object with a 'text' field")
    if isinstance(rec.get("text"), str):
        return rec["text"]
    if isinstance(rec.get("messages"), list):
        msgs = rec["messages"]
        if not all(isinstance(m, dict) and "content" in m for m in msgs):
            raise LeanLMError(f"{path}: line {lineno}: each of 'messages' must be an object with 'content'")
        return "\n\n".join(_content_text(m["content"], path, lineno) for m in msgs)
    if isinstance(rec.get("prompt"), str) and isinstance(rec.get("completion"), str):
        # prompt and completion are joined as written, as trainers do for prompt/completion data
        return rec["prompt"] + rec["completion"]
    raise LeanLMError(f"{path}: line {lineno} has no text field; give 'text', 'messages', or 'prompt' + 'completion'")


def read_texts(path: str | Path) -> list[str]:
    """The documents of a file: one for a .txt file, one per non-blank line of a .jsonl file."""
    path = Path(path)
    if not path.exists():
        raise LeanLMError(f"{path}: no such file; give a .txt or .jsonl text file")
    if path.is_dir():
        raise LeanLMError(f"{path}: is a folder; give a .txt or .jsonl text file")
    data = path.read_bytes()
    try:
        raw = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise LeanLMError(f"{path}: line {line}: not UTF-8 text (byte {e.start}); save the file as UTF-8")
    if not raw.strip():
        raise LeanLMError(f"{path}: file is empty; give a file with some text")
    if path.suffix.lower() != ".jsonl":
        return [raw]
    docs = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise LeanLMError(f"{path}: bad JSON at line {lineno} ({e.msg}); each line must be one JSON object")
        docs.append(record_text(rec, path, lineno))
    if not any(d.strip() for d in docs):
        raise LeanLMError(f"{path}: every record's text is empty; give records with some text")
    return docs


def read_text(path: str | Path) -> str:
    """A .txt file's text, or a .jsonl file's record texts joined by blank lines."""
    return "\n\n".join(read_texts(path))


def _encode(tokenizer, text: str) -> list[int]:
    try:
        return list(tokenizer.encode(text, add_special=False))
    except TypeError:  # a tokenizer whose encode takes only the text
        return list(tokenizer.encode(text))

