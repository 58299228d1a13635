"""Structured pruning: the shrunk model equals the masked dense model; block dropping; config round trip."""
import copy

import pytest
import torch
import transformers

from leanlm.compress.prune import structured as st
from leanlm.errors import LeanLMError
from conftest import tiny_llama
from leanlm.model import ModelConfig, Transformer
from leanlm.model.layout import layout_of


def _ids(n=2, t=24, seed=1):
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["magnitude", "taylor"])
def test_shrunk_equals_masked(kind):
    m, _ = tiny_llama(layers=3, heads=8, kv_heads=4)
    grads = st.taylor_gradients(m, _ids(4)) if kind == "taylor" else None
    sa, sm = st.importance(m, kind, grads)
    groups, channels = [1, 2, 0], [40, 16, 0]
    kg, kc = st.keep_sets(sa, sm, groups, channels)
    masked = copy.deepcopy(m)
    st.mask_units(masked, kg, kc)
    st.shrink(m, kg, kc)
    cfg = m.config
    assert cfg.layer_num_kv_heads == [3, 2, 4] and cfg.layer_num_heads == [6, 4, 8]
    assert cfg.layer_intermediate_size == [56, 80, 96]
    assert m.model.layers[0].mlp.down_proj.weight.shape == (64, 56)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(m(ids), masked(ids), atol=1e-5, rtol=1e-5)
        # incremental decoding with the per-layer KV cache gives the same logits as a full pass
        cache = m.new_cache(2, 24)
        a = m(ids[:, :20], cache=cache)
        b = m(ids[:, 20:], cache=cache)
        torch.testing.assert_close(torch.cat([a, b], 1), m(ids), atol=1e-5, rtol=1e-5)
    # a fresh model built from the saved config loads the pruned weights exactly
    fresh = Transformer(ModelConfig.from_hf(cfg.to_hf()))
    fresh.load_state_dict(m.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), m(ids))


def test_importance_keeps_what_matters():
    m, _ = tiny_llama(layers=1, heads=8, kv_heads=4)
    attn = m.model.layers[0].self_attn
    with torch.no_grad():
        attn.o_proj.weight[:, st._group_cols(attn, 2)] *= 10
    sq = torch.ones(attn.o_proj.in_features)
    sq[st._group_cols(attn, 0)] = 1000.0  # group 0 sees big inputs: activation importance keeps it
    blk, lay = m.model.layers[0], layout_of(m)
    act = st.attention_group_importance(blk, lay, sq, "activation")
    mag = st.attention_group_importance(blk, lay, None, "magnitude")
    assert int(act.argmax()) == 0 and int(mag.argmax()) == 2


def test_plan_hits_target_and_uniform_export():
    m, _ = tiny_llama(layers=4, heads=8, kv_heads=4)
    total = m.num_parameters()
    groups, channels = st.plan(m, st.StructuredConfig(target=0.2, head_ratio=0.5, channel_multiple=8))
    removed = sum(g * st.layer_params(m.config, i)[0] + sum(c.values()) * st.layer_params(m.config, i)[1]
                  for i, (g, c) in enumerate(zip(groups, channels)))
    assert abs(removed / total - 0.2) < 0.03
    sa, sm = st.importance(m, "magnitude")
    st.shrink(m, *st.keep_sets(sa, sm, groups, channels))
    assert abs(1 - m.num_parameters() / total - 0.2) < 0.03
    assert m.config.uniform and m.config.layer_num_heads is None  # same shapes everywhere: plain HF config
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in m.config.to_hf().items() if k != "architectures"})
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    missing = hf.load_state_dict(m.state_dict(), strict=False)
    assert not [k for k in missing.missing_keys if "rotary" not in k]
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, m(ids), atol=1e-4, rtol=1e-4)


def test_drop_blocks_equals_skipping():
    m, _ = tiny_llama(layers=4, heads=8, kv_heads=4)
    ids = _ids()
    ref = copy.deepcopy(m)
    st.drop_blocks(m, [1, 2])
    assert m.config.num_layers == 2 and len(m.model.layers) == 2
    # reference: the original model run with blocks 1 and 2 skipped
    ref.model.layers = torch.nn.ModuleList([ref.model.layers[0], ref.model.layers[3]])
    ref.model.layers[1].self_attn.layer = 1
    with torch.no_grad():
        torch.testing.assert_close(m(ids), ref(ids))
        cache = m.new_cache(2, 24)
        torch.testing.assert_close(m(ids, cache=cache), ref(ids))
    with pytest.raises(LeanLMError):
        st.drop_blocks(m, [0, 1])


def test_bad_structured_config():
    with pytest.raises(LeanLMError):
        st.StructuredConfig(target=1.2)
    with pytest.raises(LeanLMError):
        st.StructuredConfig(importance="random")
    m, _ = tiny_llama(layers=2, heads=8, kv_heads=4)
    with pytest.raises(LeanLMError):
        st.plan(m, st.StructuredConfig(target=0.2, skip_first=1, skip_last=1))


def test_pruned_model_generates_through_engine():
    from leanlm.infer.engine import Engine, SamplingParams
    m, _ = tiny_llama(layers=3, heads=8, kv_heads=4)
    sa, sm = st.importance(m, "magnitude")
    st.shrink(m, *st.keep_sets(sa, sm, [1, 2, 0], [40, 16, 0]))
    st.drop_blocks(m, [1])
    assert m.config.layer_num_kv_heads == [3, 4]
    prompt = [5, 17, 33, 2, 90]
    ids = list(prompt)
    with torch.no_grad():  # reference: greedy with a full recompute each step, no cache
        for _ in range(6):
            ids.append(int(m(torch.tensor([ids]))[0, -1].argmax()))
    got = Engine(m).generate([prompt], SamplingParams(max_tokens=6, ignore_eos=True))[0]
    assert got == ids[len(prompt):]
