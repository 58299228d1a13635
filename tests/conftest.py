"""Shared fixtures: tiny random models built with transformers' own config classes."""
from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


# Families' extra defaults for the tiny configs (Gemma's head_dim defaults to 256).
TINY_FAMILY = {"gemma2": dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=6),
               "gemma3_text": dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=6,
                                   layer_types=["sliding_attention", "full_attention"]),
               "phi3": dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)}


def tiny_hf(kind: str = "llama", seed: int = 0, **over):
    """A tiny transformers model of the given family with EVERY parameter random: matrices, biases, and
    norm weights too (around 1, or around 0 for Gemma's (1 + w) norms), so no path is checked at a
    value where it does nothing."""
    import transformers

    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
           "gemma2": transformers.Gemma2Config, "gemma3_text": transformers.Gemma3TextConfig,
           "phi3": transformers.Phi3Config}[kind]
    torch.manual_seed(seed)
    kw = {**TINY, **TINY_FAMILY.get(kind, {}), **over}
    model = transformers.AutoModelForCausalLM.from_config(cls(**kw)).eval()
    plus_one = kind.startswith("gemma")
    # Random init std 0.02 gives near-uniform logits; widen it so differences show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
            elif "norm" in name:
                p.normal_(0, 0.3) if plus_one else p.uniform_(0.5, 1.5)
            else:  # biases
                p.normal_(0, 0.2)
    return model


def to_leanlm(hf_model):
    """The same weights in leanlm, through the loader's own path (config.json reader, the family's key map,
    strict key and shape checks); tensors are copied, so the two models never share storage."""
    from leanlm.io.checkpoint import build_on_meta, materialize
    from leanlm.model import ModelConfig
    from leanlm.model.families import family

    cfg = ModelConfig.from_hf(hf_model.config.to_dict())
    sd = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    # the family's key map: transformers keeps Phi-3's q/k/v and MoE experts fused in memory
    return materialize(build_on_meta(cfg), family(cfg.model_type).load_keys(sd, cfg), "test model")


def tiny_llama(layers: int = 2, heads: int = 4, kv_heads: int = 2, seed: int = 0):
    """A tiny Llama with transformers' own (narrow, std 0.02) init -> (leanlm model, transformers model)."""
    import transformers

    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads)).eval()
    return to_leanlm(hf), hf


@torch.no_grad()
def check_left_padded_batch(m, close, generator=None):
    """Left-padded rows through the cache (prefill, then one decode step) against each row run alone;
    close(a, b) says whether two logit vectors agree."""
    seqs = [torch.randint(0, 128, (n,), generator=generator) for n in (9, 4, 13)]
    P = 13
    ids = torch.zeros(3, P, dtype=torch.long)
    valid = torch.zeros(3, P, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, P - len(s):] = s
        valid[i, P - len(s):] = True
    cache = m.new_cache(3, P + 2, valid=valid)
    first = m(ids, cache=cache)[:, -1]
    nxt = first.argmax(-1)
    second = m(nxt[:, None], cache=cache)[:, -1]
    for i, s in enumerate(seqs):
        alone = m(torch.cat([s, nxt[i:i + 1]])[None])[0]
        assert close(first[i], alone[-2]) and close(second[i], alone[-1])


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
