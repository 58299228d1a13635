"""Unstructured and N:M pruning: exact patterns, Wanda against a plain re-computation, SparseGPT vs magnitude."""
import pytest
import torch
import torch.nn as nn

from leanlm.compress.prune.masks import is_nm, parse_pattern, sparsity_of
from leanlm.compress.prune.methods import SOLVERS, PruneConfig, layer_error
from leanlm.errors import LeanLMError


def _layer_and_inputs(out=48, inp=64, n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(inp, out, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out, inp, generator=g) * 0.1)
    # correlated inputs with a few large-norm features, like LLM activations
    mix = torch.randn(inp, inp, generator=g) / inp ** 0.5 + torch.eye(inp)
    x = torch.randn(n, inp, generator=g) @ mix
    x[:, :4] *= 8
    return lin, x


def _run(method, lin, x, cfg):
    init, acc, solve = SOLVERS[method]
    st = init(lin, cfg)
    for chunk in x.split(128):
        acc(st, chunk)
    new = solve(st, lin, cfg)
    return new if new is not None else lin.weight.detach() == 0


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_exact_sparsity_and_nm(method, pattern):
    lin, x = _layer_and_inputs()
    mask = _run(method, lin, x, PruneConfig(sparsity=0.5, pattern=pattern, block_size=16))
    w = lin.weight.detach()
    if pattern == "unstructured":
        assert int(mask.sum()) == w.numel() // 2
        if method != "sparsegpt":  # magnitude and Wanda compare within each output row
            assert (mask.sum(1) == w.shape[1] // 2).all()
    else:
        n, m = parse_pattern(pattern)
        assert is_nm(w, n, m)
        assert (mask.reshape(w.shape[0], -1, m).sum(-1) == n).all()
    assert sparsity_of(w) == pytest.approx(0.5, abs=1e-6)


def test_other_sparsity_levels():
    for s in (0.3, 0.7):
        lin, x = _layer_and_inputs()
        _run("wanda", lin, x, PruneConfig(sparsity=s))
        assert ((lin.weight == 0).sum(1) == round(64 * s)).all()


def test_wanda_matches_plain_computation():
    lin, x = _layer_and_inputs(seed=3)
    w0 = lin.weight.detach().clone()
    _run("wanda", lin, x, PruneConfig(sparsity=0.5))
    # independent: per-row ranking of |W_ij| * sqrt(sum_t x_tj^2) with a plain Python sort
    norms = [float(sum(float(v) ** 2 for v in x[:, j]) ** 0.5) for j in range(x.shape[1])]
    for i in range(w0.shape[0]):
        metric = [(abs(float(w0[i, j])) * norms[j], j) for j in range(w0.shape[1])]
        pruned = {j for _, j in sorted(metric)[: w0.shape[1] // 2]}
        for j in range(w0.shape[1]):
            expect = 0.0 if j in pruned else float(w0[i, j])
            assert float(lin.weight.detach()[i, j]) == expect


def test_wanda_differs_from_magnitude_with_outlier_features():
    lin, x = _layer_and_inputs(seed=4)
    lin2 = nn.Linear(64, 48, bias=False)
    lin2.weight.data.copy_(lin.weight.data)
    m1 = _run("wanda", lin, x, PruneConfig())
    m2 = _run("magnitude", lin2, x, PruneConfig())
    assert not torch.equal(m1, m2)
    assert m1[:, :4].float().mean() < m2[:, :4].float().mean()  # Wanda keeps large-activation inputs


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_error_below_magnitude_and_wanda(pattern):
    lin, x = _layer_and_inputs(seed=1)
    ref = lin.weight.detach().clone()
    errs = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        l = nn.Linear(64, 48, bias=False)
        l.weight.data.copy_(ref)
        _run(method, l, x, PruneConfig(sparsity=0.5, pattern=pattern))
        errs[method] = layer_error(l.weight, ref, x)
    assert errs["sparsegpt"] < 0.9 * errs["wanda"]
    assert errs["sparsegpt"] < 0.8 * errs["magnitude"]
    if pattern == "unstructured":  # (under 2:4 the four outlier inputs share one group: a near tie)
        assert errs["wanda"] < 0.5 * errs["magnitude"]


def test_sparsegpt_lazy_blocks_equal_one_block():
    # N:M selection does not depend on the block size, so lazy batched updates must be exact
    lin, x = _layer_and_inputs(seed=2)
    ref = lin.weight.detach().clone()
    outs = []
    for bs in (8, 64):
        l = nn.Linear(64, 48, bias=False)
        l.weight.data.copy_(ref)
        _run("sparsegpt", l, x, PruneConfig(pattern="2:4", block_size=bs))
        outs.append(l.weight.detach().clone())
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-4)


def test_sparsegpt_update_compensates_pruned_weights():
    # with the mask fixed to magnitude's, the OBS update must still reduce the error (weights move)
    lin, x = _layer_and_inputs(seed=5)
    ref = lin.weight.detach().clone()
    _run("sparsegpt", lin, x, PruneConfig(sparsity=0.5))
    kept = lin.weight != 0
    assert not torch.allclose(lin.weight[kept], ref[kept])  # kept weights were updated


def test_sparsegpt_joint_quantization_grid():
    lin, x = _layer_and_inputs(seed=6)
    ref = lin.weight.detach().clone()
    cfg = PruneConfig(pattern="2:4", quant_bits=4, quant_group_size=48)  # 64 columns: groups of 48 and 16
    q = _run("sparsegpt", lin, x, cfg)
    from leanlm.compress.quant.qlinear import QuantLinear
    assert isinstance(q, QuantLinear) and q.bits == 4 and q.group_size == 48
    QuantLinear.fast = False
    try:
        w = q(torch.eye(64)).t().detach()  # the dequantized weight, through the module's reference path
    finally:
        QuantLinear.fast = True
    assert is_nm(w, 2, 4)  # zeros survive packing: the symmetric grid represents 0 exactly
    for start in (0, 48):  # at most 16 levels per row and group (zero included)
        for r in range(w.shape[0]):
            assert len(torch.unique(w[r, start:start + 48])) <= 16
    l2 = nn.Linear(64, 48, bias=False)
    l2.weight.data.copy_(ref)
    _run("sparsegpt", l2, x, PruneConfig(pattern="2:4"))
    assert layer_error(l2.weight, ref, x) < layer_error(w, ref, x) < 3 * layer_error(l2.weight, ref, x)


def test_bad_config():
    with pytest.raises(LeanLMError):
        PruneConfig(sparsity=1.5)
    with pytest.raises(LeanLMError):
        PruneConfig(pattern="4:2")
    with pytest.raises(LeanLMError):
        PruneConfig(pattern="2:4", owl=True)
    lin = nn.Linear(6, 4)
    with pytest.raises(LeanLMError):
        _run("wanda", lin, torch.randn(8, 6), PruneConfig(pattern="2:4"))


def test_sparsegpt_keeps_earlier_mask_when_quantizing():
    # prune with Wanda (2:4), then quantize with SparseGPT at sparsity 0: the 2:4 zeros must survive
    lin, x = _layer_and_inputs(seed=7)
    _run("wanda", lin, x, PruneConfig(pattern="2:4"))
    before = lin.weight.detach() == 0
    q = _run("sparsegpt", lin, x, PruneConfig(sparsity=0.0, quant_bits=4, quant_group_size=32))
    from leanlm.compress.quant.qlinear import QuantLinear
    QuantLinear.fast = False
    try:
        w = q(torch.eye(64)).t().detach()
    finally:
        QuantLinear.fast = True
    assert bool((w[before] == 0).all())
    assert is_nm(w, 2, 4)
