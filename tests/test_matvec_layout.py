"""Wide fp32 weights stored column-major by fuse_projections (one-row matmuls run faster that way on CPU):
the same logits as the plain path, no extra memory, and everything done with the model after a generation
(quantization, pruning, saving, GGUF export, training, a dtype change) unaffected."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import greedy_reference, tiny_hf, to_leanlm

from leanlm.infer.generate import generate_tokens
from leanlm.infer.sampling import GenerationConfig
from leanlm.model.layout import HEAD, blocks, embedding, head, layout_of
from leanlm.model.transformer import column_major_pays, is_column_major

PROMPT = [3, 17, 42, 9, 77, 5]
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
SAMPLES = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))


def _greedy(m, n=8):
    cfg = GenerationConfig(max_new_tokens=n, ignore_eos=True, compile=False)
    return [step[0] for step in generate_tokens(m, [PROMPT], cfg)]


def _storage_bytes(m) -> int:
    """Bytes of every parameter's storage, each storage once."""
    return sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in m.parameters()}.values())


def _fused(m, layer: int, name: str) -> torch.Tensor:
    """The concatenated weight fuse_projections made: "_qkv" (attention) or "_gate_up" (MLP)."""
    lay = layout_of(m)
    owner = blocks(m)[layer].get_submodule(lay.attn if name == "_qkv" else lay.mlp)
    return owner.__dict__[name][0].w


def _linear(m, layer: int, role: str) -> torch.nn.Module:
    lay = layout_of(m)
    name = getattr(lay, role) if role in ("q", "k", "v", "o") else f"{lay.mlp}.{getattr(lay, role)}"
    return blocks(m)[layer].get_submodule(name)


def _tied(kind, tied):
    return to_leanlm(tiny_hf(kind, tie_word_embeddings=tied))


def test_rule_fp32_cpu_and_wide_only():
    cpu = torch.device("cpu")
    assert column_major_pays(960, 576, torch.float32, cpu) and column_major_pays(49152, 576, torch.float32, cpu)
    assert not column_major_pays(576, 576, torch.float32, cpu)  # o_proj
    assert not column_major_pays(576, 1536, torch.float32, cpu)  # down_proj
    assert not column_major_pays(3072, 576, torch.bfloat16, cpu)
    assert not column_major_pays(3072, 576, torch.float32, torch.device("meta"))


@pytest.mark.parametrize("kind,tied", [("llama", False), ("llama", True), ("gemma2", True)])
def test_column_major_logits_and_greedy_equal_plain(kind, tied):
    m = _tied(kind, tied)
    plain = copy.deepcopy(m)
    row = copy.deepcopy(m)
    row.column_major_matvec = False
    before = _storage_bytes(m)
    with torch.no_grad():
        want = plain(IDS)
        m.fuse_projections()
        row.fuse_projections()
        got, got_row = m(IDS), row(IDS)
    fused_qkv, fused_gu = _fused(m, 0, "_qkv"), _fused(m, 1, "_gate_up")
    assert is_column_major(fused_qkv) and is_column_major(fused_gu) and is_column_major(head(m).weight)
    assert not is_column_major(head(row).weight) and _fused(row, 0, "_gate_up").is_contiguous()
    # square and narrow weights are left row-major
    assert _linear(m, 0, "o").weight.is_contiguous() and _linear(m, 0, "down").weight.is_contiguous()
    # the modules' weights are views of the fused weight; the head is the embedding's own Parameter
    assert _linear(m, 0, "k").weight.untyped_storage().data_ptr() == fused_qkv.untyped_storage().data_ptr()
    assert (head(m).weight is embedding(m).weight) == tied
    assert _storage_bytes(m) == before  # nothing copied twice
    assert set(m.state_dict()) == set(plain.state_dict())
    for k, v in plain.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_row, want, rtol=0, atol=1e-5)
    assert _greedy(m) == greedy_reference(plain, PROMPT, 8)


def test_bf16_stays_row_major_and_a_dtype_change_relays_out():
    m = _tied("llama", True)
    _greedy(m)
    assert is_column_major(head(m).weight)
    m.to(torch.bfloat16)
    ref = copy.deepcopy(m)
    out = _greedy(m)
    assert not is_column_major(head(m).weight) and head(m).weight.is_contiguous()
    assert _fused(m, 0, "_gate_up").is_contiguous() and _fused(m, 1, "_qkv").is_contiguous()
    assert out == greedy_reference(ref, PROMPT, 8)
    m.float()
    _greedy(m)  # back to fp32: column-major again
    assert is_column_major(head(m).weight) and is_column_major(_fused(m, 1, "_qkv"))


# each kind of transform a model may get after a generation (all go through apply_recipe, which lays the
# weights out row-major again first): a grid, calibrated rounding, pruning, shapes changed, factorization
RECIPES = {
    "w4a16-rtn-g32-e8": None,  # int4 grid, and the tied embedding/head as int8 rows
    "gptq": "- method: gptq\n  bits: 4\n  group_size: 32",
    "sparsegpt": "- method: sparsegpt\n  sparsity: 0.5",
    "structured": "- method: structured\n  target: 0.2\n  importance: activation\n  head_ratio: 0.0",
    "lowrank": "- method: lowrank\n  target: 0.2\n  activation_aware: true",
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_generate_compress_generate_equals_compressing_a_fresh_model(name):
    from leanlm.compress.recipe import apply_recipe, load_recipe, parse_recipe

    def recipe():
        return load_recipe(name) if RECIPES[name] is None else parse_recipe(RECIPES[name])

    fresh = _tied("llama", True)
    used = copy.deepcopy(fresh)
    _greedy(used)  # fused, wide weights column-major
    assert is_column_major(head(used).weight)
    apply_recipe(fresh, recipe(), SAMPLES, progress=False)
    apply_recipe(used, recipe(), SAMPLES, progress=False)  # sees row-major weights again (plain_layout)
    assert all(p.is_contiguous() for p in used.parameters())
    sd_used = used.state_dict()
    assert set(sd_used) == set(fresh.state_dict())
    for k, v in fresh.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(sd_used[k], v, rtol=1e-4, atol=1e-5, msg=k)
        else:  # codes: at most a stray rounding tie from calibration inputs computed in another order
            assert (sd_used[k] != v).float().mean() < 1e-3, k
    with torch.no_grad():
        torch.testing.assert_close(used(IDS), fresh(IDS), rtol=1e-3, atol=1e-3)
    assert _greedy(used) == _greedy(fresh)


def test_plain_layout_then_dora_after_generation():
    from leanlm import peft

    fresh = _tied("llama", True)
    used = copy.deepcopy(fresh)
    _greedy(used)
    storage = _storage_bytes(used)
    used.plain_layout()
    assert all(p.is_contiguous() for p in used.parameters()) and _storage_bytes(used) == storage
    assert "_qkv" not in blocks(used)[0].get_submodule(layout_of(used).attn).__dict__
    _greedy(used)  # fused and column-major again
    assert is_column_major(_fused(used, 0, "_qkv"))
    models = []
    for m in (fresh, used):
        torch.manual_seed(0)
        models.append(peft.apply(m, "dora", r=4))
    assert all(p.is_contiguous() for p in used.parameters())
    with torch.no_grad():
        for m in models:  # the same nonzero adapters in both
            for i, p in enumerate(q for q in m.parameters() if q.requires_grad):
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(i))
        torch.testing.assert_close(models[1](IDS), models[0](IDS), rtol=0, atol=1e-5)
    peft.merge(models[1])
    peft.merge(models[0])
    with torch.no_grad():
        torch.testing.assert_close(models[1](IDS), models[0](IDS), rtol=0, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_save_after_generation_writes_the_weights(tmp_path, tied):
    from safetensors.torch import load_file
    from test_gguf_export import NV, _tok

    from leanlm.io.checkpoint import load_hf_folder, save_hf_folder

    m = to_leanlm(tiny_hf("llama", vocab_size=NV, tie_word_embeddings=tied))
    want = {k: v.clone() for k, v in m.state_dict().items()}
    _greedy(m)
    save_hf_folder(m, _tok(tmp_path), tmp_path / "out")
    on_disk = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(on_disk) == set(want) - ({f"{HEAD}.weight"} if tied else set())
    for k, v in on_disk.items():
        assert torch.equal(v, want[k]), k
    back = load_hf_folder(tmp_path / "out")[0]
    for k, v in back.state_dict().items():
        assert v.is_contiguous() and torch.equal(v, want[k]), k
    with torch.no_grad():
        assert torch.equal(back(IDS), m(IDS))


def test_gguf_export_after_generation_equals_export_before(tmp_path):
    import numpy as np
    from gguf import GGUFReader
    from test_gguf_export import NV, _tok

    from leanlm.io.gguf_export import export_gguf

    m = to_leanlm(tiny_hf("llama", vocab_size=NV, tie_word_embeddings=True))
    tok = _tok(tmp_path)
    export_gguf(m, tok, tmp_path / "before.gguf", "f32")
    _greedy(m)
    export_gguf(m, tok, tmp_path / "after.gguf", "f32")
    a, b = GGUFReader(str(tmp_path / "before.gguf")), GGUFReader(str(tmp_path / "after.gguf"))
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors):
        assert np.array_equal(ta.data, tb.data), ta.name


def test_training_after_generation_gets_the_same_gradients():
    m = _tied("llama", True)
    fresh = copy.deepcopy(m)
    _greedy(m)
    for model in (m, fresh):
        model.train()
        model(IDS).float().logsumexp(-1).mean().backward()
    grads = {n: p.grad for n, p in fresh.named_parameters()}
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    opt.step()  # the optimizer updates the column-major Parameters in place
    with torch.no_grad():
        assert not torch.equal(head(m).weight, head(fresh).weight)
