"""The leanlm model for lm-evaluation-harness against lm-eval's own `hf` model on the same weights.

lm-eval is an optional extra (leanlm[lmeval]: lm_eval==0.4.13 with datasets, pandas, pyarrow,
scikit-learn, ...), too heavy to be a test dependency, so these tests run where it is installed
(`/work/venvs/lmeval/bin/python -m pytest tests/test_lm_eval_bridge.py`) and skip elsewhere.
The packaged-task scorer the board uses without lm-eval is tested in tests/test_board.py.
"""
import pytest

import leanlm
from conftest import tiny_hf
from gguf_util import byte_vocab, write_tiny_gguf

lm_eval = pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("lmeval")
    g = write_tiny_gguf(d / "m.gguf", tiny_hf("llama", vocab_size=len(byte_vocab()[0]), seed=5), "Q8_0")
    m, t = leanlm.load(g, convert_cache=False)
    leanlm.save(m, t, d / "tiny")
    return d / "tiny"


def _both(folder):
    from lm_eval.models.huggingface import HFLM

    from leanlm.eval.lm_eval_bridge import LeanLMEval

    return LeanLMEval(pretrained=str(folder), batch_size=3), HFLM(pretrained=str(folder), dtype="float32",
                                                                  batch_size=3, device="cpu")


def _inst(kind, args):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_requests_equal_hf_model(folder):
    ours, hf = _both(folder)
    pairs = [("The cat sat on the", " mat"), ("the thin hat ", "then"), ("", "hello there"),
             ("a" * 30, " the end of a longer line")]
    a = ours.loglikelihood([_inst("loglikelihood", p) for p in pairs])
    b = hf.loglikelihood([_inst("loglikelihood", p) for p in pairs])
    for (la, ga), (lb, gb) in zip(a, b):
        assert la == pytest.approx(lb, abs=1e-3) and ga == gb
    texts = ["the cat in the hat sat on the mat " * 6, "x"]
    ra = ours.loglikelihood_rolling([_inst("loglikelihood_rolling", (s,)) for s in texts])
    rb = hf.loglikelihood_rolling([_inst("loglikelihood_rolling", (s,)) for s in texts])
    assert all(isinstance(x, float) for x in ra)
    assert ra == pytest.approx(rb, abs=1e-3)
    gen = [("the cat", {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}),
           ("in the hat", {"until": ["t"], "max_gen_toks": 8, "do_sample": False})]
    ga = ours.generate_until([_inst("generate_until", g) for g in gen])
    gb = hf.generate_until([_inst("generate_until", g) for g in gen])
    assert ga == gb


def test_packaged_tasks_equal_hf_model(folder):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from leanlm.eval.lm_eval_bridge import task_dir

    tasks = ["leanlm_mc", "leanlm_cloze", "leanlm_capitals"]
    tm = TaskManager(include_path=str(task_dir()))
    kw = dict(tasks=tasks, limit=6, task_manager=tm, log_samples=True, bootstrap_iters=0)
    ra = simple_evaluate(model="leanlm", model_args=f"pretrained={folder},batch_size=4", **kw)
    rb = simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32,batch_size=4", device="cpu", **kw)
    for t in tasks:
        ma = {k: v for k, v in ra["results"][t].items() if "," in k and "stderr" not in k}
        mb = {k: v for k, v in rb["results"][t].items() if "," in k and "stderr" not in k}
        assert ma == mb and ma
        for sa, sb in zip(ra["samples"][t], rb["samples"][t]):
            if t == "leanlm_capitals":
                assert sa["filtered_resps"] == sb["filtered_resps"]
            else:
                la = [float(r[0][0]) for r in sa["resps"]]
                lb = [float(r[0][0]) for r in sb["resps"]]
                assert la == pytest.approx(lb, abs=1e-3)


def test_cli_eval_tasks(folder, capsys):
    import json

    from leanlm.cli import main

    assert main(["eval", str(folder), "--tasks", "leanlm_mc", "--limit", "4", "--json"]) == 0
    out = capsys.readouterr().out
    res = json.loads(out.strip().splitlines()[-1])
    assert 0.0 <= res["results"]["leanlm_mc"]["acc,none"] <= 1.0
    assert "leanlm_mc" in out.split("\n{")[0]  # lm-eval's own table first
