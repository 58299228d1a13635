"""Fused quantized q/k/v and gate/up (one int4 kernel call each) against the separate layers."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama
from leanlm.compress.quant import RTNConfig
from leanlm.compress.quant.rtn import rtn_solve
from leanlm.compress.quant.grid import rtn_quantize
from leanlm.compress.quant.qlinear import QuantLinear


def quantize_all(model, bits=4, group_size=32, sym=False):
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear) and child is not model.lm_head:
                setattr(mod, name, rtn_solve(None, child, RTNConfig(bits=bits, group_size=group_size, sym=sym)))
    return model


@pytest.mark.parametrize("bits,K,g,sym", [(4, 576, 128, True), (4, 96, 32, False), (3, 64, 64, True)])
def test_fused_layers_equal_separate(bits, K, g, sym):
    torch.manual_seed(K + bits)
    mods = []
    for n in (72, 24, 24):
        codes, s, o = rtn_quantize(torch.randn(n, K), bits, g, sym)
        mods.append(QuantLinear.from_codes(codes, s, o, bits, g, sym))
    fused = QuantLinear.fused(tuple(mods))
    x = torch.randn(1, 2, K)
    separate = torch.cat([m(x) for m in mods], -1)
    # rows are independent in the kernel: the same bf16 computation, row by row
    torch.testing.assert_close(fused(x), separate, rtol=0, atol=1e-6)
    assert fused.qweight.numel() == 0  # only the kernel holds the fused weights
    QuantLinear.fast = False
    try:
        torch.testing.assert_close(fused(x), torch.cat([m(x) for m in mods], -1))
    finally:
        QuantLinear.fast = True
    xb = torch.randn(200, K)  # prefill rows take the exact fp32 path through the parts
    torch.testing.assert_close(fused(xb), torch.cat([m(xb) for m in mods], -1))


def test_no_fusion_across_formats():
    a = QuantLinear.from_codes(*rtn_quantize(torch.randn(32, 64), 4, 32, True), 4, 32, True)
    b = QuantLinear.from_codes(*rtn_quantize(torch.randn(32, 64), 4, 64, True), 4, 64, True)
    assert QuantLinear.fused((a, b)) is None


def test_kernel_group_avoids_padding():
    m = QuantLinear(576, 32, 4, 128, True)
    assert m._kernel_group() == 64  # 576 is not a multiple of 128: groups of 128 run as two kernel groups of 64
    assert QuantLinear(1536, 32, 4, 128, True)._kernel_group() == 128


@torch.inference_mode()
def test_quantized_model_fused_decode_equals_unfused():
    model, _ = tiny_llama(layers=2)
    quantize_all(model)
    ids = torch.tensor([[3, 17, 42, 9, 77]])

    def decode(m):
        cache = m.new_cache(1, 16)
        out = [m(ids, cache=cache)[:, -1]]
        for t in (5, 6, 7):
            out.append(m(torch.tensor([[t]]), cache=cache)[:, -1])
        return torch.cat(out)

    plain = decode(model)
    model.fuse_projections()
    attn = model.model.layers[0].self_attn
    assert "_qkv" in attn.__dict__ and "_gate_up" in model.model.layers[0].mlp.__dict__
    torch.testing.assert_close(decode(model), plain, rtol=0, atol=1e-5)
    # swapping a layer (as a later compression step would) drops the stale fused kernel
    attn.q_proj = rtn_solve(None, torch.nn.Linear(64, 64, bias=False), RTNConfig(bits=4, group_size=32, sym=False))
    decode(model)
    assert "_qkv" not in attn.__dict__
