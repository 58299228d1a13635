"""The compiled decode step (torch.compile over a static cache) against the eager path, the reference."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_hf, to_leanlm

from leanlm.compress.recipe import apply_recipe, load_recipe
from leanlm.infer import compiled
from leanlm.infer.generate import generate_tokens
from leanlm.infer.sampling import GenerationConfig


def _tokens(m, prompts, n, compile_):
    cfg = GenerationConfig(max_new_tokens=n, ignore_eos=True, compile=compile_)
    return [list(r) for r in zip(*generate_tokens(m, prompts, cfg))]


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@torch.inference_mode()
def _logits_side_by_side(m, prompt, n):
    """Greedy decoding through the compiled step and eagerly on twin caches: both logits, step by step."""
    dec = compiled.decoder_for(m)
    ids = torch.tensor([prompt])
    ca, ce = m.new_cache(1, compiled.bucket(len(prompt) + n)), m.new_cache(1, len(prompt) + n)
    a, e = m(ids, cache=ca)[:, -1], m(ids, cache=ce)[:, -1]
    out = []
    for _ in range(n):
        out.append((a, e))
        nxt = e.argmax(-1, keepdim=True)
        a, e = dec.decode(ca, nxt), m(nxt, cache=ce)[:, -1]
    assert dec.failed is None, dec.failed
    return out


def _check(m, tol):
    prompt = [5, 9, 33, 70, 12, 3, 99]
    for a, e in _logits_side_by_side(m, prompt, 6):
        torch.testing.assert_close(a, e, atol=tol, rtol=tol)
    assert _tokens(m, [prompt], 10, True) == _tokens(m, [prompt], 10, False)


@pytest.mark.slow  # compiles (tens of seconds on 2 cores)
def test_compiled_equals_eager_fp32_without_recompiling():
    m = to_leanlm(tiny_hf("llama", seed=11))
    _check(m, 1e-4)
    before = _graphs()
    # another prompt length and answer length in the same cache bucket: the same graph, no recompilation
    assert _tokens(m, [[1, 2, 3]], 20, True) == _tokens(m, [[1, 2, 3]], 20, False)
    assert _graphs() == before


@pytest.mark.slow  # compiles (tens of seconds on 2 cores)
def test_compiled_equals_eager_4bit():
    m = to_leanlm(tiny_hf("llama", seed=12))
    apply_recipe(m, load_recipe("w4a16-rtn-g32"), progress=False)
    _check(m, 2e-2)  # the int4 kernel runs in bf16: compiled and eager round its input differently


@pytest.mark.slow  # compiles (tens of seconds on 2 cores)
def test_compiled_left_padded_batch_and_window():
    """Rows of different lengths (positions and masks from the valid slots) and Gemma 2's sliding window,
    soft-capping and (1 + w) norms."""
    m = to_leanlm(tiny_hf("gemma2", seed=13))
    prompts = [[5, 9, 33], [70, 71, 72, 73, 74, 75, 76, 77], [100]]
    assert _tokens(m, prompts, 9, True) == _tokens(m, prompts, 9, False)


def test_no_compiler_says_so_and_decodes_eagerly(monkeypatch, capsys):
    import torch._inductor.config as inductor_config

    m = to_leanlm(tiny_hf("llama", seed=14))
    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, "/nonexistent/g++"))
    got = _tokens(m, [[4, 8, 15]], 6, True)
    err = capsys.readouterr().err
    assert err.count("leanlm: compiled decode unavailable") == 1 and "decoding eagerly" in err
    assert len(err.strip().splitlines()) == 1
    assert compiled.decoder_for(m).failed
    assert got == _tokens(m, [[4, 8, 15]], 6, False)
    assert compiled.compiled_decoder(m) is None  # no second attempt for this model


def test_what_cannot_compile_decodes_eagerly(monkeypatch):
    m = to_leanlm(tiny_hf("llama", seed=15))
    assert compiled.compile_unsupported(m) is None
    assert compiled.compile_unsupported(m, kv_bits=8) == "quantized KV cache"
    monkeypatch.setenv(compiled.DISABLE_ENV, "1")
    assert compiled.compiled_decoder(m) is None
    monkeypatch.setenv(compiled.DISABLE_ENV, "0")
    assert compiled.compiled_decoder(m) is not None


def test_cache_dir_is_keyed_by_torch_and_code():
    d = compiled.compile_cache_dir()
    assert d.parent.name == "compile" and d.parent.parent.name == "leanlm"
    assert torch.__version__.split("+")[0] in d.name and compiled._code_hash() in d.name


@pytest.mark.parametrize("n,size", [(1, 256), (256, 256), (257, 512), (3000, 4096)])
def test_bucket(n, size):
    assert compiled.bucket(n) == size


def test_auto_decodes_eagerly_until_the_shape_is_compiled():
    m = to_leanlm(tiny_hf("llama", seed=16))
    dec = compiled.decoder_for(m)
    assert compiled.auto_decoder(m, None, 1, 300) is None  # eager by default
    assert compiled.auto_decoder(m, True, 1, 300) is dec
    assert compiled.auto_decoder(m, False, 1, 300) is None
    _tokens(m, [[1, 2]], 3, True)
    assert compiled.auto_decoder(m, None, 1, 40) is dec  # compiled for this shape already: used
    assert compiled.auto_decoder(m, None, 2, 40) is None  # another batch size would compile again


def test_cli_compile_flag():
    from leanlm.cli import build_parser, generation_config

    ap = build_parser("generate")
    for flag, want in (([], None), (["--compile"], True), (["--no-compile"], False)):
        assert generation_config(ap.parse_args(["generate", *flag])).compile is want
    assert build_parser("bench").parse_args(["bench", "--no-compile"]).compile is False


@pytest.mark.slow  # compiles (tens of seconds on 2 cores)
def test_corrupt_compile_cache_is_rebuilt(tmp_path, monkeypatch, capsys):
    """Every file of the on-disk cache replaced by garbage: the next compile rebuilds it, output unchanged.
    (In one process a library already loaded stays mapped; a new process would read the garbage too.)"""
    import torch._dynamo
    from torch._inductor.utils import clear_inductor_caches

    monkeypatch.setenv("LEANLM_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # a user's own cache dir would win over leanlm's
    torch._dynamo.reset()
    clear_inductor_caches()
    hf = tiny_hf("llama", seed=17)
    want = _tokens(to_leanlm(hf), [[3, 1, 4, 1, 5]], 5, False)
    assert _tokens(to_leanlm(hf), [[3, 1, 4, 1, 5]], 5, True) == want
    d = compiled.compile_cache_dir()
    files = [f for f in d.rglob("*") if f.is_file()]
    assert files and str(d) == __import__("os").environ["TORCHINDUCTOR_CACHE_DIR"]
    for f in files:  # new files (a loaded library must not change under the process that mapped it)
        f.unlink()
        f.write_bytes(b"\0garbage")
    torch._dynamo.reset()
    clear_inductor_caches()  # a new process: nothing compiled in memory
    m = to_leanlm(hf)
    assert _tokens(m, [[3, 1, 4, 1, 5]], 5, True) == want
    assert compiled.decoder_for(m).failed is None and compiled.decoder_for(m)._warm
    assert "unavailable" not in capsys.readouterr().err
