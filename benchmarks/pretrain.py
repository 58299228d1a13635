"""Pre-training benchmarks: the optimizer speedrun table, model growth, and 1 vs 2 processes.

    python benchmarks/pretrain.py speedrun --steps 200 --out docs/bench/pretrain-speedrun.jsonl
    python benchmarks/pretrain.py growth --out docs/bench/pretrain-growth.jsonl
    python benchmarks/pretrain.py mqa --steps 60 --out docs/bench/pretrain-uptrain.jsonl
    python benchmarks/pretrain.py moe --experts 4 --steps 60 --out docs/bench/pretrain-uptrain.jsonl

speedrun: the `tiny` shape on the packaged calibration text (rows of 128 tokens, 5% held out), every
optimizer from the same init and data order; validation loss every `--eval-every` steps; the table gives
the first evaluated step at which each run reaches the target loss (default: what the best tuned AdamW
run reaches at the end) and the seconds to it. Step counts do not depend on machine load; seconds do.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import leanlm  # noqa: E402
from leanlm.train import TrainConfig, train  # noqa: E402
from leanlm.train.pretrain import builtin_config, grow_depth, new_model, pack, read_documents  # noqa: E402
from leanlm.train.pretrain_cli import full_sequence_loss  # noqa: E402

# (optimizer, lr, bf16 autocast): AdamW's learning rate is swept; the others get one or two values.
RUNS = [("adamw", 3e-3, False), ("adamw", 1e-2, False), ("adamw", 3e-2, False), ("muon", 1e-2, False),
        ("muon", 3e-2, False), ("lion", 1e-3, False), ("adam-mini", 1e-2, False), ("schedule-free", 1e-2, False),
        ("adamw", 1e-2, True)]


def corpus(seq_len):
    tok = leanlm.load()[1]
    tr, va = pack(read_documents("packaged:calib"), tok, seq_len, 0.05)
    return tok, tr, va[:16]


def run_one(cfg, tr, va, optimizer, lr, bf16, steps, eval_every, batch, init_state=None):
    model = new_model(cfg, seed=0)
    if init_state is not None:
        model = init_state
    for p in model.parameters():
        p.requires_grad_(True)
    curve = []

    t0 = time.perf_counter()
    tc = TrainConfig(max_steps=steps, batch_size=batch, lr=lr, optimizer=optimizer, warmup_steps=10,
                     schedule="wsd" if optimizer != "schedule-free" else "constant", bf16=bf16,
                     eval_every=eval_every, progress=False, seed=0)
    res = train(model, tr, tc, eval_data=va, loss_fn=full_sequence_loss)
    wall = time.perf_counter() - t0
    for e in res.evals:
        curve.append((e["step"], e["eval_loss"]))
    return {"optimizer": optimizer, "lr": lr, "bf16": bf16, "steps": steps, "seconds": round(wall, 1),
            "step_s": round(wall / steps, 3), "curve": curve, "final_val": curve[-1][1] if curve else None,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def steps_to(curve, target):
    return next((s for s, v in curve if v <= target), None)


def speedrun(a):
    tok, tr, va = corpus(a.seq_len)
    cfg = builtin_config(a.shape, tok, a.seq_len)
    rows = []
    for opt, lr, bf16 in RUNS:
        r = run_one(cfg, tr, va, opt, lr, bf16, a.steps, a.eval_every, a.batch)
        rows.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "curve"}), flush=True)
        with open(a.out, "a") as f:
            f.write(json.dumps({"bench": "speedrun", "shape": a.shape, **r}) + "\n")
    adam = [r for r in rows if r["optimizer"] == "adamw" and not r["bf16"]]
    target = a.target or min(r["final_val"] for r in adam)
    best_adam = min((steps_to(r["curve"], target) or 10**9) for r in adam)
    print(f"\ntarget validation loss {target:.4f} (best tuned AdamW at step {a.steps})")
    print("| optimizer | lr | bf16 | steps to target | x AdamW steps | s/step | final val |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        s = steps_to(r["curve"], target)
        ratio = f"{s / best_adam:.2f}" if s else "-"
        print(f"| {r['optimizer']} | {r['lr']:g} | {r['bf16']} | {s or 'not reached'} | {ratio} | "
              f"{r['step_s']} | {r['final_val']:.4f} |")


def growth(a):
    """Train the small model for S steps, grow it to twice the depth and continue; against the big model
    from scratch. Compute = 6 N tokens summed over both phases."""
    tok, tr, va = corpus(a.seq_len)
    small_cfg = builtin_config(a.shape, tok, a.seq_len)
    tokens = a.batch * a.seq_len
    small = new_model(small_cfg, seed=0)
    r1 = run_one(small_cfg, tr, va, "adamw", 3e-3, False, a.steps, a.eval_every, a.batch, init_state=small)
    n_small = small.num_parameters()
    grown = grow_depth(small, 2)
    r2 = run_one(grown.config, tr, va, "adamw", 3e-3, False, a.steps, a.eval_every, a.batch, init_state=grown)
    n_big = grown.num_parameters()
    scratch = run_one(grown.config, tr, va, "adamw", 3e-3, False, 2 * a.steps, a.eval_every, a.batch)
    target = a.target or scratch["final_val"]

    def compute(curve, n, offset=0.0):
        s = steps_to(curve, target)
        return None if s is None else offset + 6 * n * tokens * s
    c_scratch = compute(scratch["curve"], n_big)
    c_grown = compute(r2["curve"], n_big, offset=6 * n_small * tokens * a.steps)
    out = {"bench": "growth", "small_params": n_small, "big_params": n_big, "target": target,
           "small": r1, "grown": r2, "scratch": scratch, "compute_scratch": c_scratch, "compute_grown": c_grown,
           "ratio": (c_grown / c_scratch) if c_grown and c_scratch else None}
    with open(a.out, "a") as f:
        f.write(json.dumps(out) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k not in ("small", "grown", "scratch")}))


def uptrain(a):
    """The default model, then its conversion (GQA->MQA by mean-pooling: `mqa`; sparse upcycling into a
    top-2 MoE: `moe`) before and after up-training on the packaged calibration text: perplexity on the
    held-out technical text, KV-cache bytes per token, time and peak RSS. One conversion per process, so
    the peak RSS is that conversion's."""
    from leanlm.data.text import packaged_text
    from leanlm.eval.perplexity import perplexity
    from leanlm.train.pretrain import kv_bytes_per_token, moe_loss, to_mqa, upcycle_moe

    model, tok = leanlm.load()
    tech = packaged_text("tech")[: a.chars]

    def row(name, m, **extra):
        t0 = time.perf_counter()
        ppl = perplexity(m, tok, tech)["perplexity"]
        r = {"bench": a.which, "model": name, "ppl_tech": round(ppl, 3), "kv_bytes_per_token": kv_bytes_per_token(
            m.config), "params": m.num_parameters(), "eval_s": round(time.perf_counter() - t0, 1), **extra,
             "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
             "load": os.getloadavg()[0]}
        print(json.dumps(r), flush=True)
        with open(a.out, "a") as f:
            f.write(json.dumps(r) + "\n")
    if not a.no_base:
        row("default (GQA 9/3)", model)
    t0 = time.perf_counter()
    if a.which == "mqa":
        model = to_mqa(model, 1)
        name, loss_fn = "MQA (3 KV heads mean-pooled into 1)", full_sequence_loss
    else:
        model = upcycle_moe(model, a.experts, 2)
        name, loss_fn = f"upcycled MoE ({a.experts} experts, top-2)", moe_loss(0.01, 2)
    row(name + ", before up-training", model, convert_s=round(time.perf_counter() - t0, 1))
    tr, _ = pack(read_documents("packaged:calib"), tok, a.seq_len, 0.05)
    for p in model.parameters():
        p.requires_grad_(True)
    t0 = time.perf_counter()
    res = train(model, tr, TrainConfig(max_steps=a.steps, batch_size=a.batch, lr=a.lr, warmup_steps=5,
                                       progress=True, grad_checkpointing=True), loss_fn=loss_fn)
    row(f"{name}, after {a.steps} steps", model, train_s=round(time.perf_counter() - t0, 1),
        train_tokens=res.tokens, first_loss=round(res.losses[0], 4), last_loss=round(res.losses[-1], 4))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("which", choices=["speedrun", "growth", "mqa", "moe"])
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--chars", type=int, default=20000)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--no-base", action="store_true", help="mqa/moe: skip the unconverted model's row")
    ap.add_argument("--target", type=float, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="pretrain-bench.jsonl")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    {"speedrun": speedrun, "growth": growth, "mqa": uptrain, "moe": uptrain}[a.which](a)


if __name__ == "__main__":
    main()
