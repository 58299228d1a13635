"""GGUF in: metadata -> ModelConfig, tensors dequantized with gguf's own code, tokenizer from metadata.

Tensor names, the q/k row permutation of the "llama" architecture, Gemma's norm shift and the fused
or per-expert tensors are the family's GGUF map (leanlm/model/gguf_map.py); the metadata becomes a
config.json-like dict read by the family's own config reader, so a GGUF and a Hugging Face folder of
the same model give the same ModelConfig.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from leanlm.errors import LeanLMError
from leanlm.model.config import ModelConfig
from leanlm.model.families import family, family_for_gguf, gguf_archs
from leanlm.model.gguf_map import LONGROPE, gguf_map, supported_names, to_leanlm

ROPE_FREQS = "rope_freqs.weight"  # per-dimension RoPE frequency divisors (llama3 scaling)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp convert_hf_to_gguf's `permute` for q (n_head) and k (n_kv_head) rows."""
    d = w.shape[0] // n_head // 2
    return w.reshape(n_head, d, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _UnknownType(Exception):
    pass


def _reader_class():
    import gguf

    class Reader(gguf.GGUFReader):
        """gguf's reader, stopping on a tensor type number it does not know with the tensor's name."""

        def _build_tensors(self, start_offs, fields):
            known = {int(t) for t in gguf.GGMLQuantizationType}
            for fld in fields:
                try:
                    name, raw = bytes(fld.parts[1]).decode("utf-8", "replace"), int(fld.parts[4][0])
                except (IndexError, TypeError, ValueError):
                    break  # another layout of gguf's internals: let gguf check
                if raw not in known:
                    raise _UnknownType(f"tensor {name} has type number {raw}, unknown to gguf "
                                       f"{getattr(gguf, '__version__', '')}".rstrip())
            return super()._build_tensors(start_offs, fields)

    return Reader


def supported_types() -> list[str]:
    """GGUF tensor types the installed gguf package dequantizes (probed on one zero block each)."""
    import gguf

    out = []
    for t in gguf.GGMLQuantizationType:
        block, size = gguf.GGML_QUANT_SIZES[t]
        try:
            gguf.quants.dequantize(np.zeros((1, size), dtype=np.uint8), t)
        except Exception:
            continue
        out.append(t.name)
    return out


def open_reader(path: str | Path):
    path = Path(path)
    if not path.exists():
        raise LeanLMError(f"{path}: no such file; pass a .gguf file or a Hugging Face model folder")
    try:
        return _reader_class()(str(path), "r")
    except _UnknownType as e:
        raise LeanLMError(f"{path}: {e}; leanlm reads {', '.join(supported_types())}") from None
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


def _llama3_factors(inv: np.ndarray, factor: float, low: float, high: float, old: float) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf LlamaModel.generate_extra_tensors: the rope_freqs divisors."""
    wl = 2 * np.pi / inv
    smooth = (old / wl - low) / (high - low)
    return np.where(wl < old / high, 1.0, np.where(wl > old / low, factor, 1 / ((1 - smooth) / factor + smooth)))


def rope_from_freq_factors(factors: np.ndarray, theta: float, dim: int) -> dict:
    """RoPE scaling for a GGUF rope_freqs tensor (per-dimension divisors of theta's frequencies).

    llama.cpp keeps Llama 3.1/3.2's "llama3" scaling only as this tensor. The llama3 parameters are
    recovered when two or more dimensions lie in the smoothed band (they fix its two wavelength bounds;
    low_freq_factor is then 1 and original_max_position_embeddings the long bound); they are used only
    if they reproduce every factor, so a saved config.json keeps transformers' own type. Otherwise the
    factors themselves are the scaling ("freq_factors"), which is exactly what llama.cpp computes."""
    factors = np.asarray(factors, dtype=np.float64)
    inv = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    exact = {"rope_type": "freq_factors", "factors": [float(x) for x in factors.astype(np.float32)]}
    if factors.shape != inv.shape:
        raise LeanLMError(f"rope_freqs has {factors.size} values, head_dim {dim} needs {inv.size}")
    f = float(factors.max())
    band = (np.abs(factors - 1) > 1e-6) & (np.abs(factors - f) > 1e-6 * f)
    if f <= 1 or band.sum() < 2:
        return exact
    u = inv[band] / (2 * np.pi)  # 1 / wavelength
    s = (1 / factors[band] - 1 / f) / (1 - 1 / f)  # the smoothing ramp, linear in 1/wavelength
    slope, icpt = np.polyfit(u, s, 1)
    if slope <= 0:
        return exact
    x = -icpt / slope  # 1 / long-wavelength bound
    y = x + 1 / slope  # 1 / short-wavelength bound
    old = 1 / x
    old = round(old) if abs(old - round(old)) < 1e-3 * old else old
    high = old * y
    high = round(high, 4) if abs(high - round(high, 4)) < 1e-6 * high else high
    got = _llama3_factors(inv, f, 1.0, high, old)
    if not np.allclose(got, factors, rtol=1e-5, atol=0):
        return exact
    return {"rope_type": "llama3", "factor": f, "low_freq_factor": 1.0, "high_freq_factor": float(high),
            "original_max_position_embeddings": int(old) if float(old).is_integer() else float(old)}


def config_from_fields(f: dict, tensor_names: set[str], source: str, rope_freqs=None,
                       small: dict | None = None) -> ModelConfig:
    """small: RoPE factor tensors (LONGROPE) the architecture's config reader asks for as "tensor:NAME"."""
    arch = f.get("general.architecture")
    if arch not in gguf_archs():
        raise LeanLMError(f"{source}: unsupported architecture {arch!r}; leanlm reads GGUF {', '.join(gguf_archs())}")

    def g(key, default=None, required=False):
        if key.startswith("tensor:"):
            return (small or {}).get(key[7:], default)
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
    elif stype not in (None, "none"):
        raise LeanLMError(f"{source}: {arch}.rope.scaling.type={stype!r} is not supported; leanlm reads linear, yarn")
    theta = float(g("rope.freq_base", 10000.0))
    if rope_freqs is not None:
        if rope:
            raise LeanLMError(f"{source}: both rope.scaling.type={stype!r} and a rope_freqs tensor; "
                              "leanlm cannot tell which scaling applies")
        try:
            rope = rope_from_freq_factors(rope_freqs, theta, int(g("rope.dimension_count", head_dim)))
        except LeanLMError as e:
            raise LeanLMError(f"{source}: {e}") from None
    window = g("attention.sliding_window")
    experts = int(g("expert_count", 0) or 0)
    fam = family_for_gguf(arch, sliding=bool(window), source=source, experts=experts > 0)
    eos = f.get("tokenizer.ggml.eos_token_id")
    eot = f.get("tokenizer.ggml.eot_token_id")
    n_layers = int(g("block_count", required=True))
    d = {
        "model_type": fam.model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(g("feed_forward_length", required=True)),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": int(g("attention.head_count_kv", n_head)),
        "head_dim": int(head_dim),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": theta,
        "rope_scaling": rope,
        "max_position_embeddings": int(g("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "sliding_window": int(window) if window else None,
        "bos_token_id": f.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": [int(x) for x in (eos, eot) if x is not None],
        "pad_token_id": f.get("tokenizer.ggml.padding_token_id"),
    }
    if fam.sliding_flag:
        d[fam.sliding_flag] = bool(window)
    d.update(gguf_map(arch).config(lambda key, default=None: g(key, default)))
    if experts:  # blocks without a router are dense MLPs
        d["mlp_only_layers"] = [i for i in range(n_layers) if f"blk.{i}.ffn_gate_inp.weight" not in tensor_names]
    cfg = ModelConfig.from_hf(d, source=source)
    # what the file holds decides: biases and q/k norms are there or not
    cfg.attention_bias = "blk.0.attn_q.bias" in tensor_names or "blk.0.attn_qkv.bias" in tensor_names
    cfg.attention_out_bias = "blk.0.attn_output.bias" in tensor_names
    cfg.qk_norm = "blk.0.attn_q_norm.weight" in tensor_names
    return cfg


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
    freqs = next((dequantize_tensor(t) for t in reader.tensors if t.name == ROPE_FREQS), None)
    small = {t.name: dequantize_tensor(t) for t in reader.tensors if t.name in LONGROPE}
    cfg = config_from_fields(fields, names, str(path), rope_freqs=freqs, small=small)
    arch = fields["general.architecture"]
    m, lay = gguf_map(arch), family(cfg.model_type).layout
    sd = {}
    for t in reader.tensors:
        if t.name == ROPE_FREQS or t.name in LONGROPE:
            continue  # read into the config's RoPE scaling above
        try:
            w = dequantize_tensor(t)
        except NotImplementedError:
            raise LeanLMError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which gguf cannot "
                              f"dequantize; leanlm reads {', '.join(supported_types())}") from None
        except Exception as e:
            raise LeanLMError(f"{path}: cannot dequantize {t.name} ({e}); the file may be truncated")
        if m.permute_qk and t.name.endswith(("attn_q.weight", "attn_q.bias")):
            w = unpermute_qk(w, cfg.num_heads)
        elif m.permute_qk and t.name.endswith(("attn_k.weight", "attn_k.bias")):
            w = unpermute_qk(w, cfg.num_kv_heads)
        w = torch.from_numpy(np.array(w, dtype=np.float32, order="C", copy=True))
        pairs = to_leanlm(t.name, w, cfg, lay, m)
        if pairs is None:
            raise LeanLMError(f"{path}: unexpected tensor {t.name!r} for architecture {arch!r}; leanlm reads "
                              f"{supported_names()}")
        sd.update((k, v.contiguous()) for k, v in pairs)
        if progress:
            progress()
    return cfg, sd, fields
