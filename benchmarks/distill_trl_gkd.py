"""TRL's GKDTrainer and `leanlm distill` side by side: same teacher, student, text, order, steps and loss.

    python3 benchmarks/distill_trl_gkd.py --trl-python /work/venvs/trl/bin/python --work /tmp/gkd \
        --steps 8 --batch 2 --seq-len 128 --lr 1e-4 --threads 1 --eval-chars 6000 [--parallel] \
        [--lmbda-row 1 [--only-on-policy]]

TRL is not a leanlm dependency: it runs in a venv of its own (`python3 -m venv --system-site-packages
/work/venvs/trl && /work/venvs/trl/bin/pip install trl==1.16.0`), as a subprocess. One run does, in order:
1. check:   benchmarks/check_trl_jsd.py in the venv (leanlm's generalized JSD == TRL's on the same logits),
            beside stage 2;
2. prepare: teacher = the default model (fp32 folder in leanlm's cache); student = the default model with
            4 blocks dropped (the `layerdrop-4` recipe, calibrated on the packaged mix), saved by
            `leanlm.save` as a plain Llama folder; training rows = windows of --seq-len tokens of the
            packaged calibration text, written in the order leanlm's training loop visits them;
3. leanlm:  `leanlm.train.distill.distill` (what `leanlm distill --loss jsd` runs) in its own process;
4. trl:     `trl.experimental.gkd.GKDTrainer` with lmbda 0 in its own process, the same rows in that order
            (sequential sampler);
5. eval:    leanlm's perplexity (held-out technical text, first --eval-chars characters, windows of 512)
            of the student before training and of both trained students, one process, loaded the same way.
Stages 3 and 4 run one after the other, or with --parallel at the same time (one process each, so both
see the same load on a shared machine; the student's perplexity before is then measured beside them and
each trained student in a process of its own). --lmbda-row L adds an on-policy pair (leanlm and TRL, a
share L of batches replaced by --new-tokens sampled by the student after --prompt-tokens of each row).
Both trainers: AdamW (torch; betas 0.9/0.999, eps 1e-8, no weight decay), gradient clipping at 1.0, no
warm-up, a cosine schedule to 0.1 x lr (TRL: `cosine_with_min_lr`, min_lr_rate 0.1), fp32, no gradient
checkpointing, generalized JSD with beta 0.5 at temperature 1 over every position but the last, torch
threads = --threads. Each job reports its losses, the learning rate of every step, seconds per step
(end of step 1 to the end of the last step, over steps - 1: start-up and the first step excluded), in
wall time and in the process's CPU time, and its peak RSS at the end of training (ru_maxrss, before saving).
Prints a Markdown table and, last, one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def last_json(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise SystemExit("a stage printed no JSON line")
    return json.loads(lines[-1])


# ---- stage 2: teacher folder, student folder, training rows -------------------------------------------

def prepare(a) -> dict:
    import torch

    import leanlm
    from leanlm.compress.recipe import apply_recipe, load_recipe
    from leanlm.data import calibration_samples, packaged_text
    from leanlm.data.instruct import text_examples
    from leanlm.io.registry import converted_dir, default_gguf_path
    from leanlm.train.loop import micro_batch

    torch.set_num_threads(a.threads)
    work = Path(a.work)
    model, tok = leanlm.load(dtype=torch.float32)  # fills the cache: its fp32 folder is the teacher
    teacher = converted_dir(default_gguf_path())
    student = work / "student"
    if not (student / "model.safetensors").exists():
        samples = calibration_samples(tok, a.calib_samples, 256, seed=0)
        apply_recipe(model, load_recipe(a.student_recipe), samples, progress=False)
        leanlm.save(model, tok, student)
    rows = [e for e in text_examples(packaged_text("calib"), tok, a.seq_len) if len(e["input_ids"]) == a.seq_len]
    order = [e for pos in range(a.steps) for e in micro_batch(rows, pos, a.batch, a.seed)]
    (work / "rows.json").write_text(json.dumps(rows))
    (work / "order.json").write_text(json.dumps(order))
    return {"teacher": str(teacher), "student": str(student), "rows": len(rows), "ordered_rows": len(order)}


# ---- stage 3: leanlm ------------------------------------------------------------------------------

def job_leanlm(a) -> dict:
    t_start = time.perf_counter()
    import torch

    import leanlm
    from leanlm.compress.recover import DistillStepConfig, make_trainable
    from leanlm.train.distill import distill

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    work = Path(a.work)
    rows = json.loads((work / "rows.json").read_text())
    teacher, _ = leanlm.load(a.teacher, dtype=torch.float32)
    student, tok = leanlm.load(a.student, dtype=torch.float32)
    # what `leanlm distill --loss jsd --beta 0.5 --warmup 0` builds (leanlm/train/distill_cli.py)
    cfg = DistillStepConfig(loss="jsd", beta=0.5, temperature=1.0, steps=a.steps, lr=a.lr, batch_size=a.batch,
                            seq_len=a.seq_len, warmup=0, seed=a.seed, progress=False, on_policy=a.lmbda,
                            on_policy_prompt=a.prompt_tokens, on_policy_tokens=a.new_tokens)
    cfg.validate()
    undo = make_trainable(student, cfg)
    ends, cpu, losses = [], [], []

    def cb(step, loss):
        ends.append(time.perf_counter())
        cpu.append(time.process_time())
        losses.append(loss)
    tag = "" if not a.lmbda else f"-lmbda{a.lmbda}"
    run_dir = work / f"leanlm-run{tag}"
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    distill(student, teacher, rows, cfg, out_dir=str(run_dir), progress=False, pad_id=tok.pad_id or 0, callback=cb)
    peak = peak_rss_mb()
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    undo()
    log = [json.loads(ln) for ln in (run_dir / "log.jsonl").read_text().splitlines()]
    leanlm.save(student, tok, work / f"student-leanlm{tag}")
    return {"trainer": "leanlm", "lmbda": a.lmbda, "steps": len(losses), "losses": losses,
            "lrs": [r["lr"] for r in log],
            "startup_s": t0 - t_start, "first_step_s": ends[0] - t0,
            "s_per_step": (ends[-1] - ends[0]) / max(1, len(ends) - 1),
            "cpu_s_per_step": (cpu[-1] - cpu[0]) / max(1, len(cpu) - 1), "peak_rss_mb": peak,
            "trainable": trainable, "output": str(work / f"student-leanlm{tag}")}


# ---- stage 4: TRL's GKDTrainer (run by the venv's python) -----------------------------------------

def job_trl(a) -> dict:
    t_start = time.perf_counter()
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    torch.set_num_threads(a.threads)
    work = Path(a.work)
    order = json.loads((work / "order.json").read_text())
    ds = Dataset.from_dict({"input_ids": [e["input_ids"] for e in order], "labels": [e["labels"] for e in order]})
    tok = AutoTokenizer.from_pretrained(a.student)
    student = AutoModelForCausalLM.from_pretrained(a.student, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(a.teacher, dtype=torch.float32)

    def collate(batch):  # every row is a full window: no padding
        ids = torch.tensor([b["input_ids"] for b in batch])
        prompts = ids[:, :a.prompt_tokens]  # used only by on-policy steps (lmbda > 0), as leanlm's are
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": torch.tensor([b["labels"] for b in batch]),
                "prompts": prompts, "prompt_attention_mask": torch.ones_like(prompts)}

    ends, cpu, losses, lrs, counts = [], [], [], [], []

    class Counted(GKDTrainer):  # records, per step, the positions scored and the count the loss is divided by
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            counts.append((int((inputs["labels"][:, 1:] != -100).sum()),
                           None if num_items_in_batch is None else int(num_items_in_batch)))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            lrs.append(kw["optimizer"].param_groups[0]["lr"])

        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())
            cpu.append(time.process_time())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    cfg = GKDConfig(
        output_dir=str(work / "trl-run"), max_steps=a.steps, per_device_train_batch_size=a.batch,
        gradient_accumulation_steps=1, learning_rate=a.lr, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=0, weight_decay=0.0, optim="adamw_torch",
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, bf16=False, fp16=False,
        gradient_checkpointing=False, lmbda=a.lmbda, beta=0.5, temperature=1.0, seq_kd=False,
        max_new_tokens=a.new_tokens, max_length=a.seq_len, use_cpu=True, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False,
        train_sampling_strategy="sequential", seed=a.seed)
    trainer = Counted(model=student, teacher_model=teacher, args=cfg, data_collator=collate, train_dataset=ds,
                         processing_class=tok, callbacks=[Clock()])
    t0 = time.perf_counter()
    trainer.train()
    peak = peak_rss_mb()
    out = work / ("student-trl" if not a.lmbda else f"student-trl-lmbda{a.lmbda}")
    trainer.save_model(str(out))
    return {"trainer": "trl", "trl": trl.__version__, "lmbda": a.lmbda, "steps": len(ends), "losses": losses,
            "lrs": lrs, "startup_s": t0 - t_start, "first_step_s": ends[0] - t0,
            "s_per_step": (ends[-1] - ends[0]) / max(1, len(ends) - 1),
            "cpu_s_per_step": (cpu[-1] - cpu[0]) / max(1, len(cpu) - 1), "peak_rss_mb": peak,
            "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
            "scored": [c[0] for c in counts], "divided_by": [c[1] for c in counts],
            # the same losses as means over the positions scored (what leanlm reports)
            "losses_per_scored": [x * (d or n) / max(1, n) for x, (n, d) in zip(losses, counts)],
            "output": str(out)}


# ---- stage 5: perplexity, one process, every folder loaded the same way ---------------------------

def evaluate(a) -> dict:
    import torch

    import leanlm
    from leanlm.data import packaged_text
    from leanlm.eval.perplexity import perplexity

    torch.set_num_threads(a.threads)
    text = packaged_text("tech")[: a.eval_chars]
    out = {}
    for folder in a.folders.split(","):
        model, tok = leanlm.load(folder, dtype=torch.float32)
        out[folder] = perplexity(model, tok, text, ctx=512, stride=512, progress=False)["perplexity"]
        del model
    return out


# ---- the run ------------------------------------------------------------------------------------

def stage(py: str, mode: str, a, extra: list[str] = ()):
    """Start one stage in its own process; the returned function waits for it and returns its JSON."""
    cmd = [py, str(Path(__file__).resolve()), mode, "--work", a.work, "--steps", str(a.steps), "--batch",
           str(a.batch), "--seq-len", str(a.seq_len), "--lr", str(a.lr), "--threads", str(a.threads),
           "--seed", str(a.seed), "--eval-chars", str(a.eval_chars), *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads),
               TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false")
    load0, t0 = os.getloadavg(), time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)

    def wait() -> dict:
        out, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"stage {mode} failed (exit {p.returncode})")
        r = last_json(out)
        r["wall_s"] = time.perf_counter() - t0
        r["loadavg_start"], r["loadavg_end"] = load0, os.getloadavg()
        print(f"# {mode}: {json.dumps(r)[:400]}", file=sys.stderr, flush=True)
        return r
    return wait


def run(a) -> int:
    Path(a.work).mkdir(parents=True, exist_ok=True)
    res = {"settings": {k: getattr(a, k) for k in ("steps", "batch", "seq_len", "lr", "threads", "seed",
                                                  "eval_chars", "student_recipe", "lmbda_row", "parallel",
                                                  "only_on_policy")}}
    chk = subprocess.Popen([a.trl_python, str(ROOT / "benchmarks" / "check_trl_jsd.py")], stdout=subprocess.PIPE,
                           text=True, env=dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1"))
    prep = stage(sys.executable, "prepare", a, ["--student-recipe", a.student_recipe,
                                                "--calib-samples", str(a.calib_samples)])()
    res["prepare"] = prep
    res["check"] = last_json(chk.communicate()[0])
    if chk.returncode:
        raise SystemExit(f"the two losses disagree on the same logits: {res['check']}")
    models = ["--teacher", prep["teacher"], "--student", prep["student"]]
    if a.only_on_policy and not a.lmbda_row:
        raise SystemExit("--only-on-policy needs --lmbda-row")
    jobs = [] if a.only_on_policy else [("leanlm", sys.executable, []), ("trl", a.trl_python, [])]
    if a.lmbda_row:  # on-policy: both sample --new-tokens after --prompt-tokens of each row, at temperature 1
        x = ["--lmbda", str(a.lmbda_row), "--new-tokens", str(a.new_tokens), "--prompt-tokens", str(a.prompt_tokens)]
        jobs += [("leanlm_on_policy", sys.executable, x), ("trl_on_policy", a.trl_python, x)]
    before = None
    if a.parallel:  # all trainings (and the student's perplexity before) at once: each sees the same load
        before = stage(sys.executable, "eval", a, ["--folders", prep["student"]])
        waits = [(k, stage(py, k.split("_")[0], a, models + x)) for k, py, x in jobs]
        for k, w in waits:
            res[k] = w()
        before = before()
    else:  # one after the other
        for k, py, x in jobs:
            res[k] = stage(py, k.split("_")[0], a, models + x)()
    rows = [res[k] for k, _, _ in jobs]
    if a.parallel:
        evals = [stage(sys.executable, "eval", a, ["--folders", r["output"]]) for r in rows]
        ppl = dict(before)
        for w in evals:
            ppl.update(w())
    else:
        folders = ",".join([prep["student"]] + [r["output"] for r in rows])
        ppl = stage(sys.executable, "eval", a, ["--folders", folders])()
    res["ppl_before"] = ppl[prep["student"]]
    for r in rows:
        r["ppl_after"] = ppl[r["output"]]
    lean, trl_ = rows[0], rows[1]  # the first (leanlm, TRL) pair
    lr_diff = max(abs(x - y) / y for x, y in zip(lean["lrs"], trl_["lrs"]))
    res["max_lr_rel_diff"] = lr_diff
    res["first_loss_diff"] = abs(lean["losses"][0] - trl_["losses"][0])
    print("| trainer | steps | ppl before | ppl after | s/step | CPU s/step | peak RSS MB | first loss | last loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        name = f"leanlm distill (lmbda {r['lmbda']})" if r["trainer"] == "leanlm" else \
            f"TRL GKDTrainer (lmbda {r['lmbda']})"
        print(f"| {name} | {r['steps']} | {res['ppl_before']:.2f} | {r['ppl_after']:.2f} | {r['s_per_step']:.2f} | "
              f"{r['cpu_s_per_step']:.2f} | {r['peak_rss_mb']:.0f} | {r['losses'][0]:.4f} | {r['losses'][-1]:.4f} |")
    for ln, tr in zip(rows[0::2], rows[1::2]):  # (leanlm, TRL) pairs: off-policy, then on-policy
        print(f"| leanlm / TRL (lmbda {ln['lmbda']}) | | | {ln['ppl_after'] / tr['ppl_after']:.3f} | "
              f"{ln['s_per_step'] / tr['s_per_step']:.3f} | {ln['cpu_s_per_step'] / tr['cpu_s_per_step']:.3f} | "
              f"{ln['peak_rss_mb'] / tr['peak_rss_mb']:.3f} | | |")
    for r in rows:
        if r["trainer"] == "trl" and r["lmbda"]:
            print(f"TRL (lmbda {r['lmbda']}): positions scored per step {r['scored']}, loss divided by "
                  f"{r['divided_by']}; its losses as means over the positions scored: "
                  + ", ".join(f"{x:.4f}" for x in r["losses_per_scored"]))
    print(f"largest relative difference of the per-step learning rates: {lr_diff:.2e}; "
          f"first-step loss difference: {res['first_loss_diff']:.2e}")
    if a.out:
        Path(a.out).write_text(json.dumps(res) + "\n")
    print(json.dumps(res))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", nargs="?", default="run", choices=["run", "prepare", "leanlm", "trl", "eval"])
    p.add_argument("--trl-python", default="/work/venvs/trl/bin/python", help="a python with trl==1.16.0")
    p.add_argument("--work", default="/tmp/leanlm-gkd", help="folder for the student, rows and trained models")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-chars", type=int, default=20000)
    p.add_argument("--student-recipe", default="layerdrop-4")
    p.add_argument("--calib-samples", type=int, default=16, help="calibration windows (256 tokens) for the recipe")
    p.add_argument("--lmbda-row", type=float, default=0.0,
                   help="also run TRL on-policy with this lmbda (HF generate samples from the student)")
    p.add_argument("--lmbda", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--only-on-policy", action="store_true", help="with --lmbda-row: skip the lmbda 0 pair")
    p.add_argument("--new-tokens", type=int, default=64, help="on-policy row: tokens the student samples")
    p.add_argument("--prompt-tokens", type=int, default=16, help="on-policy row: prompt tokens kept from each row")
    p.add_argument("--teacher", default=None, help=argparse.SUPPRESS)
    p.add_argument("--student", default=None, help=argparse.SUPPRESS)
    p.add_argument("--folders", default=None, help=argparse.SUPPRESS)
    p.add_argument("--parallel", action="store_true",
                   help="run the trainings at the same time (each its own process) instead of one after the other")
    p.add_argument("--out", default=None, help="run: also write the JSON object to this file")
    a = p.parse_args()
    if a.mode == "run":
        return run(a)
    fn = {"prepare": prepare, "leanlm": job_leanlm, "trl": job_trl, "eval": evaluate}[a.mode]
    print(json.dumps(fn(a)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
