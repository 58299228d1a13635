"""Speculative decoding through the server: the openai client's extra_body asks for it per request; the text
is the one without it, usage reports the draft tokens, bad values get a 400."""
import pytest
import torch

from leanlm.infer.engine import Engine
from test_serve import NAME, greedy, openai, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def server():
    from leanlm.serve.app import build_app
    from leanlm.serve.cli import serve_in_thread
    from leanlm.serve.engine_loop import AsyncEngine

    model, tok = tiny_model(), tiny_tokenizer()
    torch.manual_seed(5)
    draft = tiny_model()
    with torch.no_grad():  # a draft close to the model but not equal: some drafts are rejected
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * 0.05 * p.std())
    eng = Engine(model, block_size=4, num_blocks=128, max_batch_tokens=32, max_num_seqs=8,
                 eos_ids=tuple(tok.eos_ids), draft=draft)
    aeng = AsyncEngine(eng)
    app = build_app(aeng, tok, NAME)
    srv, th, url = serve_in_thread(app)
    yield dict(model=model, tok=tok, eng=eng, client=openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0))
    srv.should_exit = True
    th.join(10)
    aeng.shutdown()


PROMPT = " ".join(f"w{i}" for i in (5, 9, 13, 5, 9, 13, 5, 9, 21, 40, 5, 9))


@pytest.mark.parametrize("method", ["draft", "prompt_lookup"])
def test_same_text_with_speculation(server, method):
    c = server["client"]
    ids = server["tok"].encode(PROMPT)
    plain = c.completions.create(model=NAME, prompt=PROMPT, max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    assert plain.choices[0].text == server["tok"].decode(greedy(server["model"], ids, 20, eos=None))
    assert "speculative" not in (plain.usage.model_extra or {})
    spec = c.completions.create(model=NAME, prompt=PROMPT, max_tokens=20, temperature=0,
                                extra_body={"ignore_eos": True, "speculative": {"method": method, "k": 3}})
    assert spec.choices[0].text == plain.choices[0].text
    u = spec.usage.model_extra["speculative"]
    assert u["method"] == method and u["proposed"] > 0 and 0 < u["accepted"] <= u["proposed"]
    assert spec.usage.completion_tokens == 20
    # streamed, with several prompts at once in one engine batch (some tokens arrive several per step)
    stream = c.completions.create(model=NAME, prompt=[PROMPT, "w7 w8"], max_tokens=20, temperature=0, stream=True,
                                  stream_options={"include_usage": True},
                                  extra_body={"ignore_eos": True, "speculative": {"method": method, "k": 4}})
    texts, usage = ["", ""], None
    for ch in stream:
        for choice in ch.choices:
            texts[choice.index] += choice.text
        usage = ch.usage or usage
    assert texts[0] == plain.choices[0].text
    assert usage.model_extra["speculative"]["proposed"] > 0


def test_chat_with_speculation(server):
    c = server["client"]
    msgs = [{"role": "user", "content": PROMPT}]
    plain = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=12, temperature=0)
    spec = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=12, temperature=0,
                                     extra_body={"speculative": {"method": "draft"}})
    assert spec.choices[0].message.content == plain.choices[0].message.content
    assert spec.usage.model_extra["speculative"]["proposed"] > 0


@pytest.mark.parametrize("body, says", [
    ({"speculative": {"method": "medusa"}}, "speculative.method"),
    ({"speculative": {"method": "draft", "k": 0}}, "speculative.k"),
    ({"speculative": {"method": "draft", "k": "4"}}, "speculative.k"),
    ({"speculative": {"method": "draft", "k": 5, "k_max": 3}}, "k_max"),
    ({"speculative": {"method": "draft", "depth": 3}}, "speculative.depth"),
    ({"speculative": {"method": "layer_skip"}}, "--layer-skip"),
    ({"speculative": {"method": "prompt_lookup"}, "repetition_penalty": 1.3}, "repetition_penalty"),
    ({"speculative": "draft"}, "speculative"),
])
def test_bad_speculative_values(server, body, says):
    with pytest.raises(openai.BadRequestError) as e:
        server["client"].completions.create(model=NAME, prompt="w5 w6", max_tokens=4, extra_body=body)
    assert says in e.value.body["message"] and e.value.body["param"] == "speculative"


def test_cli_layer_skip_and_draft():
    """`leanlm serve --layer-skip 1 --draft ...`: the engine offers the methods; a request uses layer_skip."""
    import argparse

    from fastapi.testclient import TestClient

    from leanlm.errors import LeanLMError
    from leanlm.serve import cli

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    with pytest.raises(LeanLMError, match="--layer-skip"):
        cli.make_server(tiny_model(), tiny_tokenizer(), p.parse_args(["m", "--layer-skip", "one"]))
    args = p.parse_args(["m", "--layer-skip", "1", "--num-blocks", "64", "--block-size", "4"])
    model = tiny_model()
    app, aeng = cli.make_server(model, tiny_tokenizer(), args, draft=tiny_model())
    try:
        assert aeng.engine.spec.methods == ["prompt_lookup", "draft", "layer_skip"]
        with TestClient(app) as tc:
            body = dict(model="m", prompt=PROMPT, max_tokens=10, temperature=0, ignore_eos=True)
            plain = tc.post("/v1/completions", json=body).json()
            spec = tc.post("/v1/completions", json=dict(body, speculative={"method": "layer_skip", "k": 2})).json()
            assert spec["choices"][0]["text"] == plain["choices"][0]["text"]
            assert spec["usage"]["speculative"]["proposed"] > 0
    finally:
        aeng.shutdown()
