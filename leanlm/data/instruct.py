"""Instruction data for fine-tuning: chat / prompt-completion JSONL and plain text, as training examples.

An example is {"input_ids": [...], "labels": [...]}, labels -100 where no loss is taken. Chat records
(`messages`) and `prompt`/`completion` records are rendered with the tokenizer's chat template, and
only the assistant turns carry labels: the conversation is rendered at each assistant boundary and the
text between boundaries is tokenised piece by piece (template boundaries are special tokens, so the
pieces tokenise as the whole does). Plain text is one causal-LM stream cut into windows. `pack`
concatenates short examples into fixed-length rows (no cross-example mask: the usual packing trade-off).
"""
from __future__ import annotations

import json
from pathlib import Path

from leanlm.errors import LeanLMError

IGNORE = -100
ROLES = ("system", "user", "assistant", "tool")


def _encode(tokenizer, text: str) -> list[int]:
    if not text:
        return []
    try:
        return list(tokenizer.encode(text, add_special=False))
    except TypeError:
        return list(tokenizer.encode(text))


def _eos(tokenizer) -> list[int]:
    ids = getattr(tokenizer, "eos_ids", None) or []
    return [ids[0]] if ids else []


def chat_example(tokenizer, messages: list[dict], where: str = "<messages>") -> dict:
    """Render a conversation with the chat template; labels on the assistant turns only."""
    if not isinstance(messages, list) or not messages:
        raise LeanLMError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise LeanLMError(f"{where}: each message needs a role ({', '.join(ROLES)}) and text content; got {m!r:.80}")
    if not any(m["role"] == "assistant" for m in messages):
        raise LeanLMError(f"{where}: no assistant message, so nothing to learn; add the answer as an assistant turn")
    if not getattr(tokenizer, "chat_template", None):
        return _plain_chat(tokenizer, messages)
    render = tokenizer.apply_chat_template
    ids, labels, done = [], [], ""
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(messages[:k], add_generation_prompt=True)
        full = render(messages[:k + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise LeanLMError(f"{where}: the chat template does not render this conversation turn by turn "
                              "(earlier turns change); use single-turn records")
        ctx, ans = _encode(tokenizer, prompt[len(done):]), _encode(tokenizer, full[len(prompt):])
        ids += ctx + ans
        labels += [IGNORE] * len(ctx) + ans
        done = full
    tail = _encode(tokenizer, render(messages, add_generation_prompt=False)[len(done):])
    ids += tail
    labels += [IGNORE] * len(tail)
    return {"input_ids": ids, "labels": labels}


def _plain_chat(tokenizer, messages) -> dict:
    """No chat template: "role: content" lines; the answer ends with EOS."""
    ids, labels = [], []
    bos = getattr(tokenizer, "bos_id", None)
    if bos is not None and getattr(tokenizer, "add_bos", False):
        ids, labels = [bos], [IGNORE]
    for m in messages:
        if m["role"] == "assistant":
            ctx = _encode(tokenizer, "assistant: ")
            ans = _encode(tokenizer, m["content"]) + _eos(tokenizer)
            ids += ctx + ans
            labels += [IGNORE] * len(ctx) + ans
        else:
            t = _encode(tokenizer, f"{m['role']}: {m['content']}\n")
            ids += t
            labels += [IGNORE] * len(t)
    return {"input_ids": ids, "labels": labels}


def record_example(tokenizer, rec, where: str) -> dict:
    """One JSONL record: {"messages": [...]}, {"prompt", "completion"} or {"text"}."""
    if not isinstance(rec, dict):
        raise LeanLMError(f"{where}: is a JSON {type(rec).__name__}, not an object")
    if "messages" in rec:
        return chat_example(tokenizer, rec["messages"], where)
    if "prompt" in rec or "completion" in rec:
        p, c = rec.get("prompt"), rec.get("completion")
        if not isinstance(p, str) or not isinstance(c, str):
            raise LeanLMError(f"{where}: 'prompt' and 'completion' must both be strings")
        return chat_example(tokenizer, [{"role": "user", "content": p}, {"role": "assistant", "content": c}], where)
    if isinstance(rec.get("text"), str):
        ids = _encode(tokenizer, rec["text"]) + _eos(tokenizer)
        return {"input_ids": ids, "labels": list(ids)}
    raise LeanLMError(f"{where}: no 'messages', 'prompt'/'completion' or 'text' field")


def read_jsonl(path: str | Path) -> list[tuple[int, object]]:
    path = Path(path)
    if not path.is_file():
        raise LeanLMError(f"{path}: no such file; give a .jsonl file with one record per line")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise LeanLMError(f"{path}: line {lineno}: bad JSON ({e.msg} at column {e.colno})")
            except UnicodeDecodeError:
                raise LeanLMError(f"{path}: line {lineno}: not UTF-8 text; save the file as UTF-8")
    if not out:
        raise LeanLMError(f"{path}: no records; give one JSON object per line")
    return out


def load_examples(path: str | Path, tokenizer, max_len: int = 512, seq_len: int = 256) -> list[dict]:
    """Training examples from a .jsonl (chat / prompt-completion / text) or a plain .txt file."""
    path = Path(path)
    if path.suffix.lower() != ".jsonl":
        if not path.is_file():
            raise LeanLMError(f"{path}: no such file; give a .jsonl or .txt file")
        return text_examples(path.read_text(encoding="utf-8"), tokenizer, seq_len)
    out = []
    for lineno, rec in read_jsonl(path):
        ex = record_example(tokenizer, rec, f"{path}: line {lineno}")
        if len(ex["input_ids"]) > max_len:
            ex = {k: v[:max_len] for k, v in ex.items()}
        if all(x == IGNORE for x in ex["labels"][1:]):
            raise LeanLMError(f"{path}: line {lineno}: the answer falls beyond max_len={max_len} tokens; "
                              "shorten the prompt or raise max_len")
        out.append(ex)
    return out


def text_examples(text: str, tokenizer, seq_len: int = 256) -> list[dict]:
    """Plain causal LM: the whole text as one token stream in windows of seq_len (all labelled)."""
    ids = _encode(tokenizer, text)
    if len(ids) < 2:
        raise LeanLMError("the text is empty; give a file with some text")
    return [{"input_ids": ids[i:i + seq_len], "labels": ids[i:i + seq_len]}
            for i in range(0, len(ids), seq_len) if len(ids[i:i + seq_len]) > 1]


def pack(examples: list[dict], seq_len: int) -> list[dict]:
    """Concatenate consecutive examples into rows of at most seq_len tokens (an example is never split;
    one longer than seq_len is truncated). Fewer, fuller rows: less padding, faster steps."""
    rows, cur_i, cur_l = [], [], []
    for ex in examples:
        ids, lab = ex["input_ids"][:seq_len], ex["labels"][:seq_len]
        if cur_i and len(cur_i) + len(ids) > seq_len:
            rows.append({"input_ids": cur_i, "labels": cur_l})
            cur_i, cur_l = [], []
        # the first token of an appended example must not be predicted from the previous one
        cur_i = cur_i + ids
        cur_l = cur_l + ([IGNORE] + lab[1:] if cur_l else lab)
    if cur_i:
        rows.append({"input_ids": cur_i, "labels": cur_l})
    return rows
