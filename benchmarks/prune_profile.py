"""Why structured pruning buys less decode speed than the parameters it removes: a profile of one decode step.

    python benchmarks/prune_profile.py --recipes structured-20,structured-35,layerdrop-4 --threads 2 --json

The default model and each recipe's result in one process. Per model: batch-1 greedy decode, eager and
compiled (leanlm/infer/compiled.py), timed round-robin (median of --repeats); and one profiled eager run
(torch.profiler) whose operator self-times split a decode step into the linear layers (the weights the
pruning shrinks), attention, and every other operator (norms, RoPE, activations, residual adds, cache
writes); what the profiler does not attribute to an operator is Python and dispatch time. Weight bytes
read per token (block linears, plus the tied embedding as the output head) give the speed-up a purely
bandwidth-bound step would get.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

LINEAR_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul")
ATTENTION_OPS = ("aten::_scaled_dot_product", "aten::scaled_dot_product")


def weight_bytes(model) -> int:
    """Bytes of weights a decode step reads: every block parameter and the output head (tied to the
    embedding here: the head reads the whole matrix, the embedding lookup one row)."""
    from leanlm.model.layout import blocks, head

    n = sum(p.numel() * p.element_size() for b in blocks(model) for p in b.parameters())
    return n + sum(p.numel() * p.element_size() for p in head(model).parameters())


def profile_step(model, prompt: int, steps: int) -> dict:
    """Milliseconds per decode token by operator category, from torch.profiler's self CPU times."""
    from torch.profiler import ProfilerActivity, profile

    from leanlm.infer.generate import fuse_for_inference

    fuse_for_inference(model)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(1, prompt + steps + 1)
    with torch.no_grad():
        nxt = model(ids, cache=cache, last_only=True)[:, -1].argmax(-1)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(steps):
                nxt = model(nxt.unsqueeze(1), cache=cache)[:, -1].argmax(-1)
    cats = {"linear": 0.0, "attention": 0.0, "other_ops": 0.0}
    calls = 0
    for ev in prof.key_averages():
        us = ev.self_cpu_time_total
        calls += ev.count
        if ev.key.startswith(LINEAR_OPS):
            cats["linear"] += us
        elif ev.key.startswith(ATTENTION_OPS):
            cats["attention"] += us
        else:
            cats["other_ops"] += us
    mm = [{"shapes": str(ev.input_shapes), "calls_per_token": ev.count / steps,
           "ms_per_token": ev.self_cpu_time_total / 1e3 / steps}
          for ev in prof.key_averages(group_by_input_shape=True) if ev.key.startswith(LINEAR_OPS)]
    mm.sort(key=lambda r: -r["ms_per_token"])
    return {k: v / 1e3 / steps for k, v in cats.items()} | {"op_calls_per_token": calls / steps, "linear_by_shape": mm[:8]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", default="structured-20,structured-35,layerdrop-4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    import leanlm
    from leanlm.compress.recipe import apply_recipe, load_recipe
    from leanlm.data import calibration_samples
    from leanlm.eval.bench import time_decode

    torch.manual_seed(0)
    dense, tok = leanlm.load()
    samples = calibration_samples(tok, 8, 256, path="packaged:prose", seed=0)
    models = {"dense": dense}
    for name in filter(None, a.recipes.split(",")):
        m = copy.deepcopy(dense)
        apply_recipe(m, load_recipe(name), samples, progress=False)
        models[name] = m
    modes = ["eager"] + ([] if a.no_compile else ["compiled"])
    for m in models.values():  # warm-up (the compiled step compiles here, once per shape)
        for mode in modes:
            time_decode(m, 16, 4, 1, compile=mode == "compiled")
    runs = {(k, mode): [] for k in models for mode in modes}
    for r in range(a.repeats):  # round-robin, so a load change hits every model alike
        for k, m in models.items():
            for mode in modes:
                _, per_tok = time_decode(m, a.prompt, a.new_tokens, 1, seed=r, compile=mode == "compiled")
                runs[(k, mode)].append(per_tok)
    med = {key: sorted(v)[len(v) // 2] for key, v in runs.items()}
    out = {"threads": a.threads, "repeats": a.repeats, "prompt": a.prompt, "new_tokens": a.new_tokens,
           "load": os.getloadavg()[0], "models": {}}
    p0, b0 = dense.num_parameters(), weight_bytes(dense)
    for k, m in models.items():
        prof = profile_step(m, a.prompt, a.new_tokens)
        eager_ms = med[(k, "eager")] * 1e3
        row = {"params": m.num_parameters(), "params_removed": 1 - m.num_parameters() / p0,
               "weight_mb_per_token": weight_bytes(m) / 1e6, "bandwidth_bound_speedup": b0 / weight_bytes(m),
               "eager_ms_per_token": eager_ms, "eager_speedup": med[("dense", "eager")] / med[(k, "eager")],
               **{f"{c}_ms": v for c, v in prof.items() if c not in ("op_calls_per_token", "linear_by_shape")},
               "op_calls_per_token": prof["op_calls_per_token"], "linear_by_shape": prof["linear_by_shape"]}
        row["unattributed_ms"] = max(0.0, eager_ms - prof["linear"] - prof["attention"] - prof["other_ops"])
        if "compiled" in modes:
            row["compiled_ms_per_token"] = med[(k, "compiled")] * 1e3
            row["compiled_speedup"] = med[("dense", "compiled")] / med[(k, "compiled")]
        row["proportional_target"] = 1 / (1 - row["params_removed"])
        out["models"][k] = row
    hdr = ["model", "params removed", "target", "weights MB/token", "bandwidth-bound", "eager ms/token",
           "linear ms", "attention ms", "other ops ms", "unattributed ms", "eager speed-up", "compiled ms/token",
           "compiled speed-up"]
    print("| " + " | ".join(hdr) + " |\n|" + "---|" * len(hdr))
    for k, r in out["models"].items():
        print(f"| {k} | {r['params_removed']:.1%} | {r['proportional_target']:.2f}x | {r['weight_mb_per_token']:.0f} | "
              f"{r['bandwidth_bound_speedup']:.2f}x | {r['eager_ms_per_token']:.1f} | {r['linear_ms']:.1f} | "
              f"{r['attention_ms']:.1f} | {r['other_ops_ms']:.1f} | {r['unattributed_ms']:.1f} | "
              f"{r['eager_speedup']:.2f}x | {r.get('compiled_ms_per_token', float('nan')):.1f} | "
              f"{r.get('compiled_speedup', float('nan')):.2f}x |")
    print("\nlinear operators by input shapes (ms per token, self CPU time under the profiler):")
    for k, r in out["models"].items():
        print(k + ": " + "; ".join(f"{x['shapes']} x{x['calls_per_token']:.0f}: {x['ms_per_token']:.2f}"
                                   for x in r["linear_by_shape"]))
    if a.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
