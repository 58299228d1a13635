"""Mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE) against transformers 5.24, every parameter random."""
import pytest
import torch

from conftest import save_tiny_tokenizer, tiny_moe

KINDS = ["mixtral", "qwen2_moe", "qwen3_moe"]


def load_via_folder(hf, folder):
    """transformers' save_pretrained -> leanlm.load: the path users take (exercises the key maps)."""
    import leanlm

    hf.save_pretrained(folder)
    save_tiny_tokenizer(folder, hf.config.vocab_size)
    m, _ = leanlm.load(folder)
    load_via_folder.folder[hf] = folder
    return m


load_via_folder.folder = {}


@pytest.fixture(scope="module", params=KINDS)
def pair(request, tmp_path_factory):
    hf = tiny_moe(request.param)
    return hf, load_via_folder(hf, tmp_path_factory.mktemp(request.param) / "m")


def test_logits_match_transformers(pair):
    from leanlm.model.moe import SparseMoE

    hf, m = pair
    ids = torch.randint(0, 128, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        out = m(ids)
        one = m(ids[:1, :1])
        ref_one = hf(ids[:1, :1]).logits
    assert ref.abs().max() > 0.5
    assert (out - ref).abs().max().item() <= 1e-4
    assert (one - ref_one).abs().max().item() <= 1e-4  # the one-token path
    cfg = m.config
    kinds = [type(b.mlp) for b in m.model.layers]
    assert kinds == [SparseMoE if cfg.is_moe_layer(i) else type(m.model.layers[1].mlp) for i in range(cfg.num_layers)]
    if cfg.model_type == "qwen2_moe":
        assert cfg.moe_layers == [0, 2] and kinds[1] is not SparseMoE
        assert hasattr(m.model.layers[0].mlp, "shared_expert") and cfg.norm_topk_prob is False
        assert m.model.layers[0].self_attn.q_proj.bias is not None and m.model.layers[0].self_attn.o_proj.bias is None
    if cfg.model_type == "qwen3_moe":
        assert cfg.norm_topk_prob is True and cfg.qk_norm


def test_norm_topk_prob_changes_output(pair):
    """Guard against a renormalization that silently does nothing."""
    _, m = pair
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        a = m(ids)
        for b in m.model.layers:
            if hasattr(b.mlp, "norm_topk_prob"):
                b.mlp.norm_topk_prob = not b.mlp.norm_topk_prob
        b_ = m(ids)
        for b in m.model.layers:
            if hasattr(b.mlp, "norm_topk_prob"):
                b.mlp.norm_topk_prob = not b.mlp.norm_topk_prob
    assert (a - b_).abs().max() > 1e-3


def test_cached_decode_and_batching(pair):
    _, m = pair
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache(2, 20)
        parts = [m(ids[:, :6], cache=cache)] + [m(ids[:, t:t + 1], cache=cache) for t in range(6, 16)]
        alone = torch.cat([m(ids[i:i + 1]) for i in range(2)])
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-4
    assert (alone - full).abs().max() < 1e-4


def test_fused_in_memory_keys_load(pair):
    """transformers' in-memory state dict (experts fused into 3-D tensors) loads through the key map."""
    from leanlm.io.checkpoint import build_on_meta, materialize
    from leanlm.model.families import family

    hf, m = pair
    sd = hf.state_dict()
    assert any(v.dim() == 3 for v in sd.values())
    m2 = materialize(build_on_meta(m.config), family(m.config.model_type).load_keys(dict(sd), m.config), "mem")
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        assert (m2(ids) - hf(ids).logits).abs().max() < 1e-4


def test_save_round_trip_to_transformers(pair, tmp_path):
    """leanlm.save -> transformers' from_pretrained: same logits (config.json and key names)."""
    import json

    import transformers

    import leanlm

    hf, m = pair
    leanlm.save(m, None, tmp_path / "out")
    cfg = json.loads((tmp_path / "out/config.json").read_text())
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        assert (back(ids).logits - m(ids)).abs().max() < 1e-4
    assert back.config.model_type == hf.config.model_type
    if cfg["model_type"] == "mixtral":
        from safetensors import safe_open

        with safe_open(str(tmp_path / "out/model.safetensors"), "pt") as f:
            assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in f.keys()
    save_tiny_tokenizer(tmp_path / "out")
    m3, _ = leanlm.load(tmp_path / "out")
    assert m3.config == m.config


def test_quantize_on_load_sees_every_expert(pair, tmp_path):
    """QLoRA's load path reads the checkpoint one tensor at a time through the key map (Mixtral's
    block_sparse_moe/w1/w2/w3 names): every expert linear arrives under leanlm's name, NF4 on load."""
    import leanlm
    from leanlm.compress.quant.nf4 import NF4Linear
    from leanlm.model.layout import layout_of
    from leanlm.peft.qlora import nf4_on_load

    hf, m = pair
    lay = layout_of(m)
    q, _ = leanlm.load(load_via_folder.folder[hf], quantize=nf4_on_load(lay.mlp_leaves()))
    n_experts = sum(isinstance(mod, NF4Linear) and f".{lay.experts}." in n for n, mod in q.named_modules())
    assert n_experts == 3 * m.config.num_experts * sum(map(m.config.is_moe_layer, range(m.config.num_layers)))
    # the same hook on the model already in memory: the very same modules at the same names
    import copy

    from leanlm.io.checkpoint import quantize_linears

    ref = quantize_linears(copy.deepcopy(m), nf4_on_load(lay.mlp_leaves()))
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        assert torch.equal(q(ids), ref(ids)) and not torch.equal(q(ids), m(ids))


def test_router_stats_count_routed_tokens(pair):
    from leanlm.model.moe import load_summary, moe_blocks, router_stats

    _, m = pair
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad(), router_stats(m) as stats:
        m(ids)
        m(ids[:1, :1])
    k = m.config.num_experts_per_tok
    assert sorted(stats) == [i for i in range(m.config.num_layers) if m.config.is_moe_layer(i)]
    for counts in stats.values():
        assert int(counts.sum()) == (20 + 1) * k
    s = load_summary(next(iter(stats.values())))
    assert s["tokens"] == 21 * k and abs(sum(s["share"]) - 1) < 1e-3
    assert all(b.counts is None for b in moe_blocks(m))  # off outside the context


def test_experts_run_only_on_routed_tokens(pair):
    """Each expert sees only its tokens: the tokens an expert's gate_proj receives equal its count."""
    from leanlm.model.moe import moe_blocks, router_stats

    _, m = pair
    moe = moe_blocks(m)[0]
    seen = [0] * moe.num_experts
    hooks = [e.gate_proj.register_forward_pre_hook(lambda mod, a, i=i: seen.__setitem__(i, seen[i] + a[0].shape[0]))
             for i, e in enumerate(moe.experts)]
    with torch.no_grad(), router_stats(m) as stats:
        m(torch.randint(0, 128, (1, 24)))
    for h in hooks:
        h.remove()
    assert seen == stats[moe.layer].tolist() and sum(seen) == 24 * moe.top_k


def test_bad_moe_config():
    from leanlm.errors import LeanLMError
    from leanlm.model import ModelConfig

    d = tiny_moe("mixtral").config.to_dict()
    d["num_experts_per_tok"] = 9
    with pytest.raises(LeanLMError, match="num_experts_per_tok"):
        from leanlm.model.transformer import Transformer

        Transformer(ModelConfig.from_hf(d))


def test_fused_expert_projections_equal_plain_path(pair):
    import copy

    from leanlm.model.moe import moe_blocks

    _, m = pair
    m = copy.deepcopy(m)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        plain = m(ids)
        m.fuse_projections()
        assert all("_gate_up" in e.__dict__ for b in moe_blocks(m) for e in b.experts)
        assert (m(ids) - plain).abs().max() < 1e-5
