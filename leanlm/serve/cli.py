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
    p.add_argument("--adapter", default=None, help="a PEFT adapter folder to apply")
    p.add_argument("--max-num-seqs", type=int, default=32, help="requests decoded together")
    p.add_argument("--max-batch-tokens", type=int, default=256, help="token budget of one engine step")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--num-blocks", type=int, default=None, help="KV blocks (default: fits max-num-seqs contexts, "
                                                                "at most 1 GiB)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--no-prefix-caching", action="store_true", help="do not share prompt blocks between requests")


def make_server(model, tokenizer, args) -> tuple:
    """(app, AsyncEngine) for a loaded model and the parsed arguments."""
    from leanlm.infer.engine import Engine
    from leanlm.serve.app import build_app
    from leanlm.serve.engine_loop import AsyncEngine

    for name in ("max_num_seqs", "max_batch_tokens", "block_size"):
        if getattr(args, name) < 1:
            raise LeanLMError(f"--{name.replace('_', '-')} must be at least 1")
    eng = Engine(model, block_size=args.block_size, num_blocks=args.num_blocks,
                 max_batch_tokens=args.max_batch_tokens, max_num_seqs=args.max_num_seqs,
                 prefix_caching=not args.no_prefix_caching, eos_ids=tuple(tokenizer.eos_ids),
                 max_model_len=args.max_model_len)
    aeng = AsyncEngine(eng)
    name = args.served_model_name or _default_name(model, args.model)
    return build_app(aeng, tokenizer, name, api_key=args.api_key), aeng


def _default_name(model, source) -> str:
    from pathlib import Path

    src = source or getattr(model, "source", None)
    if source is None:
        return "SmolLM2-135M-Instruct"
    return Path(str(src).rstrip("/")).stem or "model"


def serve(app, aengine, host: str, port: int, log_level: str = "info"):
    """Run uvicorn until SIGINT/SIGTERM; in-flight requests then end with finish_reason "abort"."""
    try:
        import uvicorn
    except ImportError:
        raise LeanLMError("leanlm serve needs fastapi and uvicorn: pip install fastapi uvicorn")

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            aengine.shutdown(timeout=0)  # streams end now instead of running to max_tokens
            super().handle_exit(sig, frame)

    server = _Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10))
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
    model, tok = leanlm.load(args.model, dtype=args.dtype, adapter=args.adapter)
    model.eval()
    app, aeng = make_server(model, tok, args)
    serve(app, aeng, args.host, args.port)
    return 0
