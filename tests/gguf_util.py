"""Write tiny GGUF files the way llama.cpp's converter does (q/k rows permuted, quantized tensors)."""
from __future__ import annotations

import numpy as np

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_vocab():
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a")]
    tokens = SPECIAL + alphabet + ["".join(m) for m in merges]
    return tokens, [" ".join(m) for m in merges]


SPM_PIECES = ["\u2581", "t", "h", "e", "c", "a", "s", "n", "i", "o", "m", "\u2581t", "he", "\u2581the", "at",
              "\u2581c", "\u2581cat", "in", "\u2581in", "\u2581s", "\u2581sat", "on", "\u2581on", "\u2581m",
              "\u2581mat", "\u2581a"]


def spm_vocab():
    """A tiny SentencePiece-style vocabulary: unk, bos, eos, 256 byte tokens, then scored pieces."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
    types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES)
    scores = [0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))]
    return tokens, types, scores


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_freqs(cfg) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf LlamaModel.generate_extra_tensors, line for line."""
    import math

    import torch

    rope = getattr(cfg, "rope_parameters", None) or cfg.rope_scaling
    base = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low_freq_factor = rope.get("low_freq_factor", 1.0)
    high_freq_factor = rope.get("high_freq_factor", 4.0)
    old_context_len = rope.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    rope_factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            rope_factors.append(1)
        elif wavelen > low_freq_wavelen:
            rope_factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            rope_factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(rope_factors, dtype=torch.float32).numpy()


def write_tiny_gguf(path, hf_model, qtype_name: str = "Q8_0", truncate_to: int | None = None,
                    tokenizer: str = "gpt2", random_types: list[str] | None = None, seed: int = 0):
    """random_types: instead of the model's weights, the matrices are random raw blocks, the i-th
    matrix in random_types[i % len] (for types gguf can dequantize but not quantize: K- and I-quants)."""
    import gguf

    cfg = hf_model.config
    if tokenizer == "gpt2":
        tokens, merges = byte_vocab()
    else:
        tokens, spm_types, scores = spm_vocab()
    assert cfg.vocab_size == len(tokens), (cfg.vocab_size, len(tokens))
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    if tokenizer == "gpt2":
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types([3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL)))
        w.add_token_merges(merges)
        w.add_bos_token_id(0)
        w.add_eos_token_id(2)
        w.add_add_bos_token(False)
    else:
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_types(spm_types)
        w.add_token_scores(scores)
        w.add_unk_token_id(0)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(True)
    w.add_chat_template(TEMPLATE)
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type") == "llama3":  # llama.cpp writes no scaling metadata, only this tensor
        w.add_tensor("rope_freqs.weight", llama3_rope_freqs(cfg))
    qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    sub = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
           "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    rng = np.random.default_rng(seed)
    n_mat = 0
    for k, t in hf_model.state_dict().items():
        if k == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if k in names:
            name = names[k]
        else:
            parts = k.split(".")
            name = f"blk.{parts[2]}.{sub['.'.join(parts[3:-1])]}.{parts[-1]}"
        a = t.detach().float().numpy().copy()
        if name.endswith("attn_q.weight"):
            a = permute(a, cfg.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            a = permute(a, cfg.num_key_value_heads)
        if a.ndim == 2 and random_types:
            rt = random_types[n_mat % len(random_types)]
            n_mat += 1
            w.add_tensor(name, random_blocks(rt, *a.shape, rng),
                         raw_dtype=getattr(gguf.GGMLQuantizationType, rt))
        elif a.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if truncate_to is not None:
        with open(path, "r+b") as f:
            f.truncate(truncate_to)
    return path


# Byte offsets of the fp16 scales inside one block (ggml-common.h's block structs); random bytes there
# could be inf/nan, so they get a small random scale instead. "e8m0": MXFP4's exponent byte.
_F16_AT = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82], "Q3_K": [108],
           "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ2_XXS": [0], "IQ2_XS": [0], "IQ2_S": [0],
           "IQ3_XXS": [0], "IQ3_S": [0], "IQ1_S": [0], "IQ4_NL": [0], "IQ4_XS": [0], "TQ1_0": [52],
           "TQ2_0": [64], "MXFP4": "e8m0", "NVFP4": [], "IQ1_M": "iq1m"}


def random_blocks(qtype_name: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Raw blocks of a GGUF quantized type with random codes and small random scales: [rows, bytes]."""
    import gguf

    qt = getattr(gguf.GGMLQuantizationType, qtype_name)
    block, size = gguf.GGML_QUANT_SIZES[qt]
    n = rows * cols // block
    raw = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    at = _F16_AT[qtype_name]
    d = rng.uniform(0.002, 0.02, size=n).astype(np.float16).view(np.uint8).reshape(n, 2)
    if at == "e8m0":
        raw[:, 0] = rng.integers(118, 124, size=n)
    elif at == "iq1m":  # the fp16 scale sits in the top nibbles of the last four uint16 (IQ1_M's scales)
        sc = raw[:, -8:].copy().view(np.uint16)
        bits = d.copy().view(np.uint16)[:, 0]
        for i in range(4):
            sc[:, i] = (sc[:, i] & 0x0FFF) | (((bits >> (4 * i)) & 0xF) << 12)
        raw[:, -8:] = sc.view(np.uint8)
    else:
        for off in at:
            raw[:, off:off + 2] = d
    return raw.reshape(rows, -1)


def leanlm_key(name: str, cfg) -> str:
    """leanlm's state-dict key of a one-to-one GGUF tensor (the family's GGUF map)."""
    import torch

    from leanlm.model.families import family
    from leanlm.model.gguf_map import gguf_map, to_leanlm

    fam = family(cfg.model_type)
    return to_leanlm(name, torch.zeros(1), cfg, fam.layout, gguf_map(fam.gguf_arch))[0][0]


def write_family_gguf(path, hf_model, arch_name: str, qtype_name: str = "F32"):
    """A tiny GGUF of any family as llama.cpp's converter writes it, with gguf-py's own tensor-name table
    (llama.cpp's): Gemma norms stored as 1 + w, q/k permuted only for "llama", fused tensors kept fused
    (Phi-3), MoE experts stacked into 3-D tensors, the metadata llama.cpp reads."""
    import gguf

    cfg = hf_model.config
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    tokens, merges = byte_vocab()
    w = gguf.GGUFWriter(str(path), arch_name)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope = rope.get("full_attention", rope)
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if arch_name.startswith("gemma"):
        w.add_sliding_window(cfg.sliding_window)
    if arch_name == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    n_exp = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None) or 0
    if n_exp:
        w.add_expert_count(n_exp)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        if getattr(cfg, "moe_intermediate_size", None):
            w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if getattr(cfg, "shared_expert_intermediate_size", None):
            w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL)))
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
    for name, arr in family_gguf_tensors(hf_model, arch_name).items():
        if arr.ndim >= 2 and qtype_name != "F32":
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def family_gguf_tensors(hf_model, arch_name: str) -> dict:
    """{GGUF name: float32 array} of a transformers model as llama.cpp's converter names and transforms
    them, with gguf-py's own tensor-name table: Gemma norms stored as 1 + w, q/k permuted only for
    "llama", fused tensors kept fused (Phi-3), MoE experts stacked into 3-D tensors, the shared expert's
    gate as a vector."""
    import gguf

    cfg = hf_model.config
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    out = {}
    for k, t in hf_model.state_dict().items():
        if k == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        a = t.detach().float().numpy().copy()
        base = k.rsplit(".", 1)[0]
        if base.endswith("experts.gate_up_proj") or k.endswith("experts.gate_up_proj"):  # fused 3-D experts
            g, u = np.split(a, 2, axis=1)
            stem = k[: k.index("experts.")]
            parts = [(names.get_name(stem + "experts.gate_proj.weight", try_suffixes=(".weight",)), g),
                     (names.get_name(stem + "experts.up_proj.weight", try_suffixes=(".weight",)), u)]
        elif k.endswith("experts.down_proj"):
            stem = k[: k.index("experts.")]
            parts = [(names.get_name(stem + "experts.down_proj.weight", try_suffixes=(".weight",)), a)]
        else:
            parts = [(names.get_name(k, try_suffixes=(".weight", ".bias")), a)]
        for name, arr in parts:
            assert name is not None, k
            if arch_name.startswith("gemma") and name.endswith("norm.weight"):
                arr = arr + np.float32(1)  # llama.cpp's Gemma converters store 1 + w
            if arch_name == "llama" and name.endswith(("attn_q.weight", "attn_q.bias")):
                arr = permute(arr, cfg.num_attention_heads)
            elif arch_name == "llama" and name.endswith(("attn_k.weight", "attn_k.bias")):
                arr = permute(arr, cfg.num_key_value_heads)
            if name.endswith("ffn_gate_inp_shexp.weight"):
                arr = arr.reshape(-1)
            out[name] = np.ascontiguousarray(arr, dtype=np.float32)
    return out
