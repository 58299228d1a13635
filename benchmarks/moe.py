"""Batch-1 decode of a mixture-of-experts model against a dense model with the same ACTIVE parameters.

MoE: E experts of width I, top-k routing, in every block. Dense: one MLP of width k*I. Same hidden
size, attention, depth and vocabulary, so both read about the same weight bytes per token (plus the
router). Each decode step of the dense model is followed by one of the MoE model, in one process, and
tokens/s is 1 / the median step time (the machine is shared: compare ratios from the same round).

Also times the MoE block's parts during decode, in a run of the MoE model alone: the router (gate
linear, softmax, top-k, renormalization), the experts' MLPs, and the rest of the block (picking the
experts, copying the input, weighting and summing the outputs) = grouping/scatter. The routing
overhead is router + grouping/scatter as a share of the whole decode step.

    python benchmarks/moe.py --threads 2 --rounds 3 --json
"""
from __future__ import annotations

import argparse
import os
import statistics
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
def decode(models: dict, prompt_len, new_tokens, seed, timer=None):
    """Greedy decode in every model, one step of each in turn (the shared machine's load hits both alike).
    -> {name: (prefill seconds, median decode step seconds, total decode seconds)}."""
    from leanlm.infer.generate import fuse_for_inference

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, next(iter(models.values())).config.vocab_size, (1, prompt_len), generator=g)
    state, steps, pre = {}, {}, {}
    for name, m in models.items():
        fuse_for_inference(m)
        cache = m.new_cache(1, prompt_len + new_tokens + 1)
        t0 = time.perf_counter()
        state[name] = (cache, m(ids, cache=cache, last_only=True)[:, -1].argmax(-1))
        pre[name] = time.perf_counter() - t0
        steps[name] = []
    if timer is not None:
        timer.on = True
    for _ in range(new_tokens):
        for name, m in models.items():
            cache, nxt = state[name]
            t0 = time.perf_counter()
            nxt = m(nxt.unsqueeze(1), cache=cache)[:, -1].argmax(-1)
            steps[name].append(time.perf_counter() - t0)
            state[name] = (cache, nxt)
    return {k: (pre[k], statistics.median(steps[k]), sum(steps[k])) for k in models}


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
    decode(models, 16, 4, seed=99)  # warm-up
    rows = []
    for r in range(args.rounds):
        row = {"round": r + 1, "load": round(os.getloadavg()[0], 1)}
        res = decode(models, args.prompt_len, args.new_tokens, seed=r)
        for name, (pre, step, _) in res.items():
            row[f"{name}_tok_s"] = round(1 / step, 1)
            row[f"{name}_prefill_tok_s"] = round(args.prompt_len / pre, 1)
        row["moe_over_dense"] = round(row["moe_tok_s"] / row["dense_tok_s"], 3)
        # the MoE block's parts, in a separate run of the MoE model alone (the wrappers cost a little)
        timer = PartTimer(models["moe"])
        _, step, total = decode({"moe": models["moe"]}, args.prompt_len, args.new_tokens, seed=100 + r, timer=timer)["moe"]
        timer.remove()
        t = timer.t
        scatter = t["block"] - t["router"] - t["experts"]
        row["timed_moe_tok_s"] = round(1 / step, 1)
        row["router_share"] = round(t["router"] / total, 4)
        row["group_scatter_share"] = round(scatter / total, 4)
        row["routing_overhead_share"] = round((t["router"] + scatter) / total, 4)
        row["experts_share"] = round(t["experts"] / total, 4)
        rows.append(row)
    print_table("batch-1 decode: MoE vs dense with the same active parameters", rows)
    out = {"shape": shape, "params": params, "threads": args.threads, "prompt_len": args.prompt_len,
           "new_tokens": args.new_tokens, "rounds": rows}
    if args.json:
        emit_json(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
