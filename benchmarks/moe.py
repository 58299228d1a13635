"""Batch-1 decode of a mixture-of-experts model against a dense model with the same ACTIVE parameters.

MoE: E experts of width I, top-k routing, in every block. Dense: one MLP of width k*I. Same hidden
size, attention, depth and vocabulary, so both read about the same weight bytes per token (plus the
router). Rounds alternate dense, MoE, dense, MoE, ... in one process (the machine is shared: compare
ratios from the same round). Also times the MoE block's parts during decode: the router (gate
linear, softmax, top-k, renormalization), the experts' MLPs, and the rest of the block (picking the
experts, copying the input, weighting and summing the outputs) = grouping/scatter; the routing
overhead is router + grouping/scatter as a share of the whole decode step.

    python benchmarks/moe.py --threads 2 --rounds 3 --json
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch


def make(hidden, layers, heads, kv_heads, vocab, experts, top_k, width, moe: bool, seed=0):
    from leanlm.model import ModelConfig
    from leanlm.model.transformer import Transformer

    cfg = ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=width if moe else top_k * width,
                      num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, max_position_embeddings=4096,
                      model_type="mixtral" if moe else "llama",
                      num_experts=experts if moe else 0, num_experts_per_tok=top_k if moe else 0)
    torch.manual_seed(seed)
    m = Transformer(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    return m.eval()


def active_params(m) -> int:
    """Parameters one token touches (all but the unused experts and the embedding table)."""
    from leanlm.model.moe import moe_blocks

    total = sum(p.numel() for p in m.parameters()) - m.model.embed_tokens.weight.numel()
    for b in moe_blocks(m):
        per = sum(p.numel() for p in b.experts[0].parameters())
        total -= per * (b.num_experts - b.top_k)
    return total


class PartTimer:
    """Wall time of the MoE blocks' parts, by wrapping their methods on the instances (off afterwards)."""

    def __init__(self, model):
        from leanlm.model.moe import moe_blocks

        self.t = defaultdict(float)
        self.on = False  # counts only while on (the decode steps, not the prefill)
        self.blocks = moe_blocks(model)
        for b in self.blocks:
            b.forward = self._wrap(b.forward, "block")
            b.route = self._wrap(b.route, "router")
            for e in b.experts:
                e.forward = self._wrap(e.forward, "experts")

    def _wrap(self, fn, key):
        def timed(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            if self.on:
                self.t[key] += time.perf_counter() - t0
            return out
        return timed

    def remove(self):
        for b in self.blocks:
            for mod in [b, *b.experts]:
                mod.__dict__.pop("forward", None)
            b.__dict__.pop("route", None)


@torch.inference_mode()
def decode(model, prompt_len, new_tokens, seed, timer=None):
    from leanlm.infer.generate import fuse_for_inference

    fuse_for_inference(model)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=g)
    cache = model.new_cache(1, prompt_len + new_tokens + 1)
    t0 = time.perf_counter()
    nxt = model(ids, cache=cache, last_only=True)[:, -1].argmax(-1)
    if timer is not None:
        timer.on = True
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        nxt = model(nxt.unsqueeze(1), cache=cache)[:, -1].argmax(-1)
    t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) / new_tokens


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--width", type=int, default=1024, help="each expert's intermediate size (dense: top_k * width)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from leanlm.report import emit_json, print_table

    shape = dict(hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads, vocab=args.vocab,
                 experts=args.experts, top_k=args.top_k, width=args.width)
    models = {"dense": make(**shape, moe=False), "moe": make(**shape, moe=True)}
    params = {k: {"total": sum(p.numel() for p in m.parameters()), "active": active_params(m)} for k, m in models.items()}
    for m in models.values():
        decode(m, 16, 4, seed=99)  # warm-up
    rows = []
    for r in range(args.rounds):
        row = {"round": r + 1}
        for name, m in models.items():
            pre, step = decode(m, args.prompt_len, args.new_tokens, seed=r)
            row[f"{name}_tok_s"] = round(1 / step, 1)
            row[f"{name}_prefill_tok_s"] = round(args.prompt_len / pre, 1)
        row["moe_over_dense"] = round(row["moe_tok_s"] / row["dense_tok_s"], 3)
        # the MoE model's parts, in a separate timed run (the wrappers cost a little)
        timer = PartTimer(models["moe"])
        _, step = decode(models["moe"], args.prompt_len, args.new_tokens, seed=100 + r, timer=timer)
        timer.remove()
        steps_total = step * args.new_tokens
        dec = timer.t
        scatter = dec["block"] - dec["router"] - dec["experts"]
        row["timed_moe_tok_s"] = round(1 / step, 1)
        row["router_share"] = round(dec["router"] / steps_total, 4)
        row["group_scatter_share"] = round(scatter / steps_total, 4)
        row["routing_overhead_share"] = round((dec["router"] + scatter) / steps_total, 4)
        row["experts_share"] = round(dec["experts"] / steps_total, 4)
        rows.append(row)
    print_table("batch-1 decode: MoE vs dense with the same active parameters", rows)
    out = {"shape": shape, "params": params, "threads": args.threads, "prompt_len": args.prompt_len,
           "new_tokens": args.new_tokens, "rounds": rows}
    if args.json:
        emit_json(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
