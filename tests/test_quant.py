"""Quantization: grids, packing, fast kernels vs the dequantized reference, GPTQ vs RTN, the runner."""
import pytest
import torch

from leanlm.compress.quant.grid import dequantize, pack, rtn_quantize, unpack
from leanlm.compress.quant.qlinear import QuantLinear


@pytest.fixture
def reference_path():
    yield
    QuantLinear.fast = True


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("K", [1, 7, 8, 9, 100, 576])
def test_pack_roundtrip(bits, K):
    g = torch.Generator().manual_seed(bits * 1000 + K)
    c = torch.randint(0, 2 ** bits, (5, K), generator=g)
    p = pack(c, bits)
    assert p.dtype == torch.uint8 and p.shape[1] * 8 >= K * bits
    assert torch.equal(unpack(p, bits, K).long(), c)


def test_pack_4bit_layout_low_nibble_first():
    # documented layout: little-endian bit stream, code i of a byte in bits [4i, 4i+4)
    c = torch.tensor([[1, 2, 15, 0]])
    assert pack(c, 4).tolist() == [[0x21, 0x0F]]
    vals = [1, 2, 3, 4, 5, 6, 7, 0]
    stream = sum(v << (3 * i) for i, v in enumerate(vals))  # 8 codes of 3 bits = 3 bytes
    assert pack(torch.tensor([vals]), 3).tolist() == [[(stream >> (8 * j)) & 255 for j in range(3)]]


def manual_rtn(w, bits, g, sym):
    """Independent per-group loop (no shared helpers): returns the dequantized weight."""
    out = torch.empty_like(w)
    maxq = 2 ** bits - 1
    for r in range(w.shape[0]):
        for s in range(0, w.shape[1], g):
            x = w[r, s:s + g]
            if sym:
                scale = float(torch.tensor(2 * x.abs().max().item() / maxq).half())
                off = -(2 ** (bits - 1)) * scale
            else:
                scale = float(torch.tensor((x.max() - x.min()).item() / maxq).half())
                off = float(x.min().half())
            q = torch.clamp(torch.round((x - off) / scale), 0, maxq)
            out[r, s:s + g] = q * scale + off
    return out


@pytest.mark.parametrize("bits,g,sym", [(4, 32, False), (4, 48, True), (3, 128, True), (2, 64, False), (8, 100, True)])
def test_rtn_matches_manual_groups_not_dividing_width(bits, g, sym):
    w = torch.randn(6, 300)  # 300 is not a multiple of 32, 48, 64, 128 or 100*... last group shorter
    codes, s, o = rtn_quantize(w, bits, g, sym)
    assert s.shape == (6, -(-300 // g))
    torch.testing.assert_close(dequantize(codes, s, o, g), manual_rtn(w, bits, g, sym), rtol=0, atol=1e-5)


def test_rtn_reproduces_q4_1_grid_exactly():
    # weights already on an asymmetric 4-bit grid with fp16 scale/min per 32 (GGUF Q4_1) come back unchanged
    g = torch.Generator().manual_seed(0)
    d = (torch.rand(8, 3, generator=g) * 0.1 + 0.01).half().float()
    m = (-torch.rand(8, 3, generator=g)).half().float()
    q = torch.randint(0, 16, (8, 96), generator=g).float()
    q[:, ::32] = 0
    q[:, 1::32] = 15
    w = q * d.repeat_interleave(32, 1) + m.repeat_interleave(32, 1)
    codes, s, o = rtn_quantize(w, 4, 32, sym=False)
    assert torch.equal(codes.float(), q)
    torch.testing.assert_close(dequantize(codes, s, o, 32), w, rtol=0, atol=1e-6)


CASES = [(4, 576, 128, True), (4, 576, 128, False), (4, 576, -1, True), (4, 100, 32, False), (3, 576, 64, True),
         (3, 96, 32, False), (2, 64, 64, True), (2, 576, 128, False), (8, 576, -1, True), (8, 64, 32, False),
         (4, 576, 48, True)]


@pytest.mark.parametrize("bits,K,g,sym", CASES)
def test_fast_path_equals_dequantized_reference(bits, K, g, sym, reference_path):
    torch.manual_seed(bits + K + g)
    N = 40  # not a multiple of 16: the int4 packer's row tiles get padded
    w = torch.randn(N, K)
    codes, s, o = rtn_quantize(w, bits, g, sym)
    m = QuantLinear.from_codes(codes, s, o, bits, g, sym, bias=torch.randn(N))
    expected_path = {4: "int4pack", 3: "int4pack", 2: "int4pack"}.get(bits, "int8pack" if sym and g <= 0 else "dequant")
    if g == 48:
        expected_path = "dequant"
    assert m.path() == expected_path
    x = torch.randn(2, 3, K)
    QuantLinear.fast = False
    ref = m(x)
    # the reference path is the plain dequantized matmul
    torch.testing.assert_close(ref, x @ m.dequantized_weight().T + m.bias, rtol=1e-5, atol=1e-5)
    QuantLinear.fast = True
    y = m(x)
    # fast kernels run in bf16: relative error ~ bf16 epsilon, never more
    rel = ((y - ref).norm() / ref.norm()).item()
    assert rel < (1e-6 if expected_path == "dequant" else 6e-3), rel
    assert y.shape == (2, 3, N)
    # many rows (prefill) take the dequantized fp32 GEMM: equal to the reference
    xb = torch.randn(300, K)
    torch.testing.assert_close(m(xb), xb @ m.dequantized_weight().T + m.bias, rtol=1e-5, atol=1e-5)


def tiny_model(seed=0, layers=2, vocab=128):
    transformers = pytest.importorskip("transformers")
    from leanlm.model import ModelConfig
    from leanlm.model.transformer import Transformer

    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2))
    m = Transformer(ModelConfig.from_hf(hf.config.to_dict()))
    m.load_state_dict(hf.state_dict(), strict=False)
    return m.eval()


def _layer_inputs(model, samples, name):
    got = []
    h = model.get_submodule(name).register_forward_pre_hook(lambda mod, a: got.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(samples)
    h.remove()
    return torch.cat(got)


@pytest.mark.parametrize("bits,g", [(4, 32), (3, 64), (2, 32)])
def test_gptq_layer_error_below_rtn(bits, g):
    from leanlm.compress.quant.gptq import GPTQConfig, HessianState, gptq_accumulate, gptq_solve, rtn_solve

    model = tiny_model()
    samples = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    for name in ["model.layers.1.mlp.down_proj", "model.layers.0.self_attn.q_proj"]:
        layer = model.get_submodule(name)
        X = _layer_inputs(model, samples, name)
        st = HessianState(layer.in_features)
        for chunk in X.split(50):
            gptq_accumulate(st, chunk)
        torch.testing.assert_close(st.H, 2 * X.T @ X / X.shape[0], rtol=1e-4, atol=1e-5)
        for act_order in (True, False):
            cfg = GPTQConfig(bits=bits, group_size=g, act_order=act_order)
            ref = X @ layer.weight.T
            err = {}
            QuantLinear.fast = False
            try:
                for kind, q in (("rtn", rtn_solve(None, layer, cfg)), ("gptq", gptq_solve(st, layer, cfg))):
                    err[kind] = ((q(X) - ref).pow(2).sum() / ref.pow(2).sum()).item()
            finally:
                QuantLinear.fast = True
            assert err["gptq"] < 0.9 * err["rtn"], (name, act_order, err)


def test_runner_gptq_beats_rtn_and_keeps_block_memory():
    from leanlm.compress.calibrate import Step, run_steps
    from leanlm.model.surgery import select_modules
    from leanlm.compress.quant import METHODS

    samples = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(2))
    x = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(3))
    ref = tiny_model()(x)
    errs = {}
    for name in ("rtn", "gptq"):
        model = tiny_model()
        cls, method = METHODS[name]
        mods = select_modules(model, [r"^model\.layers\."], [])
        assert len(mods) == 14
        run_steps(model, [Step(name, method, cls(bits=3, group_size=32), mods)], samples, progress=False)
        assert all(isinstance(model.get_submodule(n), QuantLinear) for n in mods)
        assert not isinstance(model.lm_head, QuantLinear)
        with torch.no_grad():
            errs[name] = ((model(x) - ref).norm() / ref.norm()).item()
    assert errs["gptq"] < errs["rtn"], errs


def test_runner_shares_hessian_between_qkv_and_feeds_quantized_outputs():
    from leanlm.compress.calibrate import Method, Step, run_steps
    from leanlm.model.surgery import select_modules

    model = tiny_model()
    original = tiny_model()
    seen = []
    calls = []

    def init(layer, cfg):
        return {"n": 0}

    def acc(state, x):
        state["n"] += x.shape[0]
        calls.append(x)

    def solve(state, layer, cfg):
        seen.append(state["n"])
        with torch.no_grad():
            layer.weight.mul_(0)  # a "compression" the next block must see
        return None

    mods = select_modules(model, [r"layers\.\d+\.self_attn\.(q|k|v)_proj"], [])
    samples = torch.randint(0, 128, (3, 16))
    run_steps(model, [Step("probe", Method(init=init, accumulate=acc, solve=solve), None, mods)], samples,
              progress=False)
    # one Hessian-style state per distinct input: q accumulates 3*16 tokens, k and v alias it
    assert seen == [48, 48, 48, 48, 48, 48]
    assert len(calls) == 6  # 3 samples x 2 blocks, not x3 layers
    # block 1 was calibrated on block 0's outputs *after* block 0's q/k/v were zeroed
    for i in range(3):
        row = samples[i:i + 1]
        after = _layer_inputs(model, row, "model.layers.1.self_attn.q_proj")
        before = _layer_inputs(original, row, "model.layers.1.self_attn.q_proj")
        torch.testing.assert_close(calls[3 + i], after)
        assert not torch.allclose(calls[3 + i], before, atol=1e-3)


@pytest.mark.slow
def test_default_model_weights_sit_on_an_asymmetric_4bit_g32_grid():
    """The default model comes from a Q4_1 GGUF: asymmetric RTN with groups of 32 gives its weights back."""
    import leanlm

    model, _ = leanlm.load()
    for name in ["model.layers.0.self_attn.q_proj", "model.layers.15.mlp.down_proj", "model.layers.29.mlp.up_proj"]:
        w = model.get_submodule(name).weight.detach()
        codes, s, o = rtn_quantize(w, 4, 32, sym=False)
        err = ((dequantize(codes, s, o, 32) - w).norm() / w.norm()).item()
        sym_codes, ss, so = rtn_quantize(w, 4, 128, sym=True)
        err_g128 = ((dequantize(sym_codes, ss, so, 128) - w).norm() / w.norm()).item()
        assert err < 1e-3 < 0.05 < err_g128, (name, err, err_g128)
