"""Many LoRA adapters in one batch vs one adapter at a time (S-LoRA / Punica's comparison), default model.

K random LoRA adapters (rank r, every block linear) and R requests spread over them round-robin, each
a random prompt of P tokens decoding N tokens greedily (ignore_eos). Three ways to serve them:
  * multi-LoRA engine: one base model, a LoraPool holding all K adapters, C requests in flight at once
    (continuous batching; a batch mixes adapters: base matmul once, each adapter's delta on its rows);
  * merged copies, one request at a time: each adapter merged into its own copy of the model (merging
    is not timed), plain generation at batch 1;
  * unmerged LoRA at batch 1: peft-style LoraLinear layers (base + B(A x)) at batch 1.
Prints tokens/s of each and the ratios, and how many requests got the same tokens as the merged copy.

    PYTHONPATH=. python benchmarks/serve_multilora.py --adapters 8 --concurrency 16 --requests 32 --json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch


def make_adapters(k: int, rank: int, folder: str) -> list[str]:
    import leanlm
    from leanlm import peft

    out = []
    for i in range(k):
        model, _ = leanlm.load()
        peft.apply(model, "lora", r=rank, alpha=2.0 * rank)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)
        out.append(str(peft.save_adapter(model, f"{folder}/a{i}")))
        del model
    return out


def one_at_a_time(folders, jobs, new_tokens, merge: bool, progress) -> tuple[float, dict]:
    import leanlm
    from leanlm import peft
    from leanlm.infer.generate import generate_tokens
    from leanlm.infer.sampling import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True, stop_token_ids=[])
    spent, outs = 0.0, {}
    for a, folder in enumerate(folders):
        model, _ = leanlm.load()
        model = peft.load_adapter(model, folder)
        if merge:
            peft.merge(model)
        model.eval()
        for j, (p, adapter) in enumerate(jobs):
            if adapter != a:
                continue
            t = time.perf_counter()
            outs[j] = [s[0] for s in generate_tokens(model, [p], cfg)]
            spent += time.perf_counter() - t
            progress()
        del model
    return spent, outs


def multi_lora(folders, jobs, new_tokens, concurrency, rank) -> tuple[float, dict, int]:
    import leanlm
    from leanlm.infer.engine import Engine, SamplingParams
    from leanlm.peft.multi_lora import LoraPool

    model, _ = leanlm.load()
    pool = LoraPool(model, slots=len(folders), max_rank=rank)
    for a, f in enumerate(folders):
        pool.register_folder(a + 1, f"a{a}", f)
    eng = Engine(model, max_num_seqs=concurrency, max_batch_tokens=max(256, concurrency * 8), adapters=pool)
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    nxt, live, outs, mixed = 0, {}, {}, 0
    t0 = time.perf_counter()
    while nxt < len(jobs) or eng.has_unfinished():
        while nxt < len(jobs) and len(live) < concurrency:
            p, a = jobs[nxt]
            live[eng.add_request(p, params, adapter=a + 1)] = nxt
            outs[nxt] = []
            nxt += 1
        for o in eng.step():
            outs[live[o.request_id]].append(o.token)
            if o.finished:
                del live[o.request_id]
        mixed = max(mixed, len(pool.rows.groups))
    wall = time.perf_counter() - t0
    eng.cache.alloc.check_whole()
    return wall, outs, mixed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-unmerged", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from rich.progress import Progress

    tmp = tempfile.mkdtemp(prefix="leanlm-multilora-")
    folders = make_adapters(args.adapters, args.rank, tmp)
    g = torch.Generator().manual_seed(0)
    jobs = [(torch.randint(0, 49152, (args.prompt_len,), generator=g).tolist(), j % args.adapters)
            for j in range(args.requests)]
    total = args.requests * args.new_tokens
    res = {"adapters": args.adapters, "concurrency": args.concurrency, "requests": args.requests,
           "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "rank": args.rank}
    with Progress(transient=True, console=None) as bar:
        wall, outs, mixed = multi_lora(folders, jobs, args.new_tokens, args.concurrency, args.rank)
        res["multi_lora_tok_s"], res["multi_lora_max_adapters_in_one_step"] = total / wall, mixed
        task = bar.add_task("merged, one at a time", total=args.requests)
        spent, ref = one_at_a_time(folders, jobs, args.new_tokens, True, lambda: bar.advance(task))
        res["merged_one_at_a_time_tok_s"] = total / spent
        res["same_tokens_as_merged"] = sum(outs[j] == ref[j] for j in range(len(jobs)))
        if not args.skip_unmerged:
            task = bar.add_task("unmerged LoRA, batch 1", total=args.requests)
            spent, _ = one_at_a_time(folders, jobs, args.new_tokens, False, lambda: bar.advance(task))
            res["unmerged_batch1_tok_s"] = total / spent
    res["speedup_vs_merged_one_at_a_time"] = res["multi_lora_tok_s"] / res["merged_one_at_a_time_tok_s"]
    if "unmerged_batch1_tok_s" in res:
        res["speedup_vs_unmerged_batch1"] = res["multi_lora_tok_s"] / res["unmerged_batch1_tok_s"]
    for k, v in res.items():
        print(f"{k:40s} {v:.3f}" if isinstance(v, float) else f"{k:40s} {v}", file=sys.stderr)
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
