"""BitNet b1.58: ternary quantizers, 2-bit packing, the packed matmul, save/load and recovery."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_hf, to_leanlm
from leanlm.compress.quant.bitnet import (BitLinear, fake_quant_activations, fake_quant_weight,
                                          quantize_activations, ternarize)
from leanlm.compress.recipe import apply_recipe, load_recipe

SAMPLES = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(0))


# The reference: "The Era of 1-bit LLMs: Training Tips, Code and FAQ" (Microsoft, 2024), written out again.
def ref_weight_quant(w, per_row=False):
    m = w.abs().mean(dim=1, keepdim=True) if per_row else w.abs().mean()
    scale = 1.0 / m.clamp(min=1e-5)
    return (w * scale).round().clamp(-1, 1) / scale


def ref_activation_quant(x):
    scale = 127.0 / x.abs().max(dim=-1, keepdim=True).values.clamp(min=1e-5)
    return (x * scale).round().clamp(-128, 127) / scale


@pytest.mark.parametrize("per_row", [False, True])
def test_quantizers_are_the_b158_formulas_with_identity_gradient(per_row):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(24, 40, generator=g) * torch.rand(24, 1, generator=g)).requires_grad_(True)
    w.data[3] = 0  # an all-zero row: its scale is clamped, not a division by zero
    t, s = ternarize(w, per_row)
    assert t.dtype == torch.int8 and set(t.unique().tolist()) <= {-1, 0, 1} and s.shape == (24 if per_row else 1,)
    torch.testing.assert_close(t.float() * s[:, None], ref_weight_quant(w.detach(), per_row), rtol=1e-6, atol=0)
    wq = fake_quant_weight(w, per_row)
    torch.testing.assert_close(wq.detach(), ref_weight_quant(w.detach(), per_row), rtol=1e-6, atol=0)
    (wq * torch.arange(40.0)).sum().backward()
    torch.testing.assert_close(w.grad, torch.arange(40.0).expand(24, 40))

    x = (torch.randn(2, 5, 40, generator=g) * 3).requires_grad_(True)
    x.data[0, 1] = 0
    q, a = quantize_activations(x)
    assert bool((q == q.round()).all()) and q.abs().max() <= 127
    torch.testing.assert_close(q / a, ref_activation_quant(x.detach()), rtol=1e-6, atol=0)
    xq = fake_quant_activations(x)
    torch.testing.assert_close(xq.detach(), ref_activation_quant(x.detach()), rtol=1e-6, atol=0)
    xq.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("K", [64, 70, 3])
def test_packed_storage_round_trip_is_exact_four_codes_a_byte(K):
    w = torch.randn(9, K, generator=torch.Generator().manual_seed(K))
    m = BitLinear.from_weight(w)
    t, s = ternarize(w, False)
    assert m.qweight.dtype == torch.uint8 and m.qweight.shape == (9, -(-K // 4))
    assert torch.equal(m.codes(), t) and torch.equal(m.scale, s)
    # the bytes hold code + 1 in two bits each, lowest bits first
    b = m.qweight.to(torch.int64)
    first = ((b[:, 0] & 3) - 1, ((b[:, 0] >> 2) & 3) - 1)
    assert torch.equal(first[0], t[:, 0].long()) and (K < 2 or torch.equal(first[1], t[:, 1].long()))


@pytest.mark.parametrize("N,K,per_row", [(48, 64, False), (37, 70, True), (200, 96, False)])
def test_packed_matmul_equals_fake_quant_matmul(N, K, per_row):
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(N, K, generator=g) * 0.1, torch.randn(N, generator=g)
    m = BitLinear.from_weight(w, per_row, bias=b)
    fake = lambda x: F.linear(ref_activation_quant(x), ref_weight_quant(w, per_row), b)  # noqa: E731
    x1, xp = torch.randn(1, 3, K, generator=g), torch.randn(2, 80, K, generator=g)
    t, s = ternarize(w, per_row)

    def exact(x):  # integers in int64, then the scales
        q, a = quantize_activations(x)
        return (q.long() @ t.long().t()).double() * (s.double() / a.double()) + b.double()
    with torch.no_grad():
        BitLinear.fast = False
        try:
            for x in (x1, xp):
                torch.testing.assert_close(m(x), fake(x), rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(m(x).double(), exact(x), rtol=1e-6, atol=1e-5)
        finally:
            BitLinear.fast = True
        torch.testing.assert_close(m(xp).double(), exact(xp), rtol=1e-6, atol=1e-5)  # >= 128 rows: exact path
        y, ref = m(x1), exact(x1)
        # the int4 kernel's bf16 output rounds the integer sums: <= 2**-9 of each before rescaling
        q, a = quantize_activations(x1)
        sums = (q.long() @ t.long().t()).double().abs() * (s.double() / a.double())
        assert bool(((y.double() - ref).abs() <= sums * 2 ** -8 + 1e-5).all())
        assert m._kernel is not None


def test_recipe_by_name_fused_model_and_save_load_keep_logits(tmp_path):
    from safetensors.torch import load_file

    from leanlm.io.checkpoint import build_on_meta, materialize, save_hf_folder
    from leanlm.model import ModelConfig
    from leanlm.model.layout import all_block_linears

    r = load_recipe("bitnet158")
    assert [(s.method, s.fields) for s in r.steps] == [("bitnet158", {"per_row": False})]
    model = to_leanlm(tiny_hf(seed=0))
    ref = copy.deepcopy(model)
    apply_recipe(model, r, None, progress=False)
    names = all_block_linears(model)
    assert names and all(isinstance(model.get_submodule(n), BitLinear) for n in names)
    for n in names:  # the same ternary weights as the formulas applied to each original linear
        torch.testing.assert_close(model.get_submodule(n).dequantized_weight(),
                                   ref_weight_quant(ref.get_submodule(n).weight.detach()), rtol=1e-6, atol=0)
    ids = SAMPLES[:2, :6]
    with torch.no_grad():
        y = model(ids)
        BitLinear.fast = False
        y_ref = model(ids)
        BitLinear.fast = True
        torch.testing.assert_close(y, y_ref, atol=0.1, rtol=0.05)  # bf16 kernel output vs exact integers
        model.fuse_projections()
        torch.testing.assert_close(model(ids), y, atol=1e-5, rtol=1e-5)  # q/k/v and gate/up as one kernel
    out = save_hf_folder(model, None, tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    mods = config["leanlm_compression"]["modules"]
    assert {v["type"] for v in mods.values()} == {"BitLinear"} and set(mods) == set(names)
    tensors = load_file(str(out / "model.safetensors"))
    n0 = names[0]
    assert tensors[n0 + ".qweight"].dtype == torch.uint8 and f"{n0}.weight" not in tensors
    loaded = materialize(build_on_meta(ModelConfig.from_hf(config)), tensors, str(out),
                         meta=config["leanlm_compression"]).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids), y)
        BitLinear.fast = False
        try:
            assert torch.equal(loaded(ids), y_ref)
        finally:
            BitLinear.fast = True


def test_latent_weight_reproduces_the_layer_exactly():
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    for per_row in (False, True):
        m = BitLinear.from_weight(w, per_row)
        assert torch.equal(m.latent_init(w), w)  # the weight it came from
        other = m.latent_init(w + 1)  # not that weight: rebuilt from the codes
        t, s = ternarize(other, per_row)
        assert torch.equal(t, m.codes())
        torch.testing.assert_close(s, m.scale, rtol=1e-6, atol=0)
        x = torch.randn(3, 32)
        with torch.no_grad():
            y = m(x)
            m.begin_latent(w)
            assert m.latent.requires_grad and m._kernel is None
            torch.testing.assert_close(m(x), y, atol=0.05, rtol=0.01)
            m.end_latent()
        assert m.latent is None and "latent" not in dict(m.named_parameters())
        assert torch.equal(m.codes(), ternarize(w, per_row)[0])


def mean_kl(student, teacher, ids):
    with torch.no_grad():
        t, s = teacher(ids).log_softmax(-1), student(ids).log_softmax(-1)
    return (t.exp() * (t - s)).sum(-1).mean().item()


def test_bitnet_plus_distill_trains_latent_weights_and_lowers_the_loss():
    import leanlm.compress.recover as recover

    model = to_leanlm(tiny_hf(seed=0))
    teacher = copy.deepcopy(model)
    converted = copy.deepcopy(model)
    apply_recipe(converted, load_recipe("bitnet158"), None, progress=False)
    r = load_recipe("bitnet158+distill")
    assert [s.method for s in r.steps] == ["bitnet158", "distill"]
    r.steps[-1].fields.update(steps=25, lr=1e-3, ternary_lr=1e-2, batch_size=4, seq_len=32, progress=False)
    seen = {}

    def spy(step, loss):
        seen.setdefault("losses", []).append(loss)
        if step == 25:  # the fake-quantized model just before packing
            with torch.no_grad():
                seen["logits"] = model(SAMPLES[:2])
            seen["latent"] = sum(isinstance(m, BitLinear) and m.latent is not None for m in model.modules())
    orig = recover.distill
    recover.distill = lambda *a, **k: orig(*a, **{**k, "callback": spy})
    try:
        apply_recipe(model, r, SAMPLES, progress=False)
    finally:
        recover.distill = orig
    bits = [m for m in model.modules() if isinstance(m, BitLinear)]
    assert len(bits) == seen["latent"] > 0 and all(m.latent is None for m in bits)
    assert not any(p.requires_grad for m in bits for p in m.parameters())
    changed = sum(not torch.equal(a.codes(), b.codes()) for a, b in
                  zip(bits, [m for m in converted.modules() if isinstance(m, BitLinear)]))
    assert changed > 0  # codes moved: the latent weights trained
    BitLinear.fast = False
    try:
        with torch.no_grad():  # packing keeps what the fake-quantized model computed
            torch.testing.assert_close(model(SAMPLES[:2]), seen["logits"], atol=1e-4, rtol=1e-4)
    finally:
        BitLinear.fast = True
    assert mean_kl(model, teacher, SAMPLES) < 0.7 * mean_kl(converted, teacher, SAMPLES)


def test_from_scratch_bitnet_training_learns_and_packs_to_the_same_model():
    from leanlm.compress.quant.bitnet import bitnet_training, pack_bitnet
    from leanlm.model.layout import all_block_linears

    torch.manual_seed(0)
    model = to_leanlm(tiny_hf(seed=3))
    names = bitnet_training(model)
    assert names == all_block_linears(model)
    params = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in params) == sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3)
    ids = (torch.arange(33)[None] * torch.tensor([[1], [3], [5], [7]])) % 128  # four learnable sequences
    losses = []
    model.train()
    for _ in range(40):
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        fake = model(ids)
    assert pack_bitnet(model) == len(names)
    assert all(model.get_submodule(n).latent is None for n in names)
    BitLinear.fast = False
    try:
        with torch.no_grad():
            torch.testing.assert_close(model(ids), fake, atol=1e-4, rtol=1e-4)
    finally:
        BitLinear.fast = True
