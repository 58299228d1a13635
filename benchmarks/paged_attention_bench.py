"""Paged attention: the engine's forward step through the paged cache, dense gather vs the block-table
path, side by side in one run (results: docs/bench/serving.md).

Per context length C, 16 sequences hold C tokens each in the pool (K/V written as constants: the time
does not depend on them, and no prefill of 16 x C tokens is needed), then one step is timed:
  decode   16 rows, one new token each, every row at context C
  ragged   16 rows, contexts spread evenly from C/16 to C (the dense path pads each row to C)
  mixed    15 decode rows at context C plus a 128-token prefill chunk of a 16th sequence at context C
           (packed layout: the dense path's mask covers the whole batch)
Each cell is the median of --reps steps after one warm-up; the step is what Engine.step runs between
scheduling and sampling (prepare + model forward with the cache). Times are the process's CPU time
(time.process_time, one thread): on a shared core the wall time measures the other tenants as much as
the step; wall-clock medians are reported beside them (`*_wall_ms`).

    python benchmarks/paged_attention_bench.py --threads 1 --contexts 128,512,1024,2048 --out paged.json

--engine N: also N requests (prompts of 32-128 tokens from the packaged evaluation text, --new-tokens
greedy tokens each) run one after another with plain generation (batch 1, static cache) and all at
once through the engine on each path: CPU seconds of each, tokens per CPU second, identical outputs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def fill(cache, seqs: dict) -> None:
    """Give each sequence its context in the pool without running the model (constant K/V, written so
    that every page is real memory: a fresh zero pool would read one shared zero page)."""
    for s, c in seqs.items():
        cache.add_sequence(s)
        cache.ensure(s, c + 128)
        cache.lengths[s] = c
    for k, v in zip(cache.k, cache.v):
        k.fill_(0.01)
        v.fill_(-0.01)


def step_time(model, cache, batch, layout, reps: int) -> tuple[float, float]:
    """Median (CPU, wall) seconds of one step over `batch` [(seq, new tokens)]; lengths are put back after each."""
    lengths = dict(cache.lengths)
    n = sum(k for _, k in batch)
    cpu, wall = [], []
    for i in range(reps + 1):
        c, t = time.process_time(), time.perf_counter()
        B, T = cache.prepare(batch, layout)
        ids = torch.randint(0, model.config.vocab_size, (1, n) if layout == "packed" else (B, T))
        model(ids, cache=cache, return_hidden=True)
        if i:
            cpu.append(time.process_time() - c)
            wall.append(time.perf_counter() - t)
        cache.lengths.update(lengths)
    return statistics.median(cpu), statistics.median(wall)


@torch.inference_mode()
def bench(model, contexts, reps: int, paths=("dense", "blocks")) -> list[dict]:
    from leanlm.infer.generate import fuse_for_inference
    from leanlm.infer.paged import PagedKVCache

    fuse_for_inference(model)
    cfg, bs, rows = model.config, 16, []
    for C in contexts:
        spread = [max(1, round(C * (i + 1) / 16)) for i in range(16)]
        scenarios = {
            "decode": ({i: C for i in range(16)}, [(i, 1) for i in range(16)], "rows"),
            "ragged": ({i: spread[i] for i in range(16)}, [(i, 1) for i in range(16)], "rows"),
            "mixed": ({i: C for i in range(16)}, [(i, 1) for i in range(15)] + [(15, 128)], "packed"),
        }
        for name, (seqs, batch, layout) in scenarios.items():
            row = {"context": C, "scenario": name, "total_context": sum(seqs.values()),
                   "new_tokens": sum(n for _, n in batch)}
            for path in paths:
                blocks = sum(-(-(c + 128) // bs) for c in seqs.values())
                cache = PagedKVCache(cfg, blocks, bs, dtype=model.dtype, attention=path)
                fill(cache, seqs)
                c, w = step_time(model, cache, batch, layout, reps)
                row[f"{path}_ms"], row[f"{path}_wall_ms"] = 1e3 * c, 1e3 * w
                del cache
            row["speedup"] = row["dense_ms"] / row["blocks_ms"]
            log(f"  C={C:5d} {name:6s} dense {row['dense_ms']:8.1f} ms  blocks {row['blocks_ms']:8.1f} ms  "
                f"x{row['speedup']:.2f}")
            rows.append(row)
    return rows


@torch.inference_mode()
def bench_engine(model, tok, n: int, new_tokens: int) -> dict:
    from leanlm.data import packaged_text
    from leanlm.infer.engine import Engine, SamplingParams
    from leanlm.infer.generate import generate_tokens
    from leanlm.infer.sampling import GenerationConfig

    ids = tok.encode(packaged_text("eval"))[:40_000]
    prompts = []
    for i in range(n):  # the prompts of benchmarks/engine_bench.py's concurrency section
        k = 32 + (i * 37) % 97
        s = (i * 1013) % (len(ids) - k)
        prompts.append(ids[s:s + k])
    cfg = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True, stop_token_ids=[])
    c = time.process_time()
    ref = [[t[0] for t in generate_tokens(model, [p], cfg)] for p in prompts]
    out = {"requests": n, "new_tokens": new_tokens, "sequential_cpu_s": time.process_time() - c}
    log(f"  sequential: {out['sequential_cpu_s']:.1f} CPU s")
    for path in ("dense", "blocks"):
        eng = Engine(model, attention=path)
        c = time.process_time()
        got = eng.generate(prompts, SamplingParams(max_tokens=new_tokens, ignore_eos=True))
        out[f"{path}_cpu_s"] = time.process_time() - c
        out[f"{path}_identical"] = sum(a == b for a, b in zip(got, ref))
        out[f"{path}_x_sequential"] = out["sequential_cpu_s"] / out[f"{path}_cpu_s"]
        log(f"  engine {path}: {out[f'{path}_cpu_s']:.1f} CPU s, x{out[f'{path}_x_sequential']:.2f}, "
            f"{out[f'{path}_identical']}/{n} identical")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=None, help="model folder or .gguf (default: the default model)")
    ap.add_argument("--threads", type=int, default=1, help="CPU times are per process: compare at 1 thread")
    ap.add_argument("--contexts", default="128,512,1024,2048")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=None,
                    help="keep only the model's first N layers (same shape per layer; a shorter run)")
    ap.add_argument("--engine", type=int, default=0, help="N requests: engine vs sequential (0: skip)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default=None, help="write the JSON results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import leanlm
    from leanlm.report import print_table

    model, tok = leanlm.load(args.model)
    if args.layers:
        import dataclasses

        from leanlm.model.layout import blocks

        del blocks(model)[args.layers:]
        model.config = dataclasses.replace(model.config, num_layers=args.layers)
    result = {"threads": args.threads, "batch": 16, "layers": model.config.num_layers}
    if args.contexts:
        rows = bench(model.eval(), [int(c) for c in args.contexts.split(",")], args.reps)
        print_table("paged attention: one step at batch 16", rows,
                    ["context", "scenario", "total_context", "dense_ms", "blocks_ms", "speedup"])
        result["rows"] = rows
    if args.engine:
        result["engine"] = bench_engine(model.eval(), tok, args.engine, args.new_tokens)
        print_table("engine vs sequential (CPU time)", result["engine"])
    if args.out:
        from leanlm.io.atomic import atomic_write_text

        atomic_write_text(args.out, json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
