"""No request breaks the server: engine failures, a dying engine thread, overload, timeouts, bodies, SIGTERM."""
import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import httpx
import openai
import pytest

from leanlm.infer.engine import Engine
from leanlm.serve.engine_loop import Limits
from test_serve import NAME, tiny_model, tiny_tokenizer, wait_idle

H = {"Authorization": "Bearer k"}


@pytest.fixture(scope="module")
def server():
    from leanlm.serve.app import build_app
    from leanlm.serve.cli import serve_in_thread
    from leanlm.serve.engine_loop import AsyncEngine

    model, tok = tiny_model(), tiny_tokenizer()
    eng = Engine(model, block_size=4, num_blocks=128, max_batch_tokens=64, max_num_seqs=8, eos_ids=(1,))
    aeng = AsyncEngine(eng, Limits(max_pending=64, max_pending_tokens=1 << 20))
    app = build_app(aeng, tok, NAME, api_key="k", max_body_bytes=20_000, max_choices=8)
    srv, th, url = serve_in_thread(app)
    yield dict(url=url, eng=eng, aeng=aeng, srv=app.state.server,
               client=openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0))
    srv.should_exit = True
    th.join(10)
    aeng.shutdown()


def post(server, body, path="/v1/completions", **kw):
    kw = {"json": body} if not isinstance(body, bytes) else {"content": body}
    return httpx.post(server["url"] + path, headers=H, timeout=20, **kw)


def ok(server):
    r = post(server, {"model": NAME, "prompt": "w5 w6", "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert httpx.get(server["url"] + "/health").json() == {"status": "ok"}


@pytest.mark.parametrize("field,value", [("logit_bias", {"5": 10}), ("tools", []), ("response_format", {}),
                                         ("best_of", 2), ("frobnicate", 1)])
def test_unsupported_and_unknown_fields_named(server, field, value):
    r = post(server, {"model": NAME, "prompt": "w5", field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    assert field in r.json()["error"]["message"]


@pytest.mark.parametrize("body,param", [
    ({"model": NAME, "prompt": "w5", "seed": -1}, "seed"),
    ({"model": NAME, "prompt": "w5", "n": 17}, "n"),
    ({"model": NAME, "prompt": ["w5"] * 3, "n": 3}, "n"),  # 9 choices, the server takes 8
    ({"model": NAME, "prompt": "w5", "stop": ["a"] * 17}, "stop"),
    ({"model": NAME, "prompt": "w5", "top_k": 10 ** 9}, "top_k"),
    ({"model": NAME, "prompt": "w5", "temperature": True}, "temperature"),
    ({"model": NAME, "prompt": "w5", "echo": True}, "echo"),
    ({"model": NAME, "prompt": "w5", "presence_penalty": 0.5}, "presence_penalty"),
    ({"model": NAME, "prompt": [[5, 6], []]}, "prompt"),
])
def test_ranges(server, body, param):
    r = post(server, body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_body_size_limit(server):
    r = post(server, {"model": NAME, "prompt": "w5 " * 10_000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

    def chunks():  # no content-length: counted while it arrives
        for _ in range(30):
            yield b" " * 1000
    r = httpx.post(server["url"] + "/v1/completions", headers=H, content=chunks(), timeout=10)
    assert r.status_code == 413
    ok(server)


def test_step_failure_fails_only_that_step(server):
    """A step that raises: its requests get a 500 error object (an error event on a stream), later ones run."""
    eng, c = server["eng"], server["client"]
    run, calls = eng._run, []

    def flaky(batch):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated kernel failure")
        return run(batch)
    eng._run = flaky
    try:
        with pytest.raises(openai.InternalServerError) as e:
            c.completions.create(model=NAME, prompt="w7 w8", max_tokens=8, extra_body={"ignore_eos": True})
        assert "simulated kernel failure" in e.value.body["message"]
        calls.clear()
        lines = []
        with httpx.stream("POST", server["url"] + "/v1/completions", headers=H, timeout=20,
                          json={"model": NAME, "prompt": "w7", "max_tokens": 8, "stream": True}) as r:
            assert r.status_code == 200
            lines = [ln for ln in r.iter_lines() if ln.startswith("data:")]
        assert lines[-1] == "data: [DONE]" and "error" in json.loads(lines[-2][5:])
    finally:
        del eng._run
    wait_idle(eng)
    ok(server)
    assert server["aeng"].step_errors >= 2


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_engine_thread_death_restarts(server):
    """Even a BaseException that kills the loop thread: the request in flight gets an error, the next works."""
    eng, aeng = server["eng"], server["aeng"]

    class Fatal(BaseException):
        pass

    def die():
        del eng.step
        raise Fatal()
    eng.step = die
    before = aeng.restarts
    r = post(server, {"model": NAME, "prompt": "w9", "max_tokens": 4})
    assert r.status_code == 500 and "restarted" in r.json()["error"]["message"], r.text
    deadline = time.monotonic() + 30  # the watchdog answers the requests first, then counts the restart
    while aeng.restarts == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert aeng.restarts == before + 1 and aeng.alive
    ok(server)
    eng.cache.alloc.check_whole()


def test_timeout(server):
    eng, srv = server["eng"], server["srv"]
    step = eng.step

    def slow():
        time.sleep(0.02)
        return step()
    eng.step, srv.request_timeout = slow, 0.3
    try:
        r = post(server, {"model": NAME, "prompt": "w9", "max_tokens": 200, "ignore_eos": True})
        assert r.status_code == 408 and r.json()["error"]["code"] == "timeout", r.text
    finally:
        del eng.step
        srv.request_timeout = 600.0
    wait_idle(eng)


def test_overload_256_at_once(server):
    """256 requests at once: each gets an answer or a 429 with Retry-After; none lost, none hanging."""
    async def main():
        async with httpx.AsyncClient(base_url=server["url"], headers=H, timeout=60,
                                     limits=httpx.Limits(max_connections=256)) as h:
            async def one(i):
                body = {"model": NAME, "prompt": f"w{5 + i % 100} w7", "max_tokens": 4 + i % 5,
                        "stream": i % 3 == 0}
                r = await h.post("/v1/completions", json=body)
                return r.status_code, r.headers.get("retry-after"), r.text
            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(256))), 120)
    got = asyncio.run(main())
    codes = [c for c, _, _ in got]
    assert set(codes) <= {200, 429}, {c: t for c, _, t in got if c not in (200, 429)}
    assert codes.count(200) >= 64 and codes.count(429) > 0  # the limit is 64 pending
    assert all(ra == "1" for c, ra, _ in got if c == 429)
    for c, _, t in got:
        if c == 200 and t.startswith("data:"):
            assert t.rstrip().endswith("data: [DONE]")
    wait_idle(server["eng"])


def test_openapi_describes_bodies(server):
    s = httpx.get(server["url"] + "/openapi.json").json()
    body = s["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    comp = s["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    seed = comp["properties"]["seed"]["anyOf"][0]
    assert seed["minimum"] == 0 and seed["maximum"] == 2 ** 63 - 1 and comp["additionalProperties"] is False
    assert "429" in s["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "422" not in s["paths"]["/v1/completions"]["post"]["responses"]


SIGTERM_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path[:0] = [sys.argv[3], sys.argv[3] + "/tests"]
    from test_serve import tiny_model, tiny_tokenizer
    from leanlm.infer.engine import Engine
    from leanlm.serve.app import build_app
    from leanlm.serve.cli import serve
    from leanlm.serve.engine_loop import AsyncEngine

    eng = Engine(tiny_model(), block_size=4, num_blocks=128, eos_ids=(1,))
    step = eng.step
    def slow():
        time.sleep(0.01)
        return step()
    eng.step = slow
    aeng = AsyncEngine(eng)
    serve(build_app(aeng, tiny_tokenizer(), "tiny"), aeng, "127.0.0.1", int(sys.argv[1]), log_level="warning",
          drain_timeout=float(sys.argv[2]))
""")


@pytest.mark.parametrize("drain,finish", [(20.0, "length"), (0.5, "error")])
def test_sigterm_drains_then_exits(tmp_path, drain, finish):
    """SIGTERM: the stream in flight finishes (or, past the drain deadline, ends with an error event);
    new requests get 503; the process exits."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "srv.py"
    script.write_text(SIGTERM_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, str(script), str(port), str(drain), root], cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            assert proc.poll() is None, "the server process exited"
            try:
                httpx.get(url + "/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        with httpx.stream("POST", url + "/v1/completions", timeout=30,
                          json={"model": "tiny", "prompt": "w5", "max_tokens": 100, "stream": True,
                                "ignore_eos": True}) as r:
            lines = r.iter_lines()
            next(ln for ln in lines if ln.startswith("data:"))
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            with pytest.raises(httpx.HTTPError):  # closed to new connections, or refused with 503
                r2 = httpx.post(url + "/v1/completions", timeout=5, json={"model": "tiny", "prompt": "w5"})
                r2.raise_for_status()
            rest = [ln for ln in lines if ln.startswith("data:")]
        assert rest[-1] == "data: [DONE]"
        last = json.loads(rest[-2][5:])
        if finish == "length":
            assert last["choices"][0]["finish_reason"] == "length"
        else:
            assert "SIGTERM" in last["error"]["message"]
        assert proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once shut down
    finally:
        if proc.poll() is None:
            proc.kill()


def test_openai_client_every_supported_field(server):
    """The openai client, streaming and not, with every field the server implements: same seeded text."""
    c = server["client"]
    common = dict(model=NAME, max_tokens=6, temperature=0.9, top_p=0.95, n=2, seed=11, stop=["w3", "w4"],
                  presence_penalty=0, frequency_penalty=0, user="u1",
                  extra_body={"top_k": 40, "repetition_penalty": 1.1, "ignore_eos": True})
    r = c.completions.create(prompt=["w5 w6", "w7"], logprobs=2, echo=False, **common)
    assert len(r.choices) == 4 and all(len(ch.logprobs.top_logprobs[0]) == 2 for ch in r.choices if ch.text)
    texts = {}
    for ev in c.completions.create(prompt=["w5 w6", "w7"], logprobs=2, stream=True,
                                   stream_options={"include_usage": True}, **common):
        for ch in ev.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
    assert [texts[i] for i in range(4)] == [ch.text for ch in sorted(r.choices, key=lambda x: x.index)]
    msgs = [{"role": "system", "content": "w9"}, {"role": "user", "content": [{"type": "text", "text": "w5 w6"}],
                                                  "name": "me"}]
    kw = dict(common, max_tokens=None, max_completion_tokens=6)
    ch = c.chat.completions.create(messages=msgs, logprobs=True, top_logprobs=3, **kw)
    assert len(ch.choices) == 2 and ch.usage.completion_tokens > 0
    assert all(len(t.top_logprobs) == 3 for t in ch.choices[0].logprobs.content)
    streamed = {}
    for ev in c.chat.completions.create(messages=msgs, logprobs=True, top_logprobs=3, stream=True, **kw):
        for x in ev.choices:
            streamed[x.index] = streamed.get(x.index, "") + (x.delta.content or "")
    assert [streamed[i] for i in range(2)] == [x.message.content for x in sorted(ch.choices, key=lambda x: x.index)]
    wait_idle(server["eng"])


def test_disconnects_mid_stream_under_load_free_blocks(server):
    """16 concurrent streams, half dropped by their clients mid-way: the rest finish, every block comes back."""
    eng = server["eng"]

    async def main():
        async with httpx.AsyncClient(base_url=server["url"], headers=H, timeout=60) as h:
            async def one(i):
                body = {"model": NAME, "prompt": f"w{10 + i} w5", "max_tokens": 60, "stream": True,
                        "ignore_eos": True}
                async with h.stream("POST", "/v1/completions", json=body) as r:
                    n, last = 0, None
                    async for line in r.aiter_lines():
                        if line.startswith("data:"):
                            n, last = n + 1, line
                            if i % 2 and n == 3:
                                return "dropped"
                    return last
            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(16))), 120)
    before = server["srv"].stream_aborts
    got = asyncio.run(main())
    assert got.count("dropped") == 8 and got.count("data: [DONE]") == 8
    wait_idle(eng)
    assert server["srv"].stream_aborts - before == 8
