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

    m = Transformer(ModelConfig.from_hf(hf_model.config.to_dict()))
    m.load_state_dict(hf_model.state_dict(), strict=False)
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
