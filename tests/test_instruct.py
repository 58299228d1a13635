"""Instruction data: chat-template rendering, assistant-only labels (against transformers' assistant mask),
packing, plain text, and errors that name the bad line."""
import json

import pytest

from leanlm.data.instruct import IGNORE, chat_example, load_examples, pack, text_examples
from leanlm.errors import LeanLMError

# SmolLM2's ChatML template; the HF variant marks the assistant turn with {% generation %}
TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
            "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
HF_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
               "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
               "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
               "{{ message['content'] + '<|im_end|>\n' }}{% endgeneration %}"
               "{% else %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
               "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

CONVS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one?"},
     {"role": "assistant", "content": "Green, of course."}],
]


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from leanlm.io.tokenizer import Tokenizer

    t = HFTok(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(["What is two plus two? Name a colour. Blue, green, of course. assistant user system"] * 5,
                          tr)
    return Tokenizer(t, bos_token=None, eos_token="<|im_end|>", chat_template=TEMPLATE)


def test_labels_match_transformers_assistant_mask(tok):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.tok)
    for conv in CONVS:
        ex = chat_example(tok, conv)
        ref = hf.apply_chat_template(conv, chat_template=HF_TEMPLATE, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
        assert ex["input_ids"] == list(ref["input_ids"])
        assert [int(lab != IGNORE) for lab in ex["labels"]] == list(ref["assistant_masks"])
        assert [lab for lab in ex["labels"] if lab != IGNORE] == \
            [i for i, m in zip(ref["input_ids"], ref["assistant_masks"]) if m]


def test_ids_equal_whole_rendering_and_answers_decode(tok):
    ex = chat_example(tok, CONVS[1])
    whole = tok.encode(tok.apply_chat_template(CONVS[1], add_generation_prompt=False), add_special=False)
    assert ex["input_ids"] == whole
    answer = tok.decode([lab for lab in ex["labels"] if lab != IGNORE], skip_special=False)
    assert answer == "Blue.<|im_end|>\nGreen, of course.<|im_end|>\n"


def test_jsonl_formats_and_packing(tok, tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [
        {"messages": CONVS[0]}, {"prompt": "What is 2+2?", "completion": "4"}, {"text": "plain words"}]) + "\n\n")
    exs = load_examples(p, tok)
    assert exs[0] == exs[1]  # prompt/completion is a one-turn chat
    assert exs[2]["labels"] == exs[2]["input_ids"] and exs[2]["input_ids"][-1] == tok.eos_ids[0]
    n0 = len(exs[0]["input_ids"])
    rows = pack(exs * 3, seq_len=2 * n0 + 1)
    assert len(rows) < 9 and all(len(r["input_ids"]) <= 2 * n0 + 1 for r in rows)
    assert sum(len(r["input_ids"]) for r in rows) == 3 * sum(len(e["input_ids"]) for e in exs)
    # an appended example's first token is never a target
    assert rows[0]["labels"][n0] == IGNORE and rows[0]["labels"][:n0] == exs[0]["labels"]
    plain = text_examples("Blue green " * 40, tok, seq_len=16)
    assert all(len(e["input_ids"]) <= 16 for e in plain) and sum(len(e["input_ids"]) for e in plain) == \
        len(tok.encode("Blue green " * 40, add_special=False))


@pytest.mark.parametrize("line,msg", [
    ("{not json", "line 2: bad JSON"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "line 2: no assistant message"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "line 2: each message needs a role"),
    ('{"prompt": "hi"}', "line 2: 'prompt' and 'completion'"),
    ('{"foo": 1}', "line 2: no 'messages'"),
    ("[1, 2]", "line 2: is a JSON list"),
])
def test_errors_name_the_bad_line(tok, tmp_path, line, msg):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + line + "\n")
    with pytest.raises(LeanLMError, match=msg):
        load_examples(p, tok)
