"""OpenAI-compatible HTTP API over the engine (FastAPI).

Text lives here, not in the engine: prompts are tokenized, chat templates applied, output ids
detokenized incrementally and stop strings matched on text. Malformed requests get a 4xx with an
OpenAI-style error object; a client that disconnects aborts its requests, which frees their blocks.
"""

import asyncio
import json
import time
import uuid

from leanlm.errors import LeanLMError
from leanlm.infer.engine import SamplingParams, StepOutput
from leanlm.serve.engine_loop import AsyncEngine


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- request validation -----------------------------------------------------------------------
def _get(body: dict, name: str, kinds, default=None, lo=None, hi=None):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise APIError(400, f"'{name}' must be {_kind_name(kinds)}, got a boolean", name)
    if not isinstance(v, kinds):
        raise APIError(400, f"'{name}' must be {_kind_name(kinds)}, got {type(v).__name__}", name)
    if lo is not None and v < lo or hi is not None and v > hi:
        raise APIError(400, f"'{name}' must be between {lo} and {hi}, got {v}", name)
    return v


def _kind_name(kinds) -> str:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return " or ".join({int: "an integer", float: "a number", str: "a string", bool: "a boolean",
                        list: "a list", dict: "an object"}[k] for k in kinds)


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "'stop' must be a non-empty string or a list of them", "stop")
    return stop


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

    def feed(self, o: StepOutput) -> str:
        """Take one engine output; return the new text that is safe to send."""
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


class Server:
    """Request handling, independent of the web framework (build_app wires it into FastAPI)."""

    def __init__(self, aengine: AsyncEngine, tokenizer, model_name: str):
        self.aengine, self.tok, self.model_name = aengine, tokenizer, model_name
        eng = aengine.engine
        self.max_model_len = eng.max_model_len
        self.capacity = eng.cache.num_blocks * eng.block_size
        self.created = int(time.time())
        self.http = {}  # (path, status) -> count
        self.stream_aborts = 0

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "leanlm"}]}

    def metrics(self) -> str:
        eng = self.aengine.engine
        s = eng.stats
        alloc = eng.cache.alloc
        lines, seen = [], set()

        def metric(name, kind, help_, value, labels=""):
            if name not in seen:
                seen.add(name)
                lines.extend([f"# HELP leanlm_{name} {help_}", f"# TYPE leanlm_{name} {kind}"])
            lines.append(f"leanlm_{name}{labels} {value}")
        metric("requests_running", "gauge", "Requests being decoded.", len(eng.running))
        metric("requests_waiting", "gauge", "Requests queued for a slot.", len(eng.waiting))
        metric("requests_finished_total", "counter", "Requests finished or aborted.", s["requests_finished"])
        metric("prompt_tokens_total", "counter", "Prompt tokens of started requests.", s["prompt_tokens"])
        metric("generation_tokens_total", "counter", "Generated tokens.", s["generation_tokens"])
        metric("prefix_cache_hit_tokens_total", "counter", "Prompt tokens served from the prefix cache.",
               s["prefix_hit_tokens"])
        metric("preemptions_total", "counter", "Sequences preempted (recomputed later).", s["preemptions"])
        metric("engine_steps_total", "counter", "Engine forward steps.", s["steps"])
        metric("kv_blocks_total", "gauge", "KV cache blocks.", alloc.num_blocks)
        metric("kv_blocks_free", "gauge", "KV blocks free or holding evictable prefix-cache content.",
               alloc.num_available())
        metric("engine_step_errors_total", "counter", "Engine steps that raised.", self.aengine.step_errors)
        metric("stream_disconnects_total", "counter", "Requests aborted because the client went away.",
               self.stream_aborts)
        for (path, status), n in sorted(self.http.items()):
            metric("http_requests_total", "counter", "HTTP requests by path and status.", n,
                   f'{{path="{path}",status="{status}"}}')
        return "\n".join(lines) + "\n"

    # ---- shared request parsing ---------------------------------------------------------------
    def _common(self, body: dict, prompt_len: int, default_max: int | None) -> tuple[SamplingParams, int, list[str]]:
        model = body.get("model")
        if not isinstance(model, str):
            raise APIError(400, "'model' is required (a string); see GET /v1/models", "model")
        if model != self.model_name:
            raise APIError(404, f"model '{model}' does not exist; this server serves '{self.model_name}'",
                           "model", "model_not_found")
        room = min(self.max_model_len, self.capacity) - prompt_len
        if room <= 0:
            raise APIError(400, f"the prompt has {prompt_len} tokens; this model's context holds "
                                f"{self.max_model_len} (KV cache {self.capacity}); shorten the prompt",
                           "messages" if "messages" in body else "prompt", "context_length_exceeded")
        max_tokens = _get(body, "max_tokens", int, None, lo=1)
        if "max_completion_tokens" in body:
            max_tokens = _get(body, "max_completion_tokens", int, None, lo=1)
        if max_tokens is None:
            max_tokens = min(default_max or room, room)
        if max_tokens > room:
            raise APIError(400, f"max_tokens={max_tokens} is too large: the prompt has {prompt_len} tokens and "
                                f"the context holds {min(self.max_model_len, self.capacity)}; use at most {room}",
                           "max_tokens")
        n = _get(body, "n", int, 1, lo=1, hi=16)
        for name in ("presence_penalty", "frequency_penalty"):
            if _get(body, name, (int, float), 0) != 0:
                raise APIError(400, f"'{name}' is not supported; leave it at 0 (use 'repetition_penalty')", name)
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=float(_get(body, "temperature", (int, float), 1.0, lo=0, hi=2)),
            top_p=float(_get(body, "top_p", (int, float), 1.0, lo=1e-6, hi=1)),
            top_k=_get(body, "top_k", int, 0, lo=-1),  # -1: off, as vLLM
            seed=_get(body, "seed", int, None),
            ignore_eos=_get(body, "ignore_eos", bool, False),
            repetition_penalty=float(_get(body, "repetition_penalty", (int, float), 1.0, lo=0.01, hi=10)),
        )
        if params.top_k == -1:
            params.top_k = 0
        return params, n, _stops(body)

    def _prompt_ids(self, prompt) -> list[list[int]]:
        """OpenAI prompt forms: a string, a list of strings, a list of ids, a list of id lists."""
        V = self.aengine.engine.cfg.vocab_size

        def ids_ok(x):
            return isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < V
                                                      for t in x)
        if isinstance(prompt, str):
            prompts = [self.tok.encode(prompt)]
        elif ids_ok(prompt):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = [self.tok.encode(p) for p in prompt]
        elif isinstance(prompt, list) and prompt and all(ids_ok(p) for p in prompt):
            prompts = prompt
        else:
            raise APIError(400, f"'prompt' must be a string, a list of strings, or token ids in [0, {V}) "
                                "(a list or a list of lists)", "prompt")
        if any(len(p) == 0 for p in prompts):
            raise APIError(400, "'prompt' is empty", "prompt")
        return prompts

    def _chat_ids(self, body: dict) -> list[int]:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
        clean = []
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise APIError(400, "each message needs a 'role' string and a 'content'", "messages")
            content = m.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}]
                if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                           for c in content):
                    raise APIError(400, "only text content parts are supported", "messages")
                content = "".join(c["text"] for c in content)
            if not isinstance(content, str):
                raise APIError(400, "message 'content' must be a string or a list of text parts", "messages")
            clean.append({"role": m["role"], "content": content})
        try:
            ids = self.tok.encode_chat(clean)
        except LeanLMError as e:
            raise APIError(400, str(e), "messages")
        except Exception as e:  # a template that raises on these messages (e.g. roles out of order)
            raise APIError(400, f"the chat template rejected these messages: {e}", "messages")
        if not ids:
            raise APIError(400, "the chat template produced an empty prompt", "messages")
        return ids

    # ---- endpoints ----------------------------------------------------------------------------
    def prepare(self, body: dict, chat: bool):
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        if chat:
            prompts = [self._chat_ids(body)]
            if body.get("logprobs") not in (None, True, False):
                raise APIError(400, "'logprobs' must be a boolean for chat completions", "logprobs")
            top = _get(body, "top_logprobs", int, None, lo=0, hi=20)
            logprobs = (top or 0) if body.get("logprobs") else None
        else:
            prompts = self._prompt_ids(body.get("prompt"))
            logprobs = _get(body, "logprobs", int, None, lo=0, hi=20)
            if body.get("echo"):
                raise APIError(400, "'echo' is not supported", "echo")
            if body.get("suffix"):
                raise APIError(400, "'suffix' is not supported", "suffix")
        default_max = None if chat else 16
        params, n, stops = self._common(body, max(len(p) for p in prompts), default_max)
        params.logprobs = logprobs
        stream = _get(body, "stream", bool, False)
        opts = _get(body, "stream_options", dict, {})
        include_usage = bool(opts.get("include_usage")) and stream
        return prompts, params, n, stops, stream, include_usage

    def launch(self, prompts, params: SamplingParams, n: int, stops: list[str]):
        sink: asyncio.Queue = asyncio.Queue()
        choices: dict[str, Choice] = {}
        for pi, p in enumerate(prompts):
            for j in range(n):
                sp = SamplingParams(**vars(params))
                if sp.seed is not None:
                    sp.seed = sp.seed + j
                c = Choice(pi * n + j, self.tok, stops)
                try:
                    c.rid = self.aengine.add(p, sp, sink)
                except LeanLMError as e:
                    for c2 in choices.values():
                        self.aengine.abort(c2.rid)
                    raise APIError(503, str(e), type_="server_error")
                choices[c.rid] = c
        return sink, choices

    async def events(self, sink, choices):
        """Yield (choice, delta) as outputs arrive, until every choice is done."""
        left = len(choices)
        while left:
            item = await sink.get()
            if isinstance(item, LeanLMError):
                raise APIError(400, str(item))
            c = choices[item.request_id]
            if c.done:
                continue
            delta = c.feed(item)
            n_lp = len(c.logprobs)
            if c.done:
                left -= 1
                if not item.finished:  # a stop string matched before the engine stopped
                    self.aengine.abort(c.rid)
            yield c, delta, n_lp

    def abort_unfinished(self, choices) -> int:
        k = 0
        for c in choices.values():
            if not c.done:
                self.aengine.abort(c.rid)
                k += 1
        return k


def usage(prompts, n, choices, saved: int | None = None) -> dict:
    p = sum(len(x) for x in prompts)  # as OpenAI: the prompt counts once, whatever n
    c = sum(len(ch.ids) for ch in choices.values())
    out = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
    if saved is not None:  # the request asked for leanlm.compress_prompt
        out["prompt_tokens_saved"] = saved
    return out


async def compress_request(srv, body, chat: bool):
    """The request with its prompt compressed when it asks (leanlm.serve.prompt_option), and the
    prompt tokens saved (None when it does not ask). Runs in a worker thread: it scores with the model."""
    from leanlm.serve import prompt_option

    if not isinstance(body, dict) or body.get("leanlm") is None:
        return body, None
    try:
        return await asyncio.to_thread(prompt_option.apply, body, chat, srv.aengine.engine.model, srv.tok)
    except prompt_option.OptionError as e:
        raise APIError(400, str(e), "leanlm")


def build_app(aengine: AsyncEngine, tokenizer, model_name: str, api_key: str | None = None):
    """The FastAPI application: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    srv = Server(aengine, tokenizer, model_name)
    app = FastAPI(title="leanlm", docs_url=None, redoc_url=None)
    app.state.server = srv

    def err(e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    paths = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")

    class AuthAndCount:
        """Pure ASGI middleware (BaseHTTPMiddleware would hide client disconnects from handlers)."""

        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.inner(scope, receive, send)
            path = scope["path"]
            key = path if path in paths else "other"
            if api_key and path.startswith("/v1/"):
                auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
                if auth != f"Bearer {api_key}":
                    srv.http[(key, 401)] = srv.http.get((key, 401), 0) + 1
                    resp = err(APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                                        code="invalid_api_key", type_="authentication_error"))
                    return await resp(scope, receive, send)
            status = {}

            async def send_counted(msg):
                if msg["type"] == "http.response.start":
                    status["code"] = msg["status"]
                await send(msg)
            try:
                await self.inner(scope, receive, send_counted)
            finally:
                code = status.get("code", 500)
                srv.http[(key, code)] = srv.http.get((key, code), 0) + 1

    app.add_middleware(AuthAndCount)

    @app.exception_handler(APIError)
    async def on_api_error(request, e: APIError):
        return err(e)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request, e):
        return err(APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None))

    @app.exception_handler(RequestValidationError)
    async def on_validation(request, e):
        return err(APIError(400, f"invalid request: {e.errors()[:1]}"))

    @app.get("/health")
    async def health():
        if not aengine.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(srv.metrics(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return srv.models()

    async def read_body(request: Request):
        raw = await request.body()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})")

    async def handle(request: Request, chat: bool):
        body, saved = await compress_request(srv, await read_body(request), chat)
        prompts, params, n, stops, stream, include_usage = srv.prepare(body, chat)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        sink, choices = srv.launch(prompts, params, n, stops)
        if not stream:
            async def watch():  # Starlette does not cancel a plain handler when its client leaves
                while not await request.is_disconnected():
                    await asyncio.sleep(0.2)
                srv.stream_aborts += bool(srv.abort_unfinished(choices))
            watcher = asyncio.create_task(watch())
            try:
                async for _ in srv.events(sink, choices):
                    pass
            finally:  # cancelled or failed: free the blocks
                watcher.cancel()
                srv.stream_aborts += bool(srv.abort_unfinished(choices))
            out = []
            for c in sorted(choices.values(), key=lambda c: c.index):
                entries = c.logprobs if params.logprobs is not None else None
                if chat:
                    out.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                                "logprobs": c.chat_logprobs(entries) if entries is not None else None,
                                "finish_reason": c.finish_reason})
                else:
                    out.append({"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
                                "logprobs": c.completion_logprobs(entries) if entries is not None else None})
            return {"id": rid, "object": obj, "created": created, "model": model_name, "choices": out,
                    "usage": usage(prompts, n, choices, saved)}

        async def sse():
            chunk_obj = "chat.completion.chunk" if chat else "text_completion"

            def chunk(choices_, **extra):
                return "data: " + json.dumps({"id": rid, "object": chunk_obj, "created": created,
                                              "model": model_name, "choices": choices_, **extra}) + "\n\n"
            try:
                if chat:
                    for c in sorted(choices.values(), key=lambda c: c.index):
                        yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                      "logprobs": None, "finish_reason": None}])
                sent_lp = {c.rid: 0 for c in choices.values()}
                async for c, delta, n_lp in srv.events(sink, choices):
                    lp = None
                    if params.logprobs is not None:
                        new = c.logprobs[sent_lp[c.rid]:n_lp]
                        sent_lp[c.rid] = n_lp
                        if new:
                            lp = c.chat_logprobs(new) if chat else c.completion_logprobs(new)
                    if not delta and not c.done and lp is None:
                        continue
                    if chat:
                        d = {"content": delta} if delta else {}
                        yield chunk([{"index": c.index, "delta": d, "logprobs": lp,
                                      "finish_reason": c.finish_reason}])
                    else:
                        yield chunk([{"index": c.index, "text": delta, "logprobs": lp,
                                      "finish_reason": c.finish_reason}])
                if include_usage:
                    yield chunk([], usage=usage(prompts, n, choices, saved))
                yield "data: [DONE]\n\n"
            except APIError as e:
                yield "data: " + json.dumps(e.body()) + "\n\n"
            finally:  # also runs when the client disconnects and the response is cancelled
                srv.stream_aborts += bool(srv.abort_unfinished(choices))

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    return app
