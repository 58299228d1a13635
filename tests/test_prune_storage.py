"""Sparse storage: bitmask + values packing, smaller checkpoints, exact load, masks kept after load."""
import json

import pytest
import torch
from safetensors.torch import load_file

from leanlm.compress.prune.masks import is_nm
from leanlm.compress.prune.storage import pack_sparse, pack_state, unpack_sparse, unpack_state
from leanlm.compress.recipe import apply_recipe, builtin_names, load_recipe, parse_recipe, resolve
from conftest import tiny_llama
from leanlm.errors import LeanLMError
from leanlm.io.checkpoint import build_on_meta, materialize, save_hf_folder
from leanlm.model import ModelConfig


SAMPLES = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))


def test_pack_roundtrip_exact():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        w = torch.randn(13, 29, generator=g).to(dtype)
        w[torch.rand(13, 29, generator=g) < 0.5] = 0
        bits, vals = pack_sparse(w)
        assert bits.dtype == torch.uint8 and bits.numel() == (13 * 29 + 7) // 8 and vals.dtype == dtype
        out = unpack_sparse(bits, vals, w.shape)
        assert out.dtype == dtype and torch.equal(out, w)
    # the bit layout is documented: little-endian, row-major, 1 = kept
    w = torch.tensor([[0.0, 2.0, 0.0, 3.0, 1.0, 0.0, 0.0, 0.0, 5.0]])
    bits, vals = pack_sparse(w)
    assert bits.tolist() == [0b00011010, 0b00000001] and vals.tolist() == [2.0, 3.0, 1.0, 5.0]


def test_pack_state_skips_dense_and_checks_damage():
    sd = {"a.weight": torch.randn(8, 8), "b.weight": torch.randn(8, 8).masked_fill(torch.eye(8) == 0, 0)}
    out, meta = pack_state(sd)
    assert "a.weight" in out and "b.weight" not in out and meta == {"sparse": {"b.weight": [8, 8]}}
    back = unpack_state(out, meta)
    assert torch.equal(back["b.weight"], sd["b.weight"]) and torch.equal(back["a.weight"], sd["a.weight"])
    out["b.weight.sparse_values"] = out["b.weight.sparse_values"][:-1]
    with pytest.raises(LeanLMError):
        unpack_state(out, meta)


def test_sparse_model_saves_smaller_and_loads_exactly(tmp_path):
    m = tiny_llama()[0]
    dense_dir = save_hf_folder(m, None, tmp_path / "dense")
    apply_recipe(m, parse_recipe("- method: wanda\n  pattern: '2:4'\n"), SAMPLES, progress=False)
    sparse_dir = save_hf_folder(m, None, tmp_path / "sparse")
    meta = json.loads((sparse_dir / "config.json").read_text())["leanlm_compression"]
    assert len(meta["sparse"]) == 14
    # block weights: 2 * (64*64*2 + 64*32*2 + 3*64*96) fp32 = 245760 bytes dense; packing saves ~ 1/2 - 1/32
    d_size = (dense_dir / "model.safetensors").stat().st_size
    s_size = (sparse_dir / "model.safetensors").stat().st_size
    assert d_size - s_size > 0.45 * 245760
    sd = load_file(str(sparse_dir / "model.safetensors"))
    cfg = ModelConfig.from_hf(json.loads((sparse_dir / "config.json").read_text()))
    loaded = materialize(build_on_meta(cfg), sd, str(sparse_dir), meta=meta)
    for (n, a), (_, b) in zip(m.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    assert is_nm(loaded.model.layers[1].mlp.up_proj.weight, 2, 4)
    with torch.no_grad():
        assert torch.equal(loaded(SAMPLES), m(SAMPLES))


@pytest.mark.parametrize("name", ["sparse50-magnitude", "sparse50-wanda", "sparse50-sparsegpt", "sparse24-magnitude",
                                  "sparse24-wanda", "sparse24-sparsegpt", "sparse24-sparsegpt-w4a16", "sparse24-wanda-gptq-w4a16",
                                  "structured-20", "structured-35", "layerdrop-4", "lowrank-20"])
def test_builtin_recipes_resolve(name):
    assert name in builtin_names()
    m = tiny_llama(layers=6)[0]
    steps = resolve(load_recipe(name), m)
    assert steps and steps[0][0].modules


def test_recipe_errors_name_the_line():
    m = tiny_llama()[0]
    with pytest.raises(LeanLMError, match=r"<recipe>:3"):
        resolve(parse_recipe("- method: wanda\n  sparsity: 0.5\n  pattern: '5:4'\n"), m)
    with pytest.raises(LeanLMError, match=r"<recipe>:2.*unknown field"):
        resolve(parse_recipe("- method: sparsegpt\n  sparsty: 0.5\n"), m)
