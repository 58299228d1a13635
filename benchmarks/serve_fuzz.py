"""schemathesis against `leanlm serve`'s own /openapi.json, many examples (CI runs a bounded few).

Serves a tiny random model (2 layers, hidden 64) with the default model's tokenizer and chat template
in-process, runs the schemathesis CLI against it (positive and negative cases for every operation),
and reports the requests the server received by status: server errors (5xx) and hangs (408 or
client timeouts) must be zero.

    PYTHONPATH=. python benchmarks/serve_fuzz.py --max-examples 300 --json
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-examples", type=int, default=300, help="per operation and phase")
    ap.add_argument("--request-timeout", type=float, default=60.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import torch

    import leanlm
    from leanlm.infer.engine import Engine
    from leanlm.model import ModelConfig
    from leanlm.model.transformer import Transformer
    from leanlm.serve.app import build_app
    from leanlm.serve.cli import serve_in_thread
    from leanlm.serve.engine_loop import AsyncEngine

    torch.manual_seed(0)
    _, tok = leanlm.load()
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
    model = Transformer(cfg).eval()
    eng = Engine(model, block_size=16, num_blocks=512, max_num_seqs=16, eos_ids=tuple(tok.eos_ids))
    aeng = AsyncEngine(eng)
    app = build_app(aeng, tok, "tiny", request_timeout=args.request_timeout)
    srv, th, url = serve_in_thread(app)
    exe = shutil.which("schemathesis") or shutil.which("st")
    cmd = [exe, "run", url + "/openapi.json", "--max-examples", str(args.max_examples),
           "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                       "response_schema_conformance,negative_data_rejection",
           "--request-timeout", str(args.request_timeout + 5), "--seed", "1", "--workers", "4"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    counts = app.state.server.http
    total = sum(n for (p, s), n in counts.items() if p != "/openapi.json")
    s5xx = sum(n for (p, s), n in counts.items() if s >= 500)
    s408 = sum(n for (p, s), n in counts.items() if s == 408)
    t1 = time.monotonic()
    while eng.has_unfinished() and time.monotonic() - t1 < 60:
        time.sleep(0.1)
    out = {"command": " ".join(cmd[1:2] + ["URL/openapi.json"] + cmd[3:]), "seconds": wall, "requests": total,
           "server_errors_5xx": s5xx, "timeouts_408": s408, "schemathesis_exit": proc.returncode,
           "by_status": dict(sorted((f"{p} {s}", n) for (p, s), n in counts.items())),
           "kv_blocks_free_at_end": eng.cache.alloc.num_available(), "kv_blocks_total": eng.cache.alloc.num_blocks,
           "summary": [ln for ln in proc.stdout.splitlines() if ln.strip()][-12:]}
    srv.should_exit = True
    th.join(10)
    aeng.shutdown()
    print("\n".join(out["summary"]), file=sys.stderr)
    for k in ("seconds", "requests", "server_errors_5xx", "timeouts_408", "schemathesis_exit"):
        print(f"{k:20s} {out[k]}", file=sys.stderr)
    if args.json:
        print(json.dumps(out))
    return 0 if s5xx == 0 and s408 == 0 and proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
