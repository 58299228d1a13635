"""Soak test: many concurrent `openai` clients against `leanlm serve` for minutes, then check nothing leaked.

The server runs in-process (uvicorn on a thread) over the default model with LoRA adapters served by
name (random adapters written to a temporary folder). Each client loops: a random request (completions
or chat, streaming or not, prompt 2..~400 tokens, max_tokens 1..64, base model or an adapter), and
some streams are dropped mid-way (cancellations). The server's --max-pending is below the number of
clients so 429s happen; a client that gets one waits Retry-After seconds and goes on. At the end:
requests served, 429s, cancellations, every other failure (must be 0), KV blocks free == total,
RSS at start and end.

    python benchmarks/serve_soak.py --minutes 10 --clients 64 --adapters 2 --json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def random_adapters(k: int, folder: str) -> list[tuple[str, str]]:
    import torch

    import leanlm
    from leanlm import peft

    out = []
    for i in range(k):
        model, _ = leanlm.load()
        peft.apply(model, "lora", r=8, alpha=16.0)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)
        out.append((f"lora{i}", str(peft.save_adapter(model, f"{folder}/lora{i}"))))
        del model
    return out


async def client_loop(i: int, url: str, names: list[str], words: list[str], until: float, stats: dict):
    import openai

    rng = random.Random(i)
    c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
    while time.monotonic() < until:
        model = rng.choice(names)
        prompt = " ".join(rng.choice(words) for _ in range(rng.choice([2, 8, 32, 120, 400])))
        kw = dict(model=model, max_tokens=rng.randint(1, 64), temperature=rng.choice([0, 0.8]),
                  seed=rng.randrange(1 << 63) if rng.random() < 0.5 else None)
        chat, stream = rng.random() < 0.5, rng.random() < 0.5
        cancel = stream and rng.random() < 0.15
        try:
            if chat:
                call = c.chat.completions.create(messages=[{"role": "user", "content": prompt}], stream=stream, **kw)
            else:
                call = c.completions.create(prompt=prompt, stream=stream, **kw)
            r = await call
            if stream:
                n = 0
                async for _ in r:
                    n += 1
                    if cancel and n == 3:
                        break
                await r.close()
                if cancel and n >= 3:
                    stats["cancelled"] += 1
                    continue
            stats["served"] += 1
        except openai.RateLimitError as e:
            stats["429"] += 1
            await asyncio.sleep(float(e.response.headers.get("retry-after", "1")))
        except Exception as e:  # anything else is a failure of the server
            stats["failures"] += 1
            stats["failure_examples"].append(f"{type(e).__name__}: {str(e)[:200]}")
    await c.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=2)
    ap.add_argument("--max-pending", type=int, default=48, help="below --clients, so 429s happen")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import torch

    import leanlm
    from leanlm.serve import cli

    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="leanlm-soak-")
    adapters = random_adapters(args.adapters, tmp)
    model, tok = leanlm.load()
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    sargs = p.parse_args(["--max-model-len", "1024", "--max-pending", str(args.max_pending), "--max-num-seqs", "32",
                          *[x for n, path in adapters for x in ("--lora", f"{n}={path}")]])
    app, aeng = cli.make_server(model, tok, sargs)
    srv, th, url = cli.serve_in_thread(app)
    names = ["SmolLM2-135M-Instruct"] + [n for n, _ in adapters]
    words = ("the quick brown fox jumps over a lazy dog while seven tired cats watch from the old stone wall "
             "and a river runs past the mill toward the sea under grey clouds").split()
    stats = {"served": 0, "429": 0, "cancelled": 0, "failures": 0, "failure_examples": []}
    rss0 = rss_mb()
    t0 = time.monotonic()
    until = t0 + args.minutes * 60

    async def run():
        await asyncio.gather(*(client_loop(i, url, names, words, until, stats) for i in range(args.clients)))
    asyncio.run(run())
    wall = time.monotonic() - t0
    eng = aeng.engine
    t1 = time.monotonic()
    while (eng.has_unfinished() or aeng.num_pending) and time.monotonic() - t1 < 60:
        time.sleep(0.1)
    alloc = eng.cache.alloc
    out = dict(minutes=wall / 60, clients=args.clients, adapters=args.adapters, served=stats["served"],
               rejected_429=stats["429"], cancelled=stats["cancelled"], failures=stats["failures"],
               failure_examples=stats["failure_examples"][:5],
               kv_blocks_total=alloc.num_blocks, kv_blocks_free_at_end=alloc.num_available(),
               rss_mb_start=rss0, rss_mb_end=rss_mb(), generated_tokens=eng.stats["generation_tokens"],
               engine_step_errors=aeng.step_errors, engine_restarts=aeng.restarts,
               http=dict(sorted((f"{p} {s}", n) for (p, s), n in app.state.server.http.items())))
    alloc.check_whole()
    srv.should_exit = True
    th.join(10)
    aeng.shutdown()
    for k, v in out.items():
        print(f"{k:24s} {v}", file=sys.stderr)
    if args.json:
        print(json.dumps(out))
    return 0 if out["failures"] == 0 and out["kv_blocks_free_at_end"] == out["kv_blocks_total"] else 1


if __name__ == "__main__":
    sys.exit(main())
