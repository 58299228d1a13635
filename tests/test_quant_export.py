"""GPTQ-layout export checked against the layout's documented packing with an independent numpy reader."""
import json

import numpy as np
import pytest
import torch

from leanlm.compress.export_gptq import export_gptq
from leanlm.compress.recipe import apply_recipe, load_recipe, parse_recipe
from leanlm.errors import LeanLMError
from test_quant import tiny_model


def read_gptq_linear(t: dict, name: str, bits: int = 4) -> np.ndarray:
    """AutoGPTQ's v1 dequantization, written from the format description: returns W [N, K]."""
    qweight = t[f"{name}.qweight"].numpy().view(np.uint32)
    qzeros = t[f"{name}.qzeros"].numpy().view(np.uint32)
    scales = t[f"{name}.scales"].numpy().astype(np.float32)
    g_idx = t[f"{name}.g_idx"].numpy()
    shifts = np.arange(0, 32, bits, dtype=np.uint32)
    q = ((qweight[:, None, :] >> shifts[None, :, None]) & 0xF).reshape(-1, qweight.shape[1])  # [K, N]
    z = ((qzeros[:, :, None] >> shifts[None, None, :]) & 0xF).reshape(qzeros.shape[0], -1) + 1  # [G, N]
    w = scales[g_idx] * (q.astype(np.float32) - z[g_idx].astype(np.float32))
    return w.T


@pytest.mark.parametrize("recipe", ["w4a16-gptq-g32", "w4a16-rtn-g48"])
def test_gptq_export_matches_documented_layout(tmp_path, recipe):
    from safetensors.torch import load_file

    model = tiny_model()
    apply_recipe(model, load_recipe(recipe), torch.randint(0, 128, (4, 16)), progress=False)
    export_gptq(model, None, tmp_path / "g")
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["sym"] and not qc["desc_act"]
    assert qc["group_size"] == int(recipe.rsplit("-g", 1)[1])
    t = load_file(str(tmp_path / "g" / "model.safetensors"))
    for name in ["model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"]:
        m = model.get_submodule(name)
        qweight = t[f"{name}.qweight"]
        assert qweight.dtype == torch.int32 and qweight.shape == (m.in_features // 8, m.out_features)
        assert t[f"{name}.scales"].shape == (-(-m.in_features // m.group_size), m.out_features)
        np.testing.assert_allclose(read_gptq_linear(t, name), m.dequantized_weight().numpy(), rtol=0, atol=1e-6)
    assert "model.layers.0.self_attn.k_proj.weight" not in t and t["model.norm.weight"].dtype == torch.float16


def test_gptq_export_refuses_what_the_layout_cannot_hold(tmp_path):
    model = tiny_model()
    apply_recipe(model, parse_recipe("- method: rtn\n  bits: 4\n  group_size: 32\n  sym: false\n", "a.yaml"), None,
                 progress=False)
    with pytest.raises(LeanLMError, match="sym"):
        export_gptq(model, None, tmp_path / "a")
    model = tiny_model()
    apply_recipe(model, load_recipe("w3a16-rtn-g32"), None, progress=False)
    with pytest.raises(LeanLMError, match="4-bit"):
        export_gptq(model, None, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
