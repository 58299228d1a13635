"""GGUF files of every family, written as llama.cpp's converter writes them (gguf-py's own tensor-name
table, q/k permuted for "llama" only, 3-D expert tensors, the shared expert's gate as a vector): leanlm
reads back the transformers model's logits."""
import pytest
import torch

import leanlm
from conftest import tiny_hf, tiny_moe
from gguf_util import byte_vocab, write_family_gguf

NV = len(byte_vocab()[0])

MOE_CASES = [("mixtral", "llama"), ("qwen2_moe", "qwen2moe"), ("qwen3_moe", "qwen3moe")]


@pytest.mark.parametrize("kind,arch", MOE_CASES, ids=[c[0] for c in MOE_CASES])
def test_moe_gguf_matches_transformers(tmp_path, kind, arch):
    over = {"mlp_only_layers": []} if kind == "qwen2_moe" else {}  # llama.cpp's qwen2moe has no dense blocks
    hf = tiny_moe(kind, vocab_size=NV, **over)
    path = write_family_gguf(tmp_path / f"{arch}.gguf", hf, arch)
    m, _ = leanlm.load(path, convert_cache=False)
    assert m.config.model_type == kind and m.config.num_experts == 4
    ids = torch.randint(0, NV, (2, 16))
    with torch.no_grad():
        assert (m(ids) - hf(ids).logits).abs().max() < 1e-4


def test_moe_gguf_q8_experts_equal_gguf_dequantization(tmp_path):
    """Quantized 3-D expert tensors split per expert: each expert's matrix is gguf's own dequantization
    of its slice (Qwen2-MoE, with the shared expert and its gate)."""
    import gguf

    from leanlm.model.layout import block_prefix, layout_of

    hf = tiny_moe("qwen2_moe", vocab_size=NV, mlp_only_layers=[], shared_expert_intermediate_size=64)
    path = write_family_gguf(tmp_path / "q.gguf", hf, "qwen2moe", "Q8_0")
    m, _ = leanlm.load(path, convert_cache=False)
    lay, sd = layout_of(m), m.state_dict()
    r = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    for role, leaf in (("gate", lay.gate), ("up", lay.up), ("down", lay.down)):
        t = r[f"blk.1.ffn_{role}_exps.weight"]
        assert t.tensor_type.name == "Q8_0"
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        assert w.shape[0] == 4
        for e in range(4):
            assert torch.equal(sd[f"{block_prefix(1)}{lay.mlp}.{lay.experts}.{e}.{leaf}.weight"], w[e])
    gate = r["blk.1.ffn_gate_inp_shexp.weight"]
    assert torch.equal(sd[f"{block_prefix(1)}{lay.mlp}.{lay.shared_expert_gate}.weight"][0],
                       torch.from_numpy(gate.data.copy()))


CASES = [
    ("gemma2", "gemma2", dict(query_pre_attn_scalar=16, sliding_window=6)),
    ("gemma3_text", "gemma3", dict(query_pre_attn_scalar=16, sliding_window=6, num_hidden_layers=6,
                                   layer_types=["sliding_attention"] * 5 + ["full_attention"])),
    ("phi3", "phi3", dict(partial_rotary_factor=0.5)),
]


@pytest.mark.parametrize("kind,arch,over", CASES, ids=[c[0] for c in CASES])
def test_family_gguf_matches_transformers(tmp_path, kind, arch, over):
    hf = tiny_hf(kind, vocab_size=NV, max_position_embeddings=64, **over)
    path = write_family_gguf(tmp_path / f"{arch}.gguf", hf, arch)
    m, _ = leanlm.load(path, convert_cache=False)
    assert m.config.model_type == kind
    ids = torch.randint(0, NV, (2, 24))  # longer than the sliding window
    with torch.no_grad():
        assert (m(ids) - hf(ids).logits).abs().max() < 1e-4
