"""OpenAI-compatible HTTP API over the engine (FastAPI).

Text lives here, not in the engine: prompts are tokenized, chat templates applied, output ids
detokenized incrementally and stop strings matched on text (leanlm/serve/text.py). Request bodies are
pydantic models with ranges (leanlm/serve/schema.py), so /openapi.json says what is accepted. Every
error is an OpenAI error object: 4xx for the request, 429 with Retry-After when the server is full,
408 past the request timeout, 500 when the engine failed on this request, 503 while shutting down.
A client that disconnects aborts its requests, which frees their blocks.
"""

import asyncio
import json
import time
import uuid
from dataclasses import dataclass

from leanlm.errors import LeanLMError
from leanlm.infer.engine import SamplingParams
from leanlm.infer.engine_spec import SpecParams
from leanlm.serve import schema
from leanlm.serve.engine_loop import AsyncEngine, Overloaded, ShuttingDown
from leanlm.serve.text import Choice, usage


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_HINTS = {
    "prompt": "'prompt' must be a non-empty string, a list of strings, or token ids in [0, {V}) "
              "(a list or a list of lists), at most {P} prompts",
    "stop": "'stop' must be a non-empty string or a list of 1 to 16 of them (at most 256 characters each)",
    "messages": "'messages' must be a non-empty list of {{role, content}} objects (roles system, developer, "
                "user, assistant; content a string or a list of text parts)",
}


def validation_error(errors: list, vocab: int, max_prompts: int) -> APIError:
    """One clear 400 from pydantic's errors: which field, what is wrong."""
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    field = loc[0] if loc else None
    if e.get("type") == "extra_forbidden" and len(loc) == 1:
        if field in schema.UNSUPPORTED:
            return APIError(400, f"'{field}' is not supported by this server; remove it", field, "unsupported_field")
        return APIError(400, f"unknown field '{field}'", field, "unknown_field")
    if e.get("type") == "extra_forbidden":
        return APIError(400, f"'{'.'.join(loc)}' is not supported in a request", field, "unsupported_field")
    if e.get("type") == "json_invalid" or field is None and e.get("type") in ("model_attributes_type", "dict_type"):
        return APIError(400, f"the request body must be a JSON object ({e.get('msg')})")
    if field in schema.ONLY_DEFAULT:
        return APIError(400, schema.ONLY_DEFAULT[field], field, "unsupported_value")
    if field in _HINTS and (len(errors) > 1 or e.get("type") == "missing" and field == "messages"):
        return APIError(400, _HINTS[field].format(V=vocab, P=max_prompts), field)
    if e.get("type") == "missing":
        return APIError(400, f"'{field}' is required", field)
    where = ".".join(loc) or "body"
    return APIError(400, f"'{where}': {e.get('msg')}", field)


@dataclass
class Prepared:
    prompts: list[list[int]]
    params: SamplingParams
    n: int
    stops: list[str]
    stream: bool
    include_usage: bool
    adapter: int  # 0: the base model; else a LoRA adapter's index in the engine's pool


class Server:
    """Request handling, independent of the web framework (build_app wires it into FastAPI)."""

    def __init__(self, aengine: AsyncEngine, tokenizer, model_name: str, *, request_timeout: float = 600.0,
                 max_choices: int = 64, max_prompts: int = 64):
        self.aengine, self.tok, self.model_name = aengine, tokenizer, model_name
        eng = aengine.engine
        self.max_model_len = eng.max_model_len - eng.num_virtual
        self.capacity = eng.cache.num_blocks * eng.block_size - eng.num_virtual
        self.vocab = eng.cfg.vocab_size
        self.request_timeout, self.max_choices, self.max_prompts = request_timeout, max_choices, max_prompts
        self.CompletionRequest, self.ChatCompletionRequest = schema.request_models(
            self.vocab, eng.max_model_len, max_prompts, model_name)
        self.created = int(time.time())
        self.http = {}  # (path, status) -> count
        self.stream_aborts = 0
        self.timeouts = 0
        self.loras = None  # leanlm.serve.lora.LoraRegistry when the server serves LoRA adapters by name

    def models(self) -> dict:
        data = [{"id": self.model_name, "object": "model", "created": self.created, "owned_by": "leanlm",
                 "root": self.model_name, "parent": None}]
        if self.loras is not None:
            data += [{"id": name, "object": "model", "created": a.created, "owned_by": "leanlm", "root": a.path,
                      "parent": self.model_name} for name, a in self.loras.adapters.items()]
        return {"object": "list", "data": data}

    def resolve_model(self, model: str) -> int:
        if model == self.model_name:
            return 0
        if self.loras is not None and model in self.loras.adapters:
            return self.loras.adapters[model].index
        names = [self.model_name] + (list(self.loras.adapters) if self.loras is not None else [])
        raise APIError(404, f"model '{model}' does not exist; this server serves {', '.join(map(repr, names))} "
                            "(GET /v1/models)", "model", "model_not_found")

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
        metric("requests_pending", "gauge", "Requests accepted and not finished (queued, running, in "
                                            "transit).", self.aengine.num_pending)
        metric("requests_finished_total", "counter", "Requests finished or aborted.", s["requests_finished"])
        metric("prompt_tokens_total", "counter", "Prompt tokens of started requests.", s["prompt_tokens"])
        metric("generation_tokens_total", "counter", "Generated tokens.", s["generation_tokens"])
        metric("prefix_cache_hit_tokens_total", "counter", "Prompt tokens served from the prefix cache.",
               s["prefix_hit_tokens"])
        metric("preemptions_total", "counter", "Sequences preempted (recomputed later).", s["preemptions"])
        metric("draft_tokens_proposed_total", "counter", "Speculative draft tokens checked by the model.",
               s["draft_proposed"])
        metric("draft_tokens_accepted_total", "counter", "Speculative draft tokens accepted.", s["draft_accepted"])
        metric("engine_steps_total", "counter", "Engine forward steps.", s["steps"])
        metric("kv_blocks_total", "gauge", "KV cache blocks.", alloc.num_blocks)
        metric("kv_blocks_free", "gauge", "KV blocks free or holding evictable prefix-cache content.",
               alloc.num_available())
        metric("engine_step_errors_total", "counter", "Engine steps that raised.", self.aengine.step_errors)
        metric("engine_restarts_total", "counter", "Engine threads restarted after dying.", self.aengine.restarts)
        metric("requests_rejected_total", "counter", "Requests refused with 429 (server full).",
               self.aengine.rejected)
        metric("request_timeouts_total", "counter", "Requests ended by the request timeout.", self.timeouts)
        metric("stream_disconnects_total", "counter", "Requests aborted because the client went away.",
               self.stream_aborts)
        for (path, status), n in sorted(self.http.items()):
            metric("http_requests_total", "counter", "HTTP requests by path and status.", n,
                   f'{{path="{path}",status="{status}"}}')
        return "\n".join(lines) + "\n"

    # ---- request parsing (types and ranges are already checked by the schema) -----------------------
    def _prompt_ids(self, prompt) -> list[list[int]]:
        """OpenAI prompt forms: a string, a list of strings, a list of ids, a list of id lists."""
        if isinstance(prompt, str):
            prompts = [self.tok.encode(prompt)]
        elif isinstance(prompt[0], int):
            prompts = [prompt]
        elif isinstance(prompt[0], str):
            prompts = [self.tok.encode(p) for p in prompt]
        else:
            prompts = prompt
        if any(len(p) == 0 for p in prompts):
            raise APIError(400, "'prompt' encodes to no tokens", "prompt")
        return prompts

    def _chat_ids(self, req) -> list[int]:
        clean = []
        for m in req.messages:
            content = m.content if isinstance(m.content, str) else "".join(c.text for c in m.content)
            clean.append({"role": m.role, "content": content})
        try:
            ids = self.tok.encode_chat(clean)
        except LeanLMError as e:
            raise APIError(400, str(e), "messages")
        except Exception as e:  # a template that raises on these messages (e.g. roles out of order)
            raise APIError(400, f"the chat template rejected these messages: {e}", "messages")
        if not ids:
            raise APIError(400, "the chat template produced an empty prompt", "messages")
        return ids

    def prepare(self, req, chat: bool) -> Prepared:
        adapter = self.resolve_model(req.model)
        if chat:
            prompts = [self._chat_ids(req)]
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
            max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        else:
            prompts = self._prompt_ids(req.prompt)
            logprobs, max_tokens = req.logprobs, req.max_tokens
        if len(prompts) * req.n > self.max_choices:
            raise APIError(400, f"{len(prompts)} prompts x n={req.n} is {len(prompts) * req.n} choices; this server "
                                f"takes at most {self.max_choices} per request", "n")
        prompt_len = max(len(p) for p in prompts)
        limit = min(self.max_model_len, self.capacity)
        room = limit - prompt_len
        if room <= 0:
            raise APIError(400, f"the prompt has {prompt_len} tokens; this model's context holds "
                                f"{self.max_model_len} (KV cache {self.capacity}); shorten the prompt",
                           "messages" if chat else "prompt", "context_length_exceeded")
        if max_tokens is None:
            max_tokens = room if chat else min(16, room)
        if max_tokens > room:
            raise APIError(400, f"max_tokens={max_tokens} is too large: the prompt has {prompt_len} tokens and "
                                f"the context holds {limit}; use at most {room}", "max_tokens")
        params = SamplingParams(max_tokens=max_tokens, temperature=float(req.temperature), top_p=float(req.top_p),
                                top_k=max(req.top_k, 0), seed=req.seed, ignore_eos=req.ignore_eos,
                                repetition_penalty=float(req.repetition_penalty), logprobs=logprobs)
        if req.speculative is not None:
            s = req.speculative
            params.speculative = SpecParams(s.method, s.k, s.k_max, s.adaptive)
            eng = self.aengine.engine
            try:
                eng.spec.check(params, eng.num_virtual)  # reads only what the engine was built with
            except LeanLMError as e:
                raise APIError(400, str(e).removeprefix("engine: "), "speculative")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        include_usage = bool(req.stream_options and req.stream_options.include_usage) and req.stream
        return Prepared(prompts, params, req.n, stops, req.stream, include_usage, adapter)

    def launch(self, job: Prepared):
        sink: asyncio.Queue = asyncio.Queue()
        items, choices = [], []
        for pi, p in enumerate(job.prompts):
            for j in range(job.n):
                sp = SamplingParams(**vars(job.params))
                if sp.seed is not None:
                    sp.seed = (sp.seed + j) % (schema.SEED_MAX + 1)
                items.append((p, sp))
                choices.append(Choice(pi * job.n + j, self.tok, job.stops))
        try:
            rids = self.aengine.add_many(items, sink, job.adapter)
        except Overloaded as e:
            raise APIError(429, str(e), code="overloaded", type_="rate_limit_error",
                           headers={"Retry-After": str(e.retry_after)})
        except ShuttingDown as e:
            raise APIError(503, str(e), code="shutting_down", type_="server_error")
        for c, rid in zip(choices, rids):
            c.rid = rid
        return sink, {c.rid: c for c in choices}

    async def events(self, sink, choices, deadline: float):
        """Yield (choice, delta, n_logprobs) as outputs arrive, until every choice is done."""
        left = len(choices)
        loop = asyncio.get_running_loop()
        while left:
            try:
                item = await asyncio.wait_for(sink.get(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                self.timeouts += 1
                raise APIError(408, f"the request did not finish within the server's {self.request_timeout:g} s "
                                    "timeout; lower max_tokens", code="timeout", type_="timeout_error")
            if isinstance(item, LeanLMError):
                raise APIError(400, str(item))
            if item.finish_reason == "error":
                raise APIError(500, item.error or "the engine failed on this request", code="engine_error",
                               type_="server_error")
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


async def compress_request(srv, req, chat: bool):
    """The request with its prompt compressed when it asks (`"leanlm": {"compress_prompt": ...}`,
    leanlm.serve.prompt_option), and the prompt tokens saved (None when it does not ask). Runs in a
    worker thread: it scores with the model."""
    from leanlm.serve import prompt_option

    if req.leanlm is None:
        return req, None
    try:
        body, saved = await asyncio.to_thread(prompt_option.apply, req.model_dump(), chat,
                                              srv.aengine.engine.model, srv.tok)
    except prompt_option.OptionError as e:
        raise APIError(400, str(e), "leanlm")
    return type(req).model_validate_json(json.dumps(body)), saved  # strict JSON-mode validation again


def build_app(aengine: AsyncEngine, tokenizer, model_name: str, api_key: str | None = None, *,
              max_body_bytes: int = 4 << 20, request_timeout: float = 600.0, max_choices: int = 64,
              loras=None):
    """The FastAPI application: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics, and with
    `loras` (a leanlm.serve.lora.LoraRegistry) /v1/load_lora_adapter and /v1/unload_lora_adapter."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    srv = Server(aengine, tokenizer, model_name, request_timeout=request_timeout, max_choices=max_choices)
    srv.loras = loras
    app = FastAPI(title="leanlm", summary="OpenAI-compatible completions over leanlm's engine",
                  docs_url=None, redoc_url=None)
    app.state.server = srv

    def err(e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    paths = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics",
             "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/openapi.json"}

    class Guard:
        """Pure ASGI middleware (BaseHTTPMiddleware would hide client disconnects from handlers): API key,
        body size limit (the body is read here, then replayed), per-path status counts."""

        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.inner(scope, receive, send)
            path = scope["path"]
            key = path if path in paths else "other"
            status = {}

            async def send_counted(msg):
                if msg["type"] == "http.response.start":
                    status["code"] = msg["status"]
                await send(msg)
            try:
                early = None
                headers = dict(scope["headers"])
                if api_key and path.startswith("/v1/"):
                    if headers.get(b"authorization", b"").decode("latin-1") != f"Bearer {api_key}":
                        early = APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                                         code="invalid_api_key", type_="authentication_error")
                too_big = APIError(413, f"the request body is larger than {max_body_bytes} bytes",
                                   code="body_too_large")
                try:
                    declared = int(headers.get(b"content-length", b"0"))
                except ValueError:
                    declared = 0
                if early is None and declared > max_body_bytes:
                    early = too_big
                if early is None and scope["method"] in ("POST", "PUT", "PATCH"):
                    chunks, size, more = [], 0, True
                    while more:
                        msg = await receive()
                        if msg["type"] != "http.request":
                            return  # the client left before sending its body
                        chunks.append(msg.get("body", b""))
                        size += len(chunks[-1])
                        more = msg.get("more_body", False)
                        if size > max_body_bytes:
                            early = too_big
                            break
                    if early is None:
                        body, sent, inner_receive = b"".join(chunks), [False], receive

                        async def replay():
                            if not sent[0]:
                                sent[0] = True
                                return {"type": "http.request", "body": body, "more_body": False}
                            return await inner_receive()  # then: http.disconnect when the client leaves
                        receive = replay
                if early is not None:
                    return await err(early)(scope, receive, send_counted)
                await self.inner(scope, receive, send_counted)
            finally:
                code = status.get("code", 500)
                srv.http[(key, code)] = srv.http.get((key, code), 0) + 1

    app.add_middleware(Guard)

    @app.exception_handler(APIError)
    async def on_api_error(request, e: APIError):
        return err(e)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request, e):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return err(APIError(e.status_code, str(e.detail), code=code))

    @app.exception_handler(RequestValidationError)
    async def on_validation(request, e):
        return err(validation_error(e.errors(), srv.vocab, srv.max_prompts))

    @app.exception_handler(Exception)
    async def on_crash(request, e):  # a bug: still an OpenAI error object, and the server goes on
        return err(APIError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error",
                            type_="server_error"))

    errors = schema.error_responses
    stream_doc = {"description": "with stream=false: the JSON body below; with stream=true: server-sent "
                                 "events (data: {chunk}, an error object if the request fails, data: [DONE])",
                  "content": {"text/event-stream": {}}}

    @app.get("/health", response_model=schema.Health, responses={503: {"model": schema.Health}})
    async def health():
        if not aengine.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        if aengine.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(srv.metrics(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", response_model=schema.ModelList, responses=errors(401))
    async def models():
        return srv.models()

    async def handle(request: Request, req, chat: bool):
        req, saved = await compress_request(srv, req, chat)
        job = srv.prepare(req, chat)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        sink, choices = srv.launch(job)
        deadline = asyncio.get_running_loop().time() + srv.request_timeout
        lp_on = job.params.logprobs is not None
        if not job.stream:
            async def watch():  # Starlette does not cancel a plain handler when its client leaves
                while not await request.is_disconnected():
                    await asyncio.sleep(0.2)
                srv.stream_aborts += bool(srv.abort_unfinished(choices))
            watcher = asyncio.create_task(watch())
            try:
                async for _ in srv.events(sink, choices, deadline):
                    pass
            finally:  # cancelled or failed: free the blocks
                watcher.cancel()
                srv.abort_unfinished(choices)
            out = []
            for c in sorted(choices.values(), key=lambda c: c.index):
                entries = c.logprobs if lp_on else None
                if chat:
                    out.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                                "logprobs": c.chat_logprobs(entries) if entries is not None else None,
                                "finish_reason": c.finish_reason})
                else:
                    out.append({"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
                                "logprobs": c.completion_logprobs(entries) if entries is not None else None})
            return {"id": rid, "object": obj, "created": created, "model": req.model, "choices": out,
                    "usage": usage(job.prompts, job.n, choices, saved, job.params.speculative)}

        async def sse():
            chunk_obj = "chat.completion.chunk" if chat else "text_completion"

            def chunk(choices_, **extra):
                return "data: " + json.dumps({"id": rid, "object": chunk_obj, "created": created,
                                              "model": req.model, "choices": choices_, **extra}) + "\n\n"
            try:
                if chat:
                    for c in sorted(choices.values(), key=lambda c: c.index):
                        yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                      "logprobs": None, "finish_reason": None}])
                sent_lp = {c.rid: 0 for c in choices.values()}
                async for c, delta, n_lp in srv.events(sink, choices, deadline):
                    lp = None
                    if lp_on:
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
                if job.include_usage:
                    yield chunk([], usage=usage(job.prompts, job.n, choices, saved, job.params.speculative))
                yield "data: [DONE]\n\n"
            except APIError as e:  # the status line is sent: the error goes in the stream
                yield "data: " + json.dumps(e.body()) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:  # also runs when the client disconnects and the response is cancelled
                srv.stream_aborts += bool(srv.abort_unfinished(choices))

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    CompletionRequest, ChatCompletionRequest = srv.CompletionRequest, srv.ChatCompletionRequest
    api_errors = errors(400, 401, 404, 408, 413, 429, 500, 503)

    @app.post("/v1/completions", response_model=schema.Completion, responses={200: stream_doc, **api_errors})
    async def completions(req: CompletionRequest, request: Request):
        return await handle(request, req, chat=False)

    @app.post("/v1/chat/completions", response_model=schema.ChatCompletion,
              responses={200: stream_doc, **api_errors})
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        return await handle(request, req, chat=True)

    if loras is not None:
        from leanlm.serve.lora import add_routes

        add_routes(app, srv, loras, APIError)

    def openapi():  # validation errors answer 400 with the error object, never FastAPI's 422
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            s = get_openapi(title=app.title, version="1", summary=app.summary, routes=app.routes)
            for item in s.get("paths", {}).values():
                for op in item.values():
                    op.get("responses", {}).pop("422", None)
            comps = s.setdefault("components", {}).setdefault("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                comps.pop(name, None)
            # FastAPI's OpenAPI models hold bounds as floats (2^63-1 would become 2^63): take the request
            # bodies' schemas from pydantic itself, exact
            for cls in (CompletionRequest, ChatCompletionRequest, schema.LoadLoraRequest, schema.UnloadLoraRequest):
                js = cls.model_json_schema(ref_template="#/components/schemas/{model}")
                for k, v in js.pop("$defs", {}).items():
                    comps[k] = v
                if cls.__name__ in comps:
                    comps[cls.__name__] = js
            app.openapi_schema = s
        return app.openapi_schema
    app.openapi = openapi
    return app
