"""Fine-tuning benchmark: every method on the default model and the packaged task, plus HF peft LoRA.

    python benchmarks/finetune.py --threads 2 --steps 12 --batch-size 4 --test-examples 24 --bf16

Each method runs in its own process (so peak RSS is its own): trainable parameters, peak RSS of the
whole process (ru_maxrss: includes loading the model), peak RSS right after loading, and of the
training phase (VmRSS sampled every 0.1 s from the first step on), median step time, and exact-match
accuracy before/after on the task's test split (greedy). `qlora` loads with
`leanlm.load(quantize=nf4_on_load(...))` (each target weight becomes NF4 as it is read; its accuracy
before is the NF4 base's); `qlora-fullload` loads the fp32 model first and quantizes it after (the
old path), for the memory comparison. `peft-lora` runs HF peft LoRA over the transformers model with the same
rank, targets, data, batch, steps, optimizer and threads; its accuracy is measured by loading the
adapter it wrote into leanlm (peft parity is tested in tests/test_peft.py). One JSON line per method
is appended to --out as soon as it finishes.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class RssSampler:
    def __init__(self):
        self.peak, self.stop = 0, False
        self.t = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop:
            with open("/proc/self/status") as f:
                for ln in f:
                    if ln.startswith("VmRSS:"):
                        self.peak = max(self.peak, int(ln.split()[1]) // 1024)
            time.sleep(0.1)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(args) -> dict:
    import gc

    import torch

    import leanlm
    from leanlm.data.instruct import record_example
    from leanlm.data.tasks import accuracy, get_task
    from leanlm.peft import trainable_parameters
    from leanlm.peft.cli import DEFAULT_LR, prepare
    from leanlm.train import TrainConfig, train

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    method = args.child
    if method == "peft-lora":  # the tokenizer only: leanlm's model must not count in peft's memory
        from leanlm.io.registry import converted_dir, default_gguf_path
        from leanlm.io.tokenizer import Tokenizer

        model, tok = None, Tokenizer.from_folder(converted_dir(default_gguf_path()))
    elif method == "qlora":  # quantize-on-load: the fp32 model is never whole in memory
        from leanlm.peft.qlora import nf4_on_load

        model, tok = leanlm.load(quantize=nf4_on_load(TARGETS))
    else:
        model, tok = leanlm.load()
    load_rss = peak_rss_mb()
    task = get_task("dates")
    data = [record_example(tok, r, "task") for r in task.records("train", args.steps * args.batch_size)]
    recs = task.records("test", args.test_examples)
    out = {"method": method, "steps": args.steps, "batch_size": args.batch_size, "threads": args.threads,
           "load_peak_rss_mb": round(load_rss)}
    if method == "base":  # the untuned model's accuracy, in its own process
        return {**out, "trainable_params": 0, "accuracy_before": accuracy(model, tok, task, recs)}
    lr = args.lr or DEFAULT_LR.get(method.replace("peft-", "").replace("-fullload", ""), 2e-3)
    if method == "peft-lora":
        return {**out, **peft_child(args, tok, data, recs, task, lr)}
    if method == "qlora" and not args.skip_accuracy:  # the NF4 base differs from the fp32 one
        out["accuracy_before"] = accuracy(model, tok, task, recs)
    method = method.replace("-fullload", "")
    opts = {}
    if method in ("lora", "dora", "lora-fa", "qlora"):
        opts = dict(r=args.rank, alpha=2 * args.rank, target_modules=TARGETS)
    elif method in ("prompt", "prefix"):
        opts = dict(num_virtual_tokens=16)
    model = prepare(model, tok, method, opts)
    gc.collect()
    times = []
    sampler = RssSampler()
    sampler.t.start()
    last = [time.perf_counter()]

    def cb(step, loss):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now
        print(f"  {method} step {step} loss {loss:.4f} {times[-1]:.1f}s", file=sys.stderr, flush=True)

    res = train(model, data, TrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=lr,
                                         optimizer="mezo" if method == "mezo" else "adamw",
                                         warmup_steps=min(5, args.steps // 4), bf16=args.bf16,
                                         grad_checkpointing=args.grad_checkpointing,
                                         progress=False), callback=cb)
    sampler.stop = True
    out.update(trainable_params=trainable_parameters(model), peak_rss_mb=round(res.peak_rss_mb),
               train_rss_mb=sampler.peak, step_s=round(statistics.median(times), 2),
               first_loss=round(res.losses[0], 4), last_loss=round(res.losses[-1], 4), lr=lr,
               accuracy_after=None if args.skip_accuracy else accuracy(model, tok, task, recs))
    return out


def peft_child(args, tok, data, recs, task, lr) -> dict:
    """HF peft LoRA on transformers: same examples, batches, optimizer, schedule and threads."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    import leanlm
    from leanlm.data.tasks import accuracy
    from leanlm.io.registry import converted_dir, default_gguf_path
    from leanlm.peft import load_adapter
    from leanlm.train.loop import collate, micro_batch
    from leanlm.train.optim import lr_at

    folder = converted_dir(default_gguf_path())
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    pm = get_peft_model(hf, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS,
                                       task_type="CAUSAL_LM"))
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    sampler = RssSampler()
    sampler.t.start()
    times, losses = [], []
    pm.train()
    warm = min(5, args.steps // 4)
    for step in range(args.steps):
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, lr, warm, args.steps, 0.1)
        ids, labels = collate(micro_batch(data, step, args.batch_size, 0), 0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = pm(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
        print(f"  peft-lora step {step + 1} loss {losses[-1]:.4f} {times[-1]:.1f}s", file=sys.stderr, flush=True)
    sampler.stop = True
    peak = peak_rss_mb()
    trainable = sum(p.numel() for p in params)
    with tempfile.TemporaryDirectory() as d:
        pm.save_pretrained(d)
        del pm, hf
        model, _ = leanlm.load()
        model = load_adapter(model, d)
        acc = None if args.skip_accuracy else accuracy(model, tok, task, recs)
    return dict(trainable_params=trainable, peak_rss_mb=round(peak), train_rss_mb=sampler.peak,
                step_s=round(statistics.median(times), 2), first_loss=round(losses[0], 4),
                last_loss=round(losses[-1], 4), lr=lr, accuracy_after=acc)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="base,lora,peft-lora,qlora,dora,lora-fa,ia3,prompt,prefix,mezo")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--test-examples", type=int, default=32)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--out", default="finetune_bench.jsonl", help="JSON lines, appended per method")
    ap.add_argument("--skip-accuracy", action="store_true", help="time and memory only")
    ap.add_argument("--grad-checkpointing", action="store_true", help="leanlm methods only")
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return
    for m in args.methods.split(","):
        cmd = [sys.executable, __file__, "--child", m, "--threads", str(args.threads), "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--rank", str(args.rank),
               "--test-examples", str(args.test_examples)] + (["--bf16"] if args.bf16 else []) + \
              (["--skip-accuracy"] if args.skip_accuracy else []) + \
              (["--grad-checkpointing"] if args.grad_checkpointing else []) + \
              (["--lr", str(args.lr)] if args.lr else [])
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=False, stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            print(f"{m}: failed (exit {proc.returncode})", file=sys.stderr)
            continue
        rec = json.loads(proc.stdout.strip().splitlines()[-1])
        rec["wall_s"] = round(time.time() - t0, 1)
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
