"""Prune, then quantize: GPTQ, RTN and AWQ keep an earlier step's mask (exact zeros stay exactly zero)."""
import pytest
import torch
import torch.nn as nn

from conftest import tiny_llama
from leanlm.compress.prune.masks import is_nm
from leanlm.compress.prune.methods import PruneConfig, layer_error
from leanlm.compress.quant.gptq import GPTQConfig, RTNConfig, gptq_accumulate, gptq_init, gptq_quantize, gptq_solve, \
    rtn_solve
from leanlm.compress.quant.grid import dequantize, grid_params, rtn_quantize, zero_point_grid
from leanlm.compress.quant.qlinear import QuantLinear
from leanlm.compress.recipe import apply_recipe, builtin_names, load_recipe, parse_recipe
from test_prune import _layer_and_inputs, _run

SAMPLES = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))


def _pruned_layer(seed=0, pattern="2:4"):
    lin, x = _layer_and_inputs(seed=seed)
    _run("wanda", lin, x, PruneConfig(pattern=pattern))
    return lin, x, lin.weight.detach() == 0


def _hessian(lin, x):
    st = gptq_init(lin, None)
    for chunk in x.split(128):
        gptq_accumulate(st, chunk)
    return st


def _stored_weight(q: QuantLinear) -> torch.Tensor:
    """The weight as stored (packed codes, fp16 scales/offsets), dequantized by the reference path."""
    return q.dequantized_weight()


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("bits,group_size", [(4, 48), (3, 32), (8, 0)])
def test_gptq_keeps_the_mask_exactly(sym, act_order, bits, group_size):
    lin, x, mask = _pruned_layer(seed=1)
    st = _hessian(lin, x)
    q = gptq_solve(st, lin, GPTQConfig(bits=bits, group_size=group_size, sym=sym, act_order=act_order))
    w = _stored_weight(q)
    assert bool((w[mask] == 0).all()) and is_nm(w, 2, 4)
    assert int((w[~mask] != 0).sum()) > 0.75 * int((~mask).sum())  # the kept weights are not wiped out
    if not sym and bits < 8:
        # the test can fail: the asymmetric float-minimum grid does not hold 0 without the mask
        codes, s, o = gptq_quantize(lin.weight, st.H, bits, group_size, sym, act_order=act_order, keep_zeros=False)
        assert not bool((dequantize(codes, s, o, group_size or 64)[mask] == 0).all())


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_gptq_after_prune_beats_rtn_after_prune(sym, pattern):
    lin, x, mask = _pruned_layer(seed=2, pattern=pattern)
    pruned = lin.weight.detach().clone()
    cfg = GPTQConfig(bits=4, group_size=32, sym=sym)
    wq = _stored_weight(gptq_solve(_hessian(lin, x), lin, cfg))
    wr = _stored_weight(rtn_solve(None, lin, cfg))
    assert bool((wq[mask] == 0).all()) and bool((wr[mask] == 0).all())
    e_gptq, e_rtn = layer_error(wq, pruned, x), layer_error(wr, pruned, x)
    assert e_gptq < 0.9 * e_rtn, (e_gptq, e_rtn)


def test_gptq_compensates_in_kept_weights_only():
    # the pruned weights' accumulated updates are taken back out (SparseGPT's rule), so the result
    # differs from quantizing the dense-updated weights; and it is better than pinning without care
    lin, x, mask = _pruned_layer(seed=3)
    st = _hessian(lin, x)
    codes, s, o = gptq_quantize(lin.weight, st.H, 4, 32, True, act_order=False)
    w = dequantize(codes, s, o, 32)
    free_codes, fs, fo = gptq_quantize(lin.weight, st.H, 4, 32, True, act_order=False, keep_zeros=False)
    free = dequantize(free_codes, fs, fo, 32)
    assert not bool((free[mask] == 0).all())  # unconstrained GPTQ refills the pruned zeros
    pinned_late = free.masked_fill(mask, 0.0)  # refill, then zero again: uncompensated
    ref = lin.weight.detach()
    assert layer_error(w, ref, x) < layer_error(pinned_late, ref, x)


def test_dense_weights_without_zeros_quantize_as_before():
    lin, x = _layer_and_inputs(seed=4)
    assert bool((lin.weight != 0).all())
    st = _hessian(lin, x)
    a = gptq_quantize(lin.weight, st.H, 4, 48, False, keep_zeros=True)
    b = gptq_quantize(lin.weight, st.H, 4, 48, False, keep_zeros=False)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_accidental_zeros_of_a_dense_layer_are_not_a_mask():
    # a dense layer with a few exact zeros (the default model has 0.03%) quantizes as if it had none
    lin, x = _layer_and_inputs(seed=5)
    w = lin.weight.detach().clone()
    w.view(-1)[::500] = 0  # 0.2% zeros
    st = _hessian(lin, x)
    a = gptq_quantize(w, st.H, 4, 48, False, keep_zeros=True)
    b = gptq_quantize(w, st.H, 4, 48, False, keep_zeros=False)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    w.view(-1)[::20] = 0  # 5%: a mask, kept
    codes, s, o = gptq_quantize(w, st.H, 4, 48, False, keep_zeros=True)
    deq = dequantize(codes, s, o, 48)
    assert bool((deq[w == 0] == 0).all())


def test_zero_point_grid_is_exact_in_fp16():
    g = torch.Generator().manual_seed(0)
    for bits in (2, 3, 4, 8):
        for mag in (1e-6, 1e-4, 1e-2, 1.0, 30.0):
            lo = -torch.rand(200, generator=g) * mag
            hi = torch.rand(200, generator=g) * mag * 3
            s, o = zero_point_grid(lo, hi, bits)
            assert torch.equal(s.half().float(), s) and torch.equal(o.half().float(), o)
            z = torch.round(-o / s)
            assert bool((z * s + o == 0).all()) and bool((z >= 0).all()) and bool((z <= 2 ** bits - 1).all())
            # the range is covered up to half a step (the zero point is rounded to an integer)
            assert bool((o <= lo + s / 2).all()) and bool((o + (2 ** bits - 1) * s >= hi - s / 2).all())


def test_asymmetric_grid_that_already_holds_zero_is_kept():
    # a row sitting on a Q4_1-like grid whose zero is exact keeps its float-minimum grid (bit-exact reproduction)
    scale, lo = torch.tensor(0.0625), torch.tensor(-0.3125)  # lo = -5 * scale: code 5 is exactly 0
    w = (torch.arange(16).float() * scale + lo).repeat(3, 1)
    s, o = grid_params(w, 4, False, keep_zero=w == 0)
    assert torch.equal(s, torch.full((3,), 0.0625)) and torch.equal(o, torch.full((3,), -0.3125))
    codes, s, o = rtn_quantize(w, 4, 16, False, keep_zero=w == 0)
    assert torch.equal(dequantize(codes, s, o, 16), w)


def test_rtn_keeps_the_mask_on_the_asymmetric_grid():
    lin, _, mask = _pruned_layer(seed=5)
    w = _stored_weight(rtn_solve(None, lin, RTNConfig(bits=4, group_size=32, sym=False)))
    assert bool((w[mask] == 0).all()) and is_nm(w, 2, 4)
    w_free = _stored_weight(rtn_solve(None, lin, RTNConfig(bits=4, group_size=32, sym=False, keep_zeros=False)))
    assert not bool((w_free[mask] == 0).all())


def _block_linears(m):
    return {n: mod for n, mod in m.named_modules() if n.startswith("model.layers.")
            and isinstance(mod, (nn.Linear, QuantLinear))}


@pytest.mark.parametrize("quant", ["- method: awq\n  bits: 4\n  group_size: 32\n  sym: false\n",
                                   "- method: rtn\n  bits: 3\n  group_size: 32\n  sym: false\n"])
def test_awq_and_rtn_after_wanda_keep_24(quant):
    m = tiny_llama(layers=2, heads=8, kv_heads=4)[0]
    apply_recipe(m, parse_recipe("- method: wanda\n  pattern: '2:4'\n" + quant), SAMPLES, progress=False)
    for n, q in _block_linears(m).items():
        assert isinstance(q, QuantLinear), n
        assert is_nm(q.dequantized_weight(), 2, 4), n


def test_sparse24_wanda_gptq_recipe_keeps_24_through_save_and_load(tmp_path):
    import json

    from safetensors.torch import load_file

    from leanlm.io.checkpoint import build_on_meta, materialize, save_hf_folder
    from leanlm.model import ModelConfig

    assert "sparse24-wanda-gptq-w4a16" in builtin_names()
    m = tiny_llama(layers=3, heads=8, kv_heads=4)[0]
    wanda_only = tiny_llama(layers=3, heads=8, kv_heads=4)[0]
    apply_recipe(wanda_only, parse_recipe("- method: wanda\n  pattern: '2:4'\n"), SAMPLES, progress=False)
    apply_recipe(m, load_recipe("sparse24-wanda-gptq-w4a16"), SAMPLES, progress=False)
    masks = {n: lin.weight.detach() == 0 for n, lin in _block_linears(wanda_only).items()}
    for n, q in _block_linears(m).items():
        assert isinstance(q, QuantLinear) and q.bits == 4, n
        w = q.dequantized_weight()
        assert is_nm(w, 2, 4) and bool((w[masks[n]] == 0).all()), n  # Wanda's very mask, not another one
        assert q.path() == "int4pack"
        with torch.no_grad():  # the fast kernel (bf16 scales) also multiplies pruned weights by exactly 0
            eye = torch.eye(q.in_features)
            assert bool((q(eye).t()[masks[n]] == 0).all()), n
    x = SAMPLES[:2]
    with torch.no_grad():
        y = m(x)
    out = save_hf_folder(m, None, tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    loaded = materialize(build_on_meta(ModelConfig.from_hf(config)), load_file(str(out / "model.safetensors")),
                         str(out), meta=config["leanlm_compression"]).eval()
    for n, q in _block_linears(loaded).items():
        assert isinstance(q, QuantLinear), n
        w = q.dequantized_weight()
        assert is_nm(w, 2, 4) and bool((w[masks[n]] == 0).all()), n
    with torch.no_grad():
        assert torch.equal(loaded(x), y)


@pytest.mark.slow
def test_real_layer_gptq_after_wanda_beats_rtn_after_wanda():
    import leanlm
    from leanlm.data import calibration_samples

    model, tok = leanlm.load()
    samples = calibration_samples(tok, 2, 128, seed=0)
    blk = model.model.layers[3]
    got = {}
    hooks = [mod.register_forward_pre_hook(lambda m, a, n=n: got.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
             for n, mod in (("gate", blk.mlp.gate_proj), ("down", blk.mlp.down_proj))]
    with torch.no_grad():
        model(samples)
    for h in hooks:
        h.remove()
    for name, lin0 in (("gate", blk.mlp.gate_proj), ("down", blk.mlp.down_proj)):
        x = torch.cat(got[name])
        lin = nn.Linear(lin0.in_features, lin0.out_features, bias=False)
        lin.weight.data.copy_(lin0.weight.detach())
        _run("wanda", lin, x, PruneConfig(pattern="2:4"))
        mask, pruned = lin.weight.detach() == 0, lin.weight.detach().clone()
        cfg = GPTQConfig(bits=4, group_size=128)  # 576 and 1536 wide: a shorter last group on 576
        wq = gptq_solve(_hessian(lin, x), lin, cfg).dequantized_weight()
        wr = rtn_solve(None, lin, cfg).dequantized_weight()
        assert is_nm(wq, 2, 4) and bool((wq[mask] == 0).all()) and bool((wr[mask] == 0).all())
        e_gptq, e_rtn = layer_error(wq, pruned, x), layer_error(wr, pruned, x)
        assert e_gptq < 0.8 * e_rtn, (name, e_gptq, e_rtn)
