"""On the default model (slow): SparseGPT and Wanda beat magnitude on a real layer with real activations."""
import pytest
import torch

from leanlm.compress.prune.methods import SOLVERS, PruneConfig, layer_error


@pytest.mark.slow
def test_real_layer_errors_order():
    import leanlm
    from leanlm.data import calibration_samples

    model, tok = leanlm.load()
    samples = calibration_samples(tok, 2, 128, seed=0)
    blk = model.model.layers[3]
    got = []
    h = blk.mlp.gate_proj.register_forward_pre_hook(lambda m, a: got.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(samples)
    h.remove()
    x = torch.cat(got)
    ref = blk.mlp.gate_proj.weight.detach().clone()
    for pattern in ("unstructured", "2:4"):
        errs = {}
        for method, (init, acc, solve) in SOLVERS.items():
            lin = torch.nn.Linear(ref.shape[1], ref.shape[0], bias=False)
            lin.weight.data.copy_(ref)
            cfg = PruneConfig(sparsity=0.5, pattern=pattern)
            st = init(lin, cfg)
            acc(st, x)
            solve(st, lin, cfg)
            errs[method] = layer_error(lin.weight, ref, x)
        assert errs["sparsegpt"] < errs["wanda"] < errs["magnitude"], (pattern, errs)
