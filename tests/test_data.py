"""leanlm.data: packaged texts, reading .txt / .jsonl files, calibration windows."""
import json

import pytest
import torch

from leanlm.data import calibration_samples, packaged_path, packaged_text, read_text, read_texts
from leanlm.errors import LeanLMError


class ByteTok:
    """Byte-level stand-in: token i is byte i, so any id row decodes back to the exact text."""

    def encode(self, text, add_special=False):
        return list(text.encode("utf-8"))


@pytest.fixture(scope="module")
def bpe_tok():
    """A tiny byte-level BPE trained on the calibration text with the `tokenizers` library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([packaged_text("calib")[:50_000]], trainer)

    class Wrap:
        def encode(self, text, add_special=False):
            return tok.encode(text, add_special_tokens=add_special).ids

        def decode(self, ids):
            return tok.decode(list(ids))

    return Wrap()


# ---------------------------------------------------------------- packaged texts
def test_packaged_texts_are_sizeable_distinct_and_clean():
    ev, ca = packaged_text("eval"), packaged_text("calib")
    for t in (ev, ca):
        assert 200_000 <= len(t.encode("utf-8")) <= 300_000
        assert "gutenberg" not in t.lower() and "license" not in t.lower()
        assert "\r" not in t and t.endswith("\n")
    assert ev.startswith("Persuasion") and "Jane Austen" in ev[:200]
    assert "THE TEMPEST" in ca[:200] and "In the beginning God created" in ca
    # different works: no shared 200-character passage
    for i in range(0, len(ev) - 200, 5_000):
        assert ev[i:i + 200] not in ca
    assert packaged_path("eval").name == "eval.txt"


def test_packaged_tech_text_is_technical_clean_and_held_out():
    tech, ev, ca = packaged_text("tech"), packaged_text("eval"), packaged_text("calib")
    assert packaged_path("tech").name == "tech.txt"
    assert 50_000 <= len(tech) <= 100_000
    assert tech.startswith("Unicode HOWTO") and "Functional Programming HOWTO" in tech
    assert "code point" in tech and "generator" in tech and "UTF-8" in tech
    assert "\r" not in tech and tech.endswith("\n") and "\n\n\n" not in tech
    # the reStructuredText markup is gone: no roles, literals, directives or section underlines
    assert ":func:`" not in tech and "``" not in tech and "\n.. " not in tech and "\n=====" not in tech
    # a different work from both other texts: no shared 100-character passage
    for i in range(0, len(tech) - 100, 2_000):
        assert tech[i:i + 100] not in ca and tech[i:i + 100] not in ev


def test_packaged_text_unknown_name():
    with pytest.raises(LeanLMError, match="no packaged text 'test'; choose one of eval, calib, tech"):
        packaged_text("test")


# ---------------------------------------------------------------- read_text
def test_read_txt(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("héllo\nworld\n", encoding="utf-8")
    assert read_text(p) == "héllo\nworld\n"


def test_read_jsonl_all_record_kinds(tmp_path):
    p = tmp_path / "d.jsonl"
    recs = [{"text": "plain"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]},
            {"prompt": "Q: 2+2?", "completion": " A: 4"}]
    p.write_text("\n".join(json.dumps(r) for r in recs[:2]) + "\n\n" + "\n".join(json.dumps(r) for r in recs[2:]))
    assert read_texts(p) == ["plain", "hi\n\nhello", "ab", "Q: 2+2? A: 4"]
    assert read_text(p) == "plain\n\nhi\n\nhello\n\nab\n\nQ: 2+2? A: 4"


@pytest.mark.parametrize("name, content, message", [
    ("missing.txt", None, r"missing.txt: no such file; give a .txt or .jsonl text file"),
    ("empty.txt", "  \n\n", r"empty.txt: file is empty"),
    ("empty.jsonl", "", r"empty.jsonl: file is empty"),
    ("bad.jsonl", '{"text": "ok"}\n{"text": "x",}\n', r"bad.jsonl: bad JSON at line 2 "),
    ("notext.jsonl", '{"text": "ok"}\n\n{"body": "x"}\n', r"notext.jsonl: line 3 has no text field"),
    ("list.jsonl", '["a"]\n', r"list.jsonl: line 1 is a JSON list, not an object"),
    ("halfpair.jsonl", '{"prompt": "only"}\n', r"halfpair.jsonl: line 1 has no text field"),
    ("badmsg.jsonl", '{"messages": [{"role": "user"}]}\n', r"badmsg.jsonl: line 1: each of 'messages'"),
    ("blank.jsonl", '{"text": ""}\n', r"blank.jsonl: every record's text is empty"),
])
def test_read_text_errors(tmp_path, name, content, message):
    p = tmp_path / name
    if content is not None:
        p.write_text(content)
    with pytest.raises(LeanLMError, match=message) as e:
        read_text(p)
    assert "\n" not in str(e.value)


def test_read_text_not_utf8_and_folder(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(LeanLMError, match=r"latin1.txt: line 2: not UTF-8 text"):
        read_text(p)
    with pytest.raises(LeanLMError, match="is a folder"):
        read_text(tmp_path)


# ---------------------------------------------------------------- calibration_samples
def test_calibration_samples_come_from_calib_not_eval():
    tok = ByteTok()
    x = calibration_samples(tok, n=16, seq_len=300, path="packaged:calib", seed=3)  # the default mix: test_data_calib
    assert x.shape == (16, 300) and x.dtype == torch.long
    calib, ev = packaged_text("calib").encode(), packaged_text("eval").encode()
    starts = set()
    for row in x.tolist():
        piece = bytes(row)
        assert piece in calib and piece not in ev
        starts.add(calib.index(piece))
    # disjoint windows when the text holds enough of them
    s = sorted(starts)
    assert len(s) == 16 and all(b - a >= 300 for a, b in zip(s, s[1:]))


def test_calibration_samples_bpe_contiguous_windows(bpe_tok):
    ids = bpe_tok.encode(packaged_text("calib"))
    assert len(ids) > 20_000  # the packaged text is long enough for typical CPU calibration
    x = calibration_samples(bpe_tok, n=8, seq_len=128, path="packaged:prose", seed=0)
    hay = ",".join(map(str, ids)) + ","
    for row in x.tolist():
        assert ",".join(map(str, row)) + "," in hay
        assert bpe_tok.decode(row) not in packaged_text("eval")


def test_calibration_samples_deterministic_by_seed():
    tok = ByteTok()
    a = calibration_samples(tok, 8, 64, seed=0)
    assert torch.equal(a, calibration_samples(tok, 8, 64, seed=0))
    assert not torch.equal(a, calibration_samples(tok, 8, 64, seed=1))


def test_calibration_samples_user_file_and_overlap(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"text": "abcdefghij"}) + "\n" + json.dumps({"text": "klmnopqrst"}) + "\n")
    text = read_text(p).encode()
    x = calibration_samples(ByteTok(), n=10, seq_len=8, path=p, seed=5)  # 22 tokens: windows must overlap
    assert x.shape == (10, 8)
    assert all(bytes(r) in text for r in x.tolist())


def test_calibration_samples_errors(tmp_path):
    p = tmp_path / "short.txt"
    p.write_text("tiny")
    with pytest.raises(LeanLMError, match=r"short.txt: has 4 tokens, fewer than seq_len=5"):
        calibration_samples(ByteTok(), 1, 5, path=p)
    with pytest.raises(LeanLMError, match="is leanlm's evaluation text"):
        calibration_samples(ByteTok(), 1, 5, path=packaged_path("eval"))
    with pytest.raises(LeanLMError, match="is leanlm's evaluation text"):
        calibration_samples(ByteTok(), 1, 5, path=packaged_path("tech"))
    with pytest.raises(LeanLMError, match="n >= 1"):
        calibration_samples(ByteTok(), 0, 5)
    with pytest.raises(LeanLMError, match="no such file"):
        calibration_samples(ByteTok(), 1, 5, path=tmp_path / "nope.txt")
