"""The server's per-request prompt compression: {"leanlm": {"compress_prompt": rate}}, tokens saved in
usage, the same answer as sending the compressed prompt yourself, and bad options as 400s."""
import httpx
import pytest

from leanlm.data.prompt_compress import compress_prompt
from tests.test_serve import NAME, running_server


@pytest.fixture(scope="module")
def server():
    yield from running_server()


CONTEXT = " ".join(f"w{5 + (i * 7) % 90}" for i in range(60))


def test_completion_compressed_reports_tokens_saved(server):
    c, tok, model = server["client"], server["tok"], server["model"]
    r = c.completions.create(model=NAME, prompt=CONTEXT, max_tokens=4, temperature=0,
                             extra_body={"leanlm": {"compress_prompt": 0.5}})
    short = compress_prompt(CONTEXT, None, 0.5, model, tok)["compressed_prompt"]
    plain = c.completions.create(model=NAME, prompt=short, max_tokens=4, temperature=0)
    assert r.choices[0].text == plain.choices[0].text
    assert r.usage.prompt_tokens == plain.usage.prompt_tokens == len(tok.encode(short))
    saved = r.usage.model_extra["prompt_tokens_saved"]
    assert saved == len(tok.encode(CONTEXT)) - len(tok.encode(short)) and 25 <= saved <= 35
    assert "prompt_tokens_saved" not in (plain.usage.model_extra or {})


def test_chat_keeps_the_question_line(server):
    c = server["client"]
    msg = CONTEXT + "\nQuestion: w7 w8 w9"
    r = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": msg}], max_tokens=3,
                                  extra_body={"leanlm": {"compress_prompt": 0.25}}, temperature=0)
    full = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": msg}], max_tokens=3,
                                     temperature=0)
    assert r.usage.prompt_tokens < full.usage.prompt_tokens
    assert r.usage.model_extra["prompt_tokens_saved"] == full.usage.prompt_tokens - r.usage.prompt_tokens


@pytest.mark.parametrize("opt", [{"compress_prompt": 0}, {"compress_prompt": 1.5}, {"compress_prompt": "half"},
                                 {"compress_prompt": True}, {"other": 1}, 0.5,
                                 {"compress_prompt": {"rate": 0.5, "extra": 1}}])
def test_bad_options_are_400(server, opt):
    r = httpx.post(server["url"] + "/v1/completions",
                   json={"model": NAME, "prompt": CONTEXT, "max_tokens": 2, "leanlm": opt})
    assert r.status_code == 400, r.text
    assert "leanlm" in r.text


def test_token_id_prompt_cannot_be_compressed(server):
    r = httpx.post(server["url"] + "/v1/completions",
                   json={"model": NAME, "prompt": [5, 6, 7], "max_tokens": 2, "leanlm": {"compress_prompt": 0.5}})
    assert r.status_code == 400 and "text prompt" in r.text
