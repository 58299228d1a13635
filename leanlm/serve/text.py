"""Text around the engine's token ids: one generated choice (incremental detokenization, stop strings,
logprobs in the OpenAI shapes) and the usage block."""

from leanlm.infer.engine import StepOutput


class Choice:
    """One generated sequence: incremental detokenization, stop strings, logprobs."""

    def __init__(self, index: int, tokenizer, stops: list[str]):
        self.index, self.tok, self.stops = index, tokenizer, stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.logprobs: list[tuple[int, float, list]] = []
        self.text, self.sent = "", 0
        self.finish_reason: str | None = None
        self.rid: str | None = None
        self.draft_proposed = self.draft_accepted = 0

    def feed(self, o: StepOutput) -> str:
        """Take one engine output; return the new text that is safe to send."""
        self.draft_proposed += o.draft_proposed
        self.draft_accepted += o.draft_accepted
        if o.token is not None:
            self.ids.append(o.token)
            if o.logprob is not None:
                self.logprobs.append((o.token, o.logprob, o.top_logprobs or []))
        self.text = self.tok.decode(self.ids)
        if o.finished:
            self.finish_reason = o.finish_reason
        for s in self.stops:
            i = self.text.find(s, max(0, self.sent - len(s)))
            if i >= 0:
                self.text, self.finish_reason = self.text[:i], "stop"
        safe = len(self.text)
        if self.finish_reason is None:
            safe -= self.hold
            while safe > self.sent and self.text[safe - 1] == "\ufffd":  # an unfinished UTF-8 sequence
                safe -= 1
        delta = self.text[self.sent:max(safe, self.sent)]
        self.sent = max(safe, self.sent)
        return delta

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def piece(self, t: int) -> str:
        return self.tok.decode([t], skip_special=False)

    def completion_logprobs(self, entries, offset0: int = 0) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        off = offset0
        for t, lp, top in entries:
            s = self.piece(t)
            out["tokens"].append(s)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append({self.piece(a): b for a, b in top})
            out["text_offset"].append(off)
            off += len(s)
        return out

    def chat_logprobs(self, entries) -> dict:
        def item(t, lp):
            s = self.piece(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode())}
        return {"content": [dict(item(t, lp), top_logprobs=[item(a, b) for a, b in top]) for t, lp, top in entries]}


def usage(prompts, n, choices, saved: int | None = None, speculative=None) -> dict:
    p = sum(len(x) for x in prompts)  # as OpenAI: the prompt counts once, whatever n
    c = sum(len(ch.ids) for ch in choices.values())
    out = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
    if saved is not None:  # the request asked for leanlm.compress_prompt
        out["prompt_tokens_saved"] = saved
    if speculative is not None:  # the request asked for speculative decoding: its draft tokens
        out["speculative"] = {"method": speculative.method,
                              "proposed": sum(ch.draft_proposed for ch in choices.values()),
                              "accepted": sum(ch.draft_accepted for ch in choices.values())}
    return out
