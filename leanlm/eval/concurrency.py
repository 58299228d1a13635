"""The batching engine under N concurrent clients against plain generation one request at a time
(`leanlm bench --concurrency N`, benchmarks/serve_bench.py)."""
from __future__ import annotations

import math
import time

import torch

from leanlm.errors import LeanLMError


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    i = min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))
    return xs[i]


@torch.inference_mode()
def bench_concurrency(model, prompts: list[list[int]] | None = None, max_new_tokens: int = 64,
                      concurrency: int | tuple[int, ...] = (1, 4, 16, 32), sequential: bool = True,
                      engine_kwargs: dict | None = None, progress=None, *, prompt_len: int = 128,
                      new_tokens: int | None = None, num_requests: int | None = None, seed: int = 0,
                      return_outputs: bool = False) -> dict:
    """Generated tokens/s and latency of the engine with N concurrent clients vs one request at a time.

    Closed loop: each of N clients sends its next prompt as soon as its previous one finishes.
    Every request is greedy and generates exactly max_new_tokens (ignore_eos), so all runs do the
    same work. The sequential baseline is plain generation (static KV cache, batch 1) request after
    request. Returns {"sequential": {...}, "engine": {N: {...}}, ...} with tokens_per_s,
    p50/p99 latency (s), mean time to first token (s), speed-up over sequential and how many
    outputs are identical to the sequential ones. Flat keys (sequential_tokens_per_s,
    x{N}_tokens_per_s, x{N}_speedup, x{N}_latency_p50_s, x{N}_latency_p99_s) summarise it for a table.
    Without prompts: num_requests (default 2 x the largest N) random prompts of prompt_len ids.
    return_outputs: also {"outputs": {N: the generated ids of each prompt}}.
    """
    from leanlm.infer.engine import Engine, SamplingParams
    from leanlm.infer.generate import generate_tokens
    from leanlm.infer.sampling import GenerationConfig

    if isinstance(concurrency, int):
        concurrency = (concurrency,)
    if new_tokens is not None:
        max_new_tokens = new_tokens
    if not concurrency or min(concurrency) < 1 or max_new_tokens < 1:
        raise LeanLMError("bench_concurrency: concurrency and new tokens must be at least 1")
    if prompts is None:
        g = torch.Generator().manual_seed(seed)
        n = num_requests or 2 * max(concurrency)
        prompts = torch.randint(0, model.config.vocab_size, (n, prompt_len), generator=g).tolist()
    out: dict = {"requests": len(prompts), "max_new_tokens": max_new_tokens,
                 "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts), "engine": {}}
    ref = None
    if sequential:
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, ignore_eos=True, stop_token_ids=[])
        lat, ref = [], []
        t0 = time.perf_counter()
        for p in prompts:
            s = time.perf_counter()
            ref.append([step[0] for step in generate_tokens(model, [p], cfg)])
            lat.append(time.perf_counter() - s)
            if progress:
                progress("sequential", len(ref), len(prompts))
        wall = time.perf_counter() - t0
        out["sequential"] = {"seconds": wall, "tokens_per_s": len(prompts) * max_new_tokens / wall,
                             "latency_p50": _pct(lat, 50), "latency_p99": _pct(lat, 99)}
    for n in concurrency:
        kw = dict(max_num_seqs=n)
        kw.update(engine_kwargs or {})
        eng = Engine(model, **kw)
        params = SamplingParams(max_tokens=max_new_tokens, ignore_eos=True)
        nxt, lat, ttft, got = 0, [], [], {}
        sub: dict[str, tuple[int, float]] = {}
        t0 = time.perf_counter()
        while nxt < len(prompts) or eng.has_unfinished():
            while nxt < len(prompts) and len(sub) < n:
                rid = eng.add_request(prompts[nxt], params)
                sub[rid] = (nxt, time.perf_counter())
                got[nxt] = []
                nxt += 1
            for o in eng.step():
                i, s = sub[o.request_id]
                if not got[i]:
                    ttft.append(time.perf_counter() - s)
                got[i].append(o.token)
                if o.finished:
                    lat.append(time.perf_counter() - s)
                    del sub[o.request_id]
                    if progress:
                        progress(f"engine x{n}", len(lat), len(prompts))
        wall = time.perf_counter() - t0
        r = {"seconds": wall, "tokens_per_s": len(prompts) * max_new_tokens / wall,
             "latency_p50": _pct(lat, 50), "latency_p99": _pct(lat, 99), "ttft_mean": sum(ttft) / len(ttft),
             "steps": eng.stats["steps"], "preemptions": eng.stats["preemptions"]}
        if ref is not None:
            r["speedup"] = r["tokens_per_s"] / out["sequential"]["tokens_per_s"]
            r["identical_outputs"] = sum(got[i] == ref[i] for i in range(len(prompts)))
        out["engine"][n] = r
        if return_outputs:
            out.setdefault("outputs", {})[n] = [got[i] for i in range(len(prompts))]
        eng.cache.alloc.check_whole()
    if ref is not None:
        out["sequential_tokens_per_s"] = out["sequential"]["tokens_per_s"]
    for n, r in out["engine"].items():
        out[f"x{n}_tokens_per_s"] = r["tokens_per_s"]
        if ref is not None:
            out[f"x{n}_speedup"] = r["speedup"]
        out[f"x{n}_latency_p50_s"] = r["latency_p50"]
        out[f"x{n}_latency_p99_s"] = r["latency_p99"]
    return out
