"""GGUF export: gguf's reader and transformers' GGUF loader read back what leanlm wrote."""
import numpy as np
import pytest
import torch

import leanlm
from conftest import tiny_hf, to_leanlm
from gguf_util import byte_vocab, leanlm_key, spm_vocab, write_tiny_gguf
from leanlm.errors import LeanLMError
from leanlm.io.gguf import unpermute_qk
from leanlm.io.gguf_export import TYPES, export_gguf

NV = len(byte_vocab()[0])


def _tok(tmp_path, kind="gpt2"):
    n = NV if kind == "gpt2" else len(spm_vocab()[0])
    path = write_tiny_gguf(tmp_path / f"tok-{kind}.gguf", tiny_hf("llama", vocab_size=n), "F32", tokenizer=kind)
    return leanlm.load(path, convert_cache=False)[1]


def _randomize(hf):
    """Every parameter random (norm weights and biases too), so each path is checked numerically."""
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return hf


def _read(path, cfg):
    """gguf's own dequantization of every tensor, q/k rows put back in leanlm's order."""
    import gguf

    out = {}
    r = gguf.GGUFReader(str(path))
    llama = r.fields["general.architecture"].contents() == "llama"  # q/k permuted for this one only
    for t in r.tensors:
        if t.name == "rope_freqs.weight":
            continue
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if llama and t.name.endswith(("attn_q.weight", "attn_q.bias")):
            w = unpermute_qk(w, cfg.num_heads)
        elif llama and t.name.endswith(("attn_k.weight", "attn_k.bias")):
            w = unpermute_qk(w, cfg.num_kv_heads)
        out[leanlm_key(t.name, cfg)] = (torch.from_numpy(w.copy()), t.tensor_type.name)
    return out


@pytest.mark.parametrize("kind,over", [("llama", {}), ("qwen2", {}), ("qwen3", {"tie_word_embeddings": True})])
def test_f32_export_matches_transformers_gguf_loader(tmp_path, kind, over):
    import transformers

    hf = _randomize(tiny_hf(kind, vocab_size=NV, **over))
    m, tok = to_leanlm(hf), _tok(tmp_path)
    path = tmp_path / "out.gguf"
    export_gguf(m, tok, path, "f32")
    ids = torch.tensor([tok.encode("the cat in the hat sat on the mat")])
    back, tok2 = leanlm.load(path, convert_cache=False)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="out.gguf").eval()
    with torch.no_grad():
        want = m(ids)
        assert (back(ids) - want).abs().max() < 1e-5
        assert (ref(ids).logits - want).abs().max() < 1e-4
    got = _read(path, m.config)
    for k, v in m.state_dict().items():
        if k in got:
            assert torch.equal(got[k][0], v), k
    text = "the cat, the hat: 12 in the sun! <|im_start|>x<|im_end|>"
    assert tok2.encode(text) == tok.encode(text)
    assert tok2.chat_template == tok.chat_template and tok2.eos_ids == tok.eos_ids


@pytest.mark.parametrize("qtype", TYPES)
def test_every_type_dequantizes_close_to_the_weights(tmp_path, qtype):
    """gguf's reader decodes each type back to the weights within the type's resolution (K-quants use
    256-wide rows here so they are not replaced by their fallback)."""
    hf = tiny_hf("llama", vocab_size=NV, hidden_size=256, intermediate_size=512)
    m, tok = to_leanlm(hf), _tok(tmp_path)
    path = tmp_path / "out.gguf"
    res = export_gguf(m, tok, path, qtype)
    got = _read(path, m.config)
    tol = {"f32": 0, "f16": 1e-3, "bf16": 8e-3, "q8_0": 1e-2, "q6_k": 4e-2, "q4_0": 0.15, "q4_1": 0.1, "q4_k": 0.12}
    for k, v in m.state_dict().items():
        if k not in got:
            continue
        w, t = got[k]
        if v.dim() == 2 and k != "lm_head.weight":
            assert t == qtype.upper(), (k, t)
        err = ((w - v).abs().max() / v.abs().max()).item()
        assert err <= tol[qtype] if v.dim() == 2 else err == 0, (k, t, err)
    assert sum(res["types"].values()) == len(got)


def _quantize_linears(m, bits, sym, group=32):
    from leanlm.compress.quant.grid import rtn_quantize
    from leanlm.compress.quant.qlinear import QuantLinear
    from leanlm.model.layout import all_block_linears
    from leanlm.model.surgery import replace_module

    for name in all_block_linears(m):
        lin = m.get_submodule(name)
        codes, s, o = rtn_quantize(lin.weight.detach(), bits, group, sym, None)
        replace_module(m, name, QuantLinear.from_codes(codes, s, o, bits, group, sym, bias=lin.bias))
    return m


@pytest.mark.parametrize("bits,sym,fmt", [(4, True, "Q4_0"), (4, False, "Q4_1"), (8, True, "Q8_0")])
def test_quantized_model_is_written_exactly(tmp_path, bits, sym, fmt):
    """Groups of 32 on a GGUF grid: the file holds leanlm's own codes and fp16 scales, so gguf decodes
    exactly leanlm's weights and the file loads back with the same logits."""
    from leanlm.compress.quant.qlinear import QuantLinear

    hf = _randomize(tiny_hf("qwen2", vocab_size=NV))  # q/k/v biases ride along
    m = _quantize_linears(to_leanlm(hf), bits, sym)
    path = tmp_path / "q.gguf"
    res = export_gguf(m, _tok(tmp_path), path, "f32")  # the embedding and head stay f32
    assert res["exact"] == 14 and res["types"][fmt] == 14
    got = _read(path, m.config)
    for name, mod in m.named_modules():
        if isinstance(mod, QuantLinear):
            w, t = got[f"{name}.weight"]
            assert t == fmt and torch.equal(w, mod.dequantized_weight()), name
    back, _ = leanlm.load(path, convert_cache=False)
    ids = torch.randint(0, NV, (2, 20))
    QuantLinear.fast = False
    try:
        with torch.no_grad():
            assert (back(ids) - m(ids)).abs().max() < 1e-5
    finally:
        QuantLinear.fast = True


def test_int8_embedding_is_written_exactly(tmp_path):
    from leanlm.compress.quant.embedding import QuantEmbedding
    from leanlm.model.layout import EMBED
    from leanlm.model.surgery import replace_module

    m = to_leanlm(tiny_hf("llama", vocab_size=NV, tie_word_embeddings=True))
    emb = QuantEmbedding.from_embedding(m.get_submodule(EMBED))
    replace_module(m, EMBED, emb)
    res = export_gguf(m, _tok(tmp_path), tmp_path / "e.gguf", "q4_0")
    assert res["exact"] == 1
    w, t = _read(tmp_path / "e.gguf", m.config)[f"{EMBED}.weight"]
    assert t == "Q8_0" and torch.equal(w, emb.weight)


def test_llama_qk_permutation_and_q8_logits(tmp_path):
    """Q8_0 of a Llama (q/k permuted for llama.cpp) through transformers' GGUF loader."""
    import transformers

    hf = _randomize(tiny_hf("llama", vocab_size=NV))
    m = _quantize_linears(to_leanlm(hf), 8, True)
    export_gguf(m, _tok(tmp_path), tmp_path / "q8.gguf", "f32")
    from leanlm.compress.quant.qlinear import QuantLinear

    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q8.gguf").eval()
    ids = torch.randint(0, NV, (1, 24))
    QuantLinear.fast = False
    try:
        with torch.no_grad():
            assert (ref(ids).logits - m(ids)).abs().max() < 1e-4
    finally:
        QuantLinear.fast = True


def test_sentencepiece_tokenizer_round_trip(tmp_path):
    tok = _tok(tmp_path, "llama")
    m = to_leanlm(tiny_hf("llama", vocab_size=len(spm_vocab()[0])))
    export_gguf(m, tok, tmp_path / "s.gguf", "f16")
    _, tok2 = leanlm.load(tmp_path / "s.gguf", convert_cache=False)
    for text in ["the cat sat on the mat", "a hat in the sun\n42 ünïcode"]:
        assert tok2.encode(text) == tok.encode(text)
        assert tok2.decode(tok2.encode(text)) == tok.decode(tok.encode(text))


def test_llama3_rope_scaling_survives_export(tmp_path):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 10000.0}
    hf = tiny_hf("llama", vocab_size=NV, hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                 max_position_embeddings=512, rope_parameters=rope)
    m = to_leanlm(hf)
    export_gguf(m, _tok(tmp_path), tmp_path / "r.gguf", "f32")
    back, _ = leanlm.load(tmp_path / "r.gguf", convert_cache=False)
    assert back.config.rope_type == "llama3"
    ids = torch.randint(0, NV, (1, 200))
    with torch.no_grad():
        assert (back(ids) - hf(ids).logits).abs().max() < 1e-4


def test_export_errors_are_one_line(tmp_path, capsys, monkeypatch):
    from leanlm.cli import main

    monkeypatch.setenv("LEANLM_CACHE", str(tmp_path / "cache"))
    m, tok = to_leanlm(tiny_hf("llama", vocab_size=NV)), _tok(tmp_path)
    with pytest.raises(LeanLMError, match="unsupported GGUF type 'q3_k'; leanlm exports f32, f16"):
        export_gguf(m, tok, tmp_path / "x.gguf", "q3_k")
    m.config.layer_intermediate_size = [96, 80]
    with pytest.raises(LeanLMError, match="layers differ in shape"):
        export_gguf(m, tok, tmp_path / "x.gguf", "f16")
    m.config.layer_intermediate_size = None
    m.config.model_type = "gemma-like"
    with pytest.raises(LeanLMError, match="unsupported architecture model_type='gemma-like'"):
        export_gguf(m, tok, tmp_path / "x.gguf", "f16")
    src = write_tiny_gguf(tmp_path / "s.gguf", tiny_hf("llama", vocab_size=NV), "F32")
    capsys.readouterr()
    assert main(["export", str(src), "--type", "q5_9", "-o", str(tmp_path / "y.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("leanlm: error: unsupported GGUF type 'q5_9'") and "\n" not in err
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []


def test_cli_export_writes_a_loadable_file(tmp_path, capsys, monkeypatch):
    import json

    from leanlm.cli import main

    monkeypatch.setenv("LEANLM_CACHE", str(tmp_path / "cache"))
    src = write_tiny_gguf(tmp_path / "s.gguf", tiny_hf("llama", vocab_size=NV), "F32")
    assert main(["export", str(src), "--type", "q8_0", "-o", str(tmp_path / "o.gguf"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["type"] == "q8_0" and out["tensors"] == "F32 x5, Q8_0 x16"
    a, _ = leanlm.load(src, convert_cache=False)
    b, _ = leanlm.load(tmp_path / "o.gguf", convert_cache=False)
    ids = torch.randint(0, NV, (1, 12))
    with torch.no_grad():
        assert (a(ids) - b(ids)).abs().max() < 0.05 * a(ids).abs().max()
