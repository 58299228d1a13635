"""leanlm.data.calib: weighted calibration specs, the packaged mix, chat records in the chat template."""
import json
from fractions import Fraction

import pytest
import torch

from leanlm.data import (
    DEFAULT_MIX,
    calibration_plan,
    calibration_samples,
    packaged_path,
    parse_calib,
    read_text,
)
from leanlm.data.calib import PARTS, TEXTS_DIR, allocate
from leanlm.errors import LeanLMError


class ByteTok:
    """Byte-level stand-in without a chat template: token i is byte i."""

    def encode(self, text, add_special=False):
        return list(text.encode("utf-8"))


def _two_files(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("a" * 4000)  # rows of a are all 'a', rows of b all 'b': each row's source is plain
    b.write_text("b" * 4000)
    return a, b


def test_allocate_is_largest_remainder():
    def reference(n, weights):  # exact fractions: floor, then one more to the largest remainders, earlier first
        tot = sum(Fraction(w).limit_denominator(10**6) for w in weights)
        exact = [n * Fraction(w).limit_denominator(10**6) / tot for w in weights]
        base = [int(e) for e in exact]
        order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - base[i]), i))
        for i in order[: n - sum(base)]:
            base[i] += 1
        return base

    assert allocate(64, [0.4, 0.3, 0.3]) == [26, 19, 19]
    assert allocate(10, [1, 1, 1]) == [4, 3, 3]
    assert allocate(1, [0.3, 0.2, 0.25, 0.25]) == [1, 0, 0, 0]
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        k = int(torch.randint(1, 6, (1,), generator=g))
        w = (torch.rand(k, generator=g) + 0.01).tolist()
        n = int(torch.randint(1, 300, (1,), generator=g))
        got = allocate(n, w)
        assert sum(got) == n and got == reference(n, w)


def test_two_weighted_files_drawn_in_proportion_and_seeded(tmp_path):
    a, b = _two_files(tmp_path)
    spec = f"{a}=3,{b}=1"
    x = calibration_samples(ByteTok(), 20, 50, path=spec, seed=4)
    assert x.shape == (20, 50)
    firsts = [row[0] for row in x.tolist()]
    assert all(len(set(row)) == 1 for row in x.tolist())  # no window straddles two sources
    assert firsts.count(ord("a")) == 15 and firsts.count(ord("b")) == 5
    assert firsts != sorted(firsts)  # rows shuffled, not grouped by source
    assert torch.equal(x, calibration_samples(ByteTok(), 20, 50, path=spec, seed=4))
    plan = calibration_plan(spec, 20)
    assert [(p["samples"], p["weight"]) for p in plan] == [(15, 0.75), (5, 0.25)]


def test_single_source_spec_matches_path_and_seed_matters(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("".join(chr(97 + i % 26) for i in range(5000)))
    x = calibration_samples(ByteTok(), 8, 64, path=str(p), seed=1)
    assert torch.equal(x, calibration_samples(ByteTok(), 8, 64, path=p, seed=1))
    assert torch.equal(x, calibration_samples(ByteTok(), 8, 64, path=f"{p}=2.5", seed=1))
    assert not torch.equal(x, calibration_samples(ByteTok(), 8, 64, path=p, seed=2))


def test_default_is_the_packaged_mix_in_proportion():
    sources = parse_calib(None)
    assert [s.name for s in sources] == [s.name for s in parse_calib(DEFAULT_MIX)] == \
        ["packaged:prose", "packaged:code", "packaged:docs", "packaged:chat"]
    assert abs(sum(s.weight for s in sources) - 1) < 1e-9
    n = 40
    x = calibration_samples(ByteTok(), n, 200, seed=0)
    # ByteTok has no chat template: chat records are their contents joined by blank lines (read_text)
    texts = {name: read_text(TEXTS_DIR / PARTS[name]).encode() for name in ("prose", "code", "docs", "chat")}
    evals = [packaged_path(k).read_bytes() for k in ("eval", "tech")]
    found = {name: 0 for name in texts}
    for row in x.tolist():
        piece = bytes(row)
        hits = [name for name, t in texts.items() if piece in t]
        assert len(hits) == 1, hits  # each window comes from exactly one part
        found[hits[0]] += 1
        assert all(piece not in e for e in evals)
    assert list(found.values()) == allocate(n, [s.weight for s in sources])
    # packaged:mix is the same set as the default; packaged:calib is the old single text
    assert torch.equal(x, calibration_samples(ByteTok(), n, 200, path="packaged:mix", seed=0))
    old = calibration_samples(ByteTok(), 4, 200, path="packaged:calib", seed=0)
    assert all(bytes(r) in texts["prose"] for r in old.tolist())


def test_packaged_parts_hold_none_of_the_evaluation_texts():
    """No 200-character run of eval.txt or tech.txt appears in any part of the mix."""
    parts = [(TEXTS_DIR / f).read_text(encoding="utf-8") for f in set(PARTS.values())]
    for k in ("eval", "tech"):
        ev = packaged_path(k).read_text(encoding="utf-8")
        for start in range(0, len(ev) - 200, 5000):
            assert all(ev[start:start + 200] not in p for p in parts)


def test_chat_records_use_the_models_chat_template(tmp_path):
    import leanlm

    _, tok = leanlm.load()
    convs = [[{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}],
             [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]]
    p = tmp_path / "chat.jsonl"
    p.write_text("".join(json.dumps({"messages": m}) + "\n" for m in convs) + json.dumps({"text": "plain tail"}) + "\n")
    want = []
    for m in convs:
        want += tok.encode(tok.apply_chat_template(m, add_generation_prompt=False), add_special=False)
    want += tok.encode("plain tail\n\n", add_special=False)
    start = tok.encode("<|im_start|>", add_special=False)
    assert len(start) == 1 and want.count(start[0]) >= 4  # the template's special tokens, one id each
    x = calibration_samples(tok, 1, len(want), path=p, seed=0)
    assert x.tolist() == [want]
    # the packaged chat part renders the same way: its windows hold the template's tokens
    y = calibration_samples(tok, 4, 256, path="packaged:chat", seed=0)
    assert all(start[0] in row for row in y.tolist())


@pytest.mark.parametrize("spec, message", [
    ("packaged:poetry", r"no packaged calibration text 'poetry'; choose one of calib, chat, code, docs, mix, prose"),
    ("packaged:eval", r"packaged:eval: is a held-out evaluation text"),
    ("packaged:tech=1", r"packaged:tech: is a held-out evaluation text"),
    ("nope.txt", r"--calib nope.txt: no such file"),
    ("packaged:code=0", r"weight must be a positive number \(got 0\)"),
    ("packaged:code=-1", r"weight must be a positive number"),
    ("packaged:code=nan", r"weight must be a positive number"),
    ("packaged:code=x", r"weight 'x' is not a number"),
    ("packaged:code,,packaged:docs", r"empty source"),
    ("packaged:code,packaged:code=2", r"packaged:code is named twice"),
    ("packaged:mix,packaged:code", r"packaged:code is named twice"),
])
def test_bad_specs_are_one_line_errors(spec, message):
    with pytest.raises(LeanLMError, match=message) as e:
        calibration_samples(ByteTok(), 4, 16, path=spec)
    assert "\n" not in str(e.value)


def test_held_out_file_path_refused_in_a_spec(tmp_path):
    a, _ = _two_files(tmp_path)
    with pytest.raises(LeanLMError, match="is leanlm's evaluation text"):
        parse_calib(f"{a}=1,{packaged_path('tech')}=1")


def test_recipe_file_names_its_calibration_set(tmp_path):
    from leanlm.compress.recipe import load_recipe, parse_recipe

    r = parse_recipe("calib: packaged:code=0.5,packaged:prose=0.5\nsteps:\n  - method: rtn\n    bits: 4\n")
    assert r.calib == "packaged:code=0.5,packaged:prose=0.5" and r.steps[0].method == "rtn"
    assert parse_recipe("- method: rtn\n").calib is None
    f = tmp_path / "r.yaml"
    f.write_text("calib: packaged:docs\nsteps:\n  - method: gptq\n")
    assert load_recipe(f"{f}+distill").calib == "packaged:docs"
    with pytest.raises(LeanLMError, match=r"<recipe>:3: calib must be a calibration spec string"):
        parse_recipe("steps:\n  - method: rtn\ncalib: [a, b]\n")
