"""KV bytes a sequence holds in the engine's paged cache vs its context length, with the sliding-window
layers keeping only their window (the default) and keeping every block (`trim_windows=False`).

Two parts:
  * engine: a tiny random Gemma-3-shaped model (6 layers: 5 sliding + 1 global, hidden 64, 4 heads,
    1 KV head of 16, window 64, blocks of 16) decodes one sequence to --tokens through the real engine
    both ways; the generated tokens must be identical.
  * shape: the same bookkeeping (PagedKVCache on the meta device: no memory, no forward) for a
    Gemma-3-1B-shaped config (26 layers, 22 sliding + 4 global, 1 KV head of 256, window 512, bf16),
    prefilled in chunks of 512 to 32k tokens.

    PYTHONPATH=. python benchmarks/kv_window.py --tokens 1024 --json
"""
from __future__ import annotations

import argparse
import json
import time


def engine_part(tokens: int) -> list[dict]:
    import torch

    from leanlm.infer.engine import Engine, SamplingParams
    from leanlm.model import ModelConfig
    from leanlm.model.transformer import Transformer

    types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(6)]
    cfg = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=6, num_heads=4,
                      num_kv_heads=1, head_dim=16, model_type="gemma3_text", layer_types=types, sliding_window=64,
                      max_position_embeddings=tokens + 64, norm_plus_one=True, post_norms=True,
                      embed_scale=True, qk_norm=True, local_rope_theta=1e4, rope_theta=1e6,
                      hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    marks = {m for m in (128, 256, 512, 1024, 2048, 4096) if m < tokens}
    prompt = list(range(1, 33))
    rows, outs = {}, {}
    for trim in (True, False):
        eng = Engine(model, block_size=16, num_blocks=-(-tokens // 16) + 8, max_batch_tokens=64, max_num_seqs=1,
                     trim_windows=trim)
        rid = eng.add_request(prompt, SamplingParams(max_tokens=tokens - len(prompt), ignore_eos=True))
        outs[trim], t0 = [], time.perf_counter()
        while eng.has_unfinished():
            outs[trim] += [o.token for o in eng.step()]
            n = eng.cache.lengths.get(rid)
            if n in marks:
                rows.setdefault(n, {})[trim] = eng.cache.kv_bytes(rid)
        rows.setdefault("seconds", {})[trim] = time.perf_counter() - t0
        eng.cache.check_whole()
    assert outs[True] == outs[False], "trimming the window changed the tokens"
    return [{"context": n, "window_only": r[True], "every_block": r[False], "ratio": r[False] / r[True]}
            for n, r in sorted((k, v) for k, v in rows.items() if k != "seconds")] + [
        {"seconds_window_only": rows["seconds"][True], "seconds_every_block": rows["seconds"][False]}]


def shape_part(tokens: int) -> list[dict]:
    import torch

    from leanlm.infer.paged import PagedKVCache
    from leanlm.model import ModelConfig

    types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(26)]
    cfg = ModelConfig(vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_layers=26, num_heads=4,
                      num_kv_heads=1, head_dim=256, model_type="gemma3_text", layer_types=types, sliding_window=512)
    out, bs, chunk = [], 16, 512
    blocks = tokens // bs + 64
    marks = {m for m in (1024, 2048, 4096, 8192, 16384, 32768) if m <= tokens}
    held = {}
    for trim in (True, False):
        cache = PagedKVCache(cfg, blocks, bs, dtype=torch.bfloat16, device="meta", trim_windows=trim)
        cache.add_sequence(0)
        for start in range(0, tokens, chunk):
            cache.ensure(0, start + chunk)
            cache.prepare([(0, chunk)], "packed")
            cache.end()
            if start + chunk in marks:
                held.setdefault(start + chunk, {})[trim] = cache.kv_bytes(0)
        cache.free_sequence(0)
        cache.check_whole()
    for n, r in sorted(held.items()):
        out.append({"context": n, "window_only": r[True], "every_block": r[False], "ratio": r[False] / r[True]})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024, help="context length the tiny model decodes to")
    ap.add_argument("--shape-tokens", type=int, default=32768, help="context length of the Gemma-3-1B bookkeeping")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    res = {"engine": engine_part(args.tokens), "gemma3_1b_shape": shape_part(args.shape_tokens)}
    for part, rows in res.items():
        print(f"{part}: context | KV bytes, window only | every block | ratio")
        for r in rows:
            if "context" in r:
                print(f"  {r['context']:>6} | {r['window_only']:>13,} | {r['every_block']:>13,} | {r['ratio']:.2f}x")
            else:
                print("  " + ", ".join(f"{k} {v:.1f}" for k, v in r.items()))
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
