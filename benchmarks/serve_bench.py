"""HTTP-level serving benchmark: the official `openai` async client against `leanlm serve` on 127.0.0.1.

Runs the server in-process (uvicorn on a background thread) over the default model, sends the
same requests with N concurrent clients, and reports generated tokens/s and p50/p99 latency next
to the in-process engine on the same requests (the HTTP + tokenization + SSE overhead).

    python benchmarks/serve_bench.py --threads 1 --concurrency 1,16 --requests 16 --new-tokens 16

With --llama-server BIN --gguf-dir DIR it compares `leanlm serve` with llama.cpp's `llama-server`
instead: both run as their own processes on 127.0.0.1, get the same prompts from the same client
code (greedy, the same max_tokens, `ignore_eos`) and the same thread count, at each precision of
--precisions (fp32: the F32 GGUF against the default model; q4_0: the Q4_0 GGUF against leanlm's
symmetric 4-bit, groups of 32, int8 embedding, the same layout).

    python benchmarks/serve_bench.py --llama-server /path/to/llama-server --gguf-dir /tmp/gguf \
        --precisions fp32,q4_0 --threads 2 --concurrency 1,16 --requests 32 --new-tokens 64 --json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, -(-len(xs) * q // 100) - 1))]


async def run_clients(url: str, model: str, prompts: list[str], n: int, new_tokens: int, stream: bool) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    queue = list(enumerate(prompts))
    lat, ttft, toks, ptoks = [], [], 0, 0

    async def worker():
        nonlocal toks, ptoks
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
                        ptoks += ev.usage.prompt_tokens
                ttft.append(first or 0.0)
            else:
                r = await client.completions.create(model=model, prompt=p, max_tokens=new_tokens, temperature=0,
                                                    extra_body={"ignore_eos": True})
                toks += r.usage.completion_tokens
                ptoks += r.usage.prompt_tokens
            lat.append(time.perf_counter() - t)
    t0 = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(n)])
    wall = time.perf_counter() - t0
    out = {"seconds": wall, "tokens_per_s": toks / wall, "latency_p50": pct(lat, 50), "latency_p99": pct(lat, 99),
           "completion_tokens": toks, "prompt_tokens": ptoks}
    if ttft:
        out["ttft_mean"] = sum(ttft) / len(ttft)
    await client.close()
    return out


# ------------------------------------------------------------------ side by side with llama-server
# precision -> (the GGUF file's type tag, leanlm's counterpart: None = the default model in fp32, else a recipe).
# Q4_0: symmetric 4-bit in blocks of 32, the embedding Q8_0 = w4a16-rtn-g32 (sym) + -e8 (int8 embedding rows).
# Q8_0: blocks of 32; leanlm's int8 path has one scale per output channel and an fp32 embedding (closest, not equal).
PRECISIONS = {"fp32": ("f32", None), "q8_0": ("q8_0", "w8a16-rtn"), "q4_0": ("q4_0", "w4a16-rtn-g32-e8")}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find_gguf(folder: str, tag: str):
    """The one *.gguf in folder whose name ends in the type tag (smol-f32.gguf, model.Q4_0.gguf, q4_0.gguf)."""
    from pathlib import Path

    from leanlm.errors import LeanLMError

    if not Path(folder).is_dir():
        raise LeanLMError(f"--gguf-dir {folder}: no such folder")
    found = sorted(p for p in Path(folder).glob("*.gguf")
                   if p.stem.lower() == tag or p.stem.lower().endswith(("-" + tag, "_" + tag, "." + tag)))
    if len(found) != 1:
        raise LeanLMError(f"--gguf-dir {folder}: {len(found)} files named *-{tag}.gguf "
                          f"({', '.join(p.name for p in found) or 'none'}); want exactly one")
    return found[0]


def parse_precisions(spec: str) -> list[str]:
    from leanlm.errors import LeanLMError

    out = [p.strip().lower() for p in spec.split(",") if p.strip()]
    bad = [p for p in out if p not in PRECISIONS]
    if bad or not out:
        raise LeanLMError(f"--precisions {spec!r}: choose from {', '.join(PRECISIONS)}")
    return list(dict.fromkeys(out))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc, log: str, timeout: float = 300.0) -> None:
    """Poll GET /health until 200 (llama-server answers 503 while it loads); fail if the process ends."""
    import urllib.request

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready; "
                               f"the end of {log}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    stop(proc)
    raise RuntimeError(f"the server on {url} was not ready within {timeout:.0f} s; the end of {log}:\n{tail(log)}")


def tail(path: str, n: int = 20) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (Linux /proc): on a shared core, the work the
    server did, apart from the time it waited for the other tenants."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def llama_cmd(bin_: str, gguf, port: int, threads: int, slots: int, slot_ctx: int) -> list[str]:
    """llama-server with one slot per client: -np slots, each slot slot_ctx tokens of context (-c is shared
    out evenly among the slots), continuous batching (its default), no web UI."""
    return [bin_, "-m", str(gguf), "-np", str(slots), "-c", str(slots * slot_ctx), "-t", str(threads),
            "-tb", str(threads), "--host", "127.0.0.1", "--port", str(port), "--no-webui"]


def leanlm_cmd(model, port: int, threads: int, slots: int, max_batch_tokens: int) -> list[str]:
    return [sys.executable, "-m", "leanlm", "serve"] + ([str(model)] if model else []) + [
        "--port", str(port), "--threads", str(threads), "--max-num-seqs", str(slots),
        "--max-batch-tokens", str(max_batch_tokens)]


def child_env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def one_server(cmd: list[str], port: int, log: str, env: dict, prompts: list[str], n: int, args) -> dict:
    """Start a server, wait until ready, one short untimed request (warm-up), the timed load, stop it."""
    import urllib.request

    url = f"http://127.0.0.1:{port}"
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        wait_ready(url, proc, log)
        with urllib.request.urlopen(url + "/v1/models", timeout=30) as r:
            name = json.loads(r.read())["data"][0]["id"]
        asyncio.run(run_clients(url, name, ["The weather today is"], 1, 4, False))
        cpu = cpu_seconds(proc.pid)
        r = asyncio.run(run_clients(url, name, prompts, n, args.new_tokens, args.stream))
        r["server_cpu_s"] = cpu_seconds(proc.pid) - cpu
        return r
    finally:
        stop(proc)


def compare(args) -> int:
    """leanlm serve against llama-server, per precision and concurrency, the same prompts and client."""
    import tempfile

    import leanlm
    from leanlm.errors import LeanLMError
    from leanlm.report import emit_json, print_table

    precs = parse_precisions(args.precisions)
    ggufs = {p: find_gguf(args.gguf_dir, PRECISIONS[p][0]) for p in precs}
    conc = [int(c) for c in args.concurrency.split(",")]
    slots = args.slots or max(conc)
    _, tok = leanlm.load(args.model)
    prompts, ids = make_prompts(tok, args.requests)
    need = max(len(i) for i in ids) + args.new_tokens + 8
    if need > args.slot_ctx:
        raise LeanLMError(f"--slot-ctx {args.slot_ctx} is below the longest prompt + --new-tokens ({need})")
    version = subprocess.run([args.llama_server, "--version"], check=False, capture_output=True, text=True)
    version = " ".join((version.stdout + version.stderr).split())
    res = {"threads": args.threads, "requests": args.requests, "new_tokens": args.new_tokens, "stream": args.stream,
           "slots": slots, "slot_ctx": args.slot_ctx, "max_batch_tokens": args.max_batch_tokens,
           "llama_server": version, "rows": []}
    env = child_env(args.threads)
    with tempfile.TemporaryDirectory(prefix="serve_bench_") as work:
        log = os.path.join(work, "servers.log")
        try:
            for prec in precs:
                recipe = PRECISIONS[prec][1]
                model = args.model
                if recipe:  # leanlm's counterpart, written once as a user would: leanlm compress
                    model = os.path.join(work, prec)
                    cmd = [sys.executable, "-m", "leanlm", "compress"] + ([args.model] if args.model else []) + [
                        "--recipe", recipe, "-o", model, "--no-eval", "--threads", str(args.threads)]
                    with open(log, "a") as f:
                        if subprocess.run(cmd, check=False, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode:
                            raise RuntimeError(f"{' '.join(cmd)} failed; the end of its log:\n{tail(log)}")
                for n in conc:
                    got = {}
                    for server in ("llama.cpp", "leanlm"):
                        port = free_port()
                        cmd = (llama_cmd(args.llama_server, ggufs[prec], port, args.threads, slots, args.slot_ctx)
                               if server == "llama.cpp" else
                               leanlm_cmd(model, port, args.threads, slots, args.max_batch_tokens))
                        r = got[server] = one_server(cmd, port, log, env, prompts, n, args)
                        row = {"precision": prec, "concurrent": n, "server": server,
                               "model": ggufs[prec].name if server == "llama.cpp" else (recipe or "fp32 (default)"),
                               "tokens/s": r["tokens_per_s"], "p50 s": r["latency_p50"], "p99 s": r["latency_p99"],
                               "completion tokens": r["completion_tokens"], "prompt tokens": r["prompt_tokens"],
                               "server CPU s": r["server_cpu_s"],
                               "tokens per CPU s": r["completion_tokens"] / max(r["server_cpu_s"], 1e-9)}
                        if "ttft_mean" in r:
                            row["mean TTFT s"] = r["ttft_mean"]
                        if server == "leanlm":
                            ref = got["llama.cpp"]
                            row["leanlm / llama.cpp"] = r["tokens_per_s"] / ref["tokens_per_s"]
                            row["CPU time ratio"] = ref["server_cpu_s"] / max(r["server_cpu_s"], 1e-9)
                        res["rows"].append(row)
                        print(f"{prec} N={n} {server}: {r['tokens_per_s']:.2f} tok/s ({r['completion_tokens']} "
                              "tokens)", file=sys.stderr, flush=True)
        except BaseException:
            print(f"server log ({log}):\n{tail(log, 40)}", file=sys.stderr)
            raise
    expected = args.requests * args.new_tokens
    short = [r for r in res["rows"] if r["completion tokens"] != expected]
    if short:
        print(f"note: {len(short)} runs generated other than {expected} tokens (see 'completion tokens')",
              file=sys.stderr)
    os.environ.setdefault("COLUMNS", "160")  # rich's width when stdout is not a terminal: room for every column
    cols = ["precision", "concurrent", "server", "tokens/s", "p50 s", "p99 s", "completion tokens", "prompt tokens",
            "server CPU s", "tokens per CPU s", "leanlm / llama.cpp", "CPU time ratio"]
    print_table(f"leanlm serve vs llama-server: {args.requests} requests x {args.new_tokens} tokens, "
                f"{args.threads} threads, {slots} slots", res["rows"],
                cols + (["mean TTFT s"] if args.stream else []))
    if args.json:
        emit_json(res)
    return 0


def make_prompts(tok, n: int) -> tuple[list[str], list[list[int]]]:
    """n text prompts of 32-128 tokens from the packaged evaluation text, and their token ids."""
    from leanlm.data import packaged_text

    ids = tok.encode(packaged_text("eval"))
    prompts = [tok.decode(ids[i * 1013:i * 1013 + 32 + (i * 37) % 97]) for i in range(n)]
    return prompts, [tok.encode(p) for p in prompts]  # the ids: what the server will see


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--stream", action="store_true", help="SSE streaming requests (also measures TTFT)")
    g = ap.add_argument_group("side by side with llama.cpp's server")
    g.add_argument("--llama-server", default=None, metavar="BIN", help="llama-server binary: compare with it")
    g.add_argument("--gguf-dir", default=None, help="folder with the model's GGUFs, named *-f32.gguf, *-q4_0.gguf, ...")
    g.add_argument("--precisions", default="fp32,q4_0", help="comma list of " + ", ".join(PRECISIONS))
    g.add_argument("--slots", type=int, default=None,
                   help="llama-server -np and leanlm --max-num-seqs (default: the largest --concurrency)")
    g.add_argument("--slot-ctx", type=int, default=512, help="context per slot (llama-server -c = slots x this)")
    g.add_argument("--max-batch-tokens", type=int, default=512,
                   help="leanlm's engine token budget per step (default 512: llama-server's -ub)")
    g.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.llama_server:
        return compare(args)

    import leanlm
    from leanlm.eval.concurrency import bench_concurrency
    from leanlm.serve import cli

    model, tok = leanlm.load(args.model)
    model.eval()
    prompts, prompts_ids = make_prompts(tok, args.requests)
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
