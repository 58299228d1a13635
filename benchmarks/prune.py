"""Pruning and low-rank on the default model: perplexity, size on disk, time, peak RSS, speed vs dense.

    OMP_NUM_THREADS=2 python benchmarks/prune.py --out /tmp/prune.json
    python benchmarks/prune.py --recipes sparse50-wanda,structured-20 --speed structured-20

Every recipe runs in its own process (so time and peak RSS are its own); perplexity is on the first
--eval-tokens tokens of the packaged evaluation text (non-overlapping windows of --ctx), calibration
on --calib-n windows of --calib-len tokens of the packaged calibration text. Recipes listed in
--speed also measure decode and prefill tokens/s of the dense and the compressed model, interleaved
in that same process, so the ratio is side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT = ("sparse50-magnitude,sparse50-wanda,sparse50-sparsegpt,sparse24-magnitude,sparse24-wanda,"
           "sparse24-sparsegpt,sparse24-sparsegpt-w4a16,structured-20,structured-35,layerdrop-4,lowrank-20")


def _speed(model, dense, repeats: int, new_tokens: int, prompt: int, prefill: int) -> dict:
    from leanlm.eval.bench import time_decode

    for m in (dense, model):
        time_decode(m, 16, 4, 1)  # warm-up
    res = {"dense": {"decode": [], "prefill": []}, "pruned": {"decode": [], "prefill": []}}
    for r in range(repeats):  # interleaved, so load changes on the shared machine hit both alike
        for key, m in (("dense", dense), ("pruned", model)):
            _, per_tok = time_decode(m, prompt, new_tokens, 1, seed=r)
            pre, _ = time_decode(m, prefill, 0, 1, seed=10 + r)
            res[key]["decode"].append(1.0 / per_tok)
            res[key]["prefill"].append(prefill / pre)
    med = {k: {kk: sorted(v)[len(v) // 2] for kk, v in d.items()} for k, d in res.items()}
    return {"decode_tok_s": med["pruned"]["decode"], "prefill_tok_s": med["pruned"]["prefill"],
            "dense_decode_tok_s": med["dense"]["decode"], "dense_prefill_tok_s": med["dense"]["prefill"],
            "decode_speedup": med["pruned"]["decode"] / med["dense"]["decode"],
            "prefill_speedup": med["pruned"]["prefill"] / med["dense"]["prefill"]}


def one(args) -> dict:
    import copy
    import resource

    import torch

    import leanlm
    from leanlm.compress.recipe import apply_recipe, load_recipe
    from leanlm.data import calibration_samples, packaged_text
    from leanlm.eval.perplexity import perplexity
    from leanlm.io.checkpoint import save_hf_folder

    torch.manual_seed(0)
    model, tok = leanlm.load()
    params0 = model.num_parameters()
    ids = tok.encode(packaged_text("eval"))[: args.eval_tokens]
    out = {"recipe": args.one, "threads": torch.get_num_threads()}
    dense = copy.deepcopy(model) if args.speed_one else None
    if args.one != "dense":
        samples = calibration_samples(tok, args.calib_n, args.calib_len, path="packaged:prose", seed=0)
        t0 = time.perf_counter()
        apply_recipe(model, load_recipe(args.one), samples, progress=False)
        out["compress_s"] = time.perf_counter() - t0
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["params"] = model.num_parameters()
    packed = any(type(m).__name__ == "QuantLinear" for m in model.modules())
    # packed quantized weights are buffers, not parameters: a parameter count would mislead there
    out["params_removed"] = None if packed else 1 - out["params"] / params0
    lin = [m.weight for n, m in model.named_modules() if n.startswith("model.layers.") and isinstance(m, torch.nn.Linear)]
    if packed:  # the weights as stored (packed codes dequantized): pruned zeros must still be exact zeros
        lin = [m.dequantized_weight() for n, m in model.named_modules()
               if n.startswith("model.layers.") and hasattr(m, "dequantized_weight")]
    if lin:
        from leanlm.compress.prune.masks import is_nm

        out["block_linear_sparsity"] = float(sum(int((w == 0).sum()) for w in lin) / sum(w.numel() for w in lin))
        out["all_2_4"] = all(w.shape[1] % 4 == 0 and is_nm(w, 2, 4) for w in lin)
    t0 = time.perf_counter()
    out["perplexity"] = perplexity(model, tok, tokens=ids, ctx=args.ctx, stride=args.ctx, progress=False)["perplexity"]
    out["eval_s"] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        save_hf_folder(model, tok, Path(d) / "m")
        out["safetensors_mb"] = (Path(d) / "m" / "model.safetensors").stat().st_size / 1e6
    if dense is not None:
        out.update(_speed(model, dense, args.repeats, args.new_tokens, args.prompt, args.prefill))
    return out


def speed_all(args) -> dict:
    """Dense and every --speed-all recipe in one process, timed round-robin (fairest on a shared machine)."""
    import copy

    import torch

    import leanlm
    from leanlm.compress.recipe import apply_recipe, load_recipe
    from leanlm.data import calibration_samples
    from leanlm.eval.bench import time_decode

    torch.manual_seed(0)
    dense, tok = leanlm.load()
    samples = calibration_samples(tok, args.calib_n, args.calib_len, path="packaged:prose", seed=0)
    models = {"dense": dense}
    for name in filter(None, args.speed_all.split(",")):
        m = copy.deepcopy(dense)
        apply_recipe(m, load_recipe(name), samples, progress=False)
        models[name] = m
    for m in models.values():
        time_decode(m, 16, 4, 1)
    runs = {k: {"decode": [], "prefill": []} for k in models}
    for r in range(args.repeats):
        for k, m in models.items():
            _, per_tok = time_decode(m, args.prompt, args.new_tokens, 1, seed=r)
            pre, _ = time_decode(m, args.prefill, 0, 1, seed=10 + r)
            runs[k]["decode"].append(1.0 / per_tok)
            runs[k]["prefill"].append(args.prefill / pre)
    med = {k: {kk: sorted(v)[len(v) // 2] for kk, v in d.items()} for k, d in runs.items()}
    out = {"threads": torch.get_num_threads(), "repeats": args.repeats, "models": {}}
    for k, d in med.items():
        out["models"][k] = {"params": models[k].num_parameters(), "decode_tok_s": d["decode"],
                            "prefill_tok_s": d["prefill"],
                            "decode_speedup": d["decode"] / med["dense"]["decode"],
                            "prefill_speedup": d["prefill"] / med["dense"]["prefill"]}
    return out


def table(paths: list[str]) -> str:
    """Markdown table of result files (one JSON object per line), perplexity ratio against `dense`."""
    rows = [json.loads(line) for p in paths for line in Path(p).read_text().splitlines() if line.strip()]
    dense = next((r for r in rows if r["recipe"] == "dense"), None)
    out = ["| recipe | params removed | block sparsity | perplexity | x dense | safetensors MB | compress s | peak RSS MB "
           "| decode tok/s (dense) | prefill tok/s (dense) |", "|" + "---|" * 10]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['recipe']} | error: {r['error']} |" + " |" * 8)
            continue
        ratio = f"{r['perplexity'] / dense['perplexity']:.2f}" if dense else ""
        dec = (f"{r['decode_tok_s']:.1f} ({r['dense_decode_tok_s']:.1f}) = {r['decode_speedup']:.2f}x"
               if "decode_tok_s" in r else "")
        pre = (f"{r['prefill_tok_s']:.0f} ({r['dense_prefill_tok_s']:.0f}) = {r['prefill_speedup']:.2f}x"
               if "prefill_tok_s" in r else "")
        removed = "n/a (packed)" if r.get("params_removed") is None else f"{r['params_removed']:.1%}"
        sp = r.get("block_linear_sparsity")
        sp = "" if sp is None else f"{sp:.1%}"
        out.append(f"| {r['recipe']} | {removed} | {sp} "
                   f"| {r['perplexity']:.2f} | {ratio} | {r['safetensors_mb']:.0f} | {r.get('compress_s', 0):.0f} "
                   f"| {r['peak_rss_mb']:.0f} | {dec} | {pre} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default="dense," + DEFAULT)
    p.add_argument("--speed", default="structured-20,structured-35,layerdrop-4,lowrank-20,sparse24-sparsegpt-w4a16",
                   help="recipes that also measure decode/prefill speed against the dense model")
    p.add_argument("--calib-n", type=int, default=32)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--prefill", type=int, default=256)
    p.add_argument("--out", default=None, help="append one JSON object per recipe to this file")
    p.add_argument("--speed-all", default=None, help="time dense and these recipes round-robin in one process")
    p.add_argument("--table", nargs="+", default=None, help="print a markdown table of result files and exit")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--speed-one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.table:
        print(table(args.table))
        return 0
    if args.speed_all:
        res = speed_all(args)
        print(json.dumps(res))
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(res) + "\n")
        return 0
    if args.one:
        print(json.dumps(one(args)))
        return 0
    speed = set(filter(None, args.speed.split(",")))
    results = []
    for name in filter(None, args.recipes.split(",")):
        cmd = [sys.executable, __file__, "--one", name, "--calib-n", str(args.calib_n), "--calib-len", str(args.calib_len),
               "--eval-tokens", str(args.eval_tokens), "--ctx", str(args.ctx), "--repeats", str(args.repeats),
               "--new-tokens", str(args.new_tokens), "--prompt", str(args.prompt), "--prefill", str(args.prefill)]
        if name in speed:
            cmd.append("--speed-one")
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if r.returncode != 0:
            res = {"recipe": name, "error": (r.stderr.strip().splitlines() or ["?"])[-1]}
        else:
            res = json.loads(r.stdout.strip().splitlines()[-1])
        res["wall_s"] = time.perf_counter() - t0
        results.append(res)
        print(json.dumps(res), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
