"""The OpenAI-compatible server against the official `openai` client, on 127.0.0.1, tiny random model."""
import json
import time

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from leanlm.infer.engine import Engine  # noqa: E402
from leanlm.model import ModelConfig  # noqa: E402
from leanlm.model.transformer import Transformer  # noqa: E402

V = 128
NAME = "tiny"


def tiny_model():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256))
    m = Transformer(ModelConfig.from_hf(hf.config.to_dict()))
    m.load_state_dict(hf.state_dict(), strict=False)
    return m.eval()


def tiny_tokenizer():
    from tokenizers import Tokenizer as HFTok, models, pre_tokenizers

    from leanlm.io.tokenizer import Tokenizer

    vocab = {"<unk>": 0, "<eos>": 1, "user": 2, "assistant": 3, ":": 4}
    vocab.update({f"w{i}": i for i in range(5, V)})
    tok = HFTok(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<eos>"])
    template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                "{% if add_generation_prompt %}assistant : {% endif %}")
    return Tokenizer(tok, eos_token="<eos>", chat_template=template)


@torch.inference_mode()
def greedy(model, ids, n, eos=1):
    ids, out = list(ids), []
    for _ in range(n):
        t = int(model(torch.tensor([ids]))[0, -1].argmax())
        out.append(t)
        ids.append(t)
        if t == eos:
            break
    return out


def running_server(api_key: str | None = None):
    """A tiny-model server on a free local port (a generator: yields its handles, then shuts it down)."""
    from leanlm.serve.app import build_app
    from leanlm.serve.cli import serve_in_thread
    from leanlm.serve.engine_loop import AsyncEngine

    model, tok = tiny_model(), tiny_tokenizer()
    eng = Engine(model, block_size=4, num_blocks=128, max_batch_tokens=32, max_num_seqs=8,
                 eos_ids=tuple(tok.eos_ids))
    aeng = AsyncEngine(eng)
    app = build_app(aeng, tok, NAME, api_key=api_key)
    srv, th, url = serve_in_thread(app)
    yield dict(url=url, model=model, tok=tok, eng=eng, aeng=aeng, srv=app.state.server,
               client=openai.OpenAI(base_url=url + "/v1", api_key=api_key or "x", max_retries=0))
    srv.should_exit = True
    th.join(10)
    aeng.shutdown()


@pytest.fixture(scope="module")
def server():
    yield from running_server(api_key="sekrit")


def words(tok, ids):
    return tok.decode(ids)


def wait_idle(eng, timeout=10):
    t0 = time.time()
    while eng.has_unfinished() and time.time() - t0 < timeout:
        time.sleep(0.02)
    assert not eng.has_unfinished()
    eng.cache.alloc.check_whole()


def test_completions_match_plain_greedy(server):
    c, tok, model = server["client"], server["tok"], server["model"]
    prompts = ["w10 w11 w12 w13", "w50 w7", "w99 w98 w97 w96 w95 w94 w93 w92 w91"]
    r = c.completions.create(model=NAME, prompt=prompts, max_tokens=12, temperature=0)
    assert len(r.choices) == 3
    for ch in r.choices:
        ids = tok.encode(prompts[ch.index])
        ref = greedy(model, ids, 12)
        assert ch.text == words(tok, ref)
        assert ch.finish_reason == ("stop" if ref[-1] == 1 else "length")
    assert r.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)
    assert r.usage.completion_tokens == sum(len(greedy(model, tok.encode(p), 12)) for p in prompts)
    # streaming: the deltas add up to the same text, usage arrives last
    pieces, usage, finish = [], None, None
    for ev in c.completions.create(model=NAME, prompt=prompts[0], max_tokens=12, temperature=0, stream=True,
                                   stream_options={"include_usage": True}):
        if ev.usage:
            usage = ev.usage
        for ch in ev.choices:
            pieces.append(ch.text)
            finish = ch.finish_reason or finish
    assert "".join(pieces) == r.choices[0].text and len(pieces) > 2
    assert usage.completion_tokens == len(greedy(model, tok.encode(prompts[0]), 12)) and finish
    wait_idle(server["eng"])


def test_chat_stream_and_not(server):
    c, tok, model = server["client"], server["tok"], server["model"]
    msgs = [{"role": "user", "content": "w20 w21 w22"}]
    ids = tok.encode_chat(msgs)
    ref = words(tok, greedy(model, ids, 10))
    r = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == ref and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids)
    text = "".join(ev.choices[0].delta.content or "" for ev in c.chat.completions.create(
        model=NAME, messages=msgs, max_tokens=10, temperature=0, stream=True) if ev.choices)
    assert text == ref


def test_logprobs_stop_seed_n(server):
    c, tok, model = server["client"], server["tok"], server["model"]
    prompt = "w30 w31 w32"
    ids = tok.encode(prompt)
    r = c.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0, logprobs=3,
                             extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    seq = list(ids)
    with torch.inference_mode():
        for tstr, got in zip(lp.tokens, lp.token_logprobs):
            want = torch.log_softmax(model(torch.tensor([seq]))[0, -1].float(), -1)
            t = int(want.argmax())
            assert tstr == tok.decode([t], skip_special=False)
            assert abs(got - float(want[t])) < 1e-4
            assert len(lp.top_logprobs[0]) == 3
            seq.append(t)
    # a stop string cuts the text before it
    full = c.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0,
                                extra_body={"ignore_eos": True}).choices[0].text
    stop = full.split(" ")[2]
    cut = c.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0, stop=[stop],
                               extra_body={"ignore_eos": True}).choices[0]
    assert cut.text == full[:full.index(stop)] and cut.finish_reason == "stop"
    # streaming holds back text that could start a stop string, then ends at it
    evs = list(c.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0, stop=[stop], stream=True,
                                    extra_body={"ignore_eos": True}))
    assert "".join(e.choices[0].text for e in evs if e.choices) == cut.text
    assert [e.choices[0].finish_reason for e in evs if e.choices][-1] == "stop"
    # n with a seed: reproducible, choices differ by their seeds
    a = c.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=1.0, seed=7, n=3)
    b = c.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=1.0, seed=7, n=3)
    assert [x.text for x in a.choices] == [x.text for x in b.choices]
    assert len({x.text for x in a.choices}) > 1
    ch = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "w5"}], max_tokens=4,
                                   temperature=0, logprobs=True, top_logprobs=2)
    assert len(ch.choices[0].logprobs.content) >= 1 and len(ch.choices[0].logprobs.content[0].top_logprobs) == 2
    wait_idle(server["eng"])


def test_models_health_metrics_auth(server):
    c, url = server["client"], server["url"]
    assert [m.id for m in c.models.list().data] == [NAME]
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    m = httpx.get(url + "/metrics").text
    assert "# TYPE leanlm_generation_tokens_total counter" in m
    assert float(m.split("\nleanlm_generation_tokens_total ")[1].split()[0]) > 0
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


@pytest.mark.parametrize("body,status", [
    (b"{not json", 400),
    (b"[1, 2]", 400),
    ({"model": "nope", "prompt": "w5"}, 404),
    ({"prompt": "w5"}, 400),
    ({"model": NAME, "prompt": " ".join(["w5"] * 300)}, 400),  # longer than the context
    ({"model": NAME, "prompt": "w5", "max_tokens": 10_000}, 400),
    ({"model": NAME, "prompt": "w5", "max_tokens": 0}, 400),
    ({"model": NAME, "prompt": "w5", "max_tokens": "12"}, 400),
    ({"model": NAME, "prompt": "w5", "temperature": -1}, 400),
    ({"model": NAME, "prompt": "w5", "n": 0}, 400),
    ({"model": NAME, "prompt": [5, 9999]}, 400),
    ({"model": NAME, "prompt": ""}, 400),
    ({"model": NAME, "prompt": 5}, 400),
    ({"model": NAME, "prompt": "w5", "stop": 3}, 400),
    ({"model": NAME, "prompt": "w5", "logprobs": 99}, 400),
    ({"model": NAME, "prompt": "w5", "stream": "yes"}, 400),
])
def test_malformed_requests_get_4xx(server, body, status):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server["url"] + "/v1/completions", headers={"Authorization": "Bearer sekrit"}, **kw)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]


@pytest.mark.parametrize("body", [{"model": NAME}, {"model": NAME, "messages": []},
                                  {"model": NAME, "messages": [{"role": "user"}]},
                                  {"model": NAME, "messages": "hi"},
                                  {"model": NAME, "messages": [{"role": "user", "content": "w5"}], "logprobs": 3}])
def test_malformed_chat_4xx(server, body):
    r = httpx.post(server["url"] + "/v1/chat/completions", headers={"Authorization": "Bearer sekrit"}, json=body)
    assert r.status_code == 400, r.text


def test_disconnect_mid_stream_frees_blocks(server):
    eng = server["eng"]
    before, aborts = eng.stats["generation_tokens"], server["srv"].stream_aborts
    body = {"model": NAME, "prompt": "w40 w41", "max_tokens": 250, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=10) as h:
        with h.stream("POST", server["url"] + "/v1/completions", json=body,
                      headers={"Authorization": "Bearer sekrit"}) as r:
            it = r.iter_lines()
            first = next(l for l in it if l.startswith("data:"))
            assert json.loads(first[5:])["choices"]
            assert eng.has_unfinished()
    wait_idle(eng)  # aborted before its 250 tokens, every block back
    assert server["srv"].stream_aborts == aborts + 1
    assert 0 < eng.stats["generation_tokens"] - before < 250


def test_disconnect_non_streaming_frees_blocks(server):
    eng, srv = server["eng"], server["srv"]
    before, aborts = eng.stats["generation_tokens"], srv.stream_aborts
    step = eng.step

    def slow_step():  # 10 ms per step: 250 tokens take far longer than the client waits
        time.sleep(0.01)
        return step()
    eng.step = slow_step
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server["url"] + "/v1/completions", timeout=0.5, headers={"Authorization": "Bearer sekrit"},
                       json={"model": NAME, "prompt": "w40 w41", "max_tokens": 250, "ignore_eos": True})
        wait_idle(eng)
    finally:
        del eng.step
    assert srv.stream_aborts == aborts + 1
    assert eng.stats["generation_tokens"] - before < 250


def test_shutdown_ends_inflight_streams():
    """A separate engine: shutdown ends an in-flight stream with an error event and [DONE]."""
    from fastapi.testclient import TestClient  # noqa: F401  (starlette's, needs httpx)

    from leanlm.serve.app import build_app
    from leanlm.serve.engine_loop import AsyncEngine

    model, tok = tiny_model(), tiny_tokenizer()
    eng = Engine(model, block_size=4, num_blocks=128, eos_ids=(1,))
    aeng = AsyncEngine(eng)
    app = build_app(aeng, tok, NAME)
    with TestClient(app) as tc:
        with tc.stream("POST", "/v1/completions", json={"model": NAME, "prompt": "w9", "max_tokens": 240,
                                                         "stream": True, "ignore_eos": True}) as r:
            lines = r.iter_lines()
            next(l for l in lines if l.startswith("data:"))
            aeng.shutdown()
            rest = [l for l in lines if l.startswith("data:")]
    assert rest[-1] == "data: [DONE]"
    assert "shutting down" in json.loads(rest[-2][5:])["error"]["message"]
    eng.cache.alloc.check_whole()
    assert not aeng.alive


def test_cli_arguments_build_a_server():
    import argparse

    from fastapi.testclient import TestClient

    from leanlm.serve import cli

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    args = p.parse_args(["some/folder", "--port", "0", "--api-key", "k", "--max-num-seqs", "4", "--block-size", "8"])
    assert args.host == "127.0.0.1"
    app, aeng = cli.make_server(tiny_model(), tiny_tokenizer(), args)
    try:
        assert aeng.engine.max_num_seqs == 4 and aeng.engine.block_size == 8
        with TestClient(app) as tc:
            assert tc.get("/v1/models").status_code == 401
            r = tc.get("/v1/models", headers={"Authorization": "Bearer k"})
            assert r.json()["data"][0]["id"] == "folder"
    finally:
        aeng.shutdown()


def test_huge_seed_does_not_break_the_server(server):
    """A seed of 2^64 once killed the engine thread: every later request hung."""
    h = {"Authorization": "Bearer sekrit"}
    r = httpx.post(server["url"] + "/v1/completions", headers=h, timeout=10,
                   json={"model": NAME, "prompt": "w5", "max_tokens": 2, "temperature": 1.0, "seed": 2 ** 64})
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed", r.text
    r = httpx.post(server["url"] + "/v1/completions", headers=h, timeout=10,
                   json={"model": NAME, "prompt": "w5", "max_tokens": 2, "temperature": 1.0, "seed": 2 ** 63 - 1})
    assert r.status_code == 200, r.text
    assert httpx.get(server["url"] + "/health").json() == {"status": "ok"}
