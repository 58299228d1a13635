"""GGUF out: any leanlm model of a family llama.cpp knows, with its tokenizer and chat template.

Float weights are quantized to the requested type (gguf's own numpy quantizers for Q8_0/Q4_0/Q4_1,
ours below for Q4_K/Q6_K). A quantized linear whose grid IS a GGUF block format (4-bit groups of 32:
symmetric -> Q4_0, asymmetric -> Q4_1; 8-bit symmetric groups of 32 -> Q8_0) is written from its integer
codes and fp16 scales as they are: llama.cpp computes exactly the weights leanlm's solver chose (GGUF
stores d and m in fp16 and leanlm's scales and offsets are fp16 already, so nothing is re-rounded).

Such a module is recognised by what it exposes (`GridWeights` below), so io needs no import of the
compression code. An int8 embedding with one fp16 scale per row is Q8_0 exactly too. Like llama.cpp's
quantizer, the output head (or the tied embedding) gets Q6_K (Q8_0 when its width is not a multiple of
256) under a quantized type; rows whose width does not fit a type's block fall back as llama.cpp's do
(Q4_K -> Q5_0, Q6_K -> Q8_0, else F16).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from leanlm.errors import LeanLMError
from leanlm.io.gguf import ROPE_FREQS
from leanlm.model.families import family
from leanlm.model.gguf_map import LONGROPE, export_fields, export_plan, gguf_map
from leanlm.model.layout import HEAD

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k", "q6_k")
_FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0", "Q5_0": "F16", "Q8_0": "F16", "Q4_0": "F16", "Q4_1": "F16"}
_FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q4_K": 15, "Q6_K": 18, "BF16": 32}


@runtime_checkable
class GridWeights(Protocol):
    """A linear stored as integer codes on a uniform grid per group: w = code * scale + offset."""
    bits: int
    group_size: int
    sym: bool
    in_features: int
    scales: torch.Tensor  # [N, G] fp16

    def codes(self) -> torch.Tensor: ...  # [N, K] unsigned codes
    def offset_values(self) -> torch.Tensor: ...  # [N, G]
    def dequantized_weight(self) -> torch.Tensor: ...


def grid_format(m) -> str | None:
    """The GGUF block type that holds this module's grid exactly, or None."""
    if not isinstance(m, GridWeights) or m.group_size != 32 or m.in_features % 32:
        return None
    if m.bits == 4:
        return "Q4_0" if m.sym else "Q4_1"
    if m.bits == 8 and m.sym:
        return "Q8_0"
    return None


def int8_rows(m) -> bool:
    """An int8 table with one fp16 scale per row (leanlm's int8 embedding): Q8_0 with that scale in
    every block of the row holds it exactly."""
    q, s = getattr(m, "qweight", None), getattr(m, "scales", None)
    return (isinstance(q, torch.Tensor) and q.dtype == torch.int8 and q.dim() == 2 and q.shape[1] % 32 == 0
            and isinstance(s, torch.Tensor) and s.dtype == torch.float16 and tuple(s.shape) == (q.shape[0],)
            and not getattr(m, "n_outliers", 0))


def int8_rows_blocks(m) -> np.ndarray:
    q = m.qweight.numpy()
    N, K = q.shape
    d = np.broadcast_to(m.scales.numpy().reshape(N, 1, 1), (N, K // 32, 1)).view(np.uint8)
    return np.concatenate([d, q.reshape(N, K // 32, 32).view(np.uint8)], axis=-1).reshape(N, -1)


def grid_blocks(m, fmt: str) -> np.ndarray:
    """Raw GGUF blocks [N, bytes] from a module's codes and fp16 scales/offsets (no rounding)."""
    q = m.codes().to(torch.int32).numpy()
    N, K = q.shape
    q = q.reshape(N, K // 32, 32)
    d = m.scales.to(torch.float16).numpy().reshape(N, K // 32, 1).view(np.uint8)
    if fmt == "Q8_0":
        qs = (q - 128).astype(np.int8).view(np.uint8)
        return np.concatenate([d, qs], axis=-1).reshape(N, -1)
    qs = (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)
    parts = [d]
    if fmt == "Q4_1":
        parts.append(m.offset_values().to(torch.float16).numpy().reshape(N, K // 32, 1).view(np.uint8))
    return np.concatenate(parts + [qs], axis=-1).reshape(N, -1)


# ---- K-quants from floats (plain min/max scales; llama.cpp searches its scales, which we do not) ----
def _f16(x):
    return np.asarray(x, dtype=np.float16)


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """Q4_K blocks of 256: 8 sub-blocks of 32, w = d*sc*q - dmin*m with 6-bit sc, m and 4-bit q."""
    N, K = w.shape
    x = w.reshape(-1, 8, 32).astype(np.float32)
    lo = np.minimum(x.min(-1), 0)
    scale, mins = (x.max(-1) - lo) / 15, -lo
    d = _f16(scale.max(-1) / 63).astype(np.float32)
    dmin = _f16(mins.max(-1) / 63).astype(np.float32)
    sc = np.clip(np.round(np.divide(scale, d[:, None], out=np.zeros_like(scale), where=d[:, None] > 0)), 0, 63)
    mn = np.clip(np.round(np.divide(mins, dmin[:, None], out=np.zeros_like(mins), where=dmin[:, None] > 0)), 0, 63)
    step = (d[:, None] * sc)[..., None]
    off = (dmin[:, None] * mn)[..., None]
    q = np.clip(np.round(np.divide(x + off, step, out=np.zeros_like(x), where=step > 0)), 0, 15).astype(np.uint8)
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    s12 = np.zeros((x.shape[0], 12), dtype=np.uint8)
    s12[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    s12[:, 4:8] = mn[:, 0:4] | ((mn[:, 4:8] >> 4) << 6)
    s12[:, 8:12] = (sc[:, 4:8] & 0xF) | ((mn[:, 4:8] & 0xF) << 4)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)  # each 64: low nibbles sub-block 2i, high 2i+1
    head = np.stack([_f16(d), _f16(dmin)], axis=-1).view(np.uint8).reshape(-1, 4)
    return np.concatenate([head, s12, qs], axis=-1).reshape(N, -1)


def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """Q6_K blocks of 256: 16 sub-blocks of 16, w = d*sc*(q - 32), int8 sc, 6-bit q."""
    N, K = w.shape
    x = w.reshape(-1, 16, 16).astype(np.float32)
    idx = np.abs(x).argmax(-1)
    peak = np.take_along_axis(x, idx[..., None], -1)[..., 0]
    scale = peak / -32  # the largest magnitude lands on -32, as llama.cpp's make_qx_quants does
    d = _f16(np.abs(scale).max(-1) / 127).astype(np.float32)
    sc = np.clip(np.round(np.divide(scale, d[:, None], out=np.zeros_like(scale), where=d[:, None] > 0)), -127, 127)
    step = (d[:, None] * sc)[..., None]
    q = np.clip(np.round(np.divide(x, step, out=np.zeros_like(x), where=step != 0)), -32, 31).astype(np.int32) + 32
    q = q.reshape(-1, 2, 4, 32)  # [block, half of 128, quarter (rows l, l+32, l+64, l+96), l]
    ql = np.concatenate([q[:, :, 0] & 0xF | ((q[:, :, 2] & 0xF) << 4),
                         q[:, :, 1] & 0xF | ((q[:, :, 3] & 0xF) << 4)], axis=-1).reshape(-1, 128)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6))
    parts = [ql.astype(np.uint8), qh.reshape(-1, 64).astype(np.uint8), sc.astype(np.int8).view(np.uint8),
             _f16(d).view(np.uint8).reshape(-1, 2)]
    return np.concatenate(parts, axis=-1).reshape(N, -1)


def encode(w: np.ndarray, qtype: str) -> tuple[np.ndarray, str]:
    """Float matrix -> (data, the type written), falling back when the width does not fit the block."""
    import gguf

    while qtype not in ("F32", "F16", "BF16"):
        block = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, qtype)][0]
        if w.shape[-1] % block == 0:
            break
        qtype = _FALLBACK[qtype]
    if qtype == "F32":
        return np.ascontiguousarray(w, dtype=np.float32), qtype
    if qtype == "F16":
        return w.astype(np.float16), qtype
    if qtype == "Q4_K":
        return quantize_q4_k(w), qtype
    if qtype == "Q6_K":
        return quantize_q6_k(w), qtype
    return gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32),
                                getattr(gguf.GGMLQuantizationType, qtype)), qtype


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's LlamaModel.permute (rows of q/k for the "llama" architecture)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---- tokenizer metadata -----------------------------------------------------------------------
def tokenizer_fields(tokenizer, vocab_size: int, source: str) -> dict:
    """What llama.cpp needs to tokenize: tokenizer.ggml.* and the chat template, from leanlm's tokenizer."""
    from leanlm.io.tokenizer import _PRE_SPLITS

    spec = json.loads(tokenizer.tok.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise LeanLMError(f"{source}: tokenizer model {model.get('type')!r} has no GGUF form leanlm writes "
                          "(byte-level BPE and SentencePiece BPE do)")
    vocab = tokenizer.tok.get_vocab(with_added_tokens=True)
    n = max(vocab.values()) + 1
    if n > vocab_size:
        raise LeanLMError(f"{source}: the tokenizer has {n} tokens, the model's embedding only {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [5] * vocab_size  # UNUSED, as llama.cpp's converter pads
    for t, i in vocab.items():
        tokens[i], types[i] = t, 1
    for a in spec.get("added_tokens") or []:
        types[a["id"]] = 3 if a.get("special") else 4
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    spm = bool(model.get("byte_fallback"))
    f = {"tokenizer.ggml.model": "llama" if spm else "gpt2", "tokenizer.ggml.tokens": tokens}
    if spm:
        score = {m.replace(" ", ""): -float(r) for r, m in reversed(list(enumerate(merges)))}
        f["tokenizer.ggml.scores"] = [score.get(t, -1e9 if len(t) > 1 else 0.0) for t in tokens]
        for i, t in enumerate(tokens):
            if types[i] == 1 and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                types[i] = 6  # BYTE
        unk = model.get("unk_token")
        if unk in vocab:
            types[vocab[unk]] = 2
            f["tokenizer.ggml.unknown_token_id"] = vocab[unk]
        pre_tok = json.dumps(spec.get("pre_tokenizer") or {})
        f["tokenizer.ggml.add_space_prefix"] = '"prepend_scheme": "first"' in pre_tok or '"always"' in pre_tok
    else:
        f["tokenizer.ggml.merges"] = merges
        pre = json.dumps(spec.get("pre_tokenizer") or {})
        name = "default"
        if '"individual_digits": true' in pre:
            name = "smollm"
        for key, pattern in _PRE_SPLITS.items():
            if json.dumps(pattern)[1:-1] in pre:
                name = key
                break
        f["tokenizer.ggml.pre"] = name
    f["tokenizer.ggml.token_type"] = types
    for key, tok in [("bos_token_id", tokenizer.bos_token), ("eos_token_id", tokenizer.eos_token),
                     ("padding_token_id", tokenizer.pad_token)]:
        if tok is not None and tok in vocab:
            f[f"tokenizer.ggml.{key}"] = vocab[tok]
    extra = [i for i in tokenizer.eos_ids if i != f.get("tokenizer.ggml.eos_token_id")]
    if extra:
        f["tokenizer.ggml.eot_token_id"] = extra[0]
    f["tokenizer.ggml.add_bos_token"] = bool(tokenizer.add_bos)
    if tokenizer.chat_template:
        f["tokenizer.chat_template"] = tokenizer.chat_template
    return f


# ---- the file ---------------------------------------------------------------------------------
def _weight(mod, attr: str, name: str, source: str) -> torch.Tensor:
    t = getattr(mod, attr, None)
    if isinstance(t, torch.Tensor):
        return t.detach().float()
    if attr == "weight" and hasattr(mod, "dequantized_weight"):
        return mod.dequantized_weight().detach().float()
    raise LeanLMError(f"{source}: cannot export {name} (a {type(mod).__name__}); merge or remove it first")


def _exact(mod, attr: str) -> str | None:
    """The GGUF block type holding this weight exactly from its own codes, or None."""
    if attr != "weight":
        return None
    return grid_format(mod) or ("Q8_0*" if int8_rows(mod) else None)


def _tensor(model, t, want: str, source: str) -> tuple[np.ndarray, str, bool]:
    """One planned GGUF tensor -> (data, type written, written from leanlm's own codes)."""
    parts = [key.rsplit(".", 1) for key in t.keys]
    mods = [model.get_submodule(name) for name, _ in parts]
    exact = {_exact(mod, attr) for mod, (_, attr) in zip(mods, parts)}
    if len(exact) == 1 and None not in exact and not t.shift and not t.float32 and t.join != "vector":
        fmt = exact.pop()
        blocks = [int8_rows_blocks(mod) if fmt == "Q8_0*" else grid_blocks(mod, fmt) for mod in mods]
        data = np.stack(blocks) if t.join == "experts" else np.concatenate(blocks)
        return data, fmt.rstrip("*"), True
    ws = [_weight(mod, attr, key, source) for mod, (_, attr), key in zip(mods, parts, t.keys)]
    w = (torch.stack(ws) if t.join == "experts" else torch.cat(ws)).numpy()
    if t.shift:
        w = w + np.float32(t.shift)
    if t.join == "vector" or w.ndim == 1 or t.float32:
        return np.ascontiguousarray(w.reshape(-1) if t.join == "vector" else w, dtype=np.float32), "F32", False
    qtype = want
    if t.head and want not in ("F32", "F16", "BF16", "Q8_0"):
        qtype = "Q6_K"  # llama.cpp's choice for the output head
    data, written = encode(w.reshape(-1, w.shape[-1]), qtype)
    return data.reshape(*w.shape[:-1], data.shape[-1]), written, False


def _keys(cfg) -> set[str]:
    """The state-dict keys of a plain model of this config (what the file holds, whatever form leanlm
    keeps each module in), the tied head left out."""
    from leanlm.io.checkpoint import build_on_meta

    keys = set(build_on_meta(cfg).state_dict())
    if cfg.tie_word_embeddings:
        keys.discard(f"{HEAD}.weight")
    return keys


def progress_total(model) -> int:
    """How many times export_gguf calls `progress` for this model."""
    return len(_keys(model.config))


def export_gguf(model, tokenizer, path: str | Path, qtype: str = "f16", progress=None, source: str = "model") -> dict:
    """Write `model` as a GGUF file at `path`, atomically. Returns {"types": {type: count}, "exact": n}:
    n tensors written from leanlm's own integer codes."""
    import gguf

    from leanlm.io.gguf import _llama3_factors

    path = Path(path)
    if qtype.lower() not in TYPES:
        raise LeanLMError(f"unsupported GGUF type {qtype!r}; leanlm exports {', '.join(TYPES)}")
    want = qtype.upper()
    cfg = model.config
    fam = family(cfg.model_type, source)
    arch = fam.gguf_arch
    if arch is None:
        raise LeanLMError(f"{source}: family {cfg.model_type!r} has no GGUF architecture in llama.cpp")
    gmap = gguf_map(arch)
    if not cfg.uniform:
        raise LeanLMError(f"{source}: layers differ in shape (structured pruning); llama.cpp's "
                          f"{arch!r} architecture needs uniform layers")
    try:
        meta = export_fields(cfg, gmap)
    except LeanLMError as e:
        raise LeanLMError(f"{source}: cannot write {cfg.model_type} as llama.cpp's {arch!r}: {e}") from None
    if tokenizer is None:
        raise LeanLMError(f"{source}: no tokenizer; llama.cpp needs one in the GGUF file")
    present = _keys(cfg)
    try:
        plan = export_plan(cfg, fam.layout, gmap, present)
    except LeanLMError as e:
        raise LeanLMError(f"{source}: {e}") from None
    left = present - {k for t in plan for k in t.keys}
    if left:
        raise LeanLMError(f"{source}: no GGUF name for tensor {sorted(left)[0]} in llama.cpp's {arch!r}")
    fields = tokenizer_fields(tokenizer, cfg.vocab_size, source)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    counts: dict[str, int] = {}
    exact = 0
    try:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(path.stem)
        w.add_file_type(_FILE_TYPE[want])
        for key, value in meta.items():
            _add_field(w, gguf, f"{arch}.{key}", value)
        rs = cfg.rope_scaling or {}
        if cfg.rope_type in ("llama3", "freq_factors"):  # only gmap.rope_freqs architectures get here
            if cfg.rope_type == "llama3":
                inv = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
                fac = _llama3_factors(inv, float(rs["factor"]), float(rs["low_freq_factor"]),
                                      float(rs["high_freq_factor"]), float(rs["original_max_position_embeddings"]))
            else:
                fac = np.asarray(rs["factors"])
            w.add_tensor(ROPE_FREQS, fac.astype(np.float32))
        elif cfg.rope_type == "longrope":  # only architectures whose rope_kinds has it (phi3)
            for name, key in LONGROPE.items():
                w.add_tensor(name, np.asarray(rs[key], dtype=np.float32))
        for key, value in fields.items():
            _add_field(w, gguf, key, value)
        for t in plan:
            data, written, own = _tensor(model, t, want, source)
            exact += own
            if t.permute:
                data = permute_qk(data, t.permute)
            raw = getattr(gguf.GGMLQuantizationType, written)
            w.add_tensor(t.name, np.ascontiguousarray(data), raw_dtype=None if written in ("F32", "F16") else raw)
            counts[written] = counts.get(written, 0) + 1
            for _ in t.keys if progress else ():  # the bar counts state-dict tensors
                progress()
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"types": counts, "exact": exact}


def _add_field(w, gguf, key: str, value) -> None:
    T = gguf.GGUFValueType
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif key == "tokenizer.ggml.scores":
        w.add_array(key, [float(x) for x in value])
    elif key == "tokenizer.ggml.token_type":
        w.add_key_value(key, [int(x) for x in value], T.ARRAY, sub_type=T.INT32)
    else:
        w.add_array(key, value)
