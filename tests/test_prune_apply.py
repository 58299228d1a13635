"""Pruning steps through the recipe loop and the one calibration runner, on a tiny Llama."""
import copy

import pytest
import torch

from conftest import tiny_llama
from leanlm.compress.prune.layerdrop import block_redundancy
from leanlm.compress.prune.owl import owl_sparsities
from leanlm.compress.prune.masks import is_nm
from leanlm.compress.prune.methods import PruneConfig
from leanlm.compress.recipe import apply_recipe, parse_recipe


SAMPLES = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))


def _linears(m):
    return {n: mod for n, mod in m.named_modules() if n.startswith("model.layers.") and isinstance(mod, torch.nn.Linear)}


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_recipe_unstructured_and_nm(method):
    for pattern in ("unstructured", "2:4"):
        m = tiny_llama(layers=3, heads=8, kv_heads=4)[0]
        apply_recipe(m, parse_recipe(f"- method: {method}\n  sparsity: 0.5\n  pattern: '{pattern}'\n"),
                     SAMPLES, progress=False)
        for n, lin in _linears(m).items():
            w = lin.weight.detach()
            assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=1e-6), n
            if pattern == "2:4":
                assert is_nm(w, 2, 4), n
        assert m.lm_head.weight.count_nonzero() == m.lm_head.weight.numel()  # outside the blocks: untouched
        assert torch.isfinite(m(SAMPLES)).all()


def test_wanda_in_runner_equals_manual_first_block():
    m = tiny_llama(layers=3, heads=8, kv_heads=4)[0]
    ref = copy.deepcopy(m)
    apply_recipe(m, parse_recipe("- method: wanda\n  sparsity: 0.5\n"), SAMPLES, progress=False)
    # independent: the first block's q_proj input is the dense model's input_layernorm output
    got = []
    h = ref.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda mod, a: got.append(a[0]))
    with torch.no_grad():
        ref(SAMPLES)
    h.remove()
    x = torch.cat(got).reshape(-1, 64).double()
    w = ref.model.layers[0].self_attn.q_proj.weight.detach().double()
    score = w.abs() * x.pow(2).sum(0).sqrt()
    keep = torch.zeros_like(w, dtype=torch.bool).scatter_(1, score.argsort(1, descending=True)[:, :32], True)
    torch.testing.assert_close(m.model.layers[0].self_attn.q_proj.weight.detach(), ref.model.layers[0].self_attn.q_proj.weight.detach() * keep)


def test_owl_mean_sparsity_and_spread():
    m = tiny_llama(layers=4, heads=8, kv_heads=4)[0]
    cfg = PruneConfig(sparsity=0.5, owl=True, owl_lambda=0.1, owl_m=3.0)
    names = list(_linears(m))
    per = owl_sparsities(copy.deepcopy(m), cfg, names, SAMPLES, progress=False)
    vals = torch.tensor(list(per.values()), dtype=torch.float64)
    assert len(per) == 4 and float(vals.mean()) == pytest.approx(0.5, abs=1e-9)
    assert float(vals.max() - vals.min()) == pytest.approx(0.2, abs=1e-9)
    apply_recipe(m, parse_recipe("- method: wanda\n  owl: true\n  owl_lambda: 0.1\n  owl_m: 3.0\n"), SAMPLES,
                 progress=False)
    for b, s in per.items():
        w = m.model.layers[b].mlp.down_proj.weight
        assert float((w == 0).float().mean()) == pytest.approx(s, abs=0.02)


def test_structured_activation_through_runner():
    m = tiny_llama(layers=3, heads=8, kv_heads=4)[0]
    ref = copy.deepcopy(m)
    total = m.num_parameters()
    apply_recipe(m, parse_recipe("- method: structured\n  target: 0.25\n  head_ratio: 0.5\n"), SAMPLES, progress=False)
    assert m.config.num_heads == 4 and m.config.num_kv_heads == 2  # half of the KV groups, all layers alike
    assert abs(1 - m.num_parameters() / total - 0.25) < 0.03
    # the first block's kept groups are the ones an independent computation ranks highest
    got = []
    h = ref.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda mod, a: got.append(a[0]))
    with torch.no_grad():
        ref(SAMPLES)
    h.remove()
    sq = torch.cat(got).reshape(-1, 64).pow(2).sum(0)
    wo = ref.model.layers[0].self_attn.o_proj.weight.detach()
    group_energy = (wo.pow(2).sum(0) * sq).reshape(4, 16).sum(1)
    kept = sorted(group_energy.argsort(descending=True)[:2].tolist())
    expect = torch.cat([wo[:, g * 16:(g + 1) * 16] for g in kept], 1)
    torch.testing.assert_close(m.model.layers[0].self_attn.o_proj.weight.detach(), expect)
    with torch.no_grad():
        assert torch.isfinite(m(SAMPLES)).all()


def test_layerdrop_drops_most_redundant():
    m = tiny_llama(layers=4, heads=8, kv_heads=4)[0]
    with torch.no_grad():  # make block 1 nearly an identity: its residual branches output ~0
        m.model.layers[1].self_attn.o_proj.weight.mul_(1e-3)
        m.model.layers[1].mlp.down_proj.weight.mul_(1e-3)
    sims = block_redundancy(copy.deepcopy(m), SAMPLES, progress=False)
    assert max(range(4), key=lambda i: sims[i]) == 1 and sims[1] > 0.99
    apply_recipe(m, parse_recipe("- method: layerdrop\n  num_blocks: 1\n"), SAMPLES, progress=False)
    assert m.config.num_layers == 3 and [b.self_attn.layer for b in m.model.layers] == [0, 1, 2]
