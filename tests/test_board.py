"""`leanlm board`: Pareto frontier, per-row cache and resume, outputs, and the packaged-task scorer."""
import json

import pytest
import torch

import leanlm
from conftest import tiny_hf, to_leanlm
from gguf_util import byte_vocab, write_tiny_gguf
from leanlm.errors import LeanLMError
from leanlm.eval import board as B
from leanlm.eval.board_report import pareto_front


def test_pareto_front_on_hand_made_points():
    pts = [("a", 1.0, 10.0), ("b", 2.0, 5.0), ("c", 2.5, 6.0), ("d", 3.0, 5.0), ("e", 4.0, 1.0),
           ("f", 5.0, 1.0), ("g", 1.0, 12.0), ("h", None, 1.0)]
    # lower x and lower y better: c is dominated by b, d by b (equal y, larger x), f by e, g by a
    assert pareto_front(pts) == ["a", "b", "e"]
    # higher x better (e.g. decode speed), lower y better
    assert pareto_front(pts, x_lower_better=False) == ["f"]  # f is fastest and as good as any
    # both higher-is-better
    assert pareto_front(pts, x_lower_better=False, y_lower_better=False) == ["f", "d", "c", "g"]
    assert pareto_front([("x", 1.0, 1.0), ("y", 1.0, 1.0)]) == ["x", "y"]  # ties dominate nobody


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("board")
    g = write_tiny_gguf(d / "m.gguf", tiny_hf("llama", vocab_size=len(byte_vocab()[0]), seed=4), "Q8_0")
    m, t = leanlm.load(g, convert_cache=False)
    leanlm.save(m, t, d / "tiny")
    return d / "tiny"


def _cfg(model, out, recipes):
    return B.BoardConfig(model=str(model), recipes=B.expand_recipes(recipes), out=str(out), samples=2, seq_len=32,
                         eval_chars=1500, task_records=3, threads=1, rounds=1, prompt_len=8, decode_tokens=4,
                         prefill_len=16)


@pytest.mark.slow
def test_board_resumes_after_a_kill_then_hits_the_cache(tiny_folder, tmp_path):
    out = tmp_path / "out"
    recipe = tmp_path / "rtn3.yaml"
    recipe.write_text("- {method: rtn, bits: 3, group_size: 32}\n")
    cfg = _cfg(tiny_folder, out, f"w4a16-rtn-g32,{recipe}")
    assert cfg.recipes == ["base", "w4a16-rtn-g32", str(recipe)]

    class Killed(Exception):
        pass

    def kill_after_first_recipe(name):
        if name == "w4a16-rtn-g32":
            raise Killed

    with pytest.raises(Killed):
        B.run_board(cfg, progress=False, on_row=kill_after_first_recipe)
    assert not (out / "results.jsonl").exists()
    assert len(list((out / "cache" / "rows").glob("*.json"))) == 2  # base and the first recipe were kept

    rows = B.run_board(cfg, progress=False)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["measured"] == [str(recipe)]  # resumed: only the row the kill interrupted
    assert [r["cached"] for r in rows] == [True, True, False]
    by = {r["recipe"]: r for r in rows}
    # the child's compression equals the same recipe applied in this process (an independent path)
    from leanlm.compress.recipe import apply_recipe, load_recipe
    from leanlm.eval.perplexity import perplexity

    m, tok = leanlm.load(tiny_folder)
    apply_recipe(m, load_recipe("w4a16-rtn-g32"), None, progress=False)
    text = leanlm.data.packaged_text("eval")[:1500]
    ref = perplexity(m, tok, text, ctx=512, stride=512, progress=False)["perplexity"]
    assert by["w4a16-rtn-g32"]["ppl_eval"] == pytest.approx(ref, rel=1e-5)
    assert by["w4a16-rtn-g32"]["size_mb"] < by["base"]["size_mb"]
    assert by[str(recipe)]["size_mb"] < by["w4a16-rtn-g32"]["size_mb"]
    assert all(r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 for r in rows)
    assert by["w4a16-rtn-g32"]["peak_rss_mb"] > 50

    rows2 = B.run_board(cfg, progress=False)  # nothing changed: every row and the speed pass from cache
    meta = json.loads((out / "meta.json").read_text())
    assert meta["measured"] == [] and meta["speed_cached"]
    assert [r["decode_tok_s"] for r in rows2] == [r["decode_tok_s"] for r in rows]

    recipe.write_text("- {method: rtn, bits: 3, group_size: 16}\n")  # a changed recipe: only its row again
    doc = tmp_path / "doc.md"
    doc.write_text("# Doc\n<!-- board:begin -->\nold table\n<!-- board:end -->\nafter\n")
    cfg.update_doc = str(doc)
    rows3 = B.run_board(cfg, progress=False)
    assert "old table" not in doc.read_text() and doc.read_text().endswith("<!-- board:end -->\nafter\n")
    assert "| recipe | ppl eval |" in doc.read_text()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["measured"] == [str(recipe)] and not meta["speed_cached"]
    assert rows3[2]["size_mb"] > rows[2]["size_mb"]  # smaller groups, more scales

    lines = (out / "results.jsonl").read_text().splitlines()
    assert [json.loads(s)["recipe"] for s in lines] == cfg.recipes
    assert "| base |" in (out / "board.md").read_text() or "| **base** |" in (out / "board.md").read_text()
    for png in ("pareto_size.png", "pareto_decode.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    page = (out / "board.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "w4a16-rtn-g32" in page
    front = meta["frontier"]["pareto_size.png"]
    assert front == pareto_front([(r["recipe"], r["size_mb"], r["ppl_eval"]) for r in rows3])


def test_board_rejects_bad_recipes_before_work(tmp_path):
    with pytest.raises(LeanLMError, match="unknown recipe"):
        B.expand_recipes("w4a16-gptq-g128,not-a-recipe")
    with pytest.raises(LeanLMError, match="no recovery step"):
        B.expand_recipes("structured-20+nothing")


def test_recovery_suffix_only_when_the_build_has_it(tmp_path, monkeypatch):
    monkeypatch.setattr(B, "SUFFIXES", {"distill": tmp_path / "recover.py"})
    with pytest.raises(LeanLMError, match="none in this build"):
        B.split_recipe("structured-20+distill")
    (tmp_path / "recover.py").write_text("")
    assert B.split_recipe("structured-20+distill") == ("structured-20", ["distill"])
    assert B.recipe_text("structured-20+distill").endswith("\n+distill")
    assert B.recipe_text("structured-20+distill").startswith(B.recipe_text("structured-20"))
    names = B.expand_recipes("all")
    assert names[0] == "base" and "w4a16-gptq-g128-e8" in names and "nf4" in names and len(names) >= 21


def test_loglikelihood_matches_transformers_and_lm_eval_encoding():
    from leanlm.eval.tasks import encode_pair, loglikelihood_tokens

    hf = tiny_hf("llama", seed=3)
    model = to_leanlm(hf)
    g = torch.Generator().manual_seed(0)
    reqs = [(torch.randint(0, 128, (n,), generator=g).tolist(), torch.randint(0, 128, (k,), generator=g).tolist())
            for n, k in ((5, 1), (9, 3), (2, 4), (12, 2), (7, 1))]
    got = loglikelihood_tokens(model, reqs, batch_size=2)
    for (ctx, cont), (ll, greedy) in zip(reqs, got):
        with torch.no_grad():
            lp = torch.log_softmax(hf(torch.tensor([ctx + cont])).logits[0].double(), -1)
        pos = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
        assert ll == pytest.approx(float(sum(lp[p, t] for p, t in zip(pos, cont))), abs=1e-4)
        assert greedy == all(int(lp[p].argmax()) == t for p, t in zip(pos, cont))

    class Words:  # a whitespace-keeping toy tokenizer: one id per character
        def encode(self, s, add_special=False):
            return [ord(c) for c in s]

    assert encode_pair(Words(), "Capital: ", "Paris") == ([ord(c) for c in "Capital:"], [ord(c) for c in " Paris"])
