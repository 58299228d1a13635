"""GGUF export of every family llama.cpp runs: gguf's reader gives back llama.cpp's converter's tensors
(gguf-py's own name table applied to the transformers model) exactly, the metadata llama.cpp's loader
reads is there, quantized grids are written from leanlm's own codes, and the file loads back into leanlm
with the logits of the model that was exported."""
import math

import numpy as np
import pytest
import torch

import leanlm
from conftest import tiny_hf, tiny_moe, to_leanlm
from gguf_util import byte_vocab, family_gguf_tensors, write_tiny_gguf
from leanlm.errors import LeanLMError
from leanlm.io.gguf import unpermute_qk
from leanlm.io.gguf_export import export_gguf, progress_total

NV = len(byte_vocab()[0])

# (family, llama.cpp architecture, builder, config overrides)
CASES = [
    ("llama", "llama", tiny_hf, {"attention_bias": True}),
    ("mistral", "llama", tiny_hf, {"sliding_window": 8}),
    ("qwen2", "qwen2", tiny_hf, {}),
    ("qwen3", "qwen3", tiny_hf, {"tie_word_embeddings": True}),
    ("gemma2", "gemma2", tiny_hf, {"query_pre_attn_scalar": 16}),
    ("gemma3_text", "gemma3", tiny_hf, {"query_pre_attn_scalar": 16, "num_hidden_layers": 3, "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}},
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"]}),
    ("phi3", "phi3", tiny_hf, {"partial_rotary_factor": 0.5}),
    ("phi3", "phi3", tiny_hf, {"original_max_position_embeddings": 32, "rope_parameters": {  # LongRoPE (128k)
        "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
        "short_factor": [1.0, 1.3, 2.1, 3.7], "long_factor": [1.5, 2.5, 5.0, 9.0]}}),
    ("mixtral", "llama", tiny_moe, {}),
    ("qwen2_moe", "qwen2moe", tiny_moe, {"mlp_only_layers": [], "num_hidden_layers": 2,
                                         "shared_expert_intermediate_size": 64}),
    ("qwen3_moe", "qwen3moe", tiny_moe, {}),
]
IDS = [c[0] + ("-longrope" if "rope_parameters" in c[3] and c[0] == "phi3" else "") for c in CASES]

# What llama.cpp's loader reads (src/llama-model.cpp, src/models/<arch>.cpp), beyond the tokenizer
COMMON = ["context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
          "attention.head_count_kv", "attention.key_length", "attention.value_length", "rope.dimension_count",
          "rope.freq_base", "attention.layer_norm_rms_epsilon"]
EXTRA = {"gemma2": ["attn_logit_softcapping", "final_logit_softcapping", "attention.sliding_window"],
         "gemma3": ["attention.sliding_window", "attention.sliding_window_pattern", "rope.freq_base_swa",
                    "rope.scaling.type", "rope.scaling.factor"],
         "phi3": ["attention.sliding_window", "rope.scaling.original_context_length"],
         "qwen2moe": ["expert_count", "expert_used_count", "expert_feed_forward_length",
                      "expert_shared_feed_forward_length"],
         "qwen3moe": ["expert_count", "expert_used_count", "expert_feed_forward_length"]}
TOKENIZER = ["tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
             "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
             "tokenizer.chat_template"]


def _tok(tmp_path):
    path = write_tiny_gguf(tmp_path / "tok.gguf", tiny_hf("llama", vocab_size=NV), "F32")
    return leanlm.load(path, convert_cache=False)[1]


def _model(build, kind, over):
    hf = build(kind, vocab_size=NV, max_position_embeddings=64, **over)
    return hf, to_leanlm(hf)


def _fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items()}


def _dequantized(reader) -> dict:
    import gguf

    return {t.name: (np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32), t)
            for t in reader.tensors}


@pytest.mark.parametrize("kind,arch,build,over", CASES, ids=IDS)
def test_family_export_is_llama_cpps_conversion(tmp_path, kind, arch, build, over):
    """f32: every tensor equals what llama.cpp's converter writes for the transformers model (gguf's name
    table, norms 1 + w, q/k permuted, fused, stacked experts), bit for bit; q8_0: each matrix is gguf's own
    Q8_0 quantization of it; the metadata llama.cpp reads is there; the file loads back with the logits."""
    import gguf

    hf, m = _model(build, kind, over)
    tok = _tok(tmp_path)
    calls = []
    export_gguf(m, tok, tmp_path / "f32.gguf", "f32", progress=lambda: calls.append(1))
    assert len(calls) == progress_total(m)  # the bar ends full
    r = gguf.GGUFReader(str(tmp_path / "f32.gguf"))
    f = _fields(r)
    assert f["general.architecture"] == arch
    for key in COMMON + EXTRA.get(arch, []) + (["expert_count", "expert_used_count"] if kind == "mixtral" else []):
        assert f"{arch}.{key}" in f, key
    for key in TOKENIZER:
        assert key in f, key
    want = family_gguf_tensors(hf, arch)
    rope = over.get("rope_parameters", {})
    if rope.get("rope_type") == "longrope":  # llama.cpp's converter adds them as tensors
        want["rope_factors_long.weight"] = np.array(rope["long_factor"], dtype=np.float32)
        want["rope_factors_short.weight"] = np.array(rope["short_factor"], dtype=np.float32)
        assert f["phi3.rope.scaling.original_context_length"] == 32
        assert f["phi3.rope.scaling.attn_factor"] == np.float32(math.sqrt(1 + math.log(2) / math.log(32)))
    got = _dequantized(r)
    assert set(got) == set(want)
    for name, a in want.items():
        assert got[name][0].shape == a.shape and np.array_equal(got[name][0], a), name
    cfg = hf.config
    assert f[f"{arch}.attention.layer_norm_rms_epsilon"] == np.float32(cfg.rms_norm_eps)
    if arch == "phi3":
        assert f["phi3.rope.dimension_count"] == 8  # partial rotary: half of head_dim 16
    if arch == "gemma2":
        assert f["gemma2.attn_logit_softcapping"] == cfg.attn_logit_softcapping
        assert f["gemma2.final_logit_softcapping"] == cfg.final_logit_softcapping
    if arch == "gemma3":
        assert list(f["gemma3.attention.sliding_window_pattern"]) == [True, True, False]
        assert f["gemma3.rope.freq_base"] == 100000.0 and f["gemma3.rope.freq_base_swa"] == 1000.0
        assert f["gemma3.rope.scaling.type"] == "linear" and f["gemma3.rope.scaling.factor"] == 4.0
    if kind == "mistral":
        assert f["llama.attention.sliding_window"] == 8
    if build is tiny_moe:
        assert f[f"{arch}.expert_count"] == 4 and f[f"{arch}.expert_used_count"] == 2

    ids = torch.randint(0, NV, (2, 40))  # longer than the sliding windows and LongRoPE's original length
    back, _ = leanlm.load(tmp_path / "f32.gguf", convert_cache=False)
    assert back.config.model_type == kind
    with torch.no_grad():
        assert (back(ids) - m(ids)).abs().max() < 1e-5
        assert (back(ids) - hf(ids).logits).abs().max() < 1e-4

    export_gguf(m, tok, tmp_path / "q8.gguf", "q8_0")
    q8 = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "q8.gguf")).tensors}
    for name, a in want.items():
        t = q8[name]
        if a.ndim == 1 or "ffn_gate_inp" in name:
            assert t.tensor_type.name == "F32" and np.array_equal(np.asarray(t.data), a), name
        else:
            assert t.tensor_type.name == "Q8_0", name
            ref = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            assert np.array_equal(np.asarray(t.data).reshape(ref.shape), ref), name


def _quantize(m):
    """Attention linears to symmetric 4-bit, MLP/expert linears and routers to symmetric 8-bit, groups of
    32 (RTN): both GGUF grids in one model."""
    from leanlm.compress.quant.grid import rtn_quantize
    from leanlm.compress.quant.qlinear import QuantLinear
    from leanlm.model.layout import block_prefix, layout_of
    from leanlm.model.surgery import replace_module

    lay = layout_of(m)
    for i in range(m.config.num_layers):
        for group, names in lay.groups(m.config, i).items():
            bits = 4 if group.startswith("attn") else 8
            for rel in names:
                name = block_prefix(i) + rel
                lin = m.get_submodule(name)
                codes, s, o = rtn_quantize(lin.weight.detach(), bits, 32, True, None)
                replace_module(m, name, QuantLinear.from_codes(codes, s, o, bits, 32, True, bias=lin.bias))
    return m


@pytest.mark.parametrize("kind,arch,build,over", CASES, ids=IDS)
def test_family_quantized_grid_is_written_exactly(tmp_path, kind, arch, build, over):
    """Symmetric 4-bit (attention) and 8-bit (MLPs, experts) groups of 32: the file holds leanlm's own
    codes and scales as Q4_0 / Q8_0, also where llama.cpp fuses (Phi-3's qkv, gate+up) or stacks
    (experts) them, so gguf's dequantization of every matrix is exactly leanlm's quantized weight, and
    the file loads back with the quantized model's logits."""
    import gguf

    from leanlm.compress.quant.qlinear import QuantLinear
    from leanlm.model.families import family
    from leanlm.model.gguf_map import LONGROPE, gguf_map, to_leanlm
    from leanlm.model.layout import block_prefix, layout_of

    _, m = _model(build, kind, over)
    m = _quantize(m)
    res = export_gguf(m, _tok(tmp_path), tmp_path / "q.gguf", "f32")
    quantized = {f"{n}.weight": (mod.dequantized_weight(), "Q4_0" if mod.bits == 4 else "Q8_0")
                 for n, mod in m.named_modules() if isinstance(mod, QuantLinear)}
    fam, gm = family(kind), gguf_map(arch)
    seen = set()
    for name, (w, t) in _dequantized(gguf.GGUFReader(str(tmp_path / "q.gguf"))).items():
        if name in LONGROPE:
            continue
        if gm.permute_qk and name.endswith("attn_q.weight"):
            w = unpermute_qk(w, m.config.num_heads)
        elif gm.permute_qk and name.endswith("attn_k.weight"):
            w = unpermute_qk(w, m.config.num_kv_heads)
        for key, v in to_leanlm(name, torch.from_numpy(w.copy()), m.config, fam.layout, gm):
            if key in quantized and "ffn_gate_inp" not in name:  # the router stays F32, as llama.cpp keeps it
                assert t.tensor_type.name == quantized[key][1] and torch.equal(v, quantized[key][0]), key
                seen.add(key)
    lay = layout_of(m)
    routers = {f"{block_prefix(i)}{r}.weight" for i in range(m.config.num_layers)
               for r in lay.groups(m.config, i)["router"]}
    assert seen == set(quantized) - routers and res["exact"] > 0
    back, _ = leanlm.load(tmp_path / "q.gguf", convert_cache=False)
    ids = torch.randint(0, NV, (2, 24))
    QuantLinear.fast = False
    try:
        with torch.no_grad():
            assert (back(ids) - m(ids)).abs().max() < 1e-5
    finally:
        QuantLinear.fast = True


REFUSE = [
    ("gemma2", {"query_pre_attn_scalar": 24}, "llama.cpp scales this architecture's queries by 1/sqrt\\(16\\)"),
    ("gemma2", {"query_pre_attn_scalar": 16, "attn_logit_softcapping": None}, "always soft-caps"),
    ("gemma2", {"query_pre_attn_scalar": 16, "tie_word_embeddings": False}, "ties them"),
    ("qwen2", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}},
     "dynamic RoPE scaling has no GGUF form"),
    ("phi3", {"hidden_act": "gelu_pytorch_tanh"}, "hidden_act='gelu_pytorch_tanh', but llama.cpp runs"),
]


@pytest.mark.parametrize("kind,over,msg", REFUSE, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(REFUSE)])
def test_unfaithful_models_are_refused_in_one_line(tmp_path, kind, over, msg):
    _, m = _model(tiny_hf, kind, over)
    with pytest.raises(LeanLMError, match=msg) as e:
        export_gguf(m, _tok(tmp_path), tmp_path / "x.gguf", "f16")
    assert "\n" not in str(e.value) and str(e.value).startswith(f"model: cannot write {kind} as llama.cpp's")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("kind,over,msg", [
    ("qwen2_moe", {"num_hidden_layers": 2, "mlp_only_layers": [1]}, "mlp_only_layers"),
    ("qwen2_moe", {"num_hidden_layers": 2, "mlp_only_layers": [], "norm_topk_prob": True}, "never renormalizes"),
    ("qwen3_moe", {"norm_topk_prob": False}, "always renormalizes"),
])
def test_moe_llama_cpp_cannot_run_is_refused(tmp_path, kind, over, msg):
    _, m = _model(tiny_moe, kind, over)
    with pytest.raises(LeanLMError, match=msg):
        export_gguf(m, _tok(tmp_path), tmp_path / "x.gguf", "f16")
