"""NF4/FP4, SmoothQuant W8A8, LLM.int8() and AWQ: fast paths vs references, and each method's reason to exist."""
import json

import pytest
import torch

from leanlm.compress.quant.awq import AWQConfig, clip_weight, search_scale
from leanlm.compress.quant.int8 import W8A8Linear, quantize_rows
from leanlm.compress.quant.llmint8 import LLMInt8Config, llmint8_accumulate, llmint8_init, llmint8_solve
from leanlm.compress.quant.rtn import RTNConfig, rtn_solve
from leanlm.compress.quant.smoothquant import fold_scales
from leanlm.compress.quant.nf4 import FP4, NF4, NF4Config, NF4Linear
from leanlm.compress.quant.qlinear import QuantLinear
from test_quant import tiny_model


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("dtype", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_codes_are_nearest_table_entries(dtype, double_quant):
    torch.manual_seed(0)
    lin = torch.nn.Linear(200, 24)  # 200 = 3 blocks of 64 + a short one
    m = NF4Linear.from_linear(lin, NF4Config(dtype=dtype, block_size=64, double_quant=double_quant))
    table = torch.tensor(NF4 if dtype == "nf4" else FP4)
    absmax = m.block_absmax().repeat_interleave(64, 1)[:, :200]
    wn = (lin.weight.detach() / absmax).clamp(-1, 1)
    brute = table[(wn[..., None] - table).abs().argmin(-1)]  # independent nearest-value search
    torch.testing.assert_close(m.dequantized_weight(), brute * absmax)
    if double_quant:  # block absmax survives 8-bit double quantization within 1%
        true = torch.stack([lin.weight.detach()[:, s:s + 64].abs().amax(1) for s in range(0, 200, 64)], 1)
        assert (m.block_absmax() / true - 1).abs().max() < 0.01
    x = torch.randn(3, 200)
    torch.testing.assert_close(m(x), x @ m.dequantized_weight().T + lin.bias.detach())


def test_nf4_beats_fp4_and_int4_absmax_on_normal_weights():
    torch.manual_seed(1)
    lin = torch.nn.Linear(512, 256)
    torch.nn.init.normal_(lin.weight, std=0.02)
    w = lin.weight.detach()
    err = {d: rel(NF4Linear.from_linear(lin, NF4Config(dtype=d, double_quant=False)).dequantized_weight(), w)
           for d in ("nf4", "fp4")}
    err["int4"] = rel(rtn_solve(None, lin, RTNConfig(bits=4, group_size=64)).dequantized_weight(), w)
    assert err["nf4"] < err["fp4"] and err["nf4"] < err["int4"], err


@pytest.mark.parametrize("M", [1, 5, 40])
@pytest.mark.parametrize("outliers", [0, 3])
def test_w8a8_int_mm_equals_reference(M, outliers):
    torch.manual_seed(M)
    w = torch.randn(48, 64)
    idx = torch.tensor([3, 17, 40])[:outliers] if outliers else None
    m = W8A8Linear.from_weight(w, torch.randn(48), idx)
    x = torch.randn(M, 64)
    W8A8Linear.fast = False
    try:
        ref = m(x)
    finally:
        W8A8Linear.fast = True
    # the fast path's integers are exact, so the results agree to fp32 rounding
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-4)
    # and the reference is the simulated quantization in plain float
    xq, xs = quantize_rows(x.index_fill(1, idx, 0) if outliers else x)
    sim = (xq.float() * xs[:, None]) @ (m.qweight.float() * m.scales[:, None]).T + m.bias
    if outliers:
        sim = sim + x[:, idx] @ m.outlier_weight.float().T
    torch.testing.assert_close(ref, sim, rtol=1e-4, atol=1e-4)


def outlier_inputs(n=256, k=64, channels=(5, 30), scale=40.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g)
    x[:, list(channels)] *= scale
    return x


def test_llmint8_keeps_outlier_features_in_high_precision():
    x = outlier_inputs()
    lin = torch.nn.Linear(64, 32)
    st = llmint8_init(lin, None)
    llmint8_accumulate(st, x[:128])
    llmint8_accumulate(st, x[128:])
    m = llmint8_solve(st, lin, LLMInt8Config(threshold=20.0))
    assert m.outlier_idx.tolist() == [5, 30]
    plain = W8A8Linear.from_weight(lin.weight, lin.bias)
    ref = lin(x).detach()
    assert rel(m(x), ref) < 0.3 * rel(plain(x), ref)


def test_smoothquant_folding_is_exact_and_helps_w8a8():
    model = tiny_model()
    block = model.model.layers[0]
    x = torch.randn(1, 16, 64)
    x[..., 7] *= 30  # an outlier channel after the norm
    names = ["q_proj", "k_proj", "v_proj"]
    lins = [getattr(block.self_attn, n) for n in names]
    h = block.input_layernorm(x).reshape(-1, 64).detach()
    ref = [lin(h).detach() for lin in lins]
    plain_err = sum(rel(W8A8Linear.from_weight(lin.weight)(h), r) for lin, r in zip(lins, ref))
    act = h.abs().amax(0)
    wmax = torch.stack([lin.weight.abs().amax(0) for lin in lins]).amax(0).detach()
    s = act.pow(0.5) / wmax.pow(0.5)
    fold_scales(block.input_layernorm, "norm", lins, s)
    h2 = block.input_layernorm(x).reshape(-1, 64).detach()
    for lin, r in zip(lins, ref):  # same function in full precision
        torch.testing.assert_close(lin(h2), r, rtol=1e-4, atol=1e-4)
    smooth_err = sum(rel(W8A8Linear.from_weight(lin.weight)(h2), r) for lin, r in zip(lins, ref))
    assert smooth_err < 0.8 * plain_err, (smooth_err, plain_err)


def test_awq_scale_and_clip_search_beat_rtn_on_skewed_activations():
    torch.manual_seed(0)
    x = outlier_inputs(512, 128, channels=(1, 2, 3, 50), scale=8.0, seed=3)
    w = torch.randn(96, 128) * 0.05
    cfg = AWQConfig(bits=3, group_size=32)
    ref = x @ w.T
    lin = torch.nn.Linear(128, 96, bias=False)
    lin.weight.data.copy_(w)
    QuantLinear.fast = False
    try:
        rtn_err = rel(rtn_solve(None, lin, cfg)(x), ref)
        s = search_scale(x, [w], cfg)
        lin.weight.data.copy_(w * s)
        scaled_err = rel(rtn_solve(None, lin, cfg)(x / s), ref)
        lin.weight.data.copy_(clip_weight(w * s, x / s, cfg))
        clipped_err = rel(rtn_solve(None, lin, cfg)(x / s), ref)
    finally:
        QuantLinear.fast = True
    assert scaled_err < 0.95 * rtn_err and clipped_err <= scaled_err * 1.001, (rtn_err, scaled_err, clipped_err)


@pytest.mark.parametrize("recipe", ["nf4", "w8a8-smoothquant", "w8a8-llmint8", "w4a16-awq-g32", "w3a16-gptq-g48"])
def test_methods_through_runner_and_checkpoint(recipe, tmp_path):
    from safetensors.torch import load_file, save_file

    from leanlm.compress.recipe import apply_recipe, load_recipe
    from leanlm.io.modules import restore, state_for_save
    from leanlm.model.transformer import Transformer

    x = torch.randint(0, 128, (2, 24))
    ref = tiny_model()(x).detach()
    model = tiny_model()
    apply_recipe(model, load_recipe(recipe), torch.randint(0, 128, (4, 24)), progress=False)
    with torch.no_grad():
        y = model(x)
    assert 0 < rel(y, ref) < (0.05 if recipe.startswith("w8") else 0.5)
    tensors, meta = state_for_save(model)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "m.safetensors"))
    with torch.device("meta"):
        fresh = Transformer(model.config)
    fresh.load_state_dict(restore(fresh, load_file(str(tmp_path / "m.safetensors")), meta), strict=False, assign=True)
    fresh.tie_weights()
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), y)


def test_int8_embedding_and_tied_head_roundtrip(tmp_path):
    import leanlm
    from leanlm.compress.quant.embedding import QuantEmbedding, TiedInt8Head
    from leanlm.compress.recipe import apply_recipe, parse_recipe
    from leanlm.errors import LeanLMError

    model = tiny_model()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        ref = model(x)
    text = "- method: rtn\n  bits: 4\n  group_size: 32\n- method: rtn\n  bits: 8\n  targets: ['embed_tokens']\n"
    apply_recipe(model, parse_recipe(text, "e.yaml"), None, progress=False)
    assert isinstance(model.model.embed_tokens, QuantEmbedding) and isinstance(model.lm_head, TiedInt8Head)
    emb = model.model.embed_tokens
    assert (emb.weight - model.model.embed_tokens.weight).abs().max() == 0
    assert ((emb.weight - ref.new_tensor(0)).shape == (128, 64))
    h = torch.randn(3, 64)
    QuantEmbedding.fast = False
    try:
        slow = model.lm_head(h)
    finally:
        QuantEmbedding.fast = True
    torch.testing.assert_close(slow, h @ emb.weight.T)
    assert rel(model.lm_head(h), slow) < 6e-3
    with torch.no_grad():
        y = model(x)
    assert rel(y, ref) < 0.5
    leanlm.save(model, None, tmp_path / "m")  # through the real files (memory-mapped on load)
    from leanlm.io.checkpoint import _read_safetensors, build_on_meta, materialize

    back = materialize(build_on_meta(model.config), _read_safetensors(tmp_path / "m"), "m",
                       meta=json.loads((tmp_path / "m" / "config.json").read_text())["leanlm_compression"])
    assert isinstance(back.lm_head, TiedInt8Head)
    with torch.no_grad():
        assert torch.equal(back(x), y)
    bad = "- method: rtn\n  bits: 4\n  targets: ['embed_tokens']\n"
    with pytest.raises(LeanLMError, match="e.yaml:2: .*8 bits only"):
        apply_recipe(tiny_model(), parse_recipe(bad, "e.yaml"), None, progress=False)


@pytest.mark.parametrize("recipe", ["w4a16-awq-g32", "w8a8-smoothquant"])
def test_bf16_models_quantize_and_run_in_bf16(recipe):
    from leanlm.compress.recipe import apply_recipe, load_recipe

    x = torch.randint(0, 128, (2, 16))
    model = tiny_model().to(torch.bfloat16)
    ref = model(x).float()
    apply_recipe(model, load_recipe(recipe), torch.randint(0, 128, (4, 16)), progress=False)
    y = model(x)
    assert y.dtype == torch.bfloat16 and rel(y.float(), ref) < 0.5


@pytest.mark.slow
def test_signal_to_noise_per_method_on_real_layers():
    """Output SNR of each method on layers of the default model, with real calibration activations."""
    import math

    import leanlm
    from leanlm.compress.quant.gptq import GPTQConfig, HessianState, gptq_accumulate, gptq_solve
    from leanlm.data import calibration_samples

    model, tok = leanlm.load()
    samples = calibration_samples(tok, 16, 128, seed=0)
    layer = model.get_submodule("model.layers.3.self_attn.q_proj")
    got = []

    def grab(m, a):
        got.append(a[0].reshape(-1, a[0].shape[-1]))
        raise StopIteration  # no need to run the rest of the model

    h = layer.register_forward_pre_hook(grab)
    with torch.no_grad():
        for row in samples:
            with pytest.raises(StopIteration):
                model(row[None])
    h.remove()
    X = torch.cat(got)  # 2048 tokens: the Hessian (576 x 576) is well determined from half of them
    calib, test = X[::2], X[1::2]  # solve on half the tokens, score on the other half
    ref = test @ layer.weight.detach().T
    st = HessianState(layer.in_features)
    gptq_accumulate(st, calib)

    def snr_db(q):
        with torch.no_grad():
            return 10 * math.log10(ref.pow(2).sum().item() / (q(test) - ref).pow(2).sum().item())

    QuantLinear.fast = False
    try:
        snr = {f"rtn{b}": snr_db(rtn_solve(None, layer, RTNConfig(bits=b, group_size=128))) for b in (8, 4, 3)}
        snr.update({f"gptq{b}": snr_db(gptq_solve(st, layer, GPTQConfig(bits=b, group_size=128))) for b in (4, 3)})
        snr["nf4"] = snr_db(NF4Linear.from_linear(layer, NF4Config()))
    finally:
        QuantLinear.fast = True
    assert snr["rtn8"] > 35 and snr["rtn8"] > snr["rtn4"] + 15 > snr["rtn3"] + 15, snr
    assert snr["gptq4"] > snr["rtn4"] + 0.5 and snr["gptq3"] > snr["rtn3"] + 0.5, snr
    assert snr["nf4"] > snr["rtn3"], snr
