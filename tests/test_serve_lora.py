"""LoRA adapters by name over HTTP: mixed in one batch, each equal to its merged model; load/unload at run time."""
import argparse
import asyncio

import httpx
import pytest
import torch

from leanlm import peft
from leanlm.serve import cli
from test_serve import greedy, tiny_model, tiny_tokenizer


def make_adapter(folder, seed, **kw):
    m = peft.apply(tiny_model(), "lora", **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return peft.save_adapter(m, folder)


def merged(folder):
    m = peft.load_adapter(tiny_model(), folder)
    peft.merge(m)
    return m


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    a1 = make_adapter(root / "allowed" / "a1", 1, r=4)
    a2 = make_adapter(root / "allowed" / "a2", 2, r=8, target_modules=["q_proj", "v_proj", "down_proj"])
    outside = make_adapter(root / "outside", 3, r=4)
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    args = p.parse_args(["some/tiny", "--lora", f"a1={a1}", "--lora-dir", str(root / "allowed"), "--max-loras", "2",
                         "--block-size", "4", "--num-blocks", "128", "--max-batch-tokens", "64"])
    app, aeng = cli.make_server(tiny_model(), tiny_tokenizer(), args)
    srv, th, url = cli.serve_in_thread(app)
    yield dict(url=url, a1=a1, a2=a2, outside=outside, aeng=aeng, tok=tiny_tokenizer())
    srv.should_exit = True
    th.join(10)
    aeng.shutdown()


def test_models_load_mix_unload(lora_server):
    url, tok = lora_server["url"], lora_server["tok"]
    h = httpx.Client(base_url=url, timeout=30)
    ids = {m["id"]: m for m in h.get("/v1/models").json()["data"]}
    assert ids["a1"]["parent"] == "tiny" and ids["tiny"]["parent"] is None
    # run-time loading: only under --lora-dir
    r = h.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(lora_server["outside"])})
    assert r.status_code == 403 and r.json()["error"]["param"] == "lora_path"
    r = h.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "../outside"})
    assert r.status_code == 403
    assert h.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "nope"}).status_code == 404
    r = h.post("/v1/load_lora_adapter", json={"lora_name": "a2", "lora_path": "a2"})
    assert r.status_code == 200, r.text
    assert h.post("/v1/load_lora_adapter", json={"lora_name": "a2", "lora_path": "a2"}).status_code == 400
    assert "a2" in [m["id"] for m in h.get("/v1/models").json()["data"]]

    # one batch mixes the base model and both adapters; each output equals its merged model's
    prompts = ["w10 w11 w12", "w50 w7", "w99 w98 w97 w96", "w20"]
    refs = {"tiny": tiny_model(), "a1": merged(lora_server["a1"]), "a2": merged(lora_server["a2"])}
    jobs = [(p, name) for p in prompts for name in refs]

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=60) as ah:
            async def one(p, name):
                r = await ah.post("/v1/completions", json={"model": name, "prompt": p, "max_tokens": 6,
                                                           "temperature": 0, "ignore_eos": True})
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["text"]
            return await asyncio.gather(*(one(p, n) for p, n in jobs))
    got = asyncio.run(main())
    outs = set()
    for (p, name), text in zip(jobs, got):
        ref = greedy(refs[name], tok.encode(p), 6, eos=-1)
        assert text == tok.decode(ref), (p, name)
        outs.add((p, text))
    assert len(outs) > len(prompts)  # the adapters change the outputs
    pool = lora_server["aeng"].engine.adapters
    assert not pool.pins and pool.loads >= 2

    assert h.post("/v1/unload_lora_adapter", json={"lora_name": "a2"}).status_code == 200
    r = h.post("/v1/completions", json={"model": "a2", "prompt": "w5"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert h.post("/v1/unload_lora_adapter", json={"lora_name": "a2"}).status_code == 404
