"""Every room on mixture-of-experts models: quantization, pruning, LoRA, generation, the engine.

Calibration reaches an expert only through the tokens routed to it, so an expert can see no token at
all: calibrating on single tokens (top-2 of 4 experts) guarantees unused experts, which must come out
solved sanely (RTN / magnitude), never zeroed or NaN."""
import copy

import pytest
import torch
import torch.nn as nn

from conftest import greedy_reference, tiny_moe, to_leanlm
from leanlm.compress.quant.rtn import RTNConfig, rtn_solve
from leanlm.compress.quant.qlinear import QuantLinear
from leanlm.compress.recipe import apply_recipe, parse_recipe
from leanlm.model.layout import block_prefix, layout_of
from leanlm.model.moe import moe_blocks, router_stats

IDS = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(5))
ONE_TOKEN = torch.tensor([[17], [90]])  # two calibration samples of one token each


@pytest.fixture(scope="module")
def qwen2():
    return to_leanlm(tiny_moe("qwen2_moe"))  # experts, shared expert, a dense layer in between


@pytest.fixture(scope="module")
def mixtral():
    return to_leanlm(tiny_moe("mixtral"))


def expert_names(m, layer=0, which=None):
    lay = layout_of(m)
    mlps = [p for p in lay.mlp_prefixes(m.config, layer) if f".{lay.experts}." in p]
    return [block_prefix(layer) + p + n for p in mlps for n in (which or lay.mlp_leaves())]


def expert_of(m, name: str) -> int:
    return int(name.split(f".{layout_of(m).experts}.")[1].split(".")[0])


def unused_experts(m, samples):
    """Experts of block 0 no calibration token is routed to (block 0's routing does not depend on
    compression: its input is the embedding)."""
    with torch.no_grad(), router_stats(m) as s:
        for row in samples:
            m(row[None])
    return [e for e, c in enumerate(s[0].tolist()) if c == 0], [e for e, c in enumerate(s[0].tolist()) if c]


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_rtn_quantizes_every_expert_exactly(qwen2, monkeypatch):
    monkeypatch.setattr(QuantLinear, "fast", False)  # the dequantize-then-matmul reference path (fp32)
    m = copy.deepcopy(qwen2)
    ref = copy.deepcopy(qwen2)
    apply_recipe(m, parse_recipe("- method: rtn\n  bits: 4\n  group_size: 32"), progress=False)
    lay = layout_of(m)
    for i in range(m.config.num_layers):
        for n in [block_prefix(i) + r for r in lay.linears(m.config, i)]:
            is_router = n in [block_prefix(i) + r for r in lay.groups(m.config, i)["router"]]
            assert isinstance(m.get_submodule(n), nn.Linear if is_router else QuantLinear), n  # routers stay
            if not is_router:  # the reference: each float weight replaced by its RTN dequantization
                w = rtn_solve(None, ref.get_submodule(n), RTNConfig(4, 32)).dequantized_weight()
                ref.get_submodule(n).weight.data.copy_(w)
    with torch.no_grad():
        assert (m(IDS) - ref(IDS)).abs().max() < 1e-4


def test_gptq_solves_used_experts_and_rtn_for_unused(qwen2):
    m = copy.deepcopy(qwen2)
    unused, used = unused_experts(m, ONE_TOKEN)
    assert unused and used
    apply_recipe(m, parse_recipe("- method: gptq\n  bits: 4\n  group_size: 32"), ONE_TOKEN, progress=False)
    lay = layout_of(m)
    for n in expert_names(m, 0, [lay.gate, lay.down]):
        q = m.get_submodule(n).dequantized_weight()
        rtn = rtn_solve(None, qwen2.get_submodule(n), RTNConfig(4, 32)).dequantized_weight()
        assert torch.isfinite(q).all()
        if expert_of(m, n) in unused:
            assert torch.equal(q, rtn), n  # no token: plain RTN, not a zeroed expert
        else:
            assert not torch.equal(q, rtn), n  # GPTQ used its routed tokens
    with torch.no_grad():
        assert torch.isfinite(m(IDS)).all()


@pytest.mark.parametrize("samples", [ONE_TOKEN, torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(9))])
def test_awq_on_experts(mixtral, samples):
    m, r = copy.deepcopy(mixtral), copy.deepcopy(mixtral)
    apply_recipe(m, parse_recipe("- method: awq\n  bits: 4\n  group_size: 32\n  grid: 4\n  clip_grid: 2"),
                 samples, progress=False)
    apply_recipe(r, parse_recipe("- method: rtn\n  bits: 4\n  group_size: 32"), progress=False)
    assert all(isinstance(m.get_submodule(n), QuantLinear) for n in expert_names(m, 1))
    assert isinstance(moe_blocks(m)[0].gate, nn.Linear)  # the router stays in full precision
    with torch.no_grad():
        out, rtn, ref = m(IDS), r(IDS), mixtral(IDS)
    assert torch.isfinite(out).all()
    if samples.shape[1] > 1:  # real calibration: no worse than RTN (tiny random model: routing flips dominate)
        assert rel(out, ref) <= 1.1 * rel(rtn, ref)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_smoothing_fold_keeps_moe_block_function(kind):
    """Scales folded into the norm must be undone in the router and every expert (the layout's smoothing
    group); leaving the router out reroutes tokens."""
    from leanlm.compress.calibrate import BlockContext
    from leanlm.compress.quant.smoothquant import fold_scales, smoothing_groups
    from leanlm.model.layout import blocks

    m = to_leanlm(tiny_moe(kind))
    lay = layout_of(m)
    x = torch.randn(1, 16, m.config.hidden_size)
    cos, sin = m.rope.lookup(torch.arange(16)[None], 16, x.dtype)
    with torch.no_grad():
        ref = blocks(m)[0](x, cos, sin, "causal", None)
        ctx = BlockContext(m, blocks(m)[0], 0, [], [])
        g = torch.Generator().manual_seed(0)
        router = block_prefix(0) + f"{lay.mlp}.{lay.router}"
        for prev, how, names in smoothing_groups(ctx):
            assert how != "norm" or prev is not blocks(m)[0].get_submodule(lay.mlp_norm) or router in names
            s = torch.rand(m.get_submodule(names[0]).in_features, generator=g) * 4 + 0.25
            fold_scales(prev, how, [ctx.layer(n) for n in names], s)
        out = blocks(m)[0](x, cos, sin, "causal", None)
        assert (out - ref).abs().max() < 1e-4
        norm = blocks(m)[0].get_submodule(lay.mlp_norm)
        fold_scales(norm, "norm", [ctx.layer(n) for n in expert_names(m, 0, [lay.gate, lay.up])],
                    torch.rand(m.config.hidden_size, generator=g) * 4 + 0.25)  # router left out
        assert (blocks(m)[0](x, cos, sin, "causal", None) - ref).abs().max() > 1e-2


def test_smoothquant_on_moe(qwen2):
    m = copy.deepcopy(qwen2)
    from leanlm.compress.quant.int8 import W8A8Linear

    unused, _ = unused_experts(m, ONE_TOKEN)
    apply_recipe(m, parse_recipe("- method: smoothquant\n  alpha: 0.5"), ONE_TOKEN, progress=False)
    assert unused and all(isinstance(m.get_submodule(n), W8A8Linear) for n in expert_names(m, 0))
    with torch.no_grad():
        out, ref = m(IDS), qwen2(IDS)
    assert torch.isfinite(out).all() and rel(out, ref) < 0.25  # int8 activations; routing flips dominate


def test_smoothing_groups_include_router_and_every_expert(qwen2):
    from leanlm.compress.calibrate import BlockContext
    from leanlm.compress.quant.smoothquant import smoothing_groups
    from leanlm.model.layout import blocks

    lay = layout_of(qwen2)
    ctx = BlockContext(qwen2, blocks(qwen2)[0], 0, [], [])
    norm_group = next(names for prev, how, names in smoothing_groups(ctx)
                      if prev is blocks(qwen2)[0].get_submodule(lay.mlp_norm))
    router = [block_prefix(0) + r for r in lay.groups(qwen2.config, 0)["router"]]
    assert set(router) <= set(norm_group) and len(router) == 2  # router + shared expert gate
    assert set(expert_names(qwen2, 0, [lay.gate, lay.up])) <= set(norm_group)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_pruning_experts_with_unused_ones(qwen2, method):
    m = copy.deepcopy(qwen2)
    unused, _ = unused_experts(m, ONE_TOKEN)
    apply_recipe(m, parse_recipe(f"- method: {method}\n  sparsity: 0.5"), ONE_TOKEN, progress=False)
    for n in expert_names(m, 0):
        w = m.get_submodule(n).weight
        assert torch.isfinite(w).all() and abs(float((w == 0).float().mean()) - 0.5) < 0.02, n
        if expert_of(m, n) in unused:  # no token: magnitude pruning, kept weights unchanged
            w0 = qwen2.get_submodule(n).weight
            keep = w != 0
            assert torch.equal(w[keep], w0[keep]), n
            assert w0[~keep].abs().max() <= w0[keep].abs().min() + 1e-6 or method == "wanda"
    with torch.no_grad():
        assert torch.isfinite(m(IDS)).all()


def test_lora_on_experts_trains_and_merges(mixtral):
    from leanlm.peft import merge
    from leanlm.peft.lora import LoraConfig, LoraLinear, apply_lora

    m = copy.deepcopy(mixtral)
    lay = layout_of(m)
    apply_lora(m, LoraConfig(r=2, target_modules=lay.mlp_leaves()))
    wrapped = [n for n, mod in m.named_modules() if isinstance(mod, LoraLinear)]
    assert set(expert_names(m, 0)) <= set(wrapped) and not any(n.endswith(f".{lay.router}") for n in wrapped)
    m.train()
    m(IDS[:1, :6]).logsumexp(-1).mean().backward()
    grads = {n: m.get_submodule(n).lora_B.weight.grad for n in expert_names(m, 0, [lay.up])}
    with torch.no_grad(), router_stats(m) as s:
        m(IDS[:1, :6])
    for n, g in grads.items():  # only routed experts get a gradient
        assert (g is not None and g.abs().sum() > 0) == (s[0][expert_of(m, n)] > 0), n
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    m.eval()
    with torch.no_grad():
        before = m(IDS)
        merge(m)
        after = m(IDS)
    assert (before - mixtral(IDS)).abs().max() > 1e-3 and (before - after).abs().max() < 1e-4


def test_lora_adapter_loads_in_peft_outside_experts(tmp_path):
    """Attention and the shared expert keep their names in peft's format (experts and routers, which
    transformers holds as fused parameters, are tests/test_peft_families.py's)."""
    import peft

    from leanlm.peft.io import save_adapter
    from leanlm.peft.lora import LoraConfig, apply_lora

    hf = tiny_moe("qwen2_moe")
    m = to_leanlm(hf)
    lay = layout_of(m)
    targets = rf".*\.({lay.attn}\.({'|'.join(lay.attention_leaves())})|{lay.mlp}\.{lay.shared_expert}\.({'|'.join(lay.mlp_leaves())}))"
    apply_lora(m, LoraConfig(r=2, alpha=4, target_modules=targets))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    m.eval()
    save_adapter(m, tmp_path / "ad")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "ad")).eval()
    with torch.no_grad():
        ref = m(IDS)
        got = pm(input_ids=IDS).logits
    assert (ref - hf(IDS).logits).abs().max() > 1e-2
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_generate_and_engine_greedy(mixtral):
    from leanlm.infer.engine import Engine, SamplingParams
    from leanlm.infer.generate import generate_tokens
    from leanlm.infer.sampling import GenerationConfig

    prompts = [[5, 9, 33, 2], [70, 1, 4, 4, 8, 100, 3], [12]]
    ref = [greedy_reference(mixtral, p, 8) for p in prompts]
    gen = [[s[0] for s in generate_tokens(mixtral, [p], GenerationConfig(max_new_tokens=8, ignore_eos=True))]
           for p in prompts]
    eng = Engine(mixtral, block_size=4, num_blocks=64)
    got = eng.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))
    assert gen == ref and got == ref


def test_layer_drop_renumbers_moe_layers(qwen2, tmp_path):
    """Dropping block 0 of (MoE, dense, MoE) leaves (dense, MoE): the config says so and a save/load
    round trip computes the same logits."""
    import leanlm
    from conftest import save_tiny_tokenizer
    from leanlm.compress.prune.structured import drop_blocks

    m = copy.deepcopy(qwen2)
    drop_blocks(m, [0])
    assert m.config.num_layers == 2 and m.config.moe_layers == [1] and moe_blocks(m)[0].layer == 1
    leanlm.save(m, None, tmp_path / "d")
    save_tiny_tokenizer(tmp_path / "d")
    back, _ = leanlm.load(tmp_path / "d")
    with torch.no_grad():
        assert (back(IDS) - m(IDS)).abs().max() < 1e-5


@pytest.mark.parametrize("kind", ["qwen2_moe", "mixtral"])
def test_structured_shrinks_experts_like_masking(kind, tmp_path):
    """Each expert and the shared expert lose their lowest-scoring channels (each by its own scores,
    the same count per expert); the shrunk model equals the dense model with those channels zeroed,
    the router is untouched, and transformers reads the saved folder with the same logits."""
    import transformers

    import leanlm
    from conftest import save_tiny_tokenizer
    from leanlm.compress.prune import structured as st

    hf = tiny_moe(kind)
    m = to_leanlm(hf)
    lay = layout_of(m)
    routers = {n: m.get_submodule(n).weight.clone() for n in (block_prefix(i) + r for i in range(m.config.num_layers)
                                                             for r in lay.groups(m.config, i)["router"])}
    sa, sm = st.importance(m, "magnitude")
    groups, channels = [0] * m.config.num_layers, [{p: 8 for p in c} for c in sm]
    kg, kc = st.keep_sets(sa, sm, groups, channels)
    masked = copy.deepcopy(m)
    st.mask_units(masked, kg, kc)
    st.shrink(m, kg, kc)
    for i, blk in enumerate(m.model.layers):
        for p, kept in kc[i].items():
            assert blk.get_submodule(p + lay.down).in_features == len(kept)
            torch.testing.assert_close(blk.get_submodule(p + lay.up).weight,  # the kept rows, in order
                                       masked.model.layers[i].get_submodule(p + lay.up).weight[kept])
    assert all(torch.equal(m.get_submodule(n).weight, w) for n, w in routers.items())
    with torch.no_grad():
        torch.testing.assert_close(m(IDS), masked(IDS), atol=1e-5, rtol=1e-5)
    cfg = m.config
    assert cfg.uniform and cfg.expert_width(0) == (cfg.moe_intermediate_size or cfg.intermediate_size)
    assert cfg.expert_width(0) == hf.config.to_dict().get("moe_intermediate_size", hf.config.intermediate_size) - 8
    if kind == "qwen2_moe":
        assert cfg.shared_expert_intermediate_size == 48 - 8 and cfg.intermediate(1) == 96 - 8  # the dense layer
    leanlm.save(m, None, tmp_path / "s")
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "s")).eval()
    save_tiny_tokenizer(tmp_path / "s")
    mine, _ = leanlm.load(tmp_path / "s")
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, m(IDS), atol=1e-4, rtol=1e-4)
        assert torch.equal(mine(IDS), m(IDS))


def test_structured_per_layer_expert_widths_round_trip(qwen2, tmp_path):
    """Layers pruned by different amounts (skip_first) keep per-layer expert widths in config.json."""
    import leanlm
    from conftest import save_tiny_tokenizer

    m = copy.deepcopy(qwen2)
    apply_recipe(m, parse_recipe("- method: structured\n  target: 0.2\n  importance: magnitude\n  head_ratio: 0.0\n"
                                 "  skip_first: 1\n  channel_multiple: 4"), progress=False)
    cfg, lay = m.config, layout_of(m)
    assert cfg.layer_moe_intermediate_size[0] == 32 and cfg.layer_moe_intermediate_size[2] < 32
    assert cfg.layer_shared_expert_intermediate_size[0] == 48 and cfg.layer_shared_expert_intermediate_size[2] < 48
    assert cfg.intermediate(1) < 96 and not cfg.uniform
    for e in range(4):
        assert m.model.layers[2].get_submodule(f"{lay.mlp}.{lay.experts}.{e}.{lay.down}").in_features == \
            cfg.expert_width(2)
    leanlm.save(m, None, tmp_path / "s")
    save_tiny_tokenizer(tmp_path / "s")
    back, _ = leanlm.load(tmp_path / "s")
    with torch.no_grad():
        assert torch.equal(back(IDS), m(IDS))


@pytest.mark.parametrize("importance", ["activation", "taylor"])
def test_structured_recipe_on_moe_with_unused_experts(qwen2, importance):
    """Calibrated importance on single tokens: unused experts (no inputs, no gradients) fall back to
    magnitude scores; the target is met, every expert of a layer keeps one width, the router stays."""

    m = copy.deepcopy(qwen2)
    unused, _ = unused_experts(m, ONE_TOKEN)
    total = m.num_parameters()
    router = m.model.layers[0].mlp.gate.weight.clone()
    apply_recipe(m, parse_recipe(f"- method: structured\n  target: 0.2\n  importance: {importance}\n"
                                 "  head_ratio: 0.0\n  channel_multiple: 4"), ONE_TOKEN, progress=False)
    assert unused and abs(1 - m.num_parameters() / total - 0.2) < 0.03
    assert torch.equal(m.model.layers[0].mlp.gate.weight, router)
    lay = layout_of(m)
    for n in expert_names(m, 0, [lay.down]):
        w0 = qwen2.get_submodule(n).weight
        w = m.get_submodule(n).weight
        assert w.shape[1] == m.config.expert_width(0) < w0.shape[1]
        if expert_of(m, n) in unused:  # magnitude: the columns with the largest norms are kept
            keep = w0.pow(2).sum(0).topk(w.shape[1]).indices.sort().values
            assert torch.equal(w, w0[:, keep]), n
    with torch.no_grad():
        assert torch.isfinite(m(IDS)).all()
