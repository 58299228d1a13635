"""`leanlm finetune` end to end on a tiny saved model (plumbing: data, method, train, adapter, report)."""
import json

import pytest
import torch

from leanlm.model import ModelConfig, Transformer

TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
            "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    import leanlm.api
    from leanlm.io.tokenizer import Tokenizer

    t = HFTok(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(["Rewrite the date 2021-07-09 as day, month name and year. 9 July 2021"] * 5, tr)
    tok = Tokenizer(t, eos_token="<|im_end|>", chat_template=TEMPLATE)
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                                num_heads=4, num_kv_heads=2, tie_word_embeddings=True,
                                eos_token_id=tok.eos_ids))
    folder = tmp_path_factory.mktemp("tiny") / "model"
    leanlm.api.save(m, tok, folder)
    return folder


@pytest.mark.parametrize("method", ["lora", "ia3", "prefix", "qlora", "mezo"])
def test_finetune_cli(tiny_folder, tmp_path, capsys, method):
    from leanlm.cli import main
    from leanlm.peft import load_adapter

    out = tmp_path / "out"
    rc = main(["finetune", str(tiny_folder), "--method", method, "--max-steps", "3", "--batch-size", "4",
               "--train-examples", "16", "--test-examples", "4", "--save-every", "2", "--json",
               "--threads", "1", "-o", str(out)])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["steps"] == 3 and res["accuracy_before"] == 0.0 and 0 <= res["accuracy_after"] <= 1
    assert res["trainable_params"] > 0 and res["peak_rss_mb"] > 0
    assert len((out / "log.jsonl").read_text().splitlines()) == 3
    assert sorted(p.name for p in out.glob("step-*")) == ["step-0000002", "step-0000003"]
    if method == "mezo":
        assert (out / "model" / "model.safetensors").exists()
    else:
        import leanlm
        model, _ = leanlm.load(str(tiny_folder))
        load_adapter(model, out / "adapter")


def test_finetune_cli_bad_data(tiny_folder, tmp_path, capsys):
    from leanlm.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"messages": []}\n')
    rc = main(["finetune", str(tiny_folder), "--data", str(bad), "-o", str(tmp_path / "o")])
    assert rc == 2 and "line 2" in capsys.readouterr().err
