"""`leanlm compress [MODEL] --recipe NAME|FILE -o OUT`: apply a recipe, save, print a before/after table.

The table: perplexity on (the first --eval-chars characters of) the packaged evaluation text,
size (fp32 weights before; the written safetensors after), decode tokens/s at batch 1, time
taken, peak RSS of the process. The recipe is validated against the model before any work.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from leanlm.errors import LeanLMError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="Hugging Face folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--recipe", required=True,
                   help="built-in name (w4a16-gptq-g128, nf4, w8a8-smoothquant, ... or w{bits}a16-{method}-g{size}) "
                        "or a YAML file")
    p.add_argument("-o", "--output", required=True, help="output model folder")
    p.add_argument("--calib", default=None, metavar="SPEC",
                   help="calibration set: SOURCE[=WEIGHT][,SOURCE[=WEIGHT]...], SOURCE a .txt/.jsonl file or "
                        "packaged:prose|code|docs|chat|mix, e.g. packaged:prose=0.4,mine.jsonl=0.6 "
                        "(default: the recipe file's calib:, else packaged:mix, the packaged mix)")
    p.add_argument("--samples", type=int, default=64, help="calibration samples")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-chars", type=int, default=20000,
                   help="characters of the evaluation text for the perplexity columns (0: whole text)")
    p.add_argument("--ctx", type=int, default=512, help="perplexity window")
    p.add_argument("--no-eval", action="store_true", help="skip the before/after measurements")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--gptq-export", default=None, metavar="DIR",
                   help="also write the GPTQ layout (qweight/qzeros/scales/g_idx) for 4-bit models")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def measure(model, tok, text: str | None, ctx: int, decode_tokens: int = 32) -> dict:
    from leanlm.eval.describe import model_bytes
    from leanlm.eval.bench import time_decode

    out = {"weights_mb": model_bytes(model) / 1e6}
    if text is not None:
        from leanlm.eval.perplexity import perplexity

        out["perplexity"] = perplexity(model, tok, text, ctx=ctx, stride=ctx, progress=False)["perplexity"]
    time_decode(model, 8, 2)  # warm-up (builds packed kernels)
    runs = sorted(time_decode(model, 32, decode_tokens, seed=r)[1] for r in range(3))
    out["decode_tok_s"] = 1.0 / runs[1]
    return out


def calib_spec(args, recipe) -> str | None:
    """--calib, else the recipe file's `calib:`, else None (the packaged default mix)."""
    return args.calib if args.calib is not None else recipe.calib


def load_samples(args, tok, recipe):
    if not recipe.needs_data:
        return None
    from leanlm.data import calibration_samples

    return calibration_samples(tok, args.samples, args.seq_len, path=calib_spec(args, recipe), seed=args.seed)


def run(args) -> int:
    import torch

    import leanlm
    from leanlm.compress.recipe import apply_recipe, load_recipe, resolve
    from leanlm.eval.bench import peak_rss_mb
    from leanlm.report import emit_json, print_table

    if args.samples < 1 or args.seq_len < 2:
        raise LeanLMError("--samples must be >= 1 and --seq-len >= 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe)
    plan = None
    if recipe.needs_data:  # a bad calibration spec stops before any work
        from leanlm.data import calibration_plan

        plan = calibration_plan(calib_spec(args, recipe), args.samples)
    model, tok = leanlm.load(args.model, dtype=torch.float32)
    resolve(recipe, model)  # every step checked before any work
    out = Path(args.output)
    text = None
    if not args.no_eval:
        from leanlm.data import packaged_text

        text = packaged_text("eval")
        if args.eval_chars:
            text = text[: args.eval_chars]
    from leanlm.eval.describe import model_bytes

    before = measure(model, tok, text, args.ctx) if not args.no_eval else {}
    before["size_mb"] = model_bytes(model) / 1e6  # what an uncompressed save of these weights holds
    t0 = time.perf_counter()
    samples = load_samples(args, tok, recipe)
    apply_recipe(model, recipe, samples, progress=not args.json)
    model.eval()
    took = time.perf_counter() - t0
    leanlm.save(model, tok, out)
    if args.gptq_export:
        from leanlm.compress.export_gptq import export_gptq

        export_gptq(model, tok, args.gptq_export)
    after = measure(model, tok, text, args.ctx) if not args.no_eval else {}
    after["size_mb"] = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e6
    rows = []
    for k, label in (("perplexity", "perplexity"), ("size_mb", "size MB"), ("decode_tok_s", "decode tok/s (batch 1)")):
        b, a = before.get(k), after.get(k)
        if a is None:
            continue
        rows.append({"metric": label, "before": b if b is not None else "", "after": a,
                     "ratio": (a / b) if b else ""})
    rows.append({"metric": "time s", "before": "", "after": took, "ratio": ""})
    rows.append({"metric": "peak RSS MB", "before": "", "after": peak_rss_mb(), "ratio": ""})
    print_table(f"compress {args.recipe} -> {out}", rows, ["metric", "before", "after", "ratio"])
    if args.json:
        emit_json({"recipe": args.recipe, "output": str(out), "before": before, "after": after, "time_s": took,
                   "peak_rss_mb": peak_rss_mb(), "samples": None if samples is None else list(samples.shape),
                   "calib": plan,
                   "eval_chars": None if text is None else len(text)})
    return 0
