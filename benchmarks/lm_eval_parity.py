"""lm-eval parity: the packaged tasks through the `leanlm` model and through lm-eval's own `hf` model.

The hf side loads the transformers copy of the same weights (`leanlm.save`, i.e. `leanlm convert`);
both run in one process with the same lm-eval task configs. Prints per task both scores, the largest
log-likelihood difference over every (document, choice), and how many generations are identical.

    /work/venvs/lmeval/bin/python benchmarks/lm_eval_parity.py --threads 1 --json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--tasks", default="leanlm_mc,leanlm_cloze,leanlm_capitals")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import torch
    import lm_eval.models.huggingface  # noqa: F401  (registers lm-eval's own "hf" model)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import leanlm
    from leanlm.eval.lm_eval_bridge import task_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = args.tasks.split(",")
    tm = TaskManager(include_path=str(task_dir()))
    kw = dict(tasks=tasks, limit=args.limit, task_manager=tm, log_samples=True, bootstrap_iters=0)
    with tempfile.TemporaryDirectory() as d:
        m, t = leanlm.load(args.model)
        leanlm.save(m, t, d)  # what `leanlm convert` writes; transformers loads it
        del m
        t0 = time.perf_counter()
        ours = simple_evaluate(model="leanlm", model_args=f"pretrained={args.model or ''},batch_size={args.batch_size}",
                               **kw)
        t1 = time.perf_counter()
        ref = simple_evaluate(model="hf", model_args=f"pretrained={d},dtype=float32,batch_size={args.batch_size}",
                              device="cpu", **kw)
        t2 = time.perf_counter()
    out = {"leanlm_s": t1 - t0, "hf_s": t2 - t1, "tasks": {}}
    for task in tasks:
        ma = {k: v for k, v in ours["results"][task].items() if "," in k and "stderr" not in k}
        mb = {k: v for k, v in ref["results"][task].items() if "," in k and "stderr" not in k}
        diff, same, n = 0.0, 0, 0
        for sa, sb in zip(ours["samples"][task], ref["samples"][task]):
            n += 1
            if sa["filtered_resps"] == sb["filtered_resps"]:
                same += 1
            for ra, rb in zip(sa["resps"], sb["resps"]):
                if isinstance(ra[0], (list, tuple)):
                    diff = max(diff, abs(float(ra[0][0]) - float(rb[0][0])))
        out["tasks"][task] = {"leanlm": ma, "hf": mb, "equal": ma == mb, "max_abs_loglik_diff": diff,
                              "identical_responses": f"{same}/{n}"}
    for task, r in out["tasks"].items():
        print(f"{task}: leanlm {r['leanlm']} hf {r['hf']} equal={r['equal']} "
              f"max |d loglik|={r['max_abs_loglik_diff']:.2e} identical={r['identical_responses']}", file=sys.stderr)
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
