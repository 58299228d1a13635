"""The `leanlm` command end to end on a tiny model folder: info, eval, chat, convert."""
import io
import json

import pytest
import torch

import leanlm
from conftest import tiny_hf
from gguf_util import byte_vocab, write_tiny_gguf
from leanlm.cli import main


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    return write_tiny_gguf(d / "m.gguf", tiny_hf("llama", vocab_size=len(byte_vocab()[0]), seed=4), "Q8_0")


def _json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_info_json(gguf_path, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LEANLM_CACHE", str(tmp_path))
    assert main(["info", str(gguf_path), "--json"]) == 0
    d = _json(capsys)
    assert d["layers"] == 2 and d["kv_heads"] == 2 and d["chat_template"] is True


def test_eval_json_matches_api(gguf_path, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LEANLM_CACHE", str(tmp_path))
    text = tmp_path / "t.txt"
    text.write_text("the cat in the hat sat on the mat. " * 40)
    assert main(["eval", str(gguf_path), "--text", str(text), "--ctx", "64", "--stride", "32", "--json"]) == 0
    d = _json(capsys)
    m, tok = leanlm.load(gguf_path)
    ref = leanlm.perplexity(m, tok, text.read_text(), ctx=64, stride=32, progress=False)
    assert d["tokens"] == ref["tokens"]
    assert d["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-6)
    assert d["bits_per_byte"] == pytest.approx(ref["bits_per_byte"], rel=1e-6)


def test_eval_packaged_tech_text(gguf_path, capsys, tmp_path, monkeypatch):
    from leanlm.data import packaged_text

    monkeypatch.setenv("LEANLM_CACHE", str(tmp_path))
    args = ["eval", str(gguf_path), "--ctx", "64", "--stride", "64", "--max-chars", "2000", "--json"]
    assert main(args + ["--text", "packaged:tech"]) == 0
    d = _json(capsys)
    m, tok = leanlm.load(gguf_path)
    ref = leanlm.perplexity(m, tok, packaged_text("tech")[:2000], ctx=64, stride=64, progress=False)
    assert d["tokens"] == ref["tokens"] and d["text"] == "packaged:tech"
    assert d["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-6)
    assert main(args + ["--text", "packaged:nope"]) == 2
    assert "no packaged text 'nope'" in capsys.readouterr().err


def test_eval_rejects_bad_stride(gguf_path, capsys):
    assert main(["eval", str(gguf_path), "--ctx", "64", "--stride", "100"]) == 2
    assert "stride" in capsys.readouterr().err


def test_chat_uses_template_and_history(gguf_path, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("LEANLM_CACHE", str(tmp_path))
    monkeypatch.setattr("sys.stdin", io.StringIO("the cat\nthe hat\n\n"))
    assert main(["chat", str(gguf_path), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out  # not splitlines(): a random model's reply may hold \x0b or \x1c
    m, tok = leanlm.load(gguf_path)
    first = leanlm.generate(m, tok, [{"role": "user", "content": "the cat"}], chat=True, max_new_tokens=4)
    assert first in out.split("> ")[1]  # the first reply, after the first prompt marker


def test_convert_gguf_to_folder_same_logits(gguf_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LEANLM_CACHE", str(tmp_path / "c"))
    assert main(["convert", str(gguf_path), "-o", str(tmp_path / "hf")]) == 0
    a, tok = leanlm.load(gguf_path)
    b, _ = leanlm.load(tmp_path / "hf")
    ids = torch.tensor([tok.encode("the mat")])
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


def test_generate_and_bench_speculative(gguf_path, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LEANLM_CACHE", str(tmp_path))
    assert main(["generate", str(gguf_path), "--prompt", "the cat the cat the cat", "--prompt-lookup",
                 "--max-new-tokens", "8"]) == 0
    plain_args = ["generate", str(gguf_path), "--prompt", "the cat the cat the cat", "--max-new-tokens", "8",
                  "--no-stream"]
    spec_out = capsys.readouterr().out.strip()
    assert main(plain_args) == 0
    assert capsys.readouterr().out.strip().split("\n---")[0] == spec_out  # greedy: identical text
    assert main(["bench", str(gguf_path), "--draft", "q4", "--prompt-len", "32", "--new-tokens", "8", "--json"]) == 0
    res = _json(capsys)
    assert res["identical_output"] is True and 0 <= res["acceptance_rate"] <= 1
    assert main(["bench", str(gguf_path), "--concurrency", "2", "--prompt-len", "8", "--new-tokens", "4",
                 "--json"]) == 0
    assert _json(capsys)


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_adapter_flag_on_generate_eval_bench(gguf_path, capsys, tmp_path, monkeypatch, method):
    """--adapter DIR applies a (peft-format) adapter; the output must equal applying it by hand."""
    from leanlm.peft import apply, save_adapter

    monkeypatch.setenv("LEANLM_CACHE", str(tmp_path))
    m, tok = leanlm.load(gguf_path)
    opts = {"num_virtual_tokens": 4} if method == "prompt" else {"r": 4}
    try:
        wrapped = apply(m, method, **opts)
    except TypeError:
        wrapped = apply(m, method)
    with torch.no_grad():
        for p in wrapped.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)  # a trained-looking adapter, so it changes outputs
    save_adapter(wrapped, tmp_path / "ad")
    expected = leanlm.generate(wrapped, tok, "the cat", max_new_tokens=6, ignore_eos=True)
    assert main(["generate", str(gguf_path), "--adapter", str(tmp_path / "ad"), "--prompt", "the cat",
                 "--max-new-tokens", "6", "--no-stream"]) == 0
    got = capsys.readouterr().out.split("\n---")[0].strip()
    base = leanlm.generate(leanlm.load(gguf_path)[0], tok, "the cat", max_new_tokens=6, ignore_eos=True)
    assert got == expected.strip()
    assert expected != base  # the adapter mattered
    text = tmp_path / "t.txt"
    text.write_text("the cat in the hat. " * 30)
    assert main(["eval", str(gguf_path), "--adapter", str(tmp_path / "ad"), "--text", str(text), "--ctx", "32",
                 "--stride", "16", "--json"]) == 0
    assert _json(capsys)["perplexity"] > 1
    assert main(["bench", str(gguf_path), "--adapter", str(tmp_path / "ad"), "--prompt-len", "8",
                 "--new-tokens", "4", "--prefill-len", "16", "--repeats", "1", "--batch", "2", "--json"]) == 0
    assert _json(capsys)["decode_tokens_per_s"] > 0
