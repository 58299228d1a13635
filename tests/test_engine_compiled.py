"""The engine's piecewise compiled step (leanlm/infer/compiled_engine.py) against its eager step, the reference."""
from __future__ import annotations

import random

import pytest
import torch
from conftest import tiny_hf, to_leanlm

from leanlm.infer import compiled
from leanlm.infer.engine import Engine, SamplingParams


def _requests(seed, k=5):
    rng = random.Random(seed)
    prompts = [[rng.randrange(128) for _ in range(rng.randint(2, 28))] for _ in range(k)]
    params = [SamplingParams(max_tokens=rng.randint(3, 20), ignore_eos=True) for p in prompts]
    return prompts, params


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@torch.inference_mode()
def _hidden_side_by_side(m, prompts):
    """One mixed step (a decode, a prefill chunk after cached context, a whole prompt) on twin engines:
    the compiled and the eager final hidden states."""
    out = []
    for comp in (True, False):
        eng = Engine(m, block_size=4, max_batch_tokens=20, compile=comp)
        eng.add_request(prompts[0], SamplingParams(max_tokens=4))
        eng.step()  # prompt 0 prefilled
        for p in prompts[1:3]:
            eng.add_request(p, SamplingParams(max_tokens=4))
        eng.step()  # prompt 0 decodes; prompt 1 prefills; prompt 2's first chunk
        batch = eng._schedule()  # a decode, a decode and prompt 2's next chunk
        assert max(n for _, n in batch) > 1 and min(n for _, n in batch) == 1
        eng.cache.prepare([(s.id, n) for s, n in batch], "packed")
        ids = torch.tensor([t for s, n in batch for t in eng._fed(s, n)])[None]
        if comp:
            out.append(eng.compiled.forward({"input_ids": ids}, eng.cache))
        else:
            out.append(eng.model(ids, cache=eng.cache, return_hidden=True)[0])
    return out


@pytest.mark.slow  # compiles (minutes on a busy 2-core machine)
@pytest.mark.parametrize("kind", ["llama", "gemma3_text"])
def test_compiled_engine_equals_eager_without_recompiling(kind):
    """Llama (fused q/k/v) and Gemma 3 (q/k norms, sandwich norms, local and global RoPE, a sliding window)."""
    import torch._dynamo

    torch._dynamo.reset()
    over = {"layer_types": ["sliding_attention", "full_attention"] * 2} if kind == "gemma3_text" else {}
    m = to_leanlm(tiny_hf(kind, seed=21, num_hidden_layers=4, **over))
    prompts, params = _requests(1)
    want = Engine(m, block_size=4, max_batch_tokens=24).generate(prompts, params)
    before = _graphs()
    eng = Engine(m, block_size=4, max_batch_tokens=24, compile=True)
    # steps of many sizes: whole prompts, chunks, decodes of 5 down to 1 sequence
    assert eng.generate(prompts, params) == want
    assert eng.compiled.failed is None and eng.compiled.calls == eng.stats["steps"]
    # one graph before attention and one after, for all 4 layers and every step size
    assert _graphs() - before == 2
    prompts, params = _requests(2, k=7)
    eng = Engine(m, block_size=4, max_batch_tokens=16, compile=True)
    assert eng.generate(prompts, params) == Engine(m, block_size=4, max_batch_tokens=16).generate(prompts, params)
    assert _graphs() - before == 2  # another engine, other step sizes: no new graph
    a, e = _hidden_side_by_side(m, [list(range(6)), list(range(10, 15)), list(range(30, 60))])
    torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


def test_no_compiler_says_so_and_runs_eagerly(monkeypatch, capsys):
    import torch._inductor.config as inductor_config

    m = to_leanlm(tiny_hf("llama", seed=22))
    prompts, params = _requests(3, k=3)
    want = Engine(m, block_size=4).generate(prompts, params)
    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, "/nonexistent/g++"))
    eng = Engine(m, block_size=4, compile=True)
    assert eng.generate(prompts, params) == want
    err = capsys.readouterr().err
    assert err.count("leanlm: compiled engine step unavailable") == 1 and "running eagerly" in err
    assert len(err.strip().splitlines()) == 1
    assert eng.compiled.failed


@pytest.mark.parametrize("case", ["env", "dense", "moe"])
def test_what_cannot_compile_runs_eagerly(case, monkeypatch, capsys):
    from conftest import tiny_moe

    m = to_leanlm(tiny_moe("mixtral", seed=23) if case == "moe" else tiny_hf("llama", seed=23))
    kw = {}
    if case == "env":
        monkeypatch.setenv(compiled.DISABLE_ENV, "1")
    if case == "dense":
        kw["attention"] = "dense"
    prompts, params = _requests(4, k=2)
    eng = Engine(m, block_size=4, compile=True, **kw)
    assert eng.compiled is None
    err = capsys.readouterr().err
    why = {"env": compiled.DISABLE_ENV, "dense": "attention='dense'", "moe": "MoE"}[case]
    assert err.count("leanlm: compiled engine step unavailable") == 1 and why in err
    assert eng.generate(prompts, params) == Engine(m, block_size=4, **kw).generate(prompts, params)


def test_serve_compile_flag():
    from leanlm.cli import build_parser

    ap = build_parser("serve")
    for flag, want in (([], False), (["--compile"], True), (["--no-compile"], False)):
        assert ap.parse_args(["serve", *flag]).compile is want
