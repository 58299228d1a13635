"""First vs second start of the compiled decode step: the on-disk compile cache at work.

Each start is a fresh process that loads the default model (or builds a variant in memory), then
times its first compiled decode step (dynamo tracing, AOT and inductor compilation, or loading the
compiled code from the cache). The first start gets an empty cache directory, the second the
directory the first one filled. Also timed: the eager step, for the number of tokens after which
compiling has paid for itself.

    python benchmarks/compile_start.py --threads 2 --variants fp32,w4a16-rtn-g32-e8 --json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
torch.set_num_threads(int(sys.argv[2]))
sys.path.insert(0, sys.argv[3])
import leanlm
from decode_compiled import build
from leanlm.eval.bench import is_compiled, time_decode
base, _ = leanlm.load()
m = build(base, sys.argv[1], {})
time_decode(m, 16, 2)  # eager warm-up: fused and packed kernels
t1 = time.perf_counter()
time_decode(m, 16, 1, compile=True)
t2 = time.perf_counter()
eager = time_decode(m, 128, 32)[1]
comp = time_decode(m, 128, 32, compile=True)[1]
print(json.dumps({"import_load_s": t1 - t0, "first_compiled_step_s": t2 - t1, "eager_step_s": eager,
                  "compiled_step_s": comp, "compiled": is_compiled(m)}))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default="fp32,w4a16-rtn-g32-e8")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    here = os.path.dirname(os.path.abspath(__file__))
    rows = []
    for v in [x.strip() for x in args.variants.split(",") if x.strip()]:
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            for start in ("first", "second"):
                load = os.getloadavg()[0]
                out = subprocess.run([sys.executable, "-c", CHILD, v, str(args.threads), here], env=env,
                                     check=True, capture_output=True, text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                saved = r["eager_step_s"] - r["compiled_step_s"]
                r |= {"variant": v, "start": start, "load_1min": load,
                      "tokens_to_pay_off": r["first_compiled_step_s"] / saved if saved > 0 else None}
                rows.append(r)
                print(f"{v:20s} {start:6s} start: first compiled step {r['first_compiled_step_s']:6.1f} s, "
                      f"eager {1 / r['eager_step_s']:5.1f} tok/s, compiled {1 / r['compiled_step_s']:5.1f} tok/s, "
                      f"pays off after {r['tokens_to_pay_off'] or float('nan'):.0f} tokens (load {load:.1f})",
                      flush=True)
    if args.json:
        print(json.dumps({"threads": args.threads, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
