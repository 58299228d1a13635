"""Speed and memory: prefill and decode tokens/s, time to first token, peak RSS, weight bandwidth.

Decode at batch 1 is memory-bound: each token reads every weight once, so
`model_bytes * decode_tokens_per_s` is the weight bandwidth achieved, to compare with the machine's
memory bandwidth (the ceiling for any decoder on it).
"""
from __future__ import annotations

import resource
import time

import torch

from leanlm.infer.sampling import GenerationConfig
from leanlm.model.layout import embedding


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def weight_bytes_per_token(model) -> int:
    """Bytes of weights a decode step reads: every tensor except the embedding table (one row is read),
    but counting the table once if it doubles as the output head."""
    from leanlm.eval.describe import model_bytes

    total = model_bytes(model)
    emb = embedding(model).weight
    if not model.config.tie_word_embeddings:
        total -= emb.numel() * emb.element_size()
    return total


@torch.inference_mode()
def time_decode(model, prompt_len: int, new_tokens: int, batch: int = 1, seed: int = 0, compile: bool = False):
    """-> (prefill seconds, per-token decode seconds) for one greedy run with a random prompt.
    compile: decode steps through the compiled decoder (leanlm/infer/compiled.py) where the model takes one."""
    from leanlm.infer.compiled import bucket, compiled_decoder
    from leanlm.infer.generate import fuse_for_inference

    fuse_for_inference(model)
    dec = compiled_decoder(model) if compile and new_tokens else None
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=g)
    n = prompt_len + new_tokens + 1
    cache = model.new_cache(batch, n if dec is None else bucket(n))
    t0 = time.perf_counter()
    logits = model(ids, cache=cache, last_only=True)
    nxt = logits[:, -1].argmax(-1)
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        step = model(nxt.unsqueeze(1), cache=cache)[:, -1] if dec is None else dec.decode(cache, nxt.unsqueeze(1))
        nxt = step.argmax(-1)
    t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) / max(new_tokens, 1)


def is_compiled(model) -> bool:
    """Whether decode steps of this model run compiled (False before the first one or after a failure)."""
    from leanlm.infer.compiled import compiled_decoder

    dec = compiled_decoder(model)
    return dec is not None and bool(dec._warm)


def bench(model, prompt_len: int = 128, new_tokens: int = 64, batch: int = 4, repeats: int = 3,
          prefill_len: int = 512, compile: bool | None = None) -> dict:
    """Median of `repeats` runs after one warm-up (which compiles the decode step, timed as warm_up_s).
    compile: decode steps compiled (True) or eager (False, or None: the default until compiling is shown to pay)."""
    compile = bool(compile)
    t = time.perf_counter()
    time_decode(model, 16, 4, 1, compile=compile)  # warm-up: allocator, thread pool, kernels, compilation
    warm_s = time.perf_counter() - t
    if batch > 1:
        time_decode(model, 16, 4, batch, compile=compile)
    runs = [time_decode(model, prompt_len, new_tokens, 1, seed=r, compile=compile) for r in range(repeats)]
    ttft = sorted(r[0] for r in runs)[len(runs) // 2]
    tok_s = 1.0 / sorted(r[1] for r in runs)[len(runs) // 2]
    pre = sorted(time_decode(model, prefill_len, 0, 1, seed=10 + r)[0] for r in range(repeats))[repeats // 2]
    res = {
        "threads": torch.get_num_threads(),
        "dtype": str(model.dtype).replace("torch.", ""),
        "prompt_tokens": prompt_len,
        "new_tokens": new_tokens,
        "decode_tokens_per_s": tok_s,
        "time_to_first_token_s": ttft,
        "prefill_tokens_per_s": prefill_len / pre,
        "prefill_len": prefill_len,
        "compiled_decode": compile and is_compiled(model),
        "warm_up_s": warm_s,  # includes compiling (or loading the compiled step from the on-disk cache)
    }
    if batch > 1:
        runs_b = [time_decode(model, prompt_len, new_tokens, batch, seed=20 + r, compile=compile)
                  for r in range(repeats)]
        res[f"decode_tokens_per_s_batch{batch}"] = batch / sorted(r[1] for r in runs_b)[len(runs_b) // 2]
    nbytes = weight_bytes_per_token(model)
    from leanlm.eval.describe import model_bytes

    res["model_bytes"] = model_bytes(model)
    res["weight_bandwidth_gb_s"] = nbytes * tok_s / 1e9
    res["peak_rss_mb"] = peak_rss_mb()
    return res


def bench_transformers(hf_model, prompt_len: int, new_tokens: int, repeats: int = 3) -> float:
    """transformers' own generate() decode tokens/s on the same weights (reference for docs/benchmarks.md)."""
    def one(seed):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, hf_model.config.vocab_size, (1, prompt_len), generator=g)
        with torch.inference_mode():
            t0 = time.perf_counter()
            hf_model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            t1 = time.perf_counter()
            hf_model.generate(ids, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, do_sample=False)
            t2 = time.perf_counter()
        return ((t2 - t1) - (t1 - t0)) / new_tokens

    one(99)
    return 1.0 / sorted(one(r) for r in range(repeats))[repeats // 2]


def default_generation(max_new_tokens: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=max_new_tokens, ignore_eos=True)
