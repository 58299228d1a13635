"""Speculative decoding through the engine at batch 1, side by side in one run (results: docs/bench/speculative.md).

Rows: plain engine decoding, then each --draft model, prompt lookup and layer skipping, all greedy on the
same prompt (the end of the packaged evaluation text), each checked to give the plain output exactly.
Columns: decode tokens/s (after the first token; wall clock and this process's CPU time, which a shared core
slows less), acceptance (accepted / proposed draft tokens), tokens per
target step, speed-up over plain. Then the cost model: one engine decode step (1 token) against one verify
step (k+1 tokens) of the target, and one decode step of each draft, at the same context.

    python benchmarks/spec_engine.py --threads 1 --draft rtn=DIR --draft gptq=DIR --out spec.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def log(*a):
    print(*a, file=sys.stderr, flush=True)


@torch.inference_mode()
def run_one(eng, prompt, new_tokens, spec) -> dict:
    from leanlm.infer.engine import SamplingParams

    rid = eng.add_request(prompt, SamplingParams(max_tokens=new_tokens, ignore_eos=True, speculative=spec))
    out, t_first, c_first, steps = [], None, None, 0
    t0 = time.perf_counter()
    while eng.has_unfinished():
        for o in eng.step():
            if o.request_id == rid:
                out.append(o.token)
        steps += 1
        if t_first is None and out:
            t_first, c_first = time.perf_counter(), time.process_time()
    t_end, c_end = time.perf_counter(), time.process_time()
    return dict(out=out, decode_s=t_end - t_first, decode_cpu_s=c_end - c_first, total_s=t_end - t0,
                target_steps=steps)


@torch.inference_mode()
def step_costs(model, drafts: dict, ctx: int, k: int, reps: int) -> dict:
    """Median seconds of one target forward over the paged cache with 1 new token (decode) and with k+1 (verify),
    and of one draft decode forward, each at `ctx` tokens of context (rolled back after every forward)."""
    from leanlm.infer.paged import PagedKVCache

    def timed(m, n, clock):
        cache = PagedKVCache(m.config, num_blocks=-(-(ctx + k + 1) // 16) + 1, block_size=16, dtype=m.dtype)
        cache.add_sequence(0)
        cache.ensure(0, ctx + k + 1)
        cache.prepare([(0, ctx)], "packed")
        m(torch.zeros(1, ctx, dtype=torch.long), cache=cache)
        ts = []
        for _ in range(reps):
            t = clock()
            layout = "rows" if n == 1 else "packed"
            cache.ensure(0, ctx + n)
            B, T = cache.prepare([(0, n)], layout)
            ids = torch.ones(B, T, dtype=torch.long)
            h = m(ids, cache=cache, return_hidden=True)
            m.logits(h.reshape(B * T, -1))
            ts.append(clock() - t)
            cache.truncate(0, ctx)
        return statistics.median(ts)
    out = {}
    for clock, tag in ((time.perf_counter, "s"), (time.process_time, "cpu_s")):
        out[f"decode_step_{tag}"] = timed(model, 1, clock)
        out[f"verify_step_k{k}_{tag}"] = timed(model, k + 1, clock)
        out[f"verify_over_decode_{tag}"] = out[f"verify_step_k{k}_{tag}"] / out[f"decode_step_{tag}"]
        for name, d in drafts.items():
            out[f"draft_{name}_step_{tag}"] = timed(d, 1, clock)
            out[f"draft_{name}_over_decode_{tag}"] = out[f"draft_{name}_step_{tag}"] / out[f"decode_step_{tag}"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="target (default: the packaged SmolLM2-135M-Instruct)")
    ap.add_argument("--draft", action="append", default=[], metavar="NAME=DIR", help="a draft model (repeatable)")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=4, help="first draft length (adapts within [1, 2k])")
    ap.add_argument("--no-layer-skip", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=1, help="runs of every row (rows interleaved)")
    ap.add_argument("--cost-reps", type=int, default=15, help="forwards timed per step cost")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import leanlm
    from leanlm.data import packaged_text
    from leanlm.infer.engine import Engine
    from leanlm.infer.engine_spec import SpecParams
    from leanlm.infer.generate import fuse_for_inference

    model, tok = leanlm.load(args.model)
    model.eval()
    fuse_for_inference(model)
    drafts = {}
    for spec in args.draft:
        name, _, path = spec.partition("=")
        drafts[name] = leanlm.load(path)[0].eval()
        fuse_for_inference(drafts[name])
    prompt = tok.encode(packaged_text("eval")[:4000])[-args.prompt_len:]
    # batch 1: a pool for one sequence (the default sizes the pool for 32 full contexts, 1 GiB per engine)
    pool = dict(max_num_seqs=1, num_blocks=-(-(len(prompt) + args.new_tokens + 4 * args.k) // 16) + 2)
    rows = [("plain", Engine(model, **pool), None)]
    for name, d in drafts.items():
        rows.append((f"draft {name}", Engine(model, draft=d, **pool), SpecParams("draft", args.k)))
    rows.append(("prompt lookup", Engine(model, **pool), SpecParams("prompt_lookup", args.k)))
    if not args.no_layer_skip:
        rows.append(("layer skip", Engine(model, layer_skip=True, **pool), SpecParams("layer_skip", args.k)))
    for _, eng, spec in rows:  # warm-up: first-call costs out of the timings
        run_one(eng, prompt[:32], 8, spec)
    runs = {name: [] for name, _, _ in rows}
    ref = None
    for rep in range(args.reps):
        for name, eng, spec in rows:
            before = dict(eng.stats)
            r = run_one(eng, prompt, args.new_tokens, spec)
            ref = r["out"] if ref is None else ref
            prop = eng.stats["draft_proposed"] - before["draft_proposed"]
            acc = eng.stats["draft_accepted"] - before["draft_accepted"]
            runs[name].append(dict(tokens_per_s=(len(r["out"]) - 1) / r["decode_s"], total_s=r["total_s"],
                                   tokens_per_cpu_s=(len(r["out"]) - 1) / r["decode_cpu_s"],
                                   acceptance=acc / prop if prop else None, proposed=prop,
                                   tokens_per_target_step=len(r["out"]) / r["target_steps"],
                                   identical=r["out"] == ref))
            log(f"  rep {rep} {name}: {runs[name][-1]}")
    plain = statistics.median(x["tokens_per_s"] for x in runs["plain"])
    plain_cpu = statistics.median(x["tokens_per_cpu_s"] for x in runs["plain"])
    table = []
    for name, rs in runs.items():
        tps = statistics.median(x["tokens_per_s"] for x in rs)
        cps = statistics.median(x["tokens_per_cpu_s"] for x in rs)
        acc = [x["acceptance"] for x in rs if x["acceptance"] is not None]
        table.append({"method": name, "tokens/s": round(tps, 2), "speed-up": round(tps / plain, 3),
                      "tokens/cpu-s": round(cps, 2), "speed-up (cpu)": round(cps / plain_cpu, 3),
                      "acceptance": round(statistics.median(acc), 3) if acc else None,
                      "tokens/target step": round(statistics.median(x["tokens_per_target_step"] for x in rs), 2),
                      "identical": all(x["identical"] for x in rs),
                      "runs tokens/s": [round(x["tokens_per_s"], 2) for x in rs]})
    # how often each draft's argmax equals the target's on the plain output (teacher-forced): acceptance's ceiling
    seq = torch.tensor([prompt + ref])
    with torch.inference_mode():
        want = model(seq)[0, len(prompt) - 1:-1].argmax(-1)
        for name, d in drafts.items():
            agree = float((d(seq)[0, len(prompt) - 1:-1].argmax(-1) == want).float().mean())
            next(r for r in table if r["method"] == f"draft {name}")["argmax agreement"] = round(agree, 3)
    costs = step_costs(model, drafts, args.prompt_len + args.new_tokens // 2, args.k, reps=args.cost_reps)
    from leanlm.report import print_table

    print_table(f"speculative decoding in the engine, batch 1, {args.new_tokens} tokens after {len(prompt)}",
                table, ["method", "tokens/s", "speed-up", "tokens/cpu-s", "speed-up (cpu)", "acceptance",
                        "argmax agreement", "tokens/target step", "identical", "runs tokens/s"])
    print_table("step costs (median seconds)", {k: round(v, 4) for k, v in costs.items()})
    res = {"args": vars(args), "rows": table, "costs": costs, "runs": runs}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    print(json.dumps({"rows": table, "costs": costs}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
