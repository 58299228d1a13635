"""Does llama.cpp run the GGUF files leanlm exports, family by family, and compute what leanlm computes?

For each family leanlm exports (Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3, Mixtral, Qwen2-MoE,
Qwen3-MoE) a tiny random model (2-3 layers, hidden 64, every weight random; the default model's
tokenizer, so llama.cpp tokenizes the text as leanlm does) is exported with `export_gguf`, then
`llama-perplexity -c CTX` runs on the packaged evaluation text. leanlm scores the same tokens the way
llama-perplexity does (chunks of CTX tokens, the second half of each chunk scored) with the model that
was exported, so the two perplexities agree when llama.cpp computes the same function.

    python benchmarks/gguf_families_llamacpp.py --llama-cpp /work/build/llama.cpp/build/bin --json
"""
from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
from pathlib import Path

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)
GEMMA = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=16, hidden_activation="gelu_pytorch_tanh",
             tie_word_embeddings=True)
FAMILIES = {
    "llama": {},
    "mistral": dict(sliding_window=4096),  # llama.cpp's "llama" runs every layer global: a window > CTX
    # a window shorter than the context: llama.cpp runs it global, leanlm (as transformers) windowed
    "mistral-window16": dict(model_type="mistral", sliding_window=16),
    "qwen2": {},
    "qwen3": dict(head_dim=16, tie_word_embeddings=True),
    "gemma2": GEMMA,
    "gemma3_text": {**GEMMA, "num_hidden_layers": 3,
                    "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
                    "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                                        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
    "phi3": dict(partial_rotary_factor=0.5),
    # LongRoPE past its original length (llama.cpp takes the long factors when its context, here 64, is
    # longer than the original length; transformers and leanlm when the sequence is: the same here)
    "phi3-longrope": dict(model_type="phi3", original_max_position_embeddings=32, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
        "short_factor": [1.0, 1.4, 2.9, 5.0], "long_factor": [1.2, 2.5, 6.0, 16.0]}),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                      shared_expert_intermediate_size=64, norm_topk_prob=False, mlp_only_layers=[]),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True,
                      head_dim=16),
}


def random_model(kind: str, vocab: int, seed: int = 0):
    """A leanlm model of the family, every tensor random (norms around 1, or 0 for (1 + w) norms)."""
    import torch

    from leanlm.io.checkpoint import build_on_meta, materialize
    from leanlm.model import ModelConfig

    cfg = ModelConfig.from_hf({"model_type": kind, "vocab_size": vocab, **BASE, **FAMILIES[kind]}, source=kind)
    meta = build_on_meta(cfg)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in meta.state_dict().items():
        if v.dim() > 1:
            sd[k] = torch.randn(v.shape, generator=g) * 0.2
        elif cfg.norm_plus_one:
            sd[k] = torch.randn(v.shape, generator=g) * 0.3
        else:
            sd[k] = 0.5 + torch.rand(v.shape, generator=g)
    return materialize(meta, sd, kind).eval()


def leanlm_ppl(model, ids: list[int], ctx: int, chunks: int, bos: int | None) -> float:
    """llama-perplexity's estimate: chunk i is ids[i*ctx:(i+1)*ctx] (first token BOS when the vocabulary
    adds one); the last ctx/2 - 1 next-token predictions of each chunk are scored."""
    import torch

    first, nll, count = ctx // 2, 0.0, 0
    with torch.no_grad():
        for c in range(min(chunks, len(ids) // ctx)):
            x = list(ids[c * ctx:(c + 1) * ctx])
            if bos is not None:
                x[0] = bos
            logp = torch.log_softmax(model(torch.tensor([x]))[0].double(), -1)
            tgt = torch.tensor(x[first + 1:])
            nll -= logp[first:ctx - 1].gather(1, tgt[:, None]).sum().item()
            count += ctx - 1 - first
    return math.exp(nll / count)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", required=True, help="folder with llama-perplexity")
    ap.add_argument("--work", default="/tmp/gguf-families")
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--types", default="f32,q8_0")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import leanlm
    from leanlm.data import packaged_path
    from leanlm.io.gguf_export import export_gguf

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    text = packaged_path("eval")
    tok = leanlm.load()[1]
    ids = tok.encode(text.read_text(encoding="utf-8"))
    bos = tok.bos_id if tok.add_bos else None
    rows = []
    for kind in args.families.split(","):
        model = random_model(kind, len(tok.tok.get_vocab(with_added_tokens=True)))
        for qtype in args.types.split(","):
            # llama.cpp's vocabulary loader looks up "</s>", "<unk>", "<s>" when general.name (the file's
            # stem) says phi3 / phi-3; the default model's vocabulary has none of them
            path = work / f"{kind.replace('phi3', 'phi')}-{qtype}.gguf"
            export_gguf(model, tok, path, qtype, source=kind)
            back = leanlm.load(path, convert_cache=False)[0]  # the weights llama.cpp reads (dequantized)
            want = leanlm_ppl(back, ids, args.ctx, args.chunks, bos)
            cmd = [str(Path(args.llama_cpp) / "llama-perplexity"), "-m", str(path), "-f", str(text), "-c",
                   str(args.ctx), "-b", str(args.ctx), "--chunks", str(args.chunks), "-t", "1"]
            p = subprocess.run(cmd, capture_output=True, text=True)
            out = p.stdout + p.stderr
            m = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
            got = float(m.group(1)) if m else None
            err = None if m else (re.findall(r"(?:error|failed)[^\n]*", out, re.I) or [out[-300:]])[-1].strip()
            rows.append({"family": kind, "type": qtype, "llama.cpp PPL": got, "leanlm PPL": round(want, 4),
                         "ratio": round(got / want, 5) if got else None, "error": err})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"ctx": args.ctx, "chunks": args.chunks, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
