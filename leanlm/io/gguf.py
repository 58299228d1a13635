"""GGUF in: metadata -> ModelConfig, tensors dequantized with gguf's own code, tokenizer from metadata.

llama.cpp's converter permutes the rows of q/k for the "llama" architecture (it rotates pairs
(i, i + d/2) interleaved); we undo that so the weights match the Hugging Face layout.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from leanlm.errors import LeanLMError
from leanlm.model.config import ModelConfig
from leanlm.model.families import family_for_gguf, gguf_archs
from leanlm.model.gguf_names import hf_name
from leanlm.model.layout import layout_of


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp convert_hf_to_gguf's `permute` for q (n_head) and k (n_kv_head) rows."""
    d = w.shape[0] // n_head // 2
    return w.reshape(n_head, d, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def open_reader(path: str | Path):
    import gguf

    path = Path(path)
    if not path.exists():
        raise LeanLMError(f"{path}: no such file; pass a .gguf file or a Hugging Face model folder")
    try:
        return gguf.GGUFReader(str(path), "r")
    except Exception as e:  # gguf raises ValueError/IndexError/struct errors on damaged files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LeanLMError(f"{path}: not a readable GGUF file ({msg}); it may be truncated — download it again")


def read_fields(reader) -> dict:
    out = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except Exception:  # a field type we do not need
            continue
    return out


def config_from_fields(f: dict, tensor_names: set[str], source: str) -> ModelConfig:
    arch = f.get("general.architecture")
    if arch not in gguf_archs():
        raise LeanLMError(f"{source}: unsupported architecture {arch!r}; leanlm reads GGUF {', '.join(gguf_archs())}")

    def g(key, default=None, required=False):
        k = f"{arch}.{key}"
        if k not in f:
            if required:
                raise LeanLMError(f"{source}: GGUF metadata lacks {k!r}; the file is incomplete")
            return default
        return f[k]

    n_head = int(g("attention.head_count", required=True))
    hidden = int(g("embedding_length", required=True))
    tokens = f.get("tokenizer.ggml.tokens")
    vocab = int(g("vocab_size", len(tokens) if tokens else 0))
    head_dim = g("attention.key_length") or hidden // n_head
    rope = None
    stype = g("rope.scaling.type")
    if stype in ("linear", "yarn"):
        rope = {"rope_type": stype, "factor": float(g("rope.scaling.factor"))}
        if stype == "yarn":
            rope["original_max_position_embeddings"] = int(g("rope.scaling.original_context_length"))
    window = g("attention.sliding_window")
    model_type = family_for_gguf(arch, sliding=bool(window), source=source).model_type
    eos = f.get("tokenizer.ggml.eos_token_id")
    eot = f.get("tokenizer.ggml.eot_token_id")
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(g("feed_forward_length", required=True)),
        num_layers=int(g("block_count", required=True)),
        num_heads=n_head,
        num_kv_heads=int(g("attention.head_count_kv", n_head)),
        head_dim=int(head_dim),
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(g("rope.freq_base", 10000.0)),
        rope_scaling=rope,
        max_position_embeddings=int(g("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        attention_out_bias="blk.0.attn_output.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        sliding_window=int(window) if window else None,
        model_type=model_type,
        bos_token_id=f.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=[int(x) for x in (eos, eot) if x is not None],
        pad_token_id=f.get("tokenizer.ggml.padding_token_id"),
    )


def dequantize_tensor(t) -> np.ndarray:
    """gguf's own dequantization; returns float32 in numpy (row-major, [out, in] for matrices)."""
    import gguf

    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)


def load_gguf(path: str | Path, progress=None):
    """Read a GGUF file -> (ModelConfig, state dict of fp32 tensors in HF names, gguf field dict)."""
    path = Path(path)
    reader = open_reader(path)
    fields = read_fields(reader)
    names = {t.name for t in reader.tensors}
    cfg = config_from_fields(fields, names, str(path))
    arch = fields["general.architecture"]
    lay = layout_of(cfg)
    sd = {}
    for t in reader.tensors:
        name = hf_name(t.name, lay)
        if name is None:
            if t.name == "rope_freqs.weight":
                continue  # llama3 frequency table; we compute it from the config
            raise LeanLMError(f"{path}: unexpected tensor {t.name!r}; this GGUF layout is not supported")
        try:
            w = dequantize_tensor(t)
        except Exception as e:
            raise LeanLMError(f"{path}: cannot dequantize {t.name} ({e}); the file may be truncated")
        if arch == "llama" and t.name.endswith(("attn_q.weight", "attn_q.bias")):
            w = unpermute_qk(w, cfg.num_heads)
        elif arch == "llama" and t.name.endswith(("attn_k.weight", "attn_k.bias")):
            w = unpermute_qk(w, cfg.num_kv_heads)
        sd[name] = torch.from_numpy(np.array(w, dtype=np.float32, order="C", copy=True))
        if progress:
            progress()
    return cfg, sd, fields
