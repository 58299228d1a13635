"""Recipes: parsing, built-in and pattern names, validation errors naming the line, steps applied in order."""
import pytest
import torch

from leanlm.compress.recipe import apply_recipe, builtin_names, load_recipe, parse_recipe, resolve
from leanlm.compress.quant.qlinear import QuantLinear
from leanlm.errors import LeanLMError
from test_quant import tiny_model


def test_builtin_and_pattern_names():
    names = builtin_names()
    for n in ["w8a16-rtn", "nf4", "w8a8-smoothquant", "w8a8-llmint8"]:
        assert n in names
    for name, (method, bits, g) in {"w4a16-gptq-g128": ("gptq", 4, 128), "w3a16-awq-g32": ("awq", 3, 32),
                                    "w2a16-gptq-g64": ("gptq", 2, 64), "w4a16-rtn-g48": ("rtn", 4, 48)}.items():
        r = load_recipe(name)
        assert [(s.method, s.fields["bits"], s.fields["group_size"]) for s in r.steps] == [(method, bits, g)]
    with pytest.raises(LeanLMError, match="unknown recipe"):
        load_recipe("w4a16-gptq")


def test_every_builtin_recipe_validates_on_a_model():
    model = tiny_model()
    for name in builtin_names() + ["w4a16-gptq-g128", "w3a16-awq-g128", "w2a16-gptq-g64"]:
        if name.startswith(("sparse", "structured", "layerdrop", "lowrank")):
            continue  # pruning recipes are tested in test_prune*
        steps = resolve(load_recipe(name), model)
        assert steps and all(s.modules for s, _ in steps)


BAD = [
    ("- method: gptq\n  bits: 4\n- method: nosuch\n", ":3: unknown method 'nosuch'"),
    ("- method: gptq\n  bits: 4\n  groupsize: 128\n", ":3: unknown field 'groupsize'"),
    ("- method: rtn\n  bits: four\n", ":2: field 'bits'"),
    ("- method: rtn\n  bits: 9\n", ":2: bad value"),
    ("- method: rtn\n  bits: 4\n  targets: ['nothing_here']\n", ":3: targets"),
    ("- method: gptq\n  damp: 2.0\n", ":2: bad value"),
    ("- method: rtn\n- method: gptq\n", ":2: .*already quantized by the step at line 1"),
    ("- method: rtn\n  bits: [4\n", "not valid YAML"),
    ("method: rtn\n", "non-empty list of steps"),
    ("- bits: 4\n", ":1: each step is a mapping with a 'method:' key"),
    ("- method: rtn\n  ignore: ['(']\n", ":2: bad regex"),
]


@pytest.mark.parametrize("text,msg", BAD)
def test_bad_recipes_fail_before_any_work_naming_the_line(tmp_path, text, msg):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LeanLMError, match=msg) as e:
        apply_recipe(model, load_recipe(str(path)), torch.randint(0, 128, (2, 8)), progress=False)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(LeanLMError, match="no such recipe file"):
        load_recipe(str(tmp_path / "nope.yaml"))


def test_mixed_precision_recipe_targets_and_ignore():
    text = """
steps:
  - method: gptq
    bits: 4
    group_size: 32
    ignore: ['layers\\.1\\.']
  - method: rtn
    bits: 8
    group_size: 0
    targets: ['layers\\.1\\.']
    ignore: ['down_proj']
"""
    model = tiny_model()
    apply_recipe(model, parse_recipe(text, "mixed.yaml"), torch.randint(0, 128, (4, 16)), progress=False)
    l0, l1 = model.model.layers
    assert l0.mlp.down_proj.bits == 4 and l0.self_attn.q_proj.group_size == 32
    assert l1.self_attn.q_proj.bits == 8 and l1.self_attn.q_proj.path() == "int8pack"
    assert isinstance(l1.mlp.down_proj, torch.nn.Linear) and not isinstance(model.lm_head, QuantLinear)


def test_data_free_recipe_needs_no_samples():
    model = tiny_model()
    r = load_recipe("w4a16-rtn-g32")
    assert not r.needs_data and load_recipe("w4a16-gptq-g32").needs_data
    apply_recipe(model, r, None, progress=False)
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)
    with pytest.raises(LeanLMError, match="calibration samples"):
        apply_recipe(tiny_model(), load_recipe("w4a16-gptq-g32"), None, progress=False)


def test_e8_suffix_adds_an_int8_embedding_and_tied_head():
    from conftest import tiny_hf, to_leanlm
    from leanlm.compress.quant.embedding import QuantEmbedding, TiedInt8Head

    r = load_recipe("w4a16-rtn-g32-e8")
    assert [(s.method, s.fields["bits"]) for s in r.steps] == [("rtn", 4), ("rtn", 8)]
    hf = tiny_hf("llama", tie_word_embeddings=True)
    model, w4_only = to_leanlm(hf), to_leanlm(hf)
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    apply_recipe(model, r, progress=False)
    apply_recipe(w4_only, load_recipe("w4a16-rtn-g32"), progress=False)
    assert isinstance(model.model.embed_tokens, QuantEmbedding) and isinstance(model.lm_head, TiedInt8Head)
    with torch.no_grad():
        out, ref = model(ids), w4_only(ids)
        QuantEmbedding.fast = False  # the head's reference path: fp32 matmul with the dequantized table
        try:
            plain = model(ids)
        finally:
            QuantEmbedding.fast = True
    assert ((out - plain).norm() / plain.norm()) < 1e-2  # int8 kernel (bf16 activations) vs fp32 reference
    # the int8 table changes the 4-bit model's logits only by int8 rounding of the embedding rows
    assert ((plain - ref).norm() / ref.norm()) < 5e-2  # (2.4% on this random model)
    assert not torch.equal(plain, ref)


def test_engine_serves_a_model_with_the_int8_tied_head():
    """The tied int8 head has no weight of its own: the engine must still place its KV pool and decode
    the same greedy tokens as a full recompute of the same quantized model."""
    from conftest import greedy_reference, tiny_hf, to_leanlm
    from leanlm.compress.quant.embedding import TiedInt8Head
    from leanlm.infer.engine import Engine, SamplingParams

    model = to_leanlm(tiny_hf("llama", tie_word_embeddings=True)).eval()
    apply_recipe(model, load_recipe("w4a16-rtn-g32-e8"), progress=False)
    assert isinstance(model.lm_head, TiedInt8Head)
    prompts = [[1, 5, 9, 17, 33], [2, 40, 7]]
    with torch.no_grad():
        want = [greedy_reference(model, p, 6) for p in prompts]
    got = Engine(model).generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True))
    assert got == want
