"""Quantized KV cache on the default model: perplexity cost and bytes per token.

    python benchmarks/kv_quant.py --tokens 2048 --chunk 64

The packaged evaluation text is read in chunks of --chunk tokens through each cache, so every chunk
attends to the stored (quantized) keys and values of the ones before it, as decoding would.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import leanlm  # noqa: E402
from leanlm.data.text import packaged_text  # noqa: E402
from leanlm.infer.kv_quant import QuantizedKVCache, cached_nll, float_cache_bytes  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, tok = leanlm.load()
    ids = torch.tensor([tok.encode(packaged_text("eval"))[: a.tokens]])
    T = ids.shape[1]
    rows = []
    for bits in (None, 8, 4, 2):
        cache = model.new_cache(1, T) if bits is None else QuantizedKVCache(model.config, 1, T, bits=bits)
        t0 = time.perf_counter()
        nll, n = cached_nll(model, ids, cache, a.chunk)
        dt = time.perf_counter() - t0
        size = float_cache_bytes(model.config, 1, T) if bits is None else cache.packed_bytes()
        rows.append({"kv": "fp32" if bits is None else f"int{bits}", "perplexity": round(math.exp(nll / n), 3),
                     "bytes_per_token": size // T, "seconds": round(dt, 1)})
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    print("\n| KV cache | perplexity | + vs fp32 | bytes/token | x smaller | seconds |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kv']} | {r['perplexity']} | {r['perplexity'] - base['perplexity']:+.3f} | "
              f"{r['bytes_per_token']:,} | {base['bytes_per_token'] / r['bytes_per_token']:.2f} | {r['seconds']} |")


if __name__ == "__main__":
    main()
