"""`leanlm distill` end to end on tiny GGUF models: bad input stops before any work; a run writes a student."""
import json

import pytest
import torch

import leanlm
from conftest import tiny_hf
from gguf_util import byte_vocab, write_tiny_gguf
from leanlm.cli import main

NV = len(byte_vocab()[0])


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("distill")
    return (write_tiny_gguf(d / "teacher.gguf", tiny_hf("llama", vocab_size=NV, seed=4), "F32"),
            write_tiny_gguf(d / "student.gguf", tiny_hf("llama", vocab_size=NV, seed=5), "F32"))


def test_missing_data_file_stops_before_loading(tmp_path, capsys, monkeypatch, pair):
    monkeypatch.setattr(leanlm, "load", lambda *a, **k: pytest.fail("loaded a model before checking the data"))
    assert main(["distill", "--teacher", str(pair[0]), "--data", str(tmp_path / "nope.txt"),
                 "-o", str(tmp_path / "o")]) == 2
    assert "nope.txt" in capsys.readouterr().err
    assert main(["distill", "--teacher", str(pair[0]), "--data", "packaged:tech", "-o", str(tmp_path / "o")]) == 2
    assert "held-out" in capsys.readouterr().err


def test_distill_cli_runs_and_resumes(tmp_path, capsys, monkeypatch, pair):
    monkeypatch.setenv("LEANLM_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "d.txt"
    data.write_text("the cat sat on the mat. " * 200)
    args = ["distill", "--teacher", str(pair[0]), "--student", str(pair[1]), "--data", str(data), "-o",
            str(tmp_path / "o"), "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--lr", "1e-2",
            "--loss", "jsd", "--eval-text", str(data), "--eval-chars", "600", "--save-every", "2", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["steps"] == 4 and out["student_ppl_after"] != out["student_ppl"]
    student, tok = leanlm.load(tmp_path / "o" / "model")
    ids = torch.tensor([tok.encode("the cat sat")])
    assert torch.isfinite(student(ids)).all()
    assert sorted(p.name for p in (tmp_path / "o").glob("step-*")) == ["step-0000002", "step-0000004"]
    # resuming a finished run does no more steps
    assert main(args + ["--resume"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 4


def test_seqkd_generations_continue_prompts_and_mask_them():
    from conftest import to_leanlm
    from leanlm.train.distill_cli import teacher_generations

    teacher = to_leanlm(tiny_hf(seed=0))
    data = [{"input_ids": list(range(i, i + 20)), "labels": list(range(i, i + 20))} for i in range(5)]
    gens = teacher_generations(teacher, data, 6, 4, 7, seed=1, eos=[])
    assert len(gens) == 6
    for ex in gens:
        assert len(ex["input_ids"]) == 4 + 7 and ex["labels"][:4] == [-100] * 4
        assert ex["labels"][4:] == ex["input_ids"][4:]
        assert any(ex["input_ids"][:4] == d["input_ids"][:4] for d in data)
    assert gens == teacher_generations(teacher, data, 6, 4, 7, seed=1, eos=[])  # same seed, same data


def test_distill_cli_on_generated_text_caches_it(tmp_path, capsys, monkeypatch, pair):
    monkeypatch.setenv("LEANLM_CACHE", str(tmp_path / "cache"))
    args = ["distill", "--teacher", str(pair[0]), "--student", str(pair[1]), "--data", "generated",
            "--gen-count", "6", "--gen-len", "16", "--steps", "3", "--batch-size", "2", "--seq-len", "16",
            "--lr", "1e-2", "--no-eval", "--json"]
    assert main(args + ["-o", str(tmp_path / "a")]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["examples"] == 6 and first["generated_from_cache"] is False and first["steps"] == 3
    assert main(args + ["-o", str(tmp_path / "b")]) == 0  # another output folder: the text is read back
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["generated_from_cache"] is True and second["first_loss"] == first["first_loss"]
    assert len(list((tmp_path / "cache" / "generated").glob("*.safetensors"))) == 1


def test_distill_cli_students_of_another_shape(tmp_path, capsys, monkeypatch, pair):
    """Minitron's comparison: a student cut from the teacher by a recipe, and one of another shape from scratch;
    each shrinks, learns, and saves a folder that leanlm and transformers load alike."""
    import transformers

    monkeypatch.setenv("LEANLM_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "d.txt"
    data.write_text("the cat sat on the mat and the dog ran to the cat. " * 100)
    assert main(["compress", str(pair[0]), "--recipe", "minitron-width-40", "-o", str(tmp_path / "cut"),
                 "--samples", "4", "--seq-len", "32", "--no-eval"]) == 0
    teacher, _ = leanlm.load(pair[0])
    for student, shape in ((str(tmp_path / "cut"), None), ("scratch:num_layers=1,intermediate_size=32", (1, 32))):
        out = tmp_path / ("o" + str(shape is None))
        assert main(["distill", "--teacher", str(pair[0]), "--student", student, "--data", str(data), "-o", str(out),
                     "--steps", "8", "--batch-size", "2", "--seq-len", "32", "--lr", "1e-2", "--warmup", "0",
                     "--no-eval", "--json"]) == 0
        res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert res["steps"] == 8 and res["last_loss"] < res["first_loss"]
        assert res["student_params"] < 0.8 * teacher.num_parameters()
        model, tok = leanlm.load(out / "model")
        if shape:
            assert (model.config.num_layers, model.config.intermediate_size) == shape
        ids = torch.tensor([tok.encode("the cat sat on the mat")])
        hf = transformers.AutoModelForCausalLM.from_pretrained(out / "model").eval()
        with torch.no_grad():
            torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-4, rtol=1e-4)


def test_distill_cli_on_policy_ends_samples_at_the_tokenizers_eos(tmp_path, capsys, monkeypatch, pair):
    import leanlm.train.distill as distill_mod

    seen = []
    real = distill_mod.student_samples

    def spy(model, ids, prompt_len, new_tokens, eos_ids=(), pad_id=0):
        seen.append((prompt_len, new_tokens, list(eos_ids), pad_id))
        return real(model, ids, prompt_len, new_tokens, eos_ids, pad_id)
    monkeypatch.setattr(distill_mod, "student_samples", spy)
    data = tmp_path / "d.txt"
    data.write_text("the cat sat on the mat. " * 200)
    assert main(["distill", "--teacher", str(pair[0]), "--student", str(pair[1]), "--data", str(data), "-o",
                 str(tmp_path / "o"), "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--loss", "jsd",
                 "--lmbda", "1", "--lmbda-prompt", "5", "--lmbda-tokens", "7", "--no-eval", "--json"]) == 0
    _, tok = leanlm.load(pair[1])
    assert tok.eos_ids and seen == [(5, 7, list(tok.eos_ids), tok.pad_id or 0)] * 2
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 2


def test_distill_cli_topk_cache_is_built_once_then_read(tmp_path, capsys, pair):
    data = tmp_path / "d.txt"
    data.write_text("the cat sat on the mat. " * 200)
    args = ["distill", "--teacher", str(pair[0]), "--student", str(pair[1]), "--data", str(data), "-o",
            str(tmp_path / "o"), "--steps", "1", "--batch-size", "2", "--seq-len", "32", "--topk", "8", "--no-eval",
            "--json"]
    runs = []
    for _ in range(2):
        assert main(args) == 0
        runs.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert [r["topk_cache"] for r in runs] == ["built", "read"]
    size = (tmp_path / "o" / "teacher-topk.safetensors").stat().st_size
    assert runs[1]["topk_cache_mb"] == round(size / 2**20, 2) > 0
