"""QLoRA: NF4 with double-quantized scales, the recomputing matmul, training, merge error, LoftQ."""
import pytest
import torch

from leanlm.compress.quant.nf4 import NF4, NF4Linear
from leanlm.model import ModelConfig, Transformer
from leanlm.peft import LoraConfig, save_adapter, load_adapter
from leanlm.peft.lora import LoraLinear
from leanlm.peft.qlora import apply_qlora, merge_error, nf4_quantize, quantize_nf4
from leanlm.train import TrainConfig, train
from leanlm.train.loop import causal_lm_loss, collate

NF4_TABLE = torch.tensor(NF4)


def test_nf4_codes_are_nearest_quantiles_and_scales_double_quantized():
    torch.manual_seed(0)
    w = torch.randn(48, 128) * 0.02
    q = nf4_quantize(w)
    assert isinstance(q, NF4Linear) and q.block_size == 64 and q.double_quant  # QLoRA's layout
    deq = q.dequantize()
    blocks = w.reshape(-1, 64)  # QLoRA/bitsandbytes: blocks of 64 consecutive weights of the flat tensor
    absmax = blocks.abs().amax(1)
    am = q.block_absmax().reshape(-1)
    # double quantization (int8 around the mean) keeps every block scale within 1%
    assert ((am - absmax).abs() / absmax).max() < 0.01
    # reference: brute-force nearest NF4 value for each weight, given its block scale
    ref = NF4_TABLE[(blocks / am[:, None]).clamp(-1, 1).unsqueeze(-1).sub(NF4_TABLE).abs().argmin(-1)] * am[:, None]
    torch.testing.assert_close(deq.reshape(-1, 64), ref)
    torch.testing.assert_close(deq, q.dequantized_weight())  # fast and plain dequantization agree
    assert (deq - w).norm() / w.norm() < 0.12
    assert q.absmax_q.dtype == torch.int8 and q.qweight.dtype == torch.uint8
    assert q.qweight.numel() == w.numel() // 2 and q.absmax_q.numel() == w.numel() // 64


def test_nf4_matmul_gradients_match_dense():
    torch.manual_seed(0)
    q = nf4_quantize(torch.randn(32, 64), torch.randn(32))
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = q(x)
    y.pow(2).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    y2 = torch.nn.functional.linear(x2, q.dequantize(), q.bias)
    y2.pow(2).sum().backward()
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(x.grad, x2.grad)
    # backward recomputes the dense weight: the graph saves no [32, 64] tensor
    z = q(torch.randn(2, 64, requires_grad=True))
    saved = [t for t in _saved_tensors(z.grad_fn) if t.shape == (32, 64)]
    assert not saved


def _saved_tensors(fn, seen=None):
    seen = set() if seen is None else seen
    out = []
    if fn is None or id(fn) in seen:
        return out
    seen.add(id(fn))
    for name in dir(fn):
        if name.startswith("_saved_"):
            v = getattr(fn, name)
            if isinstance(v, torch.Tensor):
                out.append(v)
    for nxt, _ in fn.next_functions:
        out += _saved_tensors(nxt, seen)
    return out


def test_requantize_resets_the_dequantization_cache():
    torch.manual_seed(0)
    q = nf4_quantize(torch.randn(16, 64))
    before = q.dequantize().clone()
    w2 = torch.randn(16, 64) * 3
    q.requantize(w2)
    torch.testing.assert_close(q.dequantize(), nf4_quantize(w2).dequantize())
    assert not torch.equal(q.dequantize(), before)


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
                e += float(((mod.base_layer.dequantize() + mod.delta_weight() - w).norm() / w.norm()).detach())
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


def _word_tokenizer():
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models

    from leanlm.io.tokenizer import Tokenizer

    return Tokenizer(HFTok(models.WordLevel({"<unk>": 0, "</s>": 1}, unk_token="<unk>")), eos_token="</s>")


@pytest.mark.parametrize("tied", [True, False])
def test_quantize_on_load_equals_quantizing_after_a_full_load(tmp_path, tied):
    """leanlm.load(quantize=nf4_on_load(...)) quantizes each weight as it is read: the NF4 codes, scales
    and outputs equal those of quantizing the fully loaded float model, and LoRA on top trains the same."""
    import leanlm
    from leanlm.peft.qlora import nf4_on_load

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, tie_word_embeddings=tied, attention_bias=True,
                      attention_out_bias=True)
    m = Transformer(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    leanlm.save(m, _word_tokenizer(), tmp_path / "m")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    seen = []

    def hook(name, weight, bias):
        seen.append((name, weight.dtype, bias is not None))
        return nf4_on_load(targets)(name, weight, bias)

    lazy = leanlm.api.load(str(tmp_path / "m"), quantize=hook)[0]
    full = leanlm.api.load(str(tmp_path / "m"))[0]
    names = quantize_nf4(full, targets)
    assert len(names) == 14 and {n for n, _, _ in seen} == set(names) | ({"lm_head"} if not tied else set())
    assert all(dt == torch.float32 for _, dt, _ in seen) and sum(b for _, _, b in seen) == 8  # q/k/v/o bias
    for name in names:
        a, b = lazy.get_submodule(name), full.get_submodule(name)
        assert isinstance(a, NF4Linear) and isinstance(b, NF4Linear)
        for key, t in b.state_dict().items():
            assert torch.equal(a.state_dict()[key], t), (name, key)
    assert isinstance(lazy.lm_head, torch.nn.Linear)  # the head is not a target
    if tied:
        assert lazy.lm_head.weight is lazy.model.embed_tokens.weight
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(lazy(ids), full(ids), rtol=0, atol=0)
    losses = []
    for model in (lazy, full):
        torch.manual_seed(1)
        model = apply_qlora(model, LoraConfig(r=4, alpha=8))
        for mod in model.modules():
            if isinstance(mod, LoraLinear):
                torch.nn.init.normal_(mod.lora_B.weight, std=0.02)  # same adapter start for both
        losses.append(train(model, data(), TrainConfig(max_steps=3, batch_size=4, lr=1e-2, progress=False)).losses)
    torch.testing.assert_close(losses[0], losses[1])


def test_qlora_trains_after_generation_in_inference_mode():
    """Generation before training builds NF4's dequantization tables under inference_mode; training must
    still work (the training loop no longer copies inference tensors)."""
    from leanlm.infer.generate import generate_tokens
    from leanlm.infer.sampling import GenerationConfig

    m = tiny()
    quantize_nf4(m, LoraConfig().target_modules)
    list(generate_tokens(m, [[1, 2, 3]], GenerationConfig(max_new_tokens=3)))
    m = apply_qlora(m, LoraConfig(r=4, alpha=8))
    res = train(m, data(), TrainConfig(max_steps=4, batch_size=8, lr=1e-2, progress=False))
    assert len(res.losses) == 4 and res.losses[-1] < res.losses[0]


def test_quantize_on_load_reports_a_truncated_file(tmp_path):
    import leanlm
    from leanlm.errors import LeanLMError
    from leanlm.peft.qlora import nf4_on_load

    leanlm.save(tiny(), _word_tokenizer(), tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-4096])
    with pytest.raises(LeanLMError, match="model.safetensors: cannot read safetensors"):
        leanlm.load(str(tmp_path / "m"), quantize=nf4_on_load(["q_proj"]))


def test_loftq_needs_the_float_weights():
    from leanlm.errors import LeanLMError

    m = tiny()
    quantize_nf4(m, LoraConfig().target_modules)
    with pytest.raises(LeanLMError, match="LoftQ needs the float weights"):
        apply_qlora(m, LoraConfig(init="loftq"))
