"""Integration on the real default model (SmolLM2-135M-Instruct from its Q4_1 GGUF) against transformers.

Perplexity parity on the same model lives in test_perplexity.py (against the HF-docs loop)."""
import numpy as np
import pytest
import torch

import leanlm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference():
    import transformers

    from leanlm.io.registry import default_gguf_path

    p = default_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name,
                                                           dtype=torch.float32).eval()
    htok = transformers.AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    return p, hf, htok


def test_logits_match_transformers(default_model, reference):
    m, tok = default_model
    _, hf, _ = reference
    ids = torch.tensor([tok.encode("It is a truth universally acknowledged, that a single man in possession")])
    with torch.no_grad():
        diff = (m(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_tokenizer_ids_match_transformers(default_model, reference):
    from leanlm.data import packaged_text

    _, tok = default_model
    _, _, htok = reference
    text = packaged_text("eval")[:20000] + "\nIn 2024, 3.14159 and 1,000,000 — naïve café! <|im_start|>"
    assert tok.encode(text) == htok(text)["input_ids"]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    assert tok.apply_chat_template(msgs) == htok.apply_chat_template(msgs, tokenize=False,
                                                                     add_generation_prompt=True)


def test_gguf_tensors_equal_gguf_dequantization(default_model, reference):
    import gguf

    m, _ = default_model
    r = gguf.GGUFReader(str(reference[0]))
    by_name = {t.name: t for t in r.tensors}
    for name, ours in [("token_embd.weight", m.model.embed_tokens.weight),  # Q8_0
                       ("blk.7.ffn_down.weight", m.model.layers[7].mlp.down_proj.weight),  # Q4_1
                       ("blk.3.attn_v.weight", m.model.layers[3].self_attn.v_proj.weight)]:
        t = by_name[name]
        np.testing.assert_array_equal(gguf.quants.dequantize(t.data, t.tensor_type), ours.detach().numpy())
    assert by_name["blk.7.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_1


def test_generates_sensible_chat_answer(default_model):
    m, tok = default_model
    out = leanlm.generate(m, tok, "What is the capital of France?", chat=True, max_new_tokens=20)
    assert "Paris" in out
