"""`leanlm finetune` and `leanlm distill` under torchrun's environment: two gloo processes with FSDP2 follow
one process (same per-step losses, same saved weights), and the choice of device."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from leanlm.errors import LeanLMError
from leanlm.train.distributed import device_for
from test_distill_cli import pair  # noqa: F401  (fixture: a tiny GGUF teacher and student)
from test_peft_cli import tiny_folder  # noqa: F401  (fixture: a tiny saved model with a chat template)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, port, args):
    from leanlm.cli import main

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    assert main(args) == 0


def _two_processes(args):
    mp.spawn(_rank_main, args=(_free_port(), args), nprocs=2, join=True)


def _losses(out):
    import json

    return [json.loads(x)["loss"] for x in (out / "log.jsonl").read_text().splitlines()]


def _same_weights(a, b, tol=1e-5):
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert (ta[k].float() - tb[k].float()).abs().max() < tol, k


def test_finetune_lora_two_processes_follow_one(tiny_folder, tmp_path):  # noqa: F811
    base = ["finetune", str(tiny_folder), "--method", "lora", "--max-steps", "3", "--batch-size", "4",
            "--train-examples", "16", "--test-examples", "4", "--save-every", "0", "--lr", "1e-2",
            "--no-progress", "--device", "cpu"]
    from leanlm.cli import main

    assert main(base + ["--threads", "1", "-o", str(tmp_path / "one")]) == 0
    _two_processes(base + ["-o", str(tmp_path / "two")])
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), abs=1e-5)
    one, two = (sorted((tmp_path / d / "adapter").glob("*.safetensors")) for d in ("one", "two"))
    assert [p.name for p in one] == [p.name for p in two] and one
    for a, b in zip(one, two):
        _same_weights(a, b)


def test_distill_two_processes_follow_one(pair, tmp_path):  # noqa: F811
    data = tmp_path / "d.txt"
    data.write_text("the cat sat on the mat while the dog slept by the door. " * 80)
    base = ["distill", "--teacher", str(pair[0]), "--student", str(pair[1]), "--data", str(data), "--steps", "3",
            "--batch-size", "4", "--seq-len", "32", "--lr", "1e-2", "--loss", "fkl", "--no-eval", "--no-progress",
            "--device", "cpu"]
    from leanlm.cli import main

    assert main(base + ["--threads", "1", "-o", str(tmp_path / "one")]) == 0
    _two_processes(base + ["-o", str(tmp_path / "two")])
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), abs=1e-5)
    _same_weights(tmp_path / "one" / "model" / "model.safetensors", tmp_path / "two" / "model" / "model.safetensors")


def test_device_choice(monkeypatch):
    assert device_for("auto") == torch.device("cpu")  # this test machine has no CUDA
    assert device_for("cpu") == torch.device("cpu")
    with pytest.raises(LeanLMError, match="no CUDA device"):
        device_for("cuda")
    with pytest.raises(LeanLMError, match="choose one of"):
        device_for("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert device_for("auto") == torch.device("cuda", 1)  # each torchrun rank owns its own GPU
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(LeanLMError, match="LOCAL_RANK 2"):
        device_for("auto")
