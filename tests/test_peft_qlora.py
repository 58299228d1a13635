"""QLoRA: NF4 with double-quantized scales, the recomputing matmul, training, merge error, LoftQ."""
import pytest
import torch

from leanlm.model import ModelConfig, Transformer
from leanlm.peft import LoraConfig, save_adapter, load_adapter
from leanlm.peft.lora import LoraLinear
from leanlm.peft.qlora import NF4, NF4Linear, apply_qlora, merge_error, nf4_quantize, quantize_nf4
from leanlm.train import TrainConfig, train
from leanlm.train.loop import causal_lm_loss, collate


def test_nf4_codes_are_nearest_quantiles_and_scales_double_quantized():
    torch.manual_seed(0)
    w = torch.randn(48, 128) * 0.02
    q = NF4Linear(w)
    deq = q.dequantize()
    blocks = w.reshape(-1, 64)
    absmax = blocks.abs().amax(1)
    packed, q2, s2, mean = nf4_quantize(w)
    am = (q2.view(-1, 256).float() * s2[:, None]).reshape(-1)[:blocks.shape[0]] + mean
    # double quantization (int8 around the mean) keeps every block scale within 1%
    assert ((am - absmax).abs() / absmax).max() < 0.01
    # reference: brute-force nearest NF4 value for each weight, given its block scale
    ref = NF4[(blocks / am[:, None]).clamp(-1, 1).unsqueeze(-1).sub(NF4).abs().argmin(-1)] * am[:, None]
    torch.testing.assert_close(deq.reshape(-1, 64), ref)
    assert (deq - w).norm() / w.norm() < 0.12
    assert q.absmax_codes.dtype == torch.int8 and q.nf4_codes.dtype == torch.uint8
    assert q.nf4_codes.numel() == w.numel() // 2


def test_nf4_matmul_gradients_match_dense():
    torch.manual_seed(0)
    q = NF4Linear(torch.randn(32, 64), torch.randn(32))
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = q(x)
    y.pow(2).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    y2 = torch.nn.functional.linear(x2, q.dequantize(), q.bias)
    y2.pow(2).sum().backward()
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(x.grad, x2.grad)


def tiny():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, tie_word_embeddings=True)
    m = Transformer(cfg)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.05)
    return m


def data():
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(16):
        ids = torch.randint(1, 64, (12,), generator=g).tolist()
        ids[6:] = [(x * 7 + 3) % 64 for x in ids[:6]]
        out.append({"input_ids": ids, "labels": [-100] * 6 + ids[6:]})
    return out


def test_qlora_trains_saves_and_merges(tmp_path):
    m = apply_qlora(tiny(), LoraConfig(r=4, alpha=8))
    nf4 = [mod for mod in m.modules() if isinstance(mod, NF4Linear)]
    assert len(nf4) == 14 and not any(p.requires_grad for mod in nf4 for p in mod.parameters())
    ids, labels = collate(data())
    with torch.no_grad():
        before = float(causal_lm_loss(m, ids, labels)[0])
    train(m, data(), TrainConfig(max_steps=30, batch_size=8, lr=1e-2, progress=False))
    with torch.no_grad():
        after = float(causal_lm_loss(m, ids, labels)[0])
    assert after < before - 0.3
    save_adapter(m, tmp_path / "ad")
    # a QLoRA adapter is a plain LoRA adapter: it loads on an NF4-quantized model with the same outputs
    fresh = tiny()
    quantize_nf4(fresh, LoraConfig().target_modules)
    fresh = load_adapter(fresh, tmp_path / "ad")
    loras = [x for x in m.modules() if isinstance(x, LoraLinear)]
    with torch.no_grad():
        unmerged = m(ids)
        torch.testing.assert_close(fresh(ids), unmerged)
        for x in loras:
            x.disabled = True
        no_adapter = m(ids)
        for x in loras:
            x.disabled = False
        err = merge_error(m)
        merged = m(ids)
    assert 0 < err < 0.15  # requantizing the merged weight costs a reported NF4 rounding error
    assert all(isinstance(x, LoraLinear) and x.merged for x in m.modules() if isinstance(x, LoraLinear))
    # the merged model keeps the adapter's effect, up to NF4 rounding
    assert (merged - unmerged).abs().mean() < 0.5 * (no_adapter - unmerged).abs().mean()


def test_loftq_starts_closer_to_the_float_weights():
    torch.manual_seed(0)
    fp = tiny()
    plain = apply_qlora(tiny(), LoraConfig(r=8, alpha=8))
    loftq = apply_qlora(tiny(), LoraConfig(r=8, alpha=8, init="loftq", loftq_iters=2))

    def err(m):
        e = 0.0
        for name, mod in m.named_modules():
            if isinstance(mod, LoraLinear):
                w = fp.get_submodule(name).weight
                e += float((mod.base_layer.dequantize() + mod.delta_weight() - w).norm() / w.norm())
        return e

    assert err(loftq) < 0.8 * err(plain)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        ref = fp(ids)
        assert (loftq(ids) - ref).abs().mean() < (plain(ids) - ref).abs().mean()


def test_qlora_rejects_loftq_on_plain_lora():
    from leanlm.errors import LeanLMError
    from leanlm.peft import apply_lora

    with pytest.raises(LeanLMError, match="QLoRA"):
        apply_lora(tiny(), LoraConfig(init="loftq"))
