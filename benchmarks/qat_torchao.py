"""QAT side by side: torchao's fake quantization (on the transformers copy of the model) and leanlm's `w4a16-qat-g32`.

Both variants train by the same loop (leanlm.train.loop: the same batches in the same order, AdamW, warm-up
and cosine schedule, the same learning rate) with the same loss (forward KL at temperature 1 against the
fp32 model, every position), on the same calibration windows. Only the model and its fake quantization
differ:
  torchao      transformers' LlamaForCausalLM, `quantize_(model, QATConfig(weight_config=IntxFakeQuantizeConfig(
               torch.int4, group_size=32), step="prepare"))` on every decoder linear (the tied output head left
               out, as leanlm leaves it); torchao's default grid is symmetric. Perplexity is the fake-quantized
               model's.
  leanlm       leanlm's `qat` step (asymmetric 4-bit groups of 32 by default, as the recipe name gives it),
               converted to packed QuantLinear afterwards; perplexity is the packed model's.
  leanlm-sym   the same with `sym: true` (torchao's grid).
Every variant runs in its own process (peak RSS is the process's) and prints one JSON line: perplexity on
the held-out technical text before training (fake-quantized, step 0) and after, seconds per step (median;
the first step is left out as warm-up), peak RSS.

    /work/venvs/torchao/bin/python benchmarks/qat_torchao.py all --steps 4 --batch 2 --seq-len 128 --threads 1
(needs torchao in the interpreter: `python3 -m venv --system-site-packages /work/venvs/torchao &&
/work/venvs/torchao/bin/pip install torchao==0.18.0`; the leanlm variants run under it too.)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
VARIANTS = ("torchao", "leanlm", "leanlm-sym")


def windows(tok, text: str, ctx: int):
    import torch

    ids = tok.encode(text, add_special=False)
    return [torch.tensor([ids[i:i + ctx]]) for i in range(0, len(ids) - 1, ctx) if len(ids[i:i + ctx]) > 1]


def perplexity(logits_fn, wins) -> float:
    import math

    import torch
    import torch.nn.functional as F

    nll, n = 0.0, 0
    with torch.no_grad():
        for w in wins:
            lg = logits_fn(w)[0, :-1].float()
            nll += float(F.cross_entropy(lg, w[0, 1:], reduction="sum"))
            n += w.shape[1] - 1
    return math.exp(nll / n)


def job(a) -> dict:
    import tempfile

    import torch

    import leanlm
    from leanlm.data import calibration_samples, packaged_text
    from leanlm.compress.recover import windows as train_windows
    from leanlm.train.loop import TrainConfig, peak_rss_mb, train
    from leanlm.train.losses import divergence

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    teacher, tok = leanlm.load(a.model, dtype=torch.float32)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    wins = windows(tok, packaged_text("tech")[: a.eval_chars], 512)
    samples = calibration_samples(tok, a.samples, a.seq_len, seed=0)
    data = train_windows(samples, a.seq_len)
    out = {"variant": a.variant, "steps": a.steps, "batch": a.batch, "seq_len": a.seq_len, "threads": a.threads,
           "eval_tokens": sum(w.shape[1] for w in wins)}
    times = []
    last = [time.perf_counter()]

    def tick(step, loss):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now
        out.setdefault("first_loss", loss)
        out["last_loss"] = loss

    if a.variant == "torchao":
        import torch.nn as nn
        import transformers
        from torchao.quantization import quantize_
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

        from leanlm.model.layout import HEAD

        folder = tempfile.mkdtemp(prefix="qat_torchao_")
        leanlm.save(teacher, tok, folder)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        # torchao 0.18 refuses a fake-quantize config as the positional base_config: weights only, by keyword
        quantize_(model, QATConfig(weight_config=IntxFakeQuantizeConfig(torch.int4, group_size=32), step="prepare"),
                  filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn != HEAD)
        out["fake_quantized_linears"] = sum(type(m).__name__ == "FakeQuantizedLinear" for m in model.modules())
        logits = lambda ids: model(ids).logits  # noqa: E731
        out["ppl_start"] = perplexity(logits, wins)

        def loss_fn(m, ids, labels):
            s = m(ids).logits[:, :-1].flatten(0, 1)
            with torch.no_grad():
                t = teacher(ids)[:, :-1].flatten(0, 1)
            return divergence(s, t, "fkl").mean(), s.shape[0]
        for p in model.parameters():
            p.requires_grad_(True)
        tcfg = TrainConfig(max_steps=a.steps, batch_size=a.batch, lr=a.lr, warmup_steps=a.warmup, seed=0,
                           progress=False)
        last[0] = time.perf_counter()
        train(model, data, tcfg, loss_fn=loss_fn, callback=tick)
        out["ppl_end"] = perplexity(logits, wins)
    else:
        import copy

        import leanlm.compress.qat as qat
        from leanlm.compress.qat import QATConfig as LeanQAT, qat_step
        from leanlm.model.layout import all_block_linears

        from leanlm.compress.recipe import apply_recipe, parse_recipe

        model = copy.deepcopy(teacher)
        cfg = LeanQAT(bits=4, group_size=32, sym=a.variant == "leanlm-sym", steps=a.steps, batch_size=a.batch,
                      seq_len=a.seq_len, lr=a.lr, warmup=a.warmup, progress=False)
        start = copy.deepcopy(model)  # step 0: the fake-quantized model is RTN on the same grid
        rtn = f"- method: rtn\n  bits: 4\n  group_size: 32\n  sym: {str(cfg.sym).lower()}\n"
        apply_recipe(start, parse_recipe(rtn), None, progress=False)
        out["ppl_start"] = perplexity(lambda ids: start(ids), wins)
        del start
        orig = qat.distill_step
        qat.distill_step = lambda *x, **k: orig(*x, **{**k, "callback": tick})
        last[0] = time.perf_counter()
        qat_step(model, cfg, all_block_linears(model), samples, original=teacher)
        qat.distill_step = orig
        out["ppl_end"] = perplexity(lambda ids: model(ids), wins)
    out["s_per_step"] = statistics.median(times[1:]) if len(times) > 1 else times[0]
    out["step_s_all"] = [round(t, 2) for t in times]
    out["peak_rss_mb"] = peak_rss_mb()
    out["loadavg"] = os.getloadavg()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=VARIANTS + ("all",))
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--samples", type=int, default=16, help="calibration windows (training text)")
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--eval-chars", type=int, default=8000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="append the JSON lines to this file")
    a = ap.parse_args()
    if a.what != "all":
        a.variant = a.what
        print(json.dumps(job(a)), flush=True)
        return
    rows = []
    for v in VARIANTS:
        cmd = [sys.executable, os.path.abspath(__file__), v] + sys.argv[2:]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            err = r.stderr.strip().splitlines()
            rows.append({"variant": v, "error": err[-1] if err else r.returncode})
        else:
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
    print("| variant | ppl start | ppl end | s/step | peak RSS MB |\n|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | error: {r['error']} | | | |")
        else:
            print(f"| {r['variant']} | {r['ppl_start']:.2f} | {r['ppl_end']:.2f} | {r['s_per_step']:.2f} | "
                  f"{r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
