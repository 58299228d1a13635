"""Compressed checkpoints (serialize hooks, leanlm.save/load) and the `leanlm compress` command."""
import argparse
import json

import pytest
import torch

from leanlm.compress.quant.qlinear import QuantLinear
from leanlm.compress.recipe import apply_recipe, parse_recipe
from test_quant import tiny_model

MIXED = """
- method: gptq
  bits: 4
  group_size: 32
  ignore: ['down_proj']
- method: rtn
  bits: 3
  group_size: 48
  sym: false
  targets: ['down_proj']
"""


def compressed_tiny(vocab=128):
    model = tiny_model(vocab=vocab)
    apply_recipe(model, parse_recipe(MIXED, "mixed.yaml"), torch.randint(0, vocab, (4, 16)), progress=False)
    return model


def test_serialize_roundtrip_with_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    from leanlm.io.modules import restore, state_for_save
    from leanlm.model.transformer import Transformer

    model = compressed_tiny()
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        ref = model(x)
    tensors, meta = state_for_save(model)
    assert meta["modules"]["model.layers.0.mlp.down_proj"]["bits"] == 3
    assert tensors["model.layers.0.self_attn.q_proj.qweight"].dtype == torch.uint8
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "m.safetensors"))
    meta = json.loads(json.dumps(meta))  # what config.json holds
    with torch.device("meta"):
        fresh = Transformer(model.config)
    sd = restore(fresh, load_file(str(tmp_path / "m.safetensors")), meta)
    fresh.load_state_dict(sd, strict=False, assign=True)
    fresh.tie_weights()
    assert not any(t.is_meta for t in list(fresh.parameters()) + list(fresh.buffers()))
    assert isinstance(fresh.model.layers[1].mlp.down_proj, QuantLinear)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), ref)


def test_restore_rejects_unknown_module_type():
    from leanlm.io.modules import restore
    from leanlm.errors import LeanLMError

    model = tiny_model()
    with pytest.raises(LeanLMError, match="unknown compressed type"):
        restore(model, {}, {"format": "leanlm", "version": 1,
                            "modules": {"model.layers.0.mlp.up_proj": {"type": "Magic"}}}, "x/config.json")


@pytest.fixture
def tiny_folder(tmp_path):
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    import leanlm
    from leanlm.data import packaged_text
    from leanlm.io.tokenizer import Tokenizer

    t = HFTok(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator([packaged_text("calib")[:20000]], tr)
    tok = Tokenizer(t, eos_token="<|endoftext|>")
    model = tiny_model(vocab=300)
    leanlm.save(model, tok, tmp_path / "base")
    return tmp_path


def test_save_load_equal_outputs(tiny_folder):
    import leanlm

    model, tok = leanlm.load(tiny_folder / "base")
    apply_recipe(model, parse_recipe(MIXED, "mixed.yaml"), torch.randint(0, 300, (4, 16)), progress=False)
    leanlm.save(model, tok, tiny_folder / "q")
    back, _ = leanlm.load(tiny_folder / "q")
    x = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    assert isinstance(back.model.layers[0].self_attn.k_proj, QuantLinear)


def test_compress_cli(tiny_folder, capsys):
    import leanlm
    from leanlm.compress import cli

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    out = tiny_folder / "out"
    args = p.parse_args([str(tiny_folder / "base"), "--recipe", "w4a16-gptq-g32", "-o", str(out), "--samples", "4",
                         "--seq-len", "16", "--eval-chars", "600", "--ctx", "32", "--json"])
    assert cli.run(args) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["samples"] == [4, 16]
    assert res["after"]["size_mb"] < res["before"]["size_mb"]
    assert res["after"]["perplexity"] > 1 and res["before"]["perplexity"] > 1
    model, _ = leanlm.load(out)
    assert isinstance(model.model.layers[1].mlp.gate_proj, QuantLinear)
    assert model.model.layers[1].mlp.gate_proj.bits == 4


def test_compress_cli_weighted_calib_and_recipe_calib(tiny_folder, capsys):
    from leanlm.compress import cli

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    a, b = tiny_folder / "a.txt", tiny_folder / "b.txt"
    a.write_text("the cat sat on the mat. " * 200)
    b.write_text("def f(x):\n    return x + 1\n" * 200)
    common = [str(tiny_folder / "base"), "-o", str(tiny_folder / "out"), "--samples", "8", "--seq-len", "16",
              "--no-eval", "--json"]
    assert cli.run(p.parse_args(common + ["--recipe", "w4a16-gptq-g32", "--calib", f"{a}=1,{b}=3"])) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["samples"] == [8, 16]
    assert [(c["source"], c["samples"]) for c in res["calib"]] == [(str(a), 2), (str(b), 6)]
    recipe = tiny_folder / "r.yaml"
    recipe.write_text(f"calib: {b}\nsteps:\n  - method: gptq\n    bits: 4\n    group_size: 32\n")
    assert cli.run(p.parse_args(common + ["--recipe", str(recipe)])) == 0  # the recipe's calibration set
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(c["source"], c["samples"]) for c in res["calib"]] == [(str(b), 8)]
    assert cli.run(p.parse_args(common + ["--recipe", str(recipe), "--calib", str(a)])) == 0  # --calib wins
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [c["source"] for c in res["calib"]] == [str(a)]


def test_compress_cli_bad_calib_stops_before_loading(tmp_path):
    from leanlm.compress import cli
    from leanlm.errors import LeanLMError

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    for spec, msg in (("packaged:code=0", "weight must be a positive number"), ("missing.txt", "no such file"),
                      ("packaged:nope", "no packaged calibration text 'nope'")):
        args = p.parse_args([str(tmp_path / "no-model"), "--recipe", "w4a16-gptq-g128", "-o", str(tmp_path / "o"),
                             "--calib", spec])
        with pytest.raises(LeanLMError, match=msg):  # the model path does not exist: the spec is checked first
            cli.run(args)


def test_load_in_bf16_keeps_stored_quantization_dtypes(tiny_folder):
    """--dtype bfloat16 casts plain weights only; fp16 scales stay as stored (else outputs would drift)."""
    import leanlm

    model, tok = leanlm.load(tiny_folder / "base")
    apply_recipe(model, parse_recipe(MIXED, "mixed.yaml"), torch.randint(0, 300, (4, 16)), progress=False)
    leanlm.save(model, tok, tiny_folder / "q")
    back, _ = leanlm.load(tiny_folder / "q", dtype="bfloat16")
    q = back.model.layers[0].self_attn.k_proj
    assert isinstance(q, QuantLinear) and q.scales.dtype == torch.float16
    assert back.model.norm.weight.dtype == torch.bfloat16
