"""Gemma 2, Gemma 3 (text) and Phi-3 against transformers (every parameter random), and every room on them:
cached and batched decoding, the loader's key maps both ways, RTN/GPTQ/AWQ recipes, LoRA vs peft, bad input."""
import copy
import json

import pytest
import torch

import leanlm
from conftest import check_left_padded_batch, greedy_reference, tiny_hf, tiny_moe, to_leanlm
from gguf_util import byte_vocab, write_tiny_gguf
from leanlm.errors import LeanLMError
from leanlm.model import ModelConfig

NV = len(byte_vocab()[0])
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
            "short_factor": [1.0 + 0.1 * i for i in range(8)], "long_factor": [1.0 + 0.7 * i for i in range(8)]}
# Soft-caps small enough to bite on a tiny random model; window 6 (conftest) < the sequence lengths used.
CASES = {
    "gemma2": ("gemma2", dict(attn_logit_softcapping=3.0, final_logit_softcapping=6.0)),
    "gemma3": ("gemma3_text", dict(final_logit_softcapping=8.0)),
    "gemma3-linear": ("gemma3_text", dict(rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
    "phi3": ("phi3", {}),
    "phi3-window": ("phi3", dict(sliding_window=5)),
    "phi3-partial": ("phi3", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                   "partial_rotary_factor": 0.5})),
    # 30 positions > original 16: the long factors apply (below 16 the short ones; see the cached test)
    "phi3-longrope": ("phi3", dict(max_position_embeddings=128, original_max_position_embeddings=16,
                                   rope_parameters=LONGROPE)),
}
DECODE = ["gemma2", "gemma3", "phi3-window", "phi3-partial"]


def pair(case, **over):
    kind, kw = CASES[case]
    hf = tiny_hf(kind, **{**kw, **over})
    return hf, to_leanlm(hf)


def ids_of(B, T, seed=1, vocab=128):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def close(a, b, tol=1e-4):
    """fp32 parity relative to the logit scale."""
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case):
    hf, m = pair(case)
    ids = ids_of(2, 30)
    with torch.no_grad():
        ref, out = hf(ids).logits, m(ids)
    assert ref.abs().max() > 0.5
    assert close(out, ref)


def test_each_gemma_feature_changes_the_logits():
    """Guard against a feature that silently does nothing on the tiny configs: switch each off, logits move."""
    hf, m = pair("gemma2")
    ids = ids_of(1, 20)
    with torch.no_grad():
        ref = m(ids)
        for attr, off in [("softcap", None), ("scale", None)]:
            a = m.model.layers[0].self_attn
            keep = getattr(a, attr)
            setattr(a, attr, off)
            assert (m(ids) - ref).abs().max() > 1e-3, attr
            setattr(a, attr, keep)
        for field, off in [("final_logit_softcapping", None), ("embed_scale", False), ("sliding_window", None)]:
            keep = getattr(m.config, field)
            setattr(m.config, field, off)
            assert (m(ids) - ref).abs().max() > 1e-3, field
            setattr(m.config, field, keep)
    assert m.config.layer_types == ["sliding_attention", "full_attention"]
    g3 = to_leanlm(tiny_hf("gemma3_text"))
    assert g3.rope_local is not None and g3.config.local_rope_theta == 1e4 and g3.config.rope_theta == 1e6


@pytest.mark.parametrize("case", DECODE)
def test_cached_decode_equals_full_forward(case):
    _, m = pair(case)
    ids = ids_of(2, 20, seed=3)
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache(2, 32)
        parts = [m(ids[:, :7], cache=cache), m(ids[:, 7:12], cache=cache)]  # chunked prefill past the window
        parts += [m(ids[:, t:t + 1], cache=cache) for t in range(12, 20)]
    assert close(torch.cat(parts, 1), full)


def test_longrope_cached_decode_below_the_original_length():
    """LongRoPE switches factors with the sequence length for the whole forward (as transformers does), so
    decoding is checked where the short factors hold throughout."""
    _, m = pair("phi3-longrope")
    ids = ids_of(1, 16, seed=4)
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache(1, 16)
        step = torch.cat([m(ids[:, :9], cache=cache)] + [m(ids[:, t:t + 1], cache=cache) for t in range(9, 16)], 1)
    assert close(step, full)


@pytest.mark.parametrize("case", DECODE)
def test_left_padded_batch_equals_one_by_one(case):
    _, m = pair(case)
    check_left_padded_batch(m, close, torch.Generator().manual_seed(5))


@pytest.mark.parametrize("case", ["gemma2", "gemma3", "phi3-window"])
def test_generate_equals_greedy_recompute(case):
    from leanlm.infer.generate import generate_tokens
    from leanlm.infer.sampling import GenerationConfig

    _, m = pair(case)
    prompt = [5, 9, 33, 70, 12, 8, 1]
    got = [s[0] for s in generate_tokens(m, [prompt], GenerationConfig(max_new_tokens=10, ignore_eos=True))]
    assert got == greedy_reference(m, prompt, 10)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "t.gguf"
    return leanlm.load(write_tiny_gguf(path, tiny_hf("llama", vocab_size=NV)), convert_cache=False)[1]


@pytest.mark.parametrize("case", ["gemma2", "gemma3-linear", "phi3-longrope"])
def test_checkpoints_round_trip_with_transformers(case, tmp_path, tokenizer):
    """transformers' save_pretrained -> leanlm.load (the family's key map) -> same logits; and leanlm.save ->
    transformers' from_pretrained (config.json from ModelConfig.to_hf, keys fused back for Phi-3) -> same."""
    import transformers
    from safetensors import safe_open

    hf, _ = pair(case, vocab_size=NV)
    hf.save_pretrained(tmp_path / "hf")
    tokenizer.save(tmp_path / "hf")
    m, tok = leanlm.load(tmp_path / "hf")
    ids = ids_of(2, 30, seed=2, vocab=NV)
    with torch.no_grad():
        ref = hf(ids).logits
        assert close(m(ids), ref)
    leanlm.save(m, tok, tmp_path / "ours")
    with safe_open(str(tmp_path / "ours" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(hf.state_dict()) - ({"lm_head.weight"} if hf.config.tie_word_embeddings else set())
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(back) is type(hf)
    with torch.no_grad():
        assert close(back(ids).logits, ref)
    m2, _ = leanlm.load(tmp_path / "ours")
    with torch.no_grad():
        assert close(m2(ids), ref)


def test_quantize_on_load_splits_fused_phi3_weights_first(tmp_path, tokenizer):
    """QLoRA's load hook sees Phi-3's q/k/v and gate/up, not the checkpoint's fused tensors."""
    from leanlm.peft.qlora import nf4_on_load

    hf, ref = pair("phi3", vocab_size=NV)
    hf.save_pretrained(tmp_path / "hf")
    tokenizer.save(tmp_path / "hf")
    m, _ = leanlm.load(tmp_path / "hf", quantize=nf4_on_load(["q_proj", "gate_proj"]))
    layer = m.model.layers[1]
    assert type(layer.self_attn.q_proj).__name__ == "NF4Linear" and type(layer.mlp.gate_proj).__name__ == "NF4Linear"
    assert type(layer.self_attn.k_proj) is torch.nn.Linear and torch.equal(layer.mlp.up_proj.weight,
                                                                           ref.model.layers[1].mlp.up_proj.weight)
    ids = ids_of(1, 12, vocab=NV)
    with torch.no_grad():
        a, b = m(ids), ref(ids)
    assert 0 < ((a - b).norm() / b.norm()).item() < 0.3  # NF4 error on two linears per block


def test_smoothing_folds_keep_the_function():
    """Every (norm or up-projection -> linears) group the layout names, folded with a random per-channel
    scale, leaves the logits unchanged: the right norm feeds each group and (1 + w) folds correctly."""
    from leanlm.compress.calibrate import BlockContext
    from leanlm.compress.quant.smoothquant import fold_scales, smoothing_groups
    from leanlm.model.layout import blocks

    for case in ("gemma2", "gemma3", "phi3"):
        _, m = pair(case)
        ids = ids_of(1, 16)
        with torch.no_grad():
            ref = m(ids)
            g = torch.Generator().manual_seed(0)
            for i, block in enumerate(blocks(m)):
                for prev, how, names in smoothing_groups(BlockContext(m, block, i, [], [])):
                    lins = [m.get_submodule(n) for n in names]
                    s = torch.rand(lins[0].in_features, generator=g) * 3 + 0.3
                    fold_scales(prev, how, lins, s)
            assert close(m(ids), ref), case
            assert (m.model.layers[0].input_layernorm.weight != to_leanlm(pair(case)[0]).model.layers[0]
                    .input_layernorm.weight).any()


@pytest.mark.parametrize("case,recipe", [("gemma2", "w8a16-awq-g32"), ("gemma3", "w8a16-gptq-g32"),
                                         ("phi3", "w8a16-rtn-g32"), ("phi3", "w8a16-awq-g32")])
def test_quantization_recipes(case, recipe):
    from leanlm.compress.quant.qlinear import QuantLinear
    from leanlm.compress.recipe import apply_recipe, load_recipe

    _, m = pair(case)
    ids = ids_of(1, 24, seed=6)
    with torch.no_grad():
        ref = m(ids)
    apply_recipe(m, load_recipe(recipe), ids_of(8, 24, seed=7), progress=False)
    assert isinstance(m.model.layers[1].mlp.down_proj, QuantLinear)
    with torch.no_grad():
        out = m(ids)
    rel = ((out - ref).norm() / ref.norm()).item()
    # 8-bit error on a random model (1-4% here, as on a tiny Llama), not a broken forward or a wrong fold
    assert 0 < rel < 0.08, rel


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_adapter_loads_in_peft_on_gemma(method, tmp_path):
    """A leanlm adapter saved in peft's format gives the same logits in peft over transformers' Gemma 2
    (prompt tuning: the virtual tokens join the *scaled* word embeddings, as peft does)."""
    import peft

    from leanlm.peft import apply, save_adapter

    hf, m = pair("gemma2")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    opts = dict(r=4, alpha=8, target_modules=targets) if method == "lora" else dict(num_virtual_tokens=3)
    m = apply(m, method, **opts)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_" in n or "prompt_embeddings" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    ids = ids_of(2, 11)
    with torch.no_grad():
        out = m.eval()(ids)
        assert (out - to_leanlm(hf)(ids)).abs().max() > 1e-2  # the adapter changes the model
    save_adapter(m, tmp_path / "ad")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "ad")).eval()
    with torch.no_grad():
        got = pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert close(got[:, opts.get("num_virtual_tokens", 0):], out)


@pytest.mark.parametrize("kind,field,value,msg", [
    ("gemma2", "hidden_activation", "relu", "hidden_act 'relu'.*supported: silu"),
    ("gemma3_text", "use_bidirectional_attention", True, "use_bidirectional_attention"),
    ("phi3", "rope_parameters", {"rope_type": "llama3", "factor": 2.0, "rope_theta": 1e4}, "rope type 'llama3'.*longrope"),
    ("gemma2", "layer_types", ["sliding_attention", "chunked_attention"], "layer_types.*chunked_attention"),
    ("phi3", "model_type", "phi4mm", "unsupported architecture model_type='phi4mm'.*gemma2"),
    ("phi3-longrope", "rope_parameters", {**LONGROPE, "long_factor": [1.0] * 3}, "long_factor, a list of 8"),
])
def test_bad_config_stops_with_one_line(tmp_path, kind, field, value, msg):
    kind, kw = CASES.get(kind, (kind, {}))
    d = tiny_hf(kind, **kw).config.to_dict()
    d[field] = value
    (tmp_path / "config.json").write_text(json.dumps(d))
    from leanlm.model.config import read_hf_config

    with pytest.raises(LeanLMError, match=msg) as e:
        read_hf_config(tmp_path)
    assert str(e.value).startswith(str(tmp_path / "config.json")) and "\n" not in str(e.value)


def test_to_hf_writes_what_from_hf_reads():
    for kind, kw in [CASES[c] for c in CASES]:
        cfg = ModelConfig.from_hf(tiny_hf(kind, **kw).config.to_dict())
        again = ModelConfig.from_hf(json.loads(json.dumps(cfg.to_hf())))
        assert again == cfg, kind


@pytest.mark.parametrize("kind,max_window_layers", [("qwen2", 0), ("qwen2", 2), ("qwen3", 1), ("qwen3", 4),
                                                    ("qwen2_moe", 1), ("qwen2_moe", 3), ("qwen3_moe", 2)])
def test_qwen_sliding_window_layers_match_transformers(kind, max_window_layers):
    """use_sliding_window windows only some layers in transformers (Qwen2/Qwen3: from max_window_layers on;
    Qwen2-MoE: every other layer below it; Qwen3-MoE: all): the same layers and logits, read with and without
    the explicit layer_types of transformers' config.json, and written back the same."""
    import transformers

    kw = dict(use_sliding_window=True, sliding_window=4, max_window_layers=max_window_layers, num_hidden_layers=4)
    hf = tiny_moe(kind, **kw) if kind.endswith("moe") else tiny_hf(kind, **kw)
    m = to_leanlm(hf)
    want = getattr(hf.config, "layer_types", None) or ["sliding_attention"] * 4  # Qwen3-MoE windows every layer
    assert ["full_attention" if m.config.window(i) is None else "sliding_attention" for i in range(4)] == want
    ids = ids_of(2, 20, seed=8)
    with torch.no_grad():
        ref = hf(ids).logits
        assert close(m(ids), ref)
        types = m.config.layer_types
        variants = []  # (window, layer types) that must not match: the window bites on this sequence...
        if "sliding_attention" in want:
            variants.append((None, types))
        if "full_attention" in want:  # ...and on the windowed layers only
            variants.append((4, None))
        for window, layer_types in variants:
            m.config.sliding_window, m.config.layer_types = window, layer_types
            assert not close(m(ids), ref)
        m.config.sliding_window, m.config.layer_types = 4, types
    d = hf.config.to_dict()
    d.pop("layer_types", None)  # older config.json files have only max_window_layers
    assert ModelConfig.from_hf(d) == m.config
    written = json.loads(json.dumps(m.config.to_hf()))
    assert ModelConfig.from_hf(written) == m.config
    back = transformers.AutoConfig.for_model(**written)
    assert (getattr(back, "layer_types", None) or ["sliding_attention"] * 4) == want
