"""CPU time of one engine decode step, eager vs piecewise compiled (Engine(compile=True)), side by side.

N sequences with 64-token prompts are prefilled on twin engines; then decode steps of the two alternate
and each is timed with time.process_time (CPU time of this process: robust to a shared core). Results:
docs/bench/serving.md, section 9.

    python benchmarks/engine_compile_step.py --threads 1 --batches 1,16 --steps 6
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import leanlm
    from leanlm.data import packaged_text
    from leanlm.infer.engine import Engine, SamplingParams

    model, tok = leanlm.load(args.model)
    model.eval()
    ids = tok.encode(packaged_text("eval")[:20000])

    def engine(n, comp):
        e = Engine(model, compile=comp)
        for i in range(n):
            e.add_request(ids[i * 50:i * 50 + 64], SamplingParams(max_tokens=args.steps + 8, ignore_eos=True))
        while e.waiting or any(s.num_computed < len(s.tokens) - 1 for s in e.running):
            e.step()  # prefill
        e.step()  # the first decode step (compiles on the compiled engine)
        return e

    out = {"threads": args.threads, "steps": args.steps, "median_cpu_ms": {}}
    with torch.inference_mode():
        for n in (int(b) for b in args.batches.split(",")):
            es = {c: engine(n, c) for c in ("eager", "compiled")}
            ms = {c: [] for c in es}
            for _ in range(args.steps):
                for c, e in es.items():
                    t = time.process_time()
                    e.step()
                    ms[c].append(1000 * (time.process_time() - t))
            med = {c: statistics.median(v) for c, v in ms.items()}
            out["median_cpu_ms"][n] = {**med, "all": ms, "compiled_over_eager": med["compiled"] / med["eager"]}
            print(f"batch {n}: eager {med['eager']:.1f} ms, compiled {med['compiled']:.1f} ms CPU per decode step",
                  flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
