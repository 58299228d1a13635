"""What the board measures on one model folder: quality (perplexity, packaged tasks) and batch-1 speed.

Kept apart from the board's orchestration (leanlm/eval/board.py) because its source is part of the
code version that keys the board's cache: a change here re-measures every row.
"""
from __future__ import annotations

import statistics


def measure_quality(cfg, source) -> dict:
    """Perplexity on the packaged evaluation and technical texts, accuracy on the packaged tasks."""
    import leanlm
    from leanlm.eval.describe import model_bytes
    from leanlm.data import packaged_text
    from leanlm.eval.perplexity import perplexity
    from leanlm.eval.tasks import board_accuracy

    model, tok = leanlm.load(source)
    out = {"weights_mb": model_bytes(model) / 1e6, "parameters": model.num_parameters()}
    for key, text in (("ppl_eval", "eval"), ("ppl_tech", "tech")):
        t = packaged_text(text)
        t = t[: cfg.eval_chars] if cfg.eval_chars else t
        res = perplexity(model, tok, t, ctx=cfg.ctx, stride=cfg.ctx, progress=False)
        out[key], out[key.replace("ppl", "bpb")] = res["perplexity"], res["bits_per_byte"]
    out.update(board_accuracy(model, tok, cfg.task_records))
    del model
    return out


def speed_pass(cfg, sources: dict[str, object], progress=None) -> dict[str, dict]:
    """Batch-1 decode and prefill tokens/s of every row, loading each in turn, `rounds` times round-robin."""
    import gc

    import torch

    import leanlm
    from leanlm.eval.bench import time_decode

    dec: dict[str, list[float]] = {n: [] for n in sources}
    pre: dict[str, list[float]] = {n: [] for n in sources}
    for r in range(cfg.rounds):
        for name, src in sources.items():
            model, _ = leanlm.load(src)
            with torch.inference_mode():
                time_decode(model, 8, 2)  # warm-up: fused and packed kernels, allocator
                dec[name].append(1.0 / time_decode(model, cfg.prompt_len, cfg.decode_tokens, seed=r)[1])
                pre[name].append(cfg.prefill_len / time_decode(model, cfg.prefill_len, 0, seed=100 + r)[0])
            del model
            gc.collect()
            if progress:
                progress()
    return {n: {"decode_tok_s": statistics.median(dec[n]), "prefill_tok_s": statistics.median(pre[n]),
                "decode_runs": dec[n], "prefill_runs": pre[n]} for n in sources}
