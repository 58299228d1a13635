"""leanlm data dedup / filter / select and demonstration selection: streaming records with reasons for
every drop, datasketch's MinHash against exact Jaccard, DSIR weights against the direct formula, IFD
and perplexity against transformers' own losses, the CLI, and datatrove's local executor."""
import json
import math
import random
import re
import zlib
from collections import Counter

import pytest
import torch

from leanlm.cli import main
from leanlm.data import packaged_text
from leanlm.data.records import dropped_path, iter_records
from leanlm.errors import LeanLMError
from tests.conftest import tiny_hf, to_leanlm
from tests.test_instruct import TEMPLATE


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from leanlm.io.tokenizer import Tokenizer

    t = HFTok(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    t.train_from_iterator([packaged_text("calib")[:20_000]], tr)
    return Tokenizer(t, bos_token="<|endoftext|>", eos_token="<|im_end|>", chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def models():
    hf = tiny_hf("llama", vocab_size=300, max_position_embeddings=1024)
    return hf, to_leanlm(hf)


def paragraphs(name, n, min_words=30):
    return [p for p in packaged_text(name).split("\n\n") if len(p.split()) >= min_words][:n]


def write_jsonl(path, rows, raw_lines=()):
    with open(path, "wb") as f:
        for r in rows:
            f.write((json.dumps(r) + "\n").encode())
        for line in raw_lines:
            f.write(line)
    return path


def read_jsonl(path):
    return [json.loads(x) for x in open(path, encoding="utf-8") if x.strip()]


def run_cli(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr().out
    return rc, json.loads(out.strip().splitlines()[-1]) if rc == 0 else None


# ---------------------------------------------------------------- records and bad input
def test_bad_records_are_counted_with_a_reason_never_dropped_silently(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"text": "alpha beta gamma", "id": 1, "meta": {"x": [1, 2]}},
                                     {"text": "   "}, {"title": "no text"}, [1, 2]],
                [b"{not json\n", b'{"text": "caf\xe9 bad bytes"}\n', b"\n"])
    (folder / "b.txt").write_text("a plain text file\n\nwith two paragraphs\n", encoding="utf-8")
    (folder / "ignored.csv").write_text("x,y\n")
    out = tmp_path / "out.jsonl"
    rc, res = run_cli(["data", "filter", str(folder), "-o", str(out), "--min-words", "1", "--json"], capsys)
    assert rc == 0
    kept = read_jsonl(out)
    assert kept[0] == {"text": "alpha beta gamma", "id": 1, "meta": {"x": [1, 2]}}  # every field kept
    assert kept[1]["text"].startswith("a plain text file") and kept[1]["source"].endswith("b.txt")
    reasons = Counter(r["reason"] for r in read_jsonl(dropped_path(out)))
    assert reasons == {"empty": 1, "missing_field": 1, "not_object": 1, "bad_json": 1, "not_utf8": 1}
    assert res["records"] == 7 and res["kept"] == 2 and res["dropped_not_utf8"] == 1
    # paragraphs of a .txt file as records
    recs = list(iter_records(folder / "b.txt", txt_unit="paragraph"))
    assert [r.text for r in recs] == ["a plain text file", "with two paragraphs"] and recs[1].line == 3


def test_cli_errors_are_one_line(tmp_path, capsys):
    src = write_jsonl(tmp_path / "x.jsonl", [{"text": "a b c"}])
    assert main(["data", "dedup", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o.jsonl")]) == 2
    assert main(["data", "dedup", str(src), "-o", str(tmp_path / "o.jsonl"), "--threshold", "1.5"]) == 2
    assert main(["data", "filter", str(src), "-o", str(tmp_path / "o.jsonl")]) == 2  # no bound given
    assert main(["data", "filter", str(src), "-o", str(tmp_path / "o.jsonl"), "--max-words", "p200"]) == 2
    assert main(["data", "select", str(src), "-o", str(tmp_path / "o.jsonl"), "--budget", "0"]) == 2
    assert main(["data", "select", str(src), "-o", str(tmp_path / "o.jsonl"), "--budget", "3"]) == 2  # dsir, no target
    assert main(["data", "dedup", str(src), "-o", str(src)]) == 2  # output is the input
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 7 and all(e.startswith("leanlm: error: ") for e in err)
    assert not (tmp_path / "o.jsonl").exists()


# ---------------------------------------------------------------- dedup
def edit_words(text, rate, rng):
    w = text.split()
    hit = [rng.random() < rate for _ in w]
    hit[rng.randrange(len(w))] = True  # at least one edit, so no copy is exact
    return " ".join(f"x{rng.randrange(10**6)}" if h else t for t, h in zip(w, hit))


def exact_jaccard(a, b, n=5):
    def grams(t):
        w = re.sub(r"\s+", " ", t.lower()).strip().split(" ")
        return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}
    ga, gb = grams(a), grams(b)
    return len(ga & gb) / len(ga | gb)


def test_minhash_estimate_matches_exact_jaccard_on_planted_pairs():
    from leanlm.data.dedup import DedupConfig, Deduplicator

    d = Deduplicator(DedupConfig(num_perm=256))
    rng = random.Random(0)
    errs = []
    for p in paragraphs("eval", 40, min_words=60):
        q = edit_words(p, rng.choice([0.01, 0.03, 0.1]), rng)
        est = d.minhash(p).jaccard(d.minhash(q))  # datasketch's own estimate
        errs.append(abs(est - exact_jaccard(p, q)))
    # std of the estimate is sqrt(J(1-J)/256) <= 0.031
    assert max(errs) < 0.12 and sum(errs) / len(errs) < 0.04


def test_dedup_finds_planted_near_duplicates_and_keeps_fields(tmp_path, capsys):
    rng = random.Random(1)
    base = paragraphs("eval", 60, min_words=60)
    rows, truth = [], {}
    for i, p in enumerate(base):
        rows.append({"text": p, "id": f"o{i}"})
        if i % 3 == 0:
            q = edit_words(p, 0.01, rng)
            truth[f"n{i}"] = exact_jaccard(p, q)
            rows.append({"text": q, "id": f"n{i}", "extra": i})
        if i % 5 == 0:  # exact after normalization: case and whitespace only
            rows.append({"text": "  " + p.upper().replace(" ", "\n"), "id": f"e{i}"})
    out = tmp_path / "out.jsonl"
    rc, res = run_cli(["data", "dedup", str(write_jsonl(tmp_path / "in.jsonl", rows)), "-o", str(out), "--json"],
                      capsys)
    assert rc == 0
    kept_ids = [r["id"] for r in read_jsonl(out)]
    # every original kept, first occurrence, in order; an edited copy survives only below the threshold
    assert [k for k in kept_ids if k[0] == "o"] == [f"o{i}" for i in range(len(base))]
    assert all(truth[k] < 0.85 for k in kept_ids if k[0] == "n")
    dropped = {r["record"]["id"]: r for r in read_jsonl(dropped_path(out))}
    assert all(dropped[k]["reason"] == "near_duplicate" for k in truth if truth[k] >= 0.85)
    assert all(r["reason"] != "near_duplicate" or truth[k] >= 0.6 for k, r in dropped.items())
    assert {k for k, r in dropped.items() if r["reason"] == "exact_duplicate"} == {f"e{i}" for i in range(0, 60, 5)}
    assert dropped["n3"]["duplicate_of"].endswith(":" + str(1 + [r["id"] for r in rows].index("o3")))
    assert res["kept"] == len(kept_ids) and res["dropped_near_duplicate"] == len(dropped) - 12


def test_dedup_without_near_keeps_edited_copies(tmp_path):
    from leanlm.data.dedup import DedupConfig, dedup

    p = paragraphs("eval", 1, min_words=60)[0]
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": p}, {"text": p.replace(" the ", " a ", 1)}, {"text": p}])
    res = dedup(src, tmp_path / "o.jsonl", DedupConfig(near=False), progress=False)
    assert res["kept"] == 2 and res["dropped_exact_duplicate"] == 1


# ---------------------------------------------------------------- filter
def test_perplexity_scorer_matches_transformers_loss(models, tok):
    from leanlm.data.quality import PerplexityScorer

    hf, lm = models
    texts = paragraphs("calib", 5, min_words=10) + ["To be, or not"]
    got = PerplexityScorer(lm, tok, max_tokens=64, batch_size=3)(texts)
    for t, g in zip(texts, got):
        # this tokenizer adds no BOS (tok.add_bos is False), so the first token is context only
        ids = torch.tensor([tok.encode(t, add_special=False)])[:, :64]
        with torch.no_grad():
            ref = math.exp(float(hf(ids, labels=ids).loss))
        assert g == pytest.approx(ref, rel=1e-4)


def test_filter_by_value_and_percentile(tmp_path, models, tok):
    from leanlm.data.quality import FilterConfig, filter_records, repetition

    assert repetition("a b c a b c a b c") == pytest.approx(1 - 3 / 7)
    rows = [{"text": " ".join(f"w{j}" for j in range(n)), "n": n} for n in range(1, 21)]
    rows.append({"text": "one two three " * 10, "n": "rep"})
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    res = filter_records(src, tmp_path / "a.jsonl", FilterConfig(min_words="5", max_repetition="0.5"), progress=False)
    kept = [r["n"] for r in read_jsonl(tmp_path / "a.jsonl")]
    assert kept == list(range(5, 21))  # the repeated "one two three" goes, and the short ones
    reasons = Counter(r["reason"] for r in read_jsonl(dropped_path(tmp_path / "a.jsonl")))
    assert reasons == {"words_below_min": 4, "repetition_above_max": 1} and res["kept"] == 16
    res = filter_records(src, tmp_path / "b.jsonl", FilterConfig(max_words="p50"), progress=False)
    assert res["limit_max_words"] == pytest.approx(11.0)
    assert [r["n"] for r in read_jsonl(tmp_path / "b.jsonl")] == list(range(1, 12))
    drop = read_jsonl(dropped_path(tmp_path / "b.jsonl"))
    assert drop[0]["reason"] == "words_above_max" and drop[0]["limit"] == pytest.approx(11.0)
    # perplexity percentile: the kept records are exactly those at or below the computed limit
    hf, lm = models
    src2 = write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in paragraphs("calib", 12, min_words=10)])
    res = filter_records(src2, tmp_path / "c.jsonl", FilterConfig(max_perplexity="p75", batch_size=5), lm, tok,
                         progress=False)
    assert res["kept"] == 9 and res["dropped_perplexity_above_max"] == 3


# ---------------------------------------------------------------- select
def test_dsir_weights_match_the_direct_formula():
    from leanlm.data.select import dsir_log_weight, log_ratio, ngram_counts

    B = 64
    target = ["the cat sat on the mat", "the cat ran"]
    raw = ["a dog sat", "the cat sat on the mat", "stocks fell sharply today"]
    ratio = log_ratio(ngram_counts(target, B), ngram_counts(raw, B), smoothing=0.5)

    def feats(t):
        w = re.findall(r"\w+", t.lower())
        return [zlib.crc32(f.encode()) % B for f in w + [f"{a} {b}" for a, b in zip(w, w[1:])]]

    ct, cr = Counter(f for t in target for f in feats(t)), Counter(f for t in raw for f in feats(t))
    nt, nr = sum(ct.values()), sum(cr.values())
    for x in raw:
        direct = sum(math.log((ct[b] + 0.5) / (nt + 0.5 * B)) - math.log((cr[b] + 0.5) / (nr + 0.5 * B))
                     for b in feats(x))
        assert dsir_log_weight(x, ratio) == pytest.approx(direct, rel=1e-9, abs=1e-9)


def test_dsir_selects_toward_the_target_domain(tmp_path, capsys):
    tech = paragraphs("tech", 80, min_words=20)
    pool = [{"text": t, "domain": "tech"} for t in tech[40:]] + \
           [{"text": t, "domain": "novel"} for t in paragraphs("eval", 40, min_words=20)] + \
           [{"text": t, "domain": "calib"} for t in paragraphs("calib", 40, min_words=20)]
    random.Random(0).shuffle(pool)
    target = tmp_path / "target.txt"
    target.write_text("\n\n".join(tech[:40]), encoding="utf-8")
    out = tmp_path / "sel.jsonl"
    rc, res = run_cli(["data", "select", str(write_jsonl(tmp_path / "pool.jsonl", pool)), "-o", str(out),
                       "--method", "dsir", "--target", str(target), "--budget", "40", "--json"], capsys)
    assert rc == 0 and res["kept"] == 40
    picked = Counter(r["domain"] for r in read_jsonl(out))
    assert picked["tech"] >= 36


def test_ifd_matches_losses_computed_by_hand(models, tok):
    from leanlm.data.instruct import IGNORE, record_example
    from leanlm.data.select import ifd_scores, instruction_pair

    hf, lm = models
    recs = [{"prompt": "Name a colour.", "completion": "Blue, of course."},
            {"messages": [{"role": "user", "content": "What is two plus two?"},
                          {"role": "assistant", "content": "Four."}]}]
    got = ifd_scores(lm, tok, [instruction_pair(tok, r, "r", 256) for r in recs], batch_size=2)
    for r, g in zip(recs, got):
        ex = record_example(tok, r, "r")
        ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor([ex["labels"]])
        ans = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE]
        alone = torch.tensor([[tok.bos_id] + ans])
        with torch.no_grad():
            lw, la = float(hf(ids, labels=labels).loss), float(hf(alone, labels=alone).loss)
        assert g["loss_with"] == pytest.approx(lw, rel=1e-4) and g["loss_alone"] == pytest.approx(la, rel=1e-4)
        assert g["ifd"] == pytest.approx(lw / la, rel=1e-4)


def test_select_ifd_length_and_diversity_end_to_end(tmp_path, models, tok):
    from leanlm.data.select import SelectConfig, choose, k_center, select

    hf, lm = models
    rows = [{"prompt": f"Say {w}.", "completion": " ".join([w] * (i + 1)), "i": i}
            for i, w in enumerate(["blue", "green", "cat", "dog", "sun", "rain"])]
    src = write_jsonl(tmp_path / "ins.jsonl", rows, [b'{"text": "not an instruction"}\n'])
    with pytest.raises(LeanLMError, match="IFD needs instruction records"):
        select(src, tmp_path / "o.jsonl", SelectConfig(method="ifd", budget="2"), lm, tok, progress=False)
    src = write_jsonl(tmp_path / "ins.jsonl", rows)
    res = select(src, tmp_path / "len.jsonl", SelectConfig(method="length", budget="0.5"), progress=False)
    assert [r["i"] for r in read_jsonl(tmp_path / "len.jsonl")] == [3, 4, 5] and res["budget"] == 3
    res = select(src, tmp_path / "ifd.jsonl", SelectConfig(method="ifd", budget="3"), lm, tok, progress=False)
    drops = read_jsonl(dropped_path(tmp_path / "ifd.jsonl"))
    assert res["kept"] + len(drops) == 6 and all("loss_with" in d for d in drops)
    picked, excluded = choose("ifd", [0.5, 1.2, 0.9, float("nan"), 0.7], 2)
    assert picked == [2, 4] and excluded == {1: "ifd_at_least_1", 3: "ifd_unscored"}
    # k-center: one pick from each of three well-separated clusters
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(8)[:3] * 10
    emb = torch.cat([c + 0.1 * torch.randn(10, 8, generator=g) for c in centers])
    assert sorted(i // 10 for i in k_center(emb, 3)) == [0, 1, 2]
    res = select(src, tmp_path / "div.jsonl", SelectConfig(method="diversity", budget="2"), lm, tok, progress=False)
    assert res["kept"] == 2 and read_jsonl(tmp_path / "div.jsonl")[0]["i"] == 0


def test_ifd_within_clusters_takes_from_every_cluster(tmp_path, models, tok):
    from leanlm.data.select import SelectConfig, choose, kmeans, select

    g = torch.Generator().manual_seed(1)
    centers = torch.eye(8)[:3] * 10
    emb = torch.cat([c + 0.1 * torch.randn(10, 8, generator=g) for c in centers[[2, 0, 1]]])
    labels = kmeans(emb, 3)
    assert [len(set(labels[i:i + 10].tolist())) for i in (0, 10, 20)] == [1, 1, 1]  # each group whole
    assert len(set(labels.tolist())) == 3
    ifd = [0.9 - 0.01 * i for i in range(10)] + [0.5 - 0.01 * i for i in range(20)]  # group 0 is hardest
    plain, _ = choose("ifd", ifd, 6)
    assert all(i < 10 for i in plain)  # plain IFD: the hard group fills the budget
    picked, _ = choose("ifd", ifd, 6, labels=labels)
    assert sorted(picked) == [0, 1, 10, 11, 20, 21]  # two from each group, the highest IFD of each
    hf, lm = models
    rows = [{"prompt": f"Say {w}.", "completion": " ".join([w] * (i + 1)), "i": i}
            for i, w in enumerate(["blue", "green", "cat", "dog", "sun", "rain"])]
    src = write_jsonl(tmp_path / "ins.jsonl", rows)
    res = select(src, tmp_path / "c.jsonl", SelectConfig(method="ifd", budget="4", clusters=2), lm, tok,
                 progress=False)
    drops = read_jsonl(dropped_path(tmp_path / "c.jsonl"))
    # (a random tiny model puts some IFDs >= 1: those are excluded, as without clusters)
    assert res["kept"] + len(drops) == 6 and res["kept"] >= 1 and all(d["cluster"] in (0, 1) for d in drops)
    with pytest.raises(LeanLMError, match="--clusters"):
        SelectConfig(method="dsir", target="packaged:tech", clusters=2).check()


# ---------------------------------------------------------------- demonstrations
def test_demos_knn_random_fixed(models, tok):
    from leanlm.data.demos import DemoSelector, embed, few_shot_messages

    hf, lm = models
    pool = [{"prompt": p, "completion": str(i)} for i, p in enumerate(paragraphs("calib", 8, min_words=10))]
    sel = DemoSelector(lm, tok, pool)
    assert sel.select(pool[5]["prompt"], 3, "knn")[0] is pool[5]  # the same text is its own nearest
    # knn order is by cosine similarity of the mean hidden state, computed here directly
    q = "Full fathom five thy father lies"
    e, eq = embed(lm, tok, [p["prompt"] for p in pool]), embed(lm, tok, [q])[0]
    assert [d["completion"] for d in sel.select(q, 4)] == [pool[i]["completion"]
                                                           for i in torch.argsort(e @ eq, descending=True)[:4]]
    assert sel.select(q, 2, "fixed") == pool[:2]
    assert sel.select(q, 3, "random", seed=1) == sel.select("other", 3, "random", seed=1)
    assert len(few_shot_messages(pool[:2], q)) == 5
    with pytest.raises(LeanLMError):
        DemoSelector(lm, tok, [{"prompt": ""}]).select(q, 1)


# ---------------------------------------------------------------- datatrove
def test_datatrove_local_executor_runs_the_same_filter(tmp_path, default_model):
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    from leanlm.data.pipeline import leanlm_filter
    from leanlm.data.quality import FilterConfig, filter_records

    texts = paragraphs("eval", 10, min_words=5) + ["zq xv kk pp zq xv kk pp zq xv kk pp " * 3, "short one"]
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "part.jsonl", [{"text": t, "id": str(i)} for i, t in enumerate(texts)])
    cfg = FilterConfig(min_words="5", max_perplexity="60", max_tokens=64, batch_size=4)
    model, tok = default_model
    ours = filter_records(tmp_path / "in", tmp_path / "ours.jsonl", cfg, model, tok, progress=False)
    LocalPipelineExecutor([JsonlReader(str(tmp_path / "in")), leanlm_filter(cfg),
                           JsonlWriter(str(tmp_path / "dt"), output_filename="out.jsonl", compression=None)],
                          tasks=1, workers=1, logging_dir=str(tmp_path / "logs")).run()
    theirs = [r["id"] for r in read_jsonl(tmp_path / "dt" / "out.jsonl")]
    assert theirs == [r["id"] for r in read_jsonl(tmp_path / "ours.jsonl")]
    assert 0 < len(theirs) < len(texts) and ours["dropped_perplexity_above_max"] >= 1
    with pytest.raises(LeanLMError, match="percentile"):
        leanlm_filter(FilterConfig(max_perplexity="p90"))
