"""Low-rank factorization: full rank reproduces the layer, whitening beats plain SVD on output error."""
import pytest
import torch
import torch.nn as nn

from conftest import tiny_llama
from leanlm.compress import lowrank as lr
from leanlm.errors import LeanLMError


def _layer(out=40, inp=56, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(inp, out, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out, inp, generator=g))
        lin.bias.copy_(torch.randn(out, generator=g))
    x = torch.randn(400, inp, generator=g) @ (torch.randn(inp, inp, generator=g) / 8 + torch.eye(inp))
    x[:, :3] *= 10
    return lin, x


def _state(lin, x, cfg):
    st = lr.init(lin, cfg)
    for c in x.split(100):
        lr.accumulate(st, c)
    return st


@pytest.mark.parametrize("aware", [False, True])
def test_full_rank_reproduces_layer(aware):
    lin, x = _layer()
    cfg = lr.LowRankConfig(rank=40, activation_aware=aware)
    down, up = lr.solve(_state(lin, x, cfg), lin, cfg)
    assert down.shape == (40, 56) and up.shape == (40, 40)
    m = lr.make_lowrank(lin, down, up)
    with torch.no_grad():
        torch.testing.assert_close(m(x), lin(x), atol=1e-4, rtol=1e-4)


def test_truncation_matches_eckart_young_and_whitening_wins():
    lin, x = _layer(seed=1)
    W = lin.weight.detach()
    plain_cfg = lr.LowRankConfig(rank=10, activation_aware=False)
    d, u = lr.solve(_state(lin, x, plain_cfg), lin, plain_cfg)
    s = torch.linalg.svdvals(W.double())
    # plain SVD: Frobenius error equals the dropped singular values (Eckart-Young)
    assert float((W - u @ d).double().norm()) == pytest.approx(float(s[10:].norm()), rel=1e-4)
    aware_cfg = lr.LowRankConfig(rank=10, activation_aware=True, dampening=1e-6)
    d2, u2 = lr.solve(_state(lin, x, aware_cfg), lin, aware_cfg)
    err_plain = float((x @ (W - u @ d).t()).norm())
    err_aware = float((x @ (W - u2 @ d2).t()).norm())
    assert err_aware < 0.8 * err_plain
    # whitened truncation is optimal for the output error: equal to the dropped whitened singular values
    L = torch.linalg.cholesky(x.double().t() @ x.double())
    sw = torch.linalg.svdvals(W.double() @ L)
    assert err_aware == pytest.approx(float(sw[10:].norm()), rel=1e-3)


def test_rank_selection():
    assert lr.rank_for_ratio(40, 56, 1.0) == 23 and lr.rank_for_ratio(40, 56, 0.5) == 11
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert lr.rank_for_energy(s, 0.6) == 1 and lr.rank_for_energy(s, 0.9) == 2 and lr.rank_for_energy(s, 1.0) == 3
    with pytest.raises(LeanLMError):
        lr.LowRankConfig(ratio=0.5, energy=0.9)
    with pytest.raises(LeanLMError):
        lr.LowRankConfig(energy=1.5)
    with pytest.raises(LeanLMError):
        lr.LaserConfig(layers={"mlp": 2.0})


def test_apply_and_restore_modules():
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(56, 40))
    lin, x = _layer()
    model.proj.load_state_dict(lin.state_dict())
    cfg = lr.LowRankConfig(ratio=0.5, activation_aware=False)
    d, u = lr.solve(_state(lin, x, cfg), lin, cfg)
    lr.apply_factors(model, "proj", d, u, factorized=True)
    assert isinstance(model.proj, lr.LowRankLinear) and model.proj.rank == 11
    meta = lr.lowrank_meta(model)
    fresh = nn.Sequential()
    fresh.add_module("proj", nn.Linear(56, 40))
    lr.restore_modules(fresh, meta)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))
    # LASER: dense replacement keeps the module and its shape
    dense = nn.Linear(56, 40)
    dense.load_state_dict(lin.state_dict())
    holder = nn.Sequential()
    holder.add_module("proj", dense)
    lr.apply_factors(holder, "proj", d, u, factorized=False)
    assert isinstance(holder.proj, nn.Linear)
    assert int(torch.linalg.matrix_rank(holder.proj.weight.detach())) == 11


SAMPLES = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))


def test_recipe_lowrank_target_and_full_rank_model():
    from leanlm.compress.recipe import apply_recipe, parse_recipe
    m = tiny_llama()[0]
    total = m.num_parameters()
    apply_recipe(m, parse_recipe("- method: lowrank\n  target: 0.2\n"), SAMPLES, progress=False)
    lows = [mod for mod in m.modules() if isinstance(mod, lr.LowRankLinear)]
    assert len(lows) == 14
    assert 1 - m.num_parameters() / total == pytest.approx(0.2, abs=0.02)
    # full rank through the runner (activation-aware) reproduces the whole model
    m2, ref = tiny_llama()[0], tiny_llama()[0]
    apply_recipe(m2, parse_recipe("- method: lowrank\n  rank: 96\n  factorize: false\n"), SAMPLES, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(m2(SAMPLES), ref(SAMPLES), atol=1e-4, rtol=1e-4)


def test_recipe_laser_reduces_only_chosen_layers():
    from leanlm.compress.recipe import apply_recipe, parse_recipe
    m, ref = tiny_llama()[0], tiny_llama()[0]
    apply_recipe(m, parse_recipe("- method: laser\n  layers: {'layers\\.1\\.mlp\\.down_proj': 0.25}\n"), SAMPLES,
                 progress=False)
    w = m.model.layers[1].mlp.down_proj.weight.detach()
    assert isinstance(m.model.layers[1].mlp.down_proj, torch.nn.Linear)
    assert int(torch.linalg.matrix_rank(w)) == 16  # 25% of rank 64
    torch.testing.assert_close(m.model.layers[0].mlp.down_proj.weight, ref.model.layers[0].mlp.down_proj.weight)


def test_lowrank_model_saves_and_loads_back(tmp_path):
    """A factorized model round-trips through leanlm.save / leanlm.load with identical outputs."""
    import leanlm
    from leanlm.compress.recipe import apply_recipe, parse_recipe

    m = tiny_llama()[0]
    apply_recipe(m, parse_recipe("- method: lowrank\n  target: 0.2\n"), SAMPLES, progress=False)
    leanlm.save(m, None, tmp_path / "lr")
    from leanlm.io.checkpoint import build_on_meta, materialize, _read_safetensors
    import json

    meta = json.loads((tmp_path / "lr" / "config.json").read_text())["leanlm_compression"]
    back = materialize(build_on_meta(m.config), _read_safetensors(tmp_path / "lr"), "lr", meta=meta)
    assert any(isinstance(mod, lr.LowRankLinear) for mod in back.modules())
    with torch.no_grad():
        assert torch.equal(back(SAMPLES), m(SAMPLES))
