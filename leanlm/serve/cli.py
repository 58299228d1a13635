"""`leanlm serve [MODEL]`: the OpenAI-compatible server (FastAPI + uvicorn) over the engine."""
from __future__ import annotations

import argparse
import sys

from leanlm.errors import LeanLMError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="Hugging Face folder or .gguf file (default: the packaged SmolLM2-135M-Instruct)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--served-model-name", default=None, help="model id clients send (default: the folder name)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: as stored)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--adapter", default=None, help="a PEFT adapter folder to apply")
    p.add_argument("--max-num-seqs", type=int, default=32, help="requests decoded together")
    p.add_argument("--max-batch-tokens", type=int, default=256, help="token budget of one engine step")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--num-blocks", type=int, default=None, help="KV blocks (default: fits max-num-seqs contexts, "
                                                                "at most 1 GiB)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--no-prefix-caching", action="store_true", help="do not share prompt blocks between requests")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="engine steps through torch.compile: each block's pieces before and after attention, one "
                        "graph for every step size; attention over the paged cache stays eager (default: off; "
                        "the first step compiles, which takes minutes on 2 cores)")
    g = p.add_argument_group("LoRA adapters by name (requests pick one with \"model\": NAME)")
    g.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                   help="serve this LoRA adapter folder under NAME (repeat for more); one batch mixes adapters")
    g.add_argument("--lora-dir", default=None,
                   help="allow POST /v1/load_lora_adapter for folders under this directory")
    g.add_argument("--max-loras", type=int, default=8, help="adapters held in the pool at once (LRU reuse)")
    g.add_argument("--max-lora-rank", type=int, default=16, help="largest adapter rank the pool takes")
    g = p.add_argument_group("speculative decoding (requests ask with \"speculative\": {\"method\": ..., \"k\": K})")
    g.add_argument("--draft", default=None, metavar="MODEL",
                   help="a draft model sharing the tokenizer (folder or .gguf, e.g. a 4-bit `leanlm compress` "
                        "output) for method \"draft\"; its K/V take a pool like the model's (prompt_lookup needs "
                        "nothing)")
    g.add_argument("--layer-skip", nargs="?", const="default", default=None, metavar="LAYERS",
                   help="offer method \"layer_skip\": the model without these layers (e.g. 15,17,19; default: "
                        "every other layer of the second half) drafts for itself")
    g = p.add_argument_group("limits")
    g.add_argument("--max-pending", type=int, default=256,
                   help="requests (choices) queued or running at once; beyond it: 429 with Retry-After")
    g.add_argument("--max-pending-tokens", type=int, default=1 << 20,
                   help="prompt + max_tokens summed over pending requests; beyond it: 429")
    g.add_argument("--max-choices", type=int, default=64, help="prompts x n per request")
    g.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request ends with 408")
    g.add_argument("--max-body-bytes", type=int, default=4 << 20, help="request body limit (413 beyond)")
    g.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM: seconds the requests in flight get to finish before the server exits")


def make_server(model, tokenizer, args, draft=None) -> tuple:
    """(app, AsyncEngine) for a loaded model and the parsed arguments (draft: the loaded --draft model)."""
    from leanlm.infer.engine import Engine
    from leanlm.serve.app import build_app
    from leanlm.serve.engine_loop import AsyncEngine

    from leanlm.serve.engine_loop import Limits

    for name in ("max_num_seqs", "max_batch_tokens", "block_size", "max_pending", "max_pending_tokens",
                 "max_choices", "max_body_bytes", "max_loras", "max_lora_rank"):
        if getattr(args, name) < 1:
            raise LeanLMError(f"--{name.replace('_', '-')} must be at least 1")
    if args.request_timeout <= 0 or args.drain_timeout < 0:
        raise LeanLMError("--request-timeout must be positive and --drain-timeout at least 0")
    name = args.served_model_name or _default_name(model, args.model)
    pool = reg = None
    if args.lora or args.lora_dir:
        from leanlm.peft.multi_lora import LoraPool
        from leanlm.serve.lora import LoraRegistry

        if args.adapter:
            raise LeanLMError("--adapter applies one adapter to the model; with --lora/--lora-dir serve LoRA "
                              "adapters by name instead (not both)")
        pool = LoraPool(model, slots=args.max_loras, max_rank=args.max_lora_rank)
        reg = LoraRegistry(pool, args.lora_dir)
        for spec in args.lora:
            lname, sep, path = spec.partition("=")
            if not sep or not lname or not path:
                raise LeanLMError(f"--lora {spec!r}: write NAME=PATH")
            if lname == name:
                raise LeanLMError(f"--lora {spec!r}: the name is the base model's; choose another")
            reg.add_at_start(lname, path)
    eng = Engine(model, block_size=args.block_size, num_blocks=args.num_blocks,
                 max_batch_tokens=args.max_batch_tokens, max_num_seqs=args.max_num_seqs,
                 prefix_caching=not args.no_prefix_caching, eos_ids=tuple(tokenizer.eos_ids),
                 max_model_len=args.max_model_len, adapters=pool, draft=draft,
                 layer_skip=_layer_skip(getattr(args, "layer_skip", None)),
                 compile=bool(getattr(args, "compile", False)))
    aeng = AsyncEngine(eng, Limits(args.max_pending, args.max_pending_tokens))
    app = build_app(aeng, tokenizer, name, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                    request_timeout=args.request_timeout, max_choices=args.max_choices, loras=reg)
    return app, aeng


def _layer_skip(spec: str | None):
    if spec is None or spec == "default":
        return None if spec is None else True
    try:
        return [int(x) for x in spec.split(",")]
    except ValueError:
        raise LeanLMError(f"--layer-skip {spec!r}: write layer indices separated by commas, e.g. 15,17,19")


def _default_name(model, source) -> str:
    from pathlib import Path

    src = source or getattr(model, "source", None)
    if source is None:
        return "SmolLM2-135M-Instruct"
    return Path(str(src).rstrip("/")).stem or "model"


def serve(app, aengine, host: str, port: int, log_level: str = "info", drain_timeout: float = 30.0):
    """Run uvicorn until SIGINT/SIGTERM. Then no new requests are taken (503), the ones in flight get
    `drain_timeout` seconds to finish, the rest end with an error, and the process exits."""
    import threading

    try:
        import uvicorn
    except ImportError:
        raise LeanLMError("leanlm serve needs fastapi and uvicorn: pip install fastapi uvicorn")

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if not aengine.draining:
                aengine.begin_drain()
                t = threading.Timer(drain_timeout, aengine.shutdown, kwargs=dict(
                    timeout=0, reason=f"the server stopped: requests still running {drain_timeout:g} s after "
                                      "SIGTERM were ended"))
                t.daemon = True
                t.start()
            super().handle_exit(sig, frame)

    server = _Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                    timeout_graceful_shutdown=drain_timeout + 5))
    try:
        server.run()
    finally:
        aengine.shutdown()
    return server


def serve_in_thread(app, host: str = "127.0.0.1", timeout: float = 10.0):
    """Run uvicorn on a free local port in a daemon thread (tests, benchmarks) -> (server, thread, url).
    Stop it with `server.should_exit = True; thread.join()`."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not server.started:
        if not thread.is_alive() or time.monotonic() - t0 > timeout:
            raise RuntimeError(f"the server on {host}:{port} did not start within {timeout:.0f} s")
        time.sleep(0.05)
    return server, thread, f"http://{host}:{port}"


def run(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise LeanLMError("leanlm serve needs fastapi and uvicorn: pip install fastapi uvicorn")
    import leanlm

    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key", file=sys.stderr)
    if args.threads is not None:
        if args.threads < 1:
            raise LeanLMError("--threads must be at least 1")
        import torch

        torch.set_num_threads(args.threads)
    model, tok = leanlm.load(args.model, dtype=args.dtype, adapter=args.adapter)
    model.eval()
    draft = None
    if args.draft:
        draft = leanlm.load(args.draft, dtype=args.dtype)[0].eval()
    app, aeng = make_server(model, tok, args, draft=draft)
    serve(app, aeng, args.host, args.port, drain_timeout=args.drain_timeout)
    return 0
