"""HTTP-level serving benchmark: the official `openai` async client against `leanlm serve` on 127.0.0.1.

Runs the server in-process (uvicorn on a background thread) over the default model, sends the
same requests with N concurrent clients, and reports generated tokens/s and p50/p99 latency next
to the in-process engine on the same requests (the HTTP + tokenization + SSE overhead).

    python benchmarks/serve_bench.py --threads 1 --concurrency 1,16 --requests 16 --new-tokens 16
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import torch


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, -(-len(xs) * q // 100) - 1))]


async def run_clients(url: str, model: str, prompts: list[str], n: int, new_tokens: int, stream: bool) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    queue = list(enumerate(prompts))
    lat, ttft, toks = [], [], 0

    async def worker():
        nonlocal toks
        while queue:
            _, p = queue.pop(0)
            t = time.perf_counter()
            if stream:
                first = None
                async for ev in await client.completions.create(
                        model=model, prompt=p, max_tokens=new_tokens, temperature=0, stream=True,
                        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
                    if first is None and ev.choices and ev.choices[0].text:
                        first = time.perf_counter() - t
                    if ev.usage:
                        toks += ev.usage.completion_tokens
                ttft.append(first or 0.0)
            else:
                r = await client.completions.create(model=model, prompt=p, max_tokens=new_tokens, temperature=0,
                                                    extra_body={"ignore_eos": True})
                toks += r.usage.completion_tokens
            lat.append(time.perf_counter() - t)
    t0 = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(n)])
    wall = time.perf_counter() - t0
    out = {"seconds": wall, "tokens_per_s": toks / wall, "latency_p50": pct(lat, 50), "latency_p99": pct(lat, 99),
           "completion_tokens": toks}
    if ttft:
        out["ttft_mean"] = sum(ttft) / len(ttft)
    await client.close()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--stream", action="store_true", help="SSE streaming requests (also measures TTFT)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import leanlm
    from leanlm.data import packaged_text
    from leanlm.eval.concurrency import bench_concurrency
    from leanlm.serve import cli

    model, tok = leanlm.load(args.model)
    model.eval()
    ids = tok.encode(packaged_text("eval"))
    prompts_ids = [ids[i * 1013:i * 1013 + 32 + (i * 37) % 97] for i in range(args.requests)]
    prompts = [tok.decode(p) for p in prompts_ids]
    prompts_ids = [tok.encode(p) for p in prompts]  # what the server will see
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    sargs = p.parse_args([] if args.model is None else [args.model])
    conc = [int(c) for c in args.concurrency.split(",")]
    res = {"threads": args.threads, "requests": args.requests, "new_tokens": args.new_tokens, "stream": args.stream,
           "http": {}, "engine": {}}
    for n in conc:
        sargs.max_num_seqs = n
        app, aeng = cli.make_server(model, tok, sargs)
        server, th, url = cli.serve_in_thread(app)
        name = app.state.server.model_name
        res["http"][n] = asyncio.run(run_clients(url, name, prompts, n, args.new_tokens,
                                                 args.stream))
        server.should_exit = True
        th.join()
        aeng.shutdown()
        e = bench_concurrency(model, prompts_ids, max_new_tokens=args.new_tokens, concurrency=(n,), sequential=False)
        res["engine"][n] = e["engine"][n]
        res["http"][n]["vs_engine"] = res["http"][n]["tokens_per_s"] / e["engine"][n]["tokens_per_s"]
        print(f"N={n}: http {res['http'][n]['tokens_per_s']:.2f} tok/s, engine {e['engine'][n]['tokens_per_s']:.2f} "
              f"tok/s", file=sys.stderr, flush=True)
    print(json.dumps(res, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
