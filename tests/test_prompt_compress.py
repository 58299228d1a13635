"""Prompt compression: the cached iterative pruning against a recompute-everything reference, question
ranking against transformers' losses, budgets, bad rates, the CLI, and one run on the default model."""
import json

import pytest
import torch
import torch.nn.functional as F

import leanlm
from leanlm.cli import main
from leanlm.data.prompt_compress import (RESTRICT, _chunks, check_rate, compress_prompt, prune_tokens,
                                         rank_segments, word_starts)
from leanlm.errors import LeanLMError
from tests.test_data_tools import models, paragraphs, tok  # noqa: F401  (fixtures)


def _surprisal(model, prefix, piece):
    with torch.no_grad():
        logits = model(torch.tensor([prefix + piece])).logits[0]
    return F.cross_entropy(logits[len(prefix) - 1:-1], torch.tensor(piece), reduction="none")


def reference_prune(model, tokenizer, ids, frac, chunk, condition=None):
    """The same selection rule, every surprisal recomputed from scratch without a KV cache (with a
    condition: surprisal after the kept prefix minus surprisal after condition + kept prefix)."""
    head = [tokenizer.bos_id]
    starts = word_starts(tokenizer, ids)
    kept, carry = [], 0.0
    for c0, c1 in _chunks(starts, chunk):
        piece = ids[c0:c1]
        want = sum(frac[c0:c1]) + carry
        n_keep = max(0, min(len(piece), int(round(want))))
        prefix = head + [ids[i] for i in kept]
        surprisal = _surprisal(model, prefix, piece)
        if condition:
            surprisal = surprisal - _surprisal(model, head + condition + prefix[1:], piece)
        surprisal = surprisal.tolist()
        words = []
        for j in range(len(piece)):
            if starts[c0 + j] or not words:
                words.append([surprisal[j], j, j + 1])
            else:
                words[-1][0], words[-1][2] = max(words[-1][0], surprisal[j]), j + 1
        sel, used = [], 0
        for _, b, e in sorted(words, key=lambda w: (-w[0], w[1])):
            if used + e - b <= n_keep:
                sel += range(b, e)
                used += e - b
        carry = want - len(sel)
        kept += sorted(c0 + i for i in sel)
    return kept


def test_cached_pruning_matches_recomputed_reference(models, tok):  # noqa: F811
    hf, lm = models
    ids = tok.encode(" ".join(paragraphs("calib", 6, min_words=20)), add_special=False)[:180]
    frac = [0.4] * 90 + [0.7] * 90
    got = prune_tokens(lm, tok, ids, frac, chunk=40)
    assert got == reference_prune(hf, tok, ids, frac, 40)
    assert abs(len(got) - sum(frac)) <= 12  # whole words: within a word or so per chunk
    assert got == sorted(set(got))


def test_contrastive_pruning_matches_recomputed_reference(models, tok):  # noqa: F811
    hf, lm = models
    ids = tok.encode(" ".join(paragraphs("calib", 6, min_words=20)), add_special=False)[:150]
    cond = tok.encode("Who rules the island?\n\n", add_special=False)
    frac = [0.5] * 150
    got = prune_tokens(lm, tok, ids, frac, chunk=40, condition=cond)
    assert got == reference_prune(hf, tok, ids, frac, 40, condition=cond)
    assert got != prune_tokens(lm, tok, ids, frac, chunk=40)  # the contrast changes the choice
    docs = paragraphs("calib", 3, min_words=20)
    res = compress_prompt(docs, "Who rules the island?", rate=0.5, model=lm, tokenizer=tok, contrastive=True)
    assert 0.4 < res["rate"] < 0.6
    with pytest.raises(LeanLMError, match="give a question"):
        compress_prompt(docs, rate=0.5, model=lm, tokenizer=tok, contrastive=True)


def test_question_ranking_matches_transformers_losses(models, tok):  # noqa: F811
    hf, lm = models
    docs = paragraphs("calib", 4, min_words=15)
    seg_ids = [tok.encode(d, add_special=False) for d in docs]
    q = "Who rules the island?"
    order = rank_segments(lm, tok, seg_ids, q)
    qi = tok.encode(q + RESTRICT, add_special=False)
    ref = []
    for s in seg_ids:
        ids = torch.tensor([[tok.bos_id] + s + qi])
        labels = ids.clone()
        labels[:, :1 + len(s)] = -100
        with torch.no_grad():
            ref.append(float(hf(ids, labels=labels).loss))
    assert order == sorted(range(len(docs)), key=lambda i: ref[i])


def test_budget_subsequence_and_rate_one(models, tok):  # noqa: F811
    hf, lm = models
    docs = paragraphs("calib", 5, min_words=20)
    full = compress_prompt(docs, rate=1.0, model=lm, tokenizer=tok)
    assert full["compressed_prompt"] == "\n\n".join(docs) and full["rate"] == 1.0
    res = compress_prompt(docs, "What did the king say?", rate=0.3, model=lm, tokenizer=tok, chunk=32)
    assert 0.2 < res["rate"] < 0.4 and res["compressed_tokens"] < res["origin_tokens"]
    # kept tokens are a subsequence of the original, so the text's characters are too
    it = iter("\n\n".join(docs))
    assert all(ch in it for ch in res["compressed_prompt"])


@pytest.mark.parametrize("rate", [0, -0.5, 1.5, float("nan"), "half"])
def test_bad_rate_is_one_clear_error(rate):
    with pytest.raises(LeanLMError, match="rate must be"):
        check_rate(rate)


def test_bad_input_errors(models, tok, tmp_path, capsys):  # noqa: F811
    hf, lm = models
    for ctx in ("", ["  ", "\n"], 5):
        with pytest.raises(LeanLMError):
            compress_prompt(ctx, rate=0.5, model=lm, tokenizer=tok)
    f = tmp_path / "c.txt"
    f.write_text("some text\n")
    assert main(["prompt", "compress", str(f), "--rate", "2"]) == 2
    bad = tmp_path / "b.txt"
    bad.write_bytes(b"caf\xe9\n")
    assert main(["prompt", "compress", str(bad)]) == 2
    assert main(["prompt", "compress", str(f), "--contrastive"]) == 2  # no question to contrast with
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(e.startswith("leanlm: error: ") for e in err)
    assert "give a question" in err[2]


@pytest.mark.slow
def test_default_model_keeps_the_planted_answer_at_4x(default_model, tmp_path, capsys):
    model, tokenizer = default_model
    docs = paragraphs("eval", 4, min_words=60)
    docs[2] += " The name of Mr. Elliot's horse was Bramble."
    q = "What was the name of Mr. Elliot's horse?"
    res = leanlm.compress_prompt(docs, q, rate=0.25, model=model, tokenizer=tokenizer)
    assert "Bramble" in res["compressed_prompt"] and 3.4 < res["ratio"] < 4.6
    assert rank_segments(model, tokenizer, [tokenizer.encode(d, add_special=False) for d in docs], q)[0] == 2
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "short.txt"
    assert main(["prompt", "compress", str(src), "--question", q, "--rate", "0.25", "-o", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out.read_text().strip() == res["compressed_prompt"] == summary["compressed_prompt"]
