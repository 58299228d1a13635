"""The one decoder against transformers' reference implementations, every family and RoPE type."""
import pytest
import torch

from conftest import check_left_padded_batch, tiny_hf, to_leanlm

ROPE = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
}


def _compare(hf, T=24, B=2, tol=1e-4):
    m = to_leanlm(hf)
    ids = torch.randint(0, hf.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        out = m(ids)
    assert out.shape == ref.shape
    assert ref.abs().max() > 0.5  # the comparison means something
    assert (out - ref).abs().max().item() <= tol
    return m


@pytest.mark.parametrize("rope", list(ROPE))
def test_llama_rope_types_match_transformers(rope):
    # 80 positions > max_position_embeddings=64, so dynamic NTK and the scaled types all engage.
    hf = tiny_hf("llama", rope_scaling=ROPE[rope], max_position_embeddings=64 if rope != "yarn" else 64)
    _compare(hf, T=80)


@pytest.mark.parametrize("kind,over", [
    ("mistral", {"sliding_window": 8}),
    ("qwen2", {}),
    ("qwen3", {"head_dim": 32}),
    ("llama", {"num_key_value_heads": 1}),  # MQA
    ("llama", {"num_key_value_heads": 4}),  # MHA
    ("llama", {"tie_word_embeddings": True}),
    ("llama", {"attention_bias": True, "mlp_bias": True}),
])
def test_families_match_transformers(kind, over):
    m = _compare(tiny_hf(kind, **over), T=30)
    if kind == "qwen2":
        assert m.model.layers[0].self_attn.q_proj.bias is not None
        assert m.model.layers[0].self_attn.o_proj.bias is None
    if kind == "qwen3":
        assert hasattr(m.model.layers[0].self_attn, "q_norm")


def test_sliding_window_changes_output():
    """Guard against a window that silently does nothing: same weights, window off, differ."""
    hf = tiny_hf("mistral", sliding_window=4)
    m = to_leanlm(hf)
    ids = torch.randint(0, 128, (1, 20))
    with torch.no_grad():
        a = m(ids)
        m.config.sliding_window = None
        b = m(ids)
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-3


@pytest.mark.parametrize("kind,over", [("llama", {}), ("mistral", {"sliding_window": 6}), ("qwen3", {})])
def test_cached_decode_equals_full_forward(kind, over):
    m = to_leanlm(tiny_hf(kind, **over))
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache(2, 32)
        parts = [m(ids[:, :7], cache=cache), m(ids[:, 7:12], cache=cache)]  # chunked prefill
        parts += [m(ids[:, t:t + 1], cache=cache) for t in range(12, 20)]
    step = torch.cat(parts, dim=1)
    assert (step - full).abs().max() < 1e-4


def test_left_padded_batch_equals_one_by_one():
    m = to_leanlm(tiny_hf("llama"))
    check_left_padded_batch(m, lambda a, b: (a - b).abs().max() < 1e-4)


def test_bf16_close_to_fp32():
    m = to_leanlm(tiny_hf("llama"))
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        a = m(ids)
        b = m.to(torch.bfloat16)(ids).float()
    assert b.dtype == torch.float32
    assert (a.softmax(-1) - b.softmax(-1)).abs().max() < 0.05


def test_meta_build_holds_no_memory():
    from leanlm.io.checkpoint import build_on_meta
    from leanlm.model import ModelConfig

    cfg = ModelConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2)
    m = build_on_meta(cfg)
    assert all(p.is_meta for p in m.parameters())


@pytest.mark.parametrize("kind,over", [("llama", {}), ("qwen2", {}), ("qwen3", {}),
                                       ("llama", {"attention_bias": True, "mlp_bias": True})])
def test_fused_projections_equal_plain_path(kind, over):
    m = to_leanlm(tiny_hf(kind, **over))
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        plain = m(ids)
        before = sum(p.numel() for p in m.parameters())
        m.fuse_projections()
        assert "_gate_up" in m.model.layers[0].mlp.__dict__
        fused = m(ids)
    assert (fused - plain).abs().max() < 1e-5
    assert sum(p.numel() for p in m.parameters()) == before
    assert set(m.state_dict()) == set(to_leanlm(tiny_hf(kind, **over)).state_dict())


def test_fused_path_steps_aside_for_hooks_swaps_and_training():
    import torch.nn as nn

    m = to_leanlm(tiny_hf("llama")).fuse_projections()
    ids = torch.randint(0, 128, (1, 8))
    seen = []
    h = m.model.layers[0].self_attn.q_proj.register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    with torch.no_grad():
        m(ids)
    h.remove()
    assert seen, "calibration hooks must still fire on a fused model"
    # training: gradients reach the q/k/v and gate/up parameters
    m.train()
    m(ids).sum().backward()
    assert m.model.layers[0].self_attn.k_proj.weight.grad is not None
    assert m.model.layers[0].mlp.up_proj.weight.grad is not None
    # a swapped module is used, and the stale fused tensor is dropped
    m.eval()
    attn = m.model.layers[1].self_attn
    attn.v_proj = nn.Linear(attn.v_proj.in_features, attn.v_proj.out_features, bias=False)
    nn.init.zeros_(attn.v_proj.weight)
    with torch.no_grad():
        out = m(ids)
        m2 = to_leanlm(tiny_hf("llama"))
        m2.model.layers[1].self_attn.v_proj.weight.zero_()
        ref = m2(ids)
    assert (out - ref).abs().max() < 1e-5
    assert "_qkv" not in attn.__dict__


FAMILIES = [("llama", {}), ("mistral", {"sliding_window": 8}), ("qwen2", {}), ("qwen3", {"head_dim": 32}),
            ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 1})]


@pytest.mark.parametrize("kind,over", FAMILIES + [("llama", {"rope_scaling": r}) for r in ROPE.values() if r])
def test_save_pretrained_checkpoints_load_with_same_logits(tmp_path, kind, over):
    """The full path users take: transformers' save_pretrained folder -> leanlm.load -> same logits."""
    import leanlm
    from gguf_util import byte_vocab, write_tiny_gguf

    nv = len(byte_vocab()[0])
    hf = tiny_hf(kind, vocab_size=nv, **over)
    hf.save_pretrained(tmp_path / "m")
    _, tok = leanlm.load(write_tiny_gguf(tmp_path / "t.gguf", tiny_hf("llama", vocab_size=nv)), convert_cache=False)
    tok.save(tmp_path / "m")
    m, _ = leanlm.load(tmp_path / "m")
    ids = torch.randint(0, nv, (2, 80), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(ids).logits
        assert (m(ids) - ref).abs().max().item() <= 1e-4


def test_model_trains_after_generating():
    """Generation runs under inference mode; the fused weights and RoPE tables it builds must not be
    inference tensors, or a later backward pass fails."""
    from leanlm.infer.generate import generate_tokens
    from leanlm.infer.sampling import GenerationConfig

    m = to_leanlm(tiny_hf("llama"))
    list(generate_tokens(m, [[1, 2, 3]], GenerationConfig(max_new_tokens=3, ignore_eos=True)))
    assert not m.model.layers[0].self_attn.q_proj.weight.is_inference()
    m.train()
    loss = m(torch.randint(0, 128, (1, 10))).logsumexp(-1).mean()
    loss.backward()
    assert m.model.layers[0].self_attn.q_proj.weight.grad is not None
