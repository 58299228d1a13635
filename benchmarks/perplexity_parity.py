"""Perplexity of the default model on the packaged evaluation text: leanlm vs transformers, same GGUF.

    OMP_NUM_THREADS=2 python benchmarks/perplexity_parity.py --threads 2 --max-chars 60000

Both models run through the same sliding-window loop (leanlm.eval.perplexity; transformers' model is
passed in directly), so the time ratio compares the models, and the perplexities must agree (the
loop itself is checked against the loop of transformers' guide in tests/test_perplexity.py).
transformers dequantizes the GGUF itself (gguf_file=...), independently of leanlm's GGUF reader.
Prints one JSON object as the last line.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-chars", type=int, default=None, help="evaluate only this many leading characters")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="also run leanlm in bfloat16")
    ap.add_argument("--reps", type=int, default=5, help="interleaved timing repetitions (0: skip)")
    ap.add_argument("--timing-chars", type=int, default=6000, help="text length of one timing repetition")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import leanlm
    from leanlm.data import packaged_text
    from leanlm.eval import perplexity

    text = packaged_text("eval")[: args.max_chars]
    kw = dict(ctx=args.ctx, stride=args.stride, batch_size=args.batch_size, progress=True)
    t = time.perf_counter()
    model, tok = leanlm.load()
    rows = {"load_s": {"leanlm": time.perf_counter() - t}}

    def run(name, m):
        t0 = time.perf_counter()
        out = perplexity(m, tok, text, **kw)
        out["seconds"] = time.perf_counter() - t0
        out["scored_tokens_per_s"] = out["tokens"] / out["seconds"]
        rows[name] = out
        print(name, out, flush=True)

    run("leanlm_fp32", model)
    if not args.no_transformers:
        import transformers

        folder, name = model.source.rsplit("/", 1)
        t = time.perf_counter()
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
        rows["load_s"]["transformers"] = time.perf_counter() - t
        run("transformers_fp32", hf)
        a, b = rows["leanlm_fp32"], rows["transformers_fp32"]
        rows["ppl_rel_diff"] = abs(a["perplexity"] - b["perplexity"]) / b["perplexity"]
        if args.reps:
            # the machine is shared: alternate the two models on the same short text and take the
            # median of the per-pair ratios, so both see the same background load
            short = text[: args.timing_chars]
            quiet = dict(kw, progress=False)
            ratios, ts = [], {"leanlm": [], "transformers": []}
            for _ in range(args.reps):
                for key, m in (("leanlm", model), ("transformers", hf)):
                    t0 = time.perf_counter()
                    perplexity(m, tok, short, **quiet)
                    ts[key].append(time.perf_counter() - t0)
                ratios.append(ts["transformers"][-1] / ts["leanlm"][-1])
            rows["interleaved"] = {"chars": len(short), "seconds": ts, "ratios": ratios,
                                   "median_speed_ratio_leanlm_over_transformers": sorted(ratios)[len(ratios) // 2]}
            print("interleaved", rows["interleaved"], flush=True)
        del hf
    if args.bf16:
        run("leanlm_bf16", model.to(torch.bfloat16))
        rows["bf16_ppl_rel_diff"] = rows["leanlm_bf16"]["perplexity"] / rows["leanlm_fp32"]["perplexity"] - 1
        rows["speed_ratio_bf16_over_fp32"] = rows["leanlm_fp32"]["seconds"] / rows["leanlm_bf16"]["seconds"]
    rows["config"] = dict(vars(args), chars=len(text), torch=torch.__version__)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
