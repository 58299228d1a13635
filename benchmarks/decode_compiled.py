"""Batch-1 decode and 512-token prefill, eager vs compiled (torch.compile), and llama.cpp, in one run.

Variants of the default model: fp32, bf16, w8a16-rtn and w4a16-rtn-g32-e8 (built in memory from the
fp32 model with the same recipes `leanlm compress --recipe ...` runs, or loaded from a compressed
folder with `--model NAME=PATH`). Rounds alternate between variants and paths so machine noise hits
them alike; the table gives medians. Also the first compiled step's time (tracing + compiling, or
loading the compiled code from the on-disk cache), the machine's memory read bandwidth and, with
`--llama-cpp`, llama-bench on F32/F16/Q8_0/Q4_0 GGUFs of the same model (written by `leanlm export`
and `llama-quantize` when absent from --gguf-dir).

    python benchmarks/decode_compiled.py --threads 2 --rounds 3 \
        --llama-cpp /work/build/llama.cpp/build/bin --gguf-dir /tmp/gguf --json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

VARIANTS = ("fp32", "bf16", "w8a16-rtn", "w4a16-rtn-g32-e8")
LLAMA = {"fp32": "F32", "bf16": "F16", "w8a16-rtn": "Q8_0", "w4a16-rtn-g32-e8": "Q4_0"}


def build(base, name, paths):
    import leanlm
    from leanlm.compress.recipe import apply_recipe, load_recipe

    if name in paths:
        return leanlm.load(paths[name])[0]
    if name == "fp32":
        return base
    if name == "bf16":
        return copy.deepcopy(base).to(torch.bfloat16)
    m = copy.deepcopy(base)
    apply_recipe(m, load_recipe(name), progress=False)
    return m


def gguf_files(bin_dir: Path, out: Path, threads: int) -> dict:
    """F32 from leanlm's exporter, then F16/Q8_0/Q4_0 from llama-quantize (skipped when present)."""
    out.mkdir(parents=True, exist_ok=True)
    f32 = out / "smol-f32.gguf"
    if not f32.exists():
        subprocess.run([sys.executable, "-m", "leanlm", "export", "--format", "gguf", "--type", "f32",
                        "-o", str(f32)], check=True)
    files = {"F32": f32}
    for t in ("F16", "Q8_0", "Q4_0"):
        f = out / f"smol-{t.lower()}.gguf"
        if not f.exists():
            subprocess.run([str(bin_dir / "llama-quantize"), str(f32), str(f), t, str(threads)], check=True,
                           capture_output=True)
        files[t] = f
    return files


def llama_bench(bin_dir: Path, f: Path, threads: int, reps: int) -> dict:
    r = subprocess.run([str(bin_dir / "llama-bench"), "-m", str(f), "-t", str(threads), "-n", "128", "-p", "512",
                        "-r", str(reps), "-o", "json"], check=True, capture_output=True, text=True)
    rows = json.loads(r.stdout)
    return {"decode": next(x["avg_ts"] for x in rows if x["n_gen"] > 0),
            "prefill": next(x["avg_ts"] for x in rows if x["n_prompt"] > 0)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--model", action="append", default=[], help="NAME=PATH: load a variant from a folder")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--llama-cpp", default=None, help="folder with llama-bench and llama-quantize")
    ap.add_argument("--gguf-dir", default="/tmp/gguf")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from decode import read_bandwidth_gb_s

    import leanlm
    from leanlm.eval.bench import is_compiled, time_decode, weight_bytes_per_token
    from leanlm.eval.describe import model_bytes
    from leanlm.report import emit_json, print_table

    paths = dict(kv.split("=", 1) for kv in args.model)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    base, _ = leanlm.load()
    models = {n: build(base, n, paths) for n in names}
    load = os.getloadavg()[0]
    first = {}
    for n, m in models.items():
        time_decode(m, 16, 4)  # eager warm-up: fused kernels, allocator, thread pool
        t = time.perf_counter()
        time_decode(m, 16, 1, compile=True)  # the first compiled step
        first[n] = time.perf_counter() - t
    bw = read_bandwidth_gb_s()
    dec = {(n, c): [] for n in names for c in (False, True)}
    pre = {n: [] for n in names}
    for r in range(args.rounds):
        for n, m in models.items():
            for c in (False, True):
                dec[n, c].append(time_decode(m, args.prompt_len, args.new_tokens, seed=r, compile=c)[1])
            pre[n].append(time_decode(m, args.prefill_len, 0, seed=r)[0])
    llama = {}
    if args.llama_cpp:
        bin_dir = Path(args.llama_cpp)
        files = gguf_files(bin_dir, Path(args.gguf_dir), args.threads)
        for n in names:
            llama[n] = llama_bench(bin_dir, files[LLAMA[n]], args.threads, args.rounds)
    load = max(load, os.getloadavg()[0])
    rows = []
    for n, m in models.items():
        eager, comp = 1 / statistics.median(dec[n, False]), 1 / statistics.median(dec[n, True])
        nbytes = weight_bytes_per_token(m)
        row = {"variant": n, "size_mb": model_bytes(m) / 1e6, "compiled": is_compiled(m),
               "first_compiled_step_s": first[n], "eager_tok_s": eager, "compiled_tok_s": comp,
               "compiled_vs_eager": comp / eager, "share_of_read_bw": nbytes * max(eager, comp) / 1e9 / bw,
               "prefill_tok_s": args.prefill_len / statistics.median(pre[n])}
        if n in llama:
            row |= {"llama_cpp": LLAMA[n], "llama_decode_tok_s": llama[n]["decode"],
                    "best_vs_llama_decode": max(eager, comp) / llama[n]["decode"],
                    "llama_prefill_tok_s": llama[n]["prefill"],
                    "prefill_vs_llama": row["prefill_tok_s"] / llama[n]["prefill"]}
        row["all_decode_s"] = {"eager": dec[n, False], "compiled": dec[n, True]}
        rows.append(row)
    title = (f"batch-1 decode ({args.prompt_len}-token prompt, {args.new_tokens} new) and {args.prefill_len}-token "
             f"prefill, {args.threads} threads; read bandwidth {bw:.1f} GB/s; max 1-min load {load:.1f}")
    print_table(title, [{k: v for k, v in r.items() if k != "all_decode_s"} for r in rows])
    if args.json:
        emit_json({"threads": args.threads, "read_bandwidth_gb_s": bw, "load": load, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
