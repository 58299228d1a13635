"""Prune-then-distil students (Minitron): recipes by name cut a smaller model and distil it from the full one."""
from __future__ import annotations

import copy

import pytest
import torch

import leanlm
from conftest import save_tiny_tokenizer, tiny_hf, to_leanlm
from leanlm.errors import LeanLMError


@pytest.mark.parametrize("name", ["minitron-depth-50", "minitron-width-40"])
def test_minitron_recipe_plus_distill_shrinks_learns_and_saves(tmp_path, monkeypatch, name):
    import transformers

    import leanlm.compress.recover as recover
    from leanlm.compress.recipe import apply_recipe, load_recipe
    from test_distill import mean_kl

    original = to_leanlm(tiny_hf(seed=0, num_hidden_layers=4))
    samples = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(0))
    pruned = copy.deepcopy(original)
    apply_recipe(pruned, load_recipe(name), samples, progress=False)
    r = load_recipe(name + "+distill")
    assert [s.method for s in r.steps] == [load_recipe(name).steps[0].method, "distill"]
    r.steps[-1].fields.update(steps=20, lr=3e-3, batch_size=4, seq_len=32, warmup=0, progress=False)
    losses = []
    real = recover.distill
    monkeypatch.setattr(recover, "distill",
                        lambda *a, **k: real(*a, **{**k, "callback": lambda s, loss: losses.append(loss)}))
    model = copy.deepcopy(original)
    apply_recipe(model, r, samples, progress=False)
    if name == "minitron-depth-50":
        assert model.config.num_layers == 2  # half of the 4 blocks
    else:
        assert 0.5 < model.num_parameters() / original.num_parameters() < 0.75
    assert model.num_parameters() == pruned.num_parameters() < original.num_parameters()
    assert len(losses) == 20 and sum(losses[-5:]) < 0.8 * sum(losses[:5])
    data = [{"input_ids": row.tolist()} for row in samples]
    assert mean_kl(model, original, data) < 0.8 * mean_kl(pruned, original, data)
    # the student saves as a plain checkpoint of its family: leanlm and transformers load it back alike
    leanlm.save(model, None, tmp_path / "s")
    save_tiny_tokenizer(tmp_path / "s")
    back, _ = leanlm.load(tmp_path / "s")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    ids = samples[:2, :12]
    with torch.no_grad():
        ref = model(ids)
        torch.testing.assert_close(back(ids), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hf(ids).logits, ref, atol=1e-4, rtol=1e-4)


def test_layerdrop_fraction_counts_blocks():
    from leanlm.compress.prune.layerdrop import LayerDropConfig, layer_drop

    assert LayerDropConfig(fraction=0.5).blocks_to_drop(30) == 15
    assert LayerDropConfig(num_blocks=3).blocks_to_drop(30) == 3
    with pytest.raises(LeanLMError, match="fraction 1.5"):
        LayerDropConfig(fraction=1.5)
    model = to_leanlm(tiny_hf(seed=0))  # 2 blocks, the last kept: half of them is too many
    with pytest.raises(LeanLMError, match=r"fraction 0.5 \(1 blocks\).*2 blocks"):
        layer_drop(model, LayerDropConfig(fraction=0.5), samples=torch.zeros(1, 4, dtype=torch.long))


def test_scratch_student_spec():
    from leanlm.train.distill_cli import parse_scratch, scratch_student

    assert parse_scratch("out/pruned") is None and parse_scratch(None) is None
    assert parse_scratch("scratch:num_layers=12,hidden_size=384") == {"num_layers": 12, "hidden_size": 384}
    for bad in ("scratch:", "scratch:layers=12", "scratch:num_layers=0", "scratch:num_layers"):
        with pytest.raises(LeanLMError, match="--student scratch"):
            parse_scratch(bad)
    teacher = to_leanlm(tiny_hf(seed=0))
    s = scratch_student(teacher, {"num_layers": 3, "hidden_size": 32}, seed=0)
    c = s.config
    assert (c.num_layers, c.hidden_size, c.head_dim, c.num_heads, c.vocab_size) == (3, 32, 8, 4, 128)
    assert torch.isfinite(s(torch.tensor([[1, 2, 3]]))).all()
    with pytest.raises(LeanLMError, match="not a multiple of num_heads"):
        scratch_student(teacher, {"hidden_size": 30}, seed=0)
