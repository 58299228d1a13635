"""The house rules that keep a new family or method to one place: no family module name outside
leanlm/model/, io independent of compress, the output head reached through model.logits."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from conftest import tiny_llama
from leanlm.model.layout import layout_of

PKG = Path(__file__).resolve().parent.parent / "leanlm"
LLAMA_NAMES = re.compile(r"q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|self_attn|model\.layers|"
                         r"input_layernorm|post_attention_layernorm|embed_tokens|lm_head|\.mlp\b")


def test_no_family_module_name_outside_model():
    """Every room asks leanlm/model/layout.py for module names; none spells a Llama name itself."""
    hits = []
    for path in sorted(PKG.rglob("*")):
        rel = path.relative_to(PKG)
        if not path.is_file() or rel.parts[0] == "model" or path.suffix not in (".py", ".yaml", ".md", ".txt", ".json"):
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if LLAMA_NAMES.search(line):
                hits.append(f"leanlm/{rel}:{n}: {line.strip()}")
    assert not hits, "module names outside leanlm/model/ (ask the layout instead):\n" + "\n".join(hits)


def test_the_check_sees_a_name():
    assert LLAMA_NAMES.search("blk.self_attn.q_proj") and LLAMA_NAMES.search("x = block.mlp(h)")
    assert not LLAMA_NAMES.search("x = lay.mlp_prefixes(cfg, i)")


def test_logits_is_the_head():
    m, _ = tiny_llama()
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(m.logits(m(ids, return_hidden=True)), m(ids), rtol=0, atol=0)


def test_fold_scale_keeps_the_function():
    """A per-channel scale folded into a norm and multiplied into the linears it feeds changes nothing."""
    from leanlm.compress.quant.smoothquant import fold_scales

    m, _ = tiny_llama()
    ids = torch.randint(0, 128, (2, 9))
    before = m.model.layers[0].input_layernorm.weight.clone()
    with torch.no_grad():
        ref = m(ids)
        lay = layout_of(m)
        for i, blk in enumerate(m.model.layers):
            for prev, how, rel in lay.smoothing(m.config, i):
                s = torch.rand(blk.get_submodule(rel[0]).in_features) + 0.5
                fold_scales(blk.get_submodule(prev), how, [blk.get_submodule(r) for r in rel], s)
        torch.testing.assert_close(m(ids), ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(m.model.layers[0].input_layernorm.weight, before)  # the norm really changed


def test_io_does_not_import_compress():
    """Loading depends on no compression method: compressed module types register with the loader."""
    import subprocess
    import sys

    code = ("import sys, leanlm.io.checkpoint, leanlm.io.gguf, leanlm.io.modules\n"
            "bad = sorted(m for m in sys.modules if m.startswith('leanlm.compress'))\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PKG.parent)
    assert r.returncode == 0, r.stderr
    src = "\n".join(p.read_text() for p in (PKG / "io").rglob("*.py"))
    assert not re.search(r"leanlm\.compress\b", src)  # not even lazily (config.json's leanlm_compression is a key)


def test_compressed_folder_loads_through_leanlm_load(tmp_path):
    """leanlm.load imports the compress room (which registers its module types) when config.json says
    the checkpoint is compressed; a process that never imported it still loads the folder."""
    import subprocess
    import sys

    from safetensors.torch import save_file

    import leanlm
    from leanlm.compress.recipe import apply_recipe, load_recipe

    m, _ = tiny_llama()
    apply_recipe(m, load_recipe("w4a16-rtn-g32"), progress=False)
    leanlm.save(m, None, tmp_path / "q")
    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        ref = m(ids)
    save_file({"ids": ids, "ref": ref}, str(tmp_path / "io.safetensors"))
    q = str(tmp_path / "q")
    code = ("import json, pathlib, sys, torch\n"
            "from safetensors.torch import load_file\n"
            "from leanlm.errors import LeanLMError\n"
            "from leanlm.io.checkpoint import build_on_meta, materialize\n"
            "from leanlm.model.config import read_hf_config\n"
            f"folder = pathlib.Path({q!r})\n"
            "meta = json.loads((folder / 'config.json').read_text())['leanlm_compression']\n"
            "def load():\n"
            "    return materialize(build_on_meta(read_hf_config(folder)), load_file(str(folder / 'model.safetensors')),\n"
            "                       str(folder), meta=meta)\n"
            "try:\n"
            "    load()\n"
            "    raise SystemExit('loaded without the compressed types')\n"
            "except LeanLMError as e:\n"
            "    assert 'compress package' in str(e) and '\\n' not in str(e), e\n"
            "assert not any(k.startswith('leanlm.compress') for k in sys.modules)\n"
            "from leanlm.api import _register_compression\n"
            "_register_compression(folder)\n"
            f"d = load_file({str(tmp_path / 'io.safetensors')!r})\n"
            "m = load()\n"
            "torch.testing.assert_close(m(d['ids']), d['ref'])  # thread counts may differ: float tolerance\n"
            "print(type(m.model.layers[0].self_attn.q_proj).__name__)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PKG.parent)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "QuantLinear"


def test_unregistered_type_is_one_line(tmp_path):
    from leanlm.errors import LeanLMError
    from leanlm.io.modules import restore

    m, _ = tiny_llama()
    meta = {"format": "leanlm", "version": 1, "warp": {"x.weight": [2, 2]}}
    with __import__("pytest").raises(LeanLMError, match="'warp'.*no codec"):
        restore(m, {}, meta, "m/config.json")


# ---------------------------------------------------------------- one way to add a method
def _one_line(fn, *pattern):
    import pytest

    from leanlm.errors import LeanLMError

    with pytest.raises(LeanLMError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for p in pattern:
        assert re.search(p, msg), (p, msg)
    return msg


def test_every_room_checks_methods_the_same_way():
    """Unknown method and unknown or mistyped field: one line naming it, in compress (quant, prune,
    low-rank) and peft alike; the tables are plain dicts of (config dataclass, apply)."""
    import dataclasses

    from leanlm import peft
    from leanlm.compress import lowrank, prune, quant
    from leanlm.compress.recipe import parse_recipe, resolve

    for table in (quant.METHODS, prune.METHODS, lowrank.METHODS, peft.METHODS):
        for name, entry in table.items():
            assert len(entry) == 2 and dataclasses.is_dataclass(entry[0]), name
    m, _ = tiny_llama()
    for step, pat in [("- method: nosuch\n", r"recipe.yaml:1: unknown method 'nosuch'; known: .*wanda"),
                      ("- method: wanda\n  sparsity: 0.5\n  blocksize: 3\n", r":3: unknown field 'blocksize'"),
                      ("- method: magnitude\n  sparsity: high\n", r":2: field 'sparsity' = 'high' has the wrong type"),
                      ("- method: lowrank\n  rank: 4\n  ratio: 0.5\n", r"recipe.yaml:\d: bad value: lowrank: set exactly one"),
                      ("- method: gptq\n  bits: 9\n", r":2: bad value: bits must be between 2 and 8")]:
        _one_line(lambda: resolve(parse_recipe(step, "recipe.yaml"), m), pat)
    _one_line(lambda: peft.apply(m, "nosuch"), r"unknown fine-tuning method 'nosuch'; known: .*qlora")
    _one_line(lambda: peft.apply(m, "lora", rank=4), r"fine-tuning method 'lora': unknown field 'rank'.*known fields: r,")
    _one_line(lambda: peft.apply(m, "dora", r="4"), r"field 'r' = '4' has the wrong type")


def test_method_entries_are_plain():
    """DoRA and LoRA-FA are config defaults, MeZO and QLoRA are entries like the others."""
    from leanlm import peft

    m, _ = tiny_llama()
    d = peft.apply(m, "dora", r=2)
    assert d.peft_config.use_dora and isinstance(d.peft_config, peft.LoraConfig)
    assert sorted(d.peft_config.target_modules) == sorted(layout_of(m).all_linear())
    m2, _ = tiny_llama()
    for p in m2.parameters():
        p.requires_grad_(False)
    peft.apply(m2, "mezo")
    assert all(p.requires_grad for p in m2.parameters())


def test_kv_policies_are_a_table():
    from leanlm.infer.kv_evict import POLICIES, EvictingKVCache, make_cache

    m, _ = tiny_llama()
    _one_line(lambda: make_cache(m, "lru", budget=8), r"unknown KV eviction policy 'lru'; known: full, h2o")
    _one_line(lambda: make_cache(m, "streaming", budget=8, recent=2), r"'streaming': unknown field 'recent'.*budget, sink")
    c = make_cache(m, "scissorhands", budget=16, history=8)
    assert isinstance(c, EvictingKVCache) and c.policy == "scissorhands" and c.budget == 16
    assert set(POLICIES) == {"full", "streaming", "h2o", "scissorhands"}
