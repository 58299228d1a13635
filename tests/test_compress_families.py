"""Every compression method on a tiny random model of every family (dense, Gemma, Phi-3 and MoE):
each targeted linear is really rewritten (experts and shared experts included, routers kept in full
precision), the logits stay finite and, for the 8-bit methods, close to the original's, and a
save/load round trip computes the same logits."""
import copy

import pytest
import torch
import torch.nn as nn

import leanlm
from conftest import MOE, save_tiny_tokenizer, tiny_hf, tiny_moe, to_leanlm
from leanlm.compress.lowrank import LowRankLinear
from leanlm.compress.quant.int8 import W8A8Linear
from leanlm.compress.quant.qlinear import QuantLinear
from leanlm.compress.recipe import apply_recipe, parse_recipe
from leanlm.model.families import FAMILIES
from leanlm.model.layout import all_block_linears, block_linears, layout_of

SAMPLES = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(4))

RECIPES = {
    "gptq": "- method: gptq\n  bits: 8\n  group_size: 32",
    "awq": "- method: awq\n  bits: 8\n  group_size: 32\n  grid: 4\n  clip_grid: 2",
    "smoothquant": "- method: smoothquant\n  alpha: 0.5",
    "wanda": "- method: wanda\n  sparsity: 0.5",
    "sparsegpt": "- method: sparsegpt\n  sparsity: 0.5",
    # MLP channels only, as the shipped structured recipes (tiny Qwen3's head_dim 128 makes attention
    # most of the model, and whole KV groups of 2 cannot be split finer); tests/test_prune_structured.py
    # covers removing KV groups
    "structured": "- method: structured\n  target: 0.1\n  importance: activation\n  head_ratio: 0.0\n"
                  "  channel_multiple: 4",
    "lowrank": "- method: lowrank\n  target: 0.2\n  activation_aware: true",
}
# relative logit error allowed for the 8-bit methods, the near-lossless ones (these random models have
# large weights, so logits move more than on a trained model; SmoothQuant also rounds activations to
# int8; in a MoE model a token near a routing tie picks another expert). The lossy methods (50%
# sparsity, 20% of the parameters removed, 24 calibration tokens) change a random model's logits as
# much as they are large: only finiteness and the round trip are checked for them.
NEAR = {"gptq": 0.1, "awq": 0.1, "smoothquant": 0.1}
NEAR_MOE = 0.3


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = to_leanlm(tiny_moe(kind) if kind in MOE else tiny_hf(kind))
        return cache[kind]
    return get


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_the_matrix_covers_every_family():
    assert set(FAMILIES) == {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "mixtral",
                             "qwen2_moe", "qwen3_moe"}


def _check_rewritten(method, m, ref):
    """Every block linear but the routers was rewritten by the method."""
    routers = set(all_block_linears(m, "router"))
    targets = [n for n in all_block_linears(m) if n not in routers]
    assert any(".experts." in n for n in targets) == bool(m.config.num_experts)
    for n in routers:  # routers stay in full precision (AWQ and SmoothQuant fold their scales into them)
        assert type(m.get_submodule(n)) is nn.Linear
        assert method in ("awq", "smoothquant") or torch.equal(m.get_submodule(n).weight, ref.get_submodule(n).weight)
    if method in ("gptq", "awq"):
        assert all(isinstance(m.get_submodule(n), QuantLinear) for n in targets)
    elif method == "smoothquant":
        assert all(isinstance(m.get_submodule(n), W8A8Linear) for n in targets)
    elif method in ("wanda", "sparsegpt"):
        for n in targets:
            assert abs(float((m.get_submodule(n).weight == 0).float().mean()) - 0.5) < 0.02, n
    elif method == "lowrank":
        assert all(isinstance(m.get_submodule(n), LowRankLinear) for n in targets)
    elif method == "structured":
        assert abs(1 - m.num_parameters() / ref.num_parameters() - 0.1) < 0.04  # whole multiples of 4 channels
        lay = layout_of(m)
        for i in range(m.config.num_layers):  # every MLP (each expert, the shared expert) is narrower
            downs = [n for n in block_linears(m, i, "mlp_out")]
            assert downs and all(m.get_submodule(n).in_features < ref.get_submodule(n).in_features for n in downs)
            assert len({m.get_submodule(n).in_features for n in downs if f".{lay.experts}." in n}) <= 1


@pytest.mark.parametrize("method", list(RECIPES))
@pytest.mark.parametrize("kind", list(FAMILIES))
def test_method_on_family(models, kind, method, tmp_path):
    ref = models(kind)
    m = copy.deepcopy(ref)
    apply_recipe(m, parse_recipe(RECIPES[method]), SAMPLES, progress=False)
    _check_rewritten(method, m, ref)
    with torch.no_grad():
        out, want = m(IDS), ref(IDS)
    assert torch.isfinite(out).all()
    if method in NEAR:
        assert rel(out, want) < (NEAR_MOE if m.config.num_experts else NEAR[method]), rel(out, want)
    leanlm.save(m, None, tmp_path / "m")
    save_tiny_tokenizer(tmp_path / "m")
    back, _ = leanlm.load(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(back(IDS), out, atol=1e-5, rtol=1e-5)
