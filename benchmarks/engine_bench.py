"""Serving benchmarks on one model, side by side in one run (results: docs/bench/serving.md).

  concurrency  generated tokens/s and p50/p99 latency with N concurrent clients (engine) against the
               same requests run one after another with plain generation
  prefix       time to first token with a prefix-cache hit vs a miss (long shared prompt prefix)
  spec         speculative decoding speed-up and acceptance (prompt lookup, layer skipping, 4-bit draft)
  kv           perplexity against KV-cache budget (StreamingLLM, H2O, Scissorhands-style)
  compile      the engine eager vs piecewise compiled (Engine(compile=True)) at each --concurrency, in
               alternating rounds: tokens/s, ratio, identical outputs, and the compile (warm-up) time

    python benchmarks/engine_bench.py --threads 1 --sections concurrency,prefix,spec,kv --out bench.json
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


def eval_ids(tok, n: int) -> list[int]:
    from leanlm.data import packaged_text

    return tok.encode(packaged_text("eval"))[:n]


def bench_concurrency(model, tok, args) -> dict:
    from leanlm.eval.concurrency import bench_concurrency

    prompts = _concurrency_prompts(tok, args)

    def progress(what, i, n):
        if i == n or i % 8 == 0:
            log(f"  {what}: {i}/{n}")
    conc = tuple(int(c) for c in args.concurrency.split(","))
    return bench_concurrency(model, prompts, max_new_tokens=args.new_tokens, concurrency=conc, progress=progress,
                             engine_kwargs=dict(max_batch_tokens=args.batch_tokens))


@torch.inference_mode()
def bench_prefix(model, tok, args) -> dict:
    from leanlm.infer.engine import Engine, SamplingParams

    ids = eval_ids(tok, 40_000)
    eng = Engine(model, max_batch_tokens=args.prefix_len + 64, max_num_seqs=4)
    params = SamplingParams(max_tokens=8)

    def ttft(prompt):
        t = time.perf_counter()
        rid = eng.add_request(prompt, params)
        first, out = None, []
        while eng.has_unfinished():
            for o in eng.step():
                if o.request_id == rid:
                    first = first or time.perf_counter() - t
                    out.append(o.token)
        return first, out
    miss, hit, same = [], [], 0
    nocache = Engine(model, max_batch_tokens=args.prefix_len + 64, max_num_seqs=4, prefix_caching=False)
    for trial in range(args.trials):
        base = 5000 + trial * 3000
        prefix = ids[base:base + args.prefix_len]
        q1, q2 = ids[base + 1000:base + 1016], ids[base + 2000:base + 2016]
        t_miss, _ = ttft(prefix + q1)
        t_hit, out = ttft(prefix + q2)
        miss.append(t_miss)
        hit.append(t_hit)
        same += out == nocache.generate([prefix + q2], params)[0]
        log(f"  trial {trial}: miss {t_miss:.3f}s hit {t_hit:.3f}s")
    return {"prefix_tokens": args.prefix_len, "suffix_tokens": 16, "trials": args.trials,
            "ttft_miss_s": statistics.median(miss), "ttft_hit_s": statistics.median(hit),
            "speedup": statistics.median(miss) / statistics.median(hit),
            "hit_outputs_identical_to_no_cache": same, "prefix_hit_tokens": eng.stats["prefix_hit_tokens"]}


@torch.inference_mode()
def bench_spec(model, tok, args) -> dict:
    from leanlm.infer.generate import generate_tokens
    from leanlm.infer.sampling import GenerationConfig
    from leanlm.infer.speculative import default_skip_layers, generate_speculative, quantized_draft

    ids = eval_ids(tok, 40_000)
    para = tok.decode(ids[2000:2000 + 160])
    tasks = {
        "rewrite (chat)": tok.encode_chat([{"role": "user", "content": "Copy this text exactly:\n\n" + para}]),
        "continue (text)": ids[8000:8000 + 160],
    }
    cfg = GenerationConfig(max_new_tokens=args.spec_tokens, ignore_eos=True, stop_token_ids=[])
    t = time.perf_counter()
    draft4 = quantized_draft(model, head="int8")  # Q4_1-like grid: asymmetric 4-bit, groups of 32; int8 head
    qtime = time.perf_counter() - t
    draft4_fp32_head = quantized_draft(model)  # the default: fp32 head
    methods = {
        "prompt lookup (k=4)": dict(prompt_lookup=True, num_draft=4),
        f"layer skip {default_skip_layers(model.config.num_layers)} (k=3)": dict(self_speculative=True,
                                                                                num_draft=3),
        "4-bit RTN draft, fp32 head (k=8)": dict(draft=draft4_fp32_head, num_draft=8),
        "4-bit RTN draft, int8 head (k=4)": dict(draft=draft4, num_draft=4),
        "4-bit RTN draft, int8 head (k=8)": dict(draft=draft4, num_draft=8),
        "4-bit RTN draft, int8 head (k=12)": dict(draft=draft4, num_draft=12),
    }

    @torch.inference_mode()
    def decode_ms(m, prompt, n=16):
        from leanlm.infer.generate import fuse_for_inference

        fuse_for_inference(m)
        cache = m.new_cache(1, len(prompt) + n + 1)
        m(torch.tensor([prompt]), cache=cache)
        t = time.perf_counter()
        for _ in range(n):
            m(torch.tensor([[prompt[-1]]]), cache=cache)
        return (time.perf_counter() - t) / n * 1000
    p0 = ids[8000:8000 + 160]
    out = {"new_tokens": args.spec_tokens, "draft_quantize_s": qtime, "tasks": {},
           "target_decode_ms": decode_ms(model, p0), "draft4_decode_ms": decode_ms(draft4, p0),
           "draft4_fp32_head_decode_ms": decode_ms(draft4_fp32_head, p0)}
    log(f"  decode ms/token: target {out['target_decode_ms']:.0f}, 4-bit draft {out['draft4_decode_ms']:.0f} "
        f"(fp32 head {out['draft4_fp32_head_decode_ms']:.0f})")
    for tname, prompt in tasks.items():
        generate_speculative(model, prompt, cfg, prompt_lookup=True)  # warm-up (kernels, allocator)
        plain, runs = [], {m: [] for m in methods}
        for r in range(args.spec_rounds):  # interleaved rounds, best time of each: robust to a busy machine
            t = time.perf_counter()
            ref = [s[0] for s in generate_tokens(model, [prompt], cfg)]
            plain.append(time.perf_counter() - t)
            log(f"  {tname} round {r}: plain {plain[-1]:.2f}s")
            for mname, kw in methods.items():
                toks, st = generate_speculative(model, prompt, cfg, **kw)
                runs[mname].append((st.seconds, st, toks == ref))
                log(f"    {mname}: {st.seconds:.2f}s accept {st.acceptance_rate:.2f} same={toks == ref}")
        res = {"prompt_tokens": len(prompt), "plain_s": min(plain), "plain_all_s": plain, "methods": {}}
        for mname, rs in runs.items():
            best, st, _ = min(rs, key=lambda x: x[0])
            res["methods"][mname] = {"seconds": best, "all_s": [x[0] for x in rs], "speedup": min(plain) / best,
                                     "acceptance_rate": st.acceptance_rate,
                                     "tokens_per_target_forward": st.tokens_per_round,
                                     "identical_to_plain_greedy": all(x[2] for x in rs)}
        out["tasks"][tname] = res
    return out


def _concurrency_prompts(tok, args) -> list[list[int]]:
    ids = eval_ids(tok, 40_000)
    prompts = []
    for i in range(args.requests):
        n = 32 + (i * 37) % 97  # 32..128 tokens
        s = (i * 1013) % (len(ids) - n)
        prompts.append(ids[s:s + n])
    return prompts


@torch.inference_mode()
def bench_compile(model, tok, args) -> dict:
    from leanlm.eval.concurrency import bench_concurrency
    from leanlm.infer.engine import Engine, SamplingParams

    prompts = _concurrency_prompts(tok, args)
    conc = tuple(int(c) for c in args.concurrency.split(","))
    # warm-up: compiles the two pieces (one graph each, for every step size) on steps of several sizes
    t, cpu = time.perf_counter(), time.process_time()
    eng = Engine(model, max_batch_tokens=args.batch_tokens, compile=True)
    eng.generate(prompts[:3], SamplingParams(max_tokens=2, ignore_eos=True))
    out = {"compile_s": time.perf_counter() - t, "compile_cpu_s": time.process_time() - cpu,
           "compile_failed": eng.compiled.failed if eng.compiled else "n/a", "rounds": args.rounds, "engine": {}}
    log(f"  compile + warm-up: {out['compile_s']:.1f}s ({out['compile_cpu_s']:.1f} CPU s in this process)")
    runs = {(c, v): [] for c in conc for v in ("eager", "compiled")}
    outs = {}
    for r in range(args.rounds):  # alternating, so both variants see the same machine load
        for c in conc:
            for v in ("eager", "compiled"):
                cpu = time.process_time()
                res = bench_concurrency(model, prompts, max_new_tokens=args.new_tokens, concurrency=c,
                                        sequential=False, engine_kwargs=dict(max_batch_tokens=args.batch_tokens,
                                                                             compile=v == "compiled"),
                                        return_outputs=True)
                cpu = time.process_time() - cpu
                e = res["engine"][c]
                # tokens per CPU second as well: on a shared core the wall clock also counts other jobs' time
                runs[(c, v)].append((e["tokens_per_s"], len(prompts) * args.new_tokens / cpu))
                outs[(c, v)] = res["outputs"][c]
                log(f"  round {r} x{c} {v}: {e['tokens_per_s']:.1f} tok/s, {runs[(c, v)][-1][1]:.1f} tok/CPU-s")
    for c in conc:
        eager, comp = runs[(c, "eager")], runs[(c, "compiled")]
        out["engine"][c] = {"eager_tokens_per_s": [a[0] for a in eager],
                            "compiled_tokens_per_s": [b[0] for b in comp],
                            "ratio_per_round": [b[0] / a[0] for a, b in zip(eager, comp)],
                            "eager_tokens_per_cpu_s": [a[1] for a in eager],
                            "compiled_tokens_per_cpu_s": [b[1] for b in comp],
                            "cpu_ratio_per_round": [b[1] / a[1] for a, b in zip(eager, comp)],
                            "identical_outputs": sum(a == b for a, b in zip(outs[(c, "eager")],
                                                                            outs[(c, "compiled")])),
                            "requests": len(prompts)}
    return out


def bench_kv(model, tok, args) -> dict:
    from leanlm.infer.kv_evict import evict_perplexity

    ids = eval_ids(tok, 30_000)[20_000:20_000 + args.kv_len]
    out = {"tokens": len(ids), "chunk": args.kv_chunk, "sink": 4, "results": {}}
    t = time.perf_counter()
    out["results"]["full"] = {"100%": evict_perplexity(model, ids, "full", len(ids), chunk=args.kv_chunk)}
    log(f"  full: {out['results']['full']['100%']:.3f} ({time.perf_counter() - t:.0f}s)")
    for policy in ("streaming", "h2o", "scissorhands"):
        out["results"][policy] = {}
        for frac in (0.25, 0.5):
            t = time.perf_counter()
            ppl = evict_perplexity(model, ids, policy, int(len(ids) * frac), chunk=args.kv_chunk)
            out["results"][policy][f"{int(frac * 100)}%"] = ppl
            log(f"  {policy} {frac:.0%}: {ppl:.3f} ({time.perf_counter() - t:.0f}s)")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="model folder or .gguf (default: the default model)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sections", default="concurrency,prefix,spec,kv")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--concurrency", default="1,4,16,32")
    ap.add_argument("--batch-tokens", type=int, default=256)
    ap.add_argument("--prefix-len", type=int, default=384)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--spec-tokens", type=int, default=64)
    ap.add_argument("--spec-rounds", type=int, default=2)
    ap.add_argument("--kv-len", type=int, default=512)
    ap.add_argument("--kv-chunk", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2, help="compile section: alternating eager/compiled rounds")
    ap.add_argument("--out", default=None, help="write the JSON results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import leanlm

    model, tok = leanlm.load(args.model)
    model.eval()
    res = {"model": getattr(model, "source", None), "threads": args.threads, "torch": torch.__version__,
           "args": vars(args)}
    fns = {"concurrency": bench_concurrency, "prefix": bench_prefix, "spec": bench_spec, "kv": bench_kv,
           "compile": bench_compile}
    for sec in args.sections.split(","):
        log(f"[{sec}]")
        t = time.perf_counter()
        res[sec] = fns[sec](model, tok, args)
        res[sec]["wall_s"] = time.perf_counter() - t
        if args.out:
            with open(args.out + ".tmp", "w") as f:
                json.dump(res, f, indent=1, default=str)
            import os

            os.replace(args.out + ".tmp", args.out)
    print(json.dumps(res, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
