"""Shared fixtures: tiny random models built with transformers' own config classes."""
from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def tiny_hf(kind: str = "llama", seed: int = 0, **over):
    """A tiny transformers model of the given family, with random weights."""
    import transformers

    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[kind]
    torch.manual_seed(seed)
    kw = {**TINY, **over}
    model = transformers.AutoModelForCausalLM.from_config(cls(**kw)).eval()
    # Random init std 0.02 gives near-uniform logits; widen it so differences show.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return model


def to_leanlm(hf_model):
    from leanlm.model import ModelConfig, Transformer

    from leanlm.model.families import family

    m = Transformer(ModelConfig.from_hf(hf_model.config.to_dict()))
    # the family's key map: transformers keeps MoE experts fused in memory
    m.load_state_dict(family(m.config.model_type).load_keys(hf_model.state_dict(), m.config), strict=False)
    m.tie_weights()
    return m.eval()


def tiny_llama(layers: int = 2, heads: int = 4, kv_heads: int = 2, seed: int = 0):
    """A tiny Llama with transformers' own (narrow, std 0.02) init -> (leanlm model, transformers model)."""
    import transformers

    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads)).eval()
    return to_leanlm(hf), hf


@torch.inference_mode()
def greedy_reference(model, prompt, n):
    """Plain greedy decoding by recomputing the whole sequence each step (no cache at all)."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.fixture
def tiny_pair():
    hf = tiny_hf("llama")
    return hf, to_leanlm(hf)


@pytest.fixture(scope="session")
def default_model():
    import leanlm

    return leanlm.load()


MOE = {"mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
       "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                         shared_expert_intermediate_size=48, norm_topk_prob=False, mlp_only_layers=[1],
                         num_hidden_layers=3),
       "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)}


def tiny_moe(kind: str = "mixtral", seed: int = 0, **over):
    """A tiny transformers mixture-of-experts model with EVERY parameter random: norms, biases, router,
    experts (transformers keeps experts fused in memory; save_pretrained writes them one per expert)."""
    import transformers

    cls = {"mixtral": transformers.MixtralConfig, "qwen2_moe": transformers.Qwen2MoeConfig,
           "qwen3_moe": transformers.Qwen3MoeConfig}[kind]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cls(**{**TINY, **MOE[kind], **over})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif p.dim() == 1:
                p.normal_(0, 0.2)
            else:
                p.normal_(0, 0.2)
    return model


def save_tiny_tokenizer(folder, vocab_size: int = 128):
    """A word-level tokenizer.json whose tokens are the ids' digits (enough for leanlm.load)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({str(i): i for i in range(vocab_size)}, unk_token="0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
