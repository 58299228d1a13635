"""The per-request prompt-compression option of the server.

    {"model": ..., "messages": [...], "leanlm": {"compress_prompt": 0.5}}
    {"model": ..., "prompt": "...", "leanlm": {"compress_prompt": {"rate": 0.25, "question": "Who ...?"}}}

`rate` in (0, 1] is the fraction of tokens kept (leanlm.compress_prompt, scored by the served model
itself). Chat: the last user message is compressed; when it ends with a line starting "Question:"
(or `question` is given), that line is the question and is kept whole. Completions: each text prompt
is compressed (token-id prompts cannot be). The response's `usage` then carries
`prompt_tokens_saved` (prompt tokens before compression minus after) beside OpenAI's fields.
"""
from __future__ import annotations

import re

from leanlm.errors import LeanLMError

_QUESTION = re.compile(r"\n\s*(Question:.*)\Z", re.S)


class OptionError(ValueError):
    """A bad `leanlm` field: the message says what to send instead."""


def parse(body: dict) -> dict | None:
    """{"rate", "question"} from the request's `leanlm` field, or None when it asks for nothing."""
    opt = body.get("leanlm")
    if opt is None:
        return None
    if not isinstance(opt, dict):
        raise OptionError("'leanlm' must be an object, e.g. {\"compress_prompt\": 0.5}")
    unknown = set(opt) - {"compress_prompt"}
    if unknown:
        raise OptionError(f"unknown 'leanlm' option(s): {', '.join(sorted(unknown))}; supported: compress_prompt")
    cp = opt.get("compress_prompt")
    if cp is None:
        return None
    question = None
    if isinstance(cp, dict):
        if set(cp) - {"rate", "question"}:
            raise OptionError("'leanlm.compress_prompt' takes 'rate' and 'question'")
        rate, question = cp.get("rate"), cp.get("question")
        if question is not None and not isinstance(question, str):
            raise OptionError("'leanlm.compress_prompt.question' must be a string")
    else:
        rate = cp
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
        raise OptionError("'leanlm.compress_prompt' rate must be a number in (0, 1] (fraction of tokens kept)")
    return {"rate": float(rate), "question": question}


def _compress(text: str, opt: dict, model, tok) -> tuple[str, int]:
    from leanlm.data.prompt_compress import compress_prompt

    question, context = opt["question"], text
    if question is None:
        m = _QUESTION.search(text)
        if m:
            question, context = m.group(1), text[: m.start()]
    if not context.strip():
        return text, 0
    try:
        res = compress_prompt(context, question, opt["rate"], model, tok)
    except LeanLMError as e:
        raise OptionError(str(e)) from None
    out = res["compressed_prompt"]
    if question is not None and opt["question"] is None:
        out = out + "\n\n" + question
    before = len(tok.encode(text, add_special=False))
    return out, before - len(tok.encode(out, add_special=False))


def apply(body: dict, chat: bool, model, tok) -> tuple[dict, int]:
    """A copy of the request with its prompt compressed, and the prompt tokens saved (0 without the option)."""
    opt = parse(body)
    if opt is None:
        return body, 0
    body = dict(body)
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list):
            return body, 0  # the usual validation reports it
        users = [i for i, m in enumerate(msgs) if isinstance(m, dict) and m.get("role") == "user"]
        if not users:
            raise OptionError("'leanlm.compress_prompt' needs a user message to compress")
        i = users[-1]
        content = msgs[i].get("content")
        if isinstance(content, list) and all(isinstance(c, dict) and isinstance(c.get("text"), str) for c in content):
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            return body, 0
        new, saved = _compress(content, opt, model, tok)
        body["messages"] = msgs[:i] + [{**msgs[i], "content": new}] + msgs[i + 1:]
        return body, saved
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        body["prompt"], saved = _compress(prompt, opt, model, tok)
        return body, saved
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        out = [_compress(p, opt, model, tok) for p in prompt]
        body["prompt"] = [o[0] for o in out]
        return body, sum(o[1] for o in out)
    raise OptionError("'leanlm.compress_prompt' needs a text prompt (a string or a list of strings), not token ids")
