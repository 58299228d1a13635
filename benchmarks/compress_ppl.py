"""The compression step of a `benchmarks/distill.py job` alone, then perplexity on packaged texts.

    python benchmarks/compress_ppl.py --recipe w3a16-gptq-g64 --threads 1 --texts tech,eval

Same model, calibration windows (64 x 256 of packaged:prose, seed 0) and scoring (first --eval-chars
characters, windows of 512, no overlap) as distill.py; prints one JSON line with the md5 of the
calibration ids (same windows across checkouts), the compression seconds and each text's perplexity.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--recipe", default="w3a16-gptq-g64")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calib", default="packaged:prose")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--texts", default="tech")
    p.add_argument("--eval-chars", type=int, default=20000)
    a = p.parse_args()

    import torch

    import leanlm
    from leanlm.compress.recipe import apply_recipe, load_recipe
    from leanlm.data import calibration_samples, packaged_text
    from leanlm.eval.perplexity import perplexity

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model, tok = leanlm.load(None, dtype=torch.float32)
    samples = calibration_samples(tok, a.samples, a.seq_len, path=a.calib, seed=0)
    t0 = time.perf_counter()
    apply_recipe(model, load_recipe(a.recipe), samples, progress=False)
    out = {"recipe": a.recipe, "threads": a.threads, "torch": torch.__version__,
           "calib_md5": hashlib.md5(samples.numpy().tobytes()).hexdigest(), "compress_s": time.perf_counter() - t0}
    for name in a.texts.split(","):
        text = packaged_text(name)[: a.eval_chars]
        out[f"ppl_{name}"] = perplexity(model, tok, text, ctx=512, stride=512, progress=False)["perplexity"]
    out["loadavg"] = os.getloadavg()
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
