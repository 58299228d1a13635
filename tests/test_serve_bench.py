"""The side-by-side serving benchmark's helpers: which GGUF stands for a precision, llama-server's slots."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import serve_bench  # noqa: E402

from leanlm.errors import LeanLMError  # noqa: E402


def test_find_gguf_by_type_tag(tmp_path):
    for name in ("smol-f32.gguf", "smol-f16.gguf", "model.Q4_0.gguf", "smol-q8_0.gguf", "notes-f32.txt"):
        (tmp_path / name).write_bytes(b"")
    assert serve_bench.find_gguf(str(tmp_path), "f32").name == "smol-f32.gguf"
    assert serve_bench.find_gguf(str(tmp_path), "q4_0").name == "model.Q4_0.gguf"
    assert serve_bench.find_gguf(str(tmp_path), "q8_0").name == "smol-q8_0.gguf"
    (tmp_path / "other_f32.gguf").write_bytes(b"")
    with pytest.raises(LeanLMError, match="2 files"):
        serve_bench.find_gguf(str(tmp_path), "f32")
    with pytest.raises(LeanLMError, match="none"):
        serve_bench.find_gguf(str(tmp_path), "q4_1")
    with pytest.raises(LeanLMError, match="no such folder"):
        serve_bench.find_gguf(str(tmp_path / "missing"), "f32")


def test_precisions_and_server_commands():
    assert serve_bench.parse_precisions("FP32, q4_0,fp32") == ["fp32", "q4_0"]
    with pytest.raises(LeanLMError, match="choose from"):
        serve_bench.parse_precisions("fp32,q4_k")
    cmd = serve_bench.llama_cmd("llama-server", "m.gguf", 8081, threads=2, slots=16, slot_ctx=512)
    assert cmd[cmd.index("-np") + 1] == "16" and cmd[cmd.index("-c") + 1] == str(16 * 512)
    assert cmd[cmd.index("-t") + 1] == cmd[cmd.index("-tb") + 1] == "2"
    cmd = serve_bench.leanlm_cmd(None, 8082, threads=2, slots=16, max_batch_tokens=512)
    assert cmd[cmd.index("--max-num-seqs") + 1] == "16" and cmd[cmd.index("--threads") + 1] == "2"
    assert cmd[3] == "serve" and cmd[4] == "--port"
