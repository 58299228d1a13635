"""LoRA / DoRA / (IA)3 / prompt / prefix adapters against HF peft over the transformers model."""
import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from leanlm.errors import LeanLMError  # noqa: E402
from leanlm.model import ModelConfig, Transformer  # noqa: E402
from leanlm.peft import (apply,  # noqa: E402
                         load_adapter, merge, save_adapter, trainable_parameters, unload_lora, unmerge)


def tiny_hf(bias=False):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, attention_bias=bias)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def ours(hf):
    m = Transformer(ModelConfig.from_hf(hf.config.to_dict()))
    m.load_state_dict(hf.state_dict(), strict=False)
    return m.eval()


IDS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))

# method -> (leanlm method + options, peft config)
CASES = {
    "lora": (("lora", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
             lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                     task_type="CAUSAL_LM")),
    "rslora-regex": (("lora", dict(r=4, alpha=8, use_rslora=True, target_modules=r".*\.(k_proj|up_proj)")),
                     lambda: peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                                             target_modules=r".*\.(k_proj|up_proj)", task_type="CAUSAL_LM")),
    "dora": (("dora", dict(r=4, alpha=8, target_modules=["q_proj", "o_proj", "gate_proj"])),
             lambda: peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "o_proj", "gate_proj"],
                                     task_type="CAUSAL_LM")),
    "ia3": (("ia3", dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
            lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                                   task_type="CAUSAL_LM")),
}
VIRTUAL = {
    "prompt": (("prompt", dict(num_virtual_tokens=5)),
               lambda: peft.PromptTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM")),
    "prefix": (("prefix", dict(num_virtual_tokens=5)),
               lambda: peft.PrefixTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM")),
}


def randomize(model):
    """Adapters start as the identity; give every adapter tensor a non-trivial value."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(k in n for k in ("lora_", "ia3_l", "prompt_embeddings", "prompt_encoder")):
                p.add_(torch.randn(p.shape, generator=g) * (0.3 if "ia3" in n or "magnitude" in n else 0.1))


def peft_logits(pm, n_virtual=0):
    with torch.no_grad():
        out = pm(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits
    return out[:, n_virtual:]


@pytest.mark.parametrize("case", list(CASES) + list(VIRTUAL))
@pytest.mark.parametrize("bias", [False, True])
def test_leanlm_adapter_loads_in_peft(case, bias, tmp_path):
    (method, opts), _ = {**CASES, **VIRTUAL}[case]
    hf = tiny_hf(bias)
    m = apply(ours(hf), method, **opts)
    randomize(m)
    m.eval()
    with torch.no_grad():
        ref = m(IDS)
    save_adapter(m, tmp_path / "ad")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "ad")).eval()
    n = opts.get("num_virtual_tokens", 0) if method == "prompt" else 0
    torch.testing.assert_close(peft_logits(pm, n), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("case", list(CASES) + list(VIRTUAL))
def test_peft_adapter_loads_in_leanlm(case, tmp_path):
    (method, opts), make = {**CASES, **VIRTUAL}[case]
    hf = tiny_hf(bias=True)
    pm = peft.get_peft_model(copy.deepcopy(hf), make())
    randomize(pm)
    pm.eval()
    pm.save_pretrained(str(tmp_path / "ad"))
    m = load_adapter(ours(hf), tmp_path / "ad").eval()
    with torch.no_grad():
        got = m(IDS)
    n = opts.get("num_virtual_tokens", 0) if method == "prompt" else 0
    torch.testing.assert_close(got, peft_logits(pm, n), atol=2e-5, rtol=1e-4)
    # and it really changed the model
    assert (got - ours(hf)(IDS)).abs().max() > 1e-3


@pytest.mark.parametrize("case", list(CASES))
def test_merged_equals_unmerged(case):
    (method, opts), _ = CASES[case]
    m = apply(ours(tiny_hf(bias=True)), method, **opts)
    randomize(m)
    with torch.no_grad():
        w0 = m.model.layers[0].self_attn.q_proj
        before = m(IDS)
        merge(m)
        merged = m(IDS)
        unmerge(m)
        after = m(IDS)
    torch.testing.assert_close(merged, before, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert (merged - before).abs().max() < 1e-4 and w0 is m.model.layers[0].self_attn.q_proj


def test_unload_gives_plain_model_with_merged_weights(tmp_path):
    hf = tiny_hf()
    m = apply(ours(hf), "dora", r=4, alpha=8)
    randomize(m)
    with torch.no_grad():
        ref = m(IDS)
    unload_lora(m)
    assert all(type(mod).__name__ != "LoraLinear" for mod in m.modules())
    assert set(m.state_dict()) == set(ours(hf).state_dict())
    torch.testing.assert_close(m(IDS), ref, atol=1e-4, rtol=1e-4)


def test_trainable_counts_and_lora_fa():
    m = apply(ours(tiny_hf()), "lora", r=4, target_modules=["q_proj"])
    # q_proj 64->64 in 2 layers: A 4x64 + B 64x4
    assert trainable_parameters(m) == 2 * (4 * 64 + 64 * 4)
    fa = apply(ours(tiny_hf()), "lora-fa", r=4, target_modules=["q_proj"])
    assert trainable_parameters(fa) == 2 * 64 * 4
    assert trainable_parameters(apply(ours(tiny_hf()), "ia3")) == 2 * (32 + 32 + 96)


def test_bad_inputs(tmp_path):
    with pytest.raises(LeanLMError, match="no module matches"):
        apply(ours(tiny_hf()), "lora", target_modules=["nope"])
    with pytest.raises(LeanLMError, match="adapter_config.json"):
        load_adapter(ours(tiny_hf()), tmp_path)
    pm = peft.get_peft_model(tiny_hf(), peft.LoraConfig(r=2, target_modules=["q_proj"], bias="all"))
    pm.save_pretrained(str(tmp_path / "b"))
    with pytest.raises(LeanLMError, match="bias"):
        load_adapter(ours(tiny_hf()), tmp_path / "b")
    m = apply(ours(tiny_hf()), "lora", r=2, target_modules=["q_proj"])
    save_adapter(m, tmp_path / "c")
    conf = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    conf["target_modules"] = ["k_proj"]
    (tmp_path / "c" / "adapter_config.json").write_text(json.dumps(conf))
    with pytest.raises(LeanLMError, match="do not fit"):
        load_adapter(ours(tiny_hf()), tmp_path / "c")


@pytest.mark.parametrize("method", ["prompt", "prefix", "dora"])
def test_cached_generation_matches_full_recompute(method):
    """Generation with the KV cache (left-padded batch) equals greedy decoding by full recompute."""
    from leanlm.infer.generate import generate_tokens
    from leanlm.infer.sampling import GenerationConfig

    opts = {"num_virtual_tokens": 3} if method != "dora" else {"r": 4}
    m = apply(ours(tiny_hf()), method, **opts)
    randomize(m)
    m.eval()
    prompts = [[5, 9, 11, 3, 7], [8, 2]]
    steps = list(generate_tokens(m, prompts, GenerationConfig(max_new_tokens=6, stop_token_ids=[])))
    got = [[s[i] for s in steps] for i in range(2)]
    for p, g in zip(prompts, got):
        ids = list(p)
        with torch.no_grad():
            for _ in range(6):
                ids.append(int(m(torch.tensor([ids]))[0, -1].argmax()))
        assert g == ids[len(p):]


@pytest.mark.slow
def test_default_model_lora_parity_with_peft(tmp_path):
    """SmolLM2-135M: a leanlm LoRA adapter over transformers + peft gives leanlm's logits."""
    import leanlm
    from leanlm.io.registry import converted_dir, default_gguf_path

    model, tok = leanlm.load()
    m = apply(model, "dora", r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    randomize(m)
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog.")])
    with torch.no_grad():
        ref = m(ids)
    save_adapter(m, tmp_path / "ad")
    del m, model
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(converted_dir(default_gguf_path())),
                                                           dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ad")).eval()
    with torch.no_grad():
        got = pm(input_ids=ids).logits
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-4)
