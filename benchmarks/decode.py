"""Batch-1 decode and prefill: leanlm vs transformers on the same weights, dtype and threads, in one run.

Also measures the machine's memory read bandwidth (a large tensor sum), the ceiling for batch-1
decode, and reports how close each decoder gets to it.

    python benchmarks/decode.py --threads 2 --json
"""
from __future__ import annotations

import argparse
import time

import torch


def read_bandwidth_gb_s(gib: float = 1.0, repeats: int = 5) -> float:
    x = torch.ones(int(gib * (1 << 30) / 4), dtype=torch.float32)
    x.sum()
    best = min(_timed(lambda: x.sum()) for _ in range(repeats))
    return x.numel() * 4 / best / 1e9


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (leanlm, transformers, ...)")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import leanlm
    from leanlm.eval.bench import time_decode, weight_bytes_per_token
    from leanlm.report import emit_json, print_table

    model, _ = leanlm.load()
    model_bf16, _ = leanlm.load(dtype="bfloat16")
    hf = None
    if not args.no_transformers:
        import transformers

        from leanlm.io.registry import default_gguf_path

        p = default_gguf_path()
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name,
                                                               dtype=torch.float32).eval()

    def hf_decode(seed):
        from leanlm.eval.bench import bench_transformers

        return 1.0 / bench_transformers(hf, args.prompt_len, args.new_tokens, repeats=1)

    def hf_prefill(seed):
        ids = torch.randint(0, 49152, (1, args.prefill_len), generator=torch.Generator().manual_seed(seed))
        with torch.inference_mode():
            return _timed(lambda: hf(ids, logits_to_keep=1))

    bw = read_bandwidth_gb_s()
    rows = {k: [] for k in ("leanlm fp32", "leanlm bf16", "transformers fp32")}
    pre = {k: [] for k in rows}
    time_decode(model, 16, 4)
    time_decode(model_bf16, 16, 4)
    for r in range(args.rounds):
        rows["leanlm fp32"].append(time_decode(model, args.prompt_len, args.new_tokens, seed=r)[1])
        rows["leanlm bf16"].append(time_decode(model_bf16, args.prompt_len, args.new_tokens, seed=r)[1])
        pre["leanlm fp32"].append(time_decode(model, args.prefill_len, 0, seed=r)[0])
        pre["leanlm bf16"].append(time_decode(model_bf16, args.prefill_len, 0, seed=r)[0])
        if hf is not None:
            rows["transformers fp32"].append(hf_decode(r))
            pre["transformers fp32"].append(hf_prefill(r))

    def med(v):
        return sorted(v)[len(v) // 2]

    out = []
    nbytes = {"leanlm fp32": weight_bytes_per_token(model), "leanlm bf16": weight_bytes_per_token(model_bf16),
              "transformers fp32": weight_bytes_per_token(model)}
    for k in rows:
        if not rows[k]:
            continue
        tps = 1.0 / med(rows[k])
        out.append({"decoder": k, "decode_tokens_per_s": tps, "prefill_tokens_per_s": args.prefill_len / med(pre[k]),
                    "weight_gb_per_token": nbytes[k] / 1e9, "weight_bandwidth_gb_s": nbytes[k] * tps / 1e9,
                    "share_of_read_bandwidth": nbytes[k] * tps / 1e9 / bw})
    base = next((o for o in out if o["decoder"] == "transformers fp32"), None)
    for o in out:
        if base:
            o["decode_vs_transformers"] = o["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    print_table(f"batch-1 decode, {args.threads} threads, prompt {args.prompt_len}, {args.new_tokens} new tokens; "
                f"memory read bandwidth {bw:.1f} GB/s", out)
    if args.json:
        emit_json({"threads": args.threads, "read_bandwidth_gb_s": bw, "rows": out})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
