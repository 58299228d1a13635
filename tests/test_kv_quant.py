"""Quantized KV cache: against the float cache on the same model (logits, perplexity), memory, bad input."""
import pytest
import torch

from conftest import tiny_hf, to_leanlm
from leanlm.errors import LeanLMError
from leanlm.infer.kv_quant import QuantizedKVCache, cached_nll, dequantize, float_cache_bytes, quantize


def test_quantize_roundtrip_error_shrinks_with_bits():
    x = torch.randn(3, 5, 64)
    errs = []
    for bits in (8, 4, 2):
        c, s, z = quantize(x, bits)
        errs.append(float((dequantize(c, s, z, torch.float32) - x).abs().max()))
    assert errs[0] < 0.02 < errs[1] < errs[2]
    assert errs[1] <= float((x.amax(-1) - x.amin(-1)).max()) / 15 / 2 + 1e-6  # half a 4-bit step at most


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_int8_cache_tracks_the_float_cache(kind):
    m = to_leanlm(tiny_hf(kind))
    ids = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(0))
    cfg = m.config
    ref, n = cached_nll(m, ids, m.new_cache(1, 48), chunk=8)
    nlls = {b: cached_nll(m, ids, QuantizedKVCache(cfg, 1, 48, bits=b), chunk=8)[0] for b in (8, 4, 2)}
    assert abs(nlls[8] - ref) / ref < 0.005  # int8: within 0.5% of the float cache's NLL
    assert abs(nlls[8] - ref) < abs(nlls[4] - ref) < abs(nlls[2] - ref)  # fewer bits cost more
    with torch.no_grad():
        full = m(ids)
        c = QuantizedKVCache(cfg, 1, 48, bits=8)
        step = torch.cat([m(ids[:, :20], cache=c)] + [m(ids[:, t:t + 1], cache=c) for t in range(20, 48)], 1)
    assert (step - full).abs().max() < 0.05 * full.abs().max()


def test_left_padded_batch_and_memory():
    m = to_leanlm(tiny_hf("llama"))
    valid = torch.tensor([[False, False, True, True], [True, True, True, True]])
    c = QuantizedKVCache(m.config, 2, 16, bits=8, valid=valid)
    ids = torch.randint(0, 128, (2, 4))
    with torch.no_grad():
        out = m(ids, cache=c)
        alone = m(ids[:1, 2:])
    assert (out[0, 2:] - alone[0]).abs().max() < 0.05 * alone.abs().max()
    fb = float_cache_bytes(m.config, 2, 16)
    assert QuantizedKVCache(m.config, 2, 16, bits=8).packed_bytes() < fb / 3
    assert QuantizedKVCache(m.config, 2, 16, bits=2).packed_bytes() <= fb / 8  # head_dim 16: scales weigh
    with pytest.raises(LeanLMError, match="supported 8, 4, 2"):
        QuantizedKVCache(m.config, 1, 8, bits=3)


def test_generate_with_an_int8_cache_follows_the_float_cache():
    from leanlm.infer.generate import generate_tokens
    from leanlm.infer.sampling import GenerationConfig

    m = to_leanlm(tiny_hf("llama"))
    prompts = [[5, 9, 17, 3, 44, 2], [7, 7, 1]]

    def run(bits):
        steps = list(generate_tokens(m, prompts, GenerationConfig(max_new_tokens=6, stop_token_ids=[], kv_bits=bits)))
        return [[s[i] for s in steps] for i in range(2)]
    assert run(8) == run(None)
