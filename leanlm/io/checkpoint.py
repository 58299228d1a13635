"""Hugging Face folders in and out (safetensors only; nothing is ever unpickled).

Models are built on the meta device and filled with `load_state_dict(assign=True)`, so loading
never holds two copies of the weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from leanlm.errors import LeanLMError
from leanlm.io import modules
from leanlm.io.atomic import atomic_dir
from leanlm.model.config import ModelConfig, read_hf_config
from leanlm.model.families import family
from leanlm.model.layout import HEAD
from leanlm.model.transformer import Transformer

# Keys some checkpoints carry that are derived, not weights.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def build_on_meta(cfg: ModelConfig) -> Transformer:
    with torch.device("meta"):
        return Transformer(cfg)


def materialize(model: Transformer, sd: dict[str, torch.Tensor], source: str, meta: dict | None = None,
                dtype: torch.dtype | None = None) -> Transformer:
    """Assign tensors into a meta-device model; the key sets must match exactly."""
    sd = {k: v for k, v in sd.items() if not k.endswith(_IGNORED_SUFFIXES)}
    if meta:  # compressed modules (quantized/sparse) rebuild themselves from their tensors first
        sd = modules.restore(model, sd, meta, source)
    if model.config.tie_word_embeddings:
        sd.pop(f"{HEAD}.weight", None)
    own = model.state_dict(keep_vars=True)
    expected = {k for k, v in own.items() if v.is_meta}
    if model.config.tie_word_embeddings:
        expected.discard(f"{HEAD}.weight")
    missing, unexpected = expected - sd.keys(), sd.keys() - own.keys()
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {sorted(missing)[0]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors (e.g. {sorted(unexpected)[0]})")
        raise LeanLMError(f"{source}: weights do not match the config: {'; '.join(parts)}")
    # Compressed modules keep their stored dtypes (e.g. fp16 scales); only plain weights follow `dtype`.
    keep = tuple(f"{n}." for n in ((meta or {}).get("modules") or {}))
    for k, v in sd.items():
        if tuple(own[k].shape) != tuple(v.shape):
            raise LeanLMError(f"{source}: tensor {k} has shape {tuple(v.shape)}, config expects "
                              f"{tuple(own[k].shape)}; config.json and weights disagree")
        if dtype is not None and v.is_floating_point() and v.dtype != dtype and not (keep and k.startswith(keep)):
            sd[k] = v.to(dtype)
    model.load_state_dict(sd, strict=False, assign=True)
    model.tie_weights()
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if left:
        raise LeanLMError(f"{source}: tensor {left[0]} was never loaded")
    return model.eval()


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise LeanLMError(f"{index}: malformed index ({e}); re-save the model")
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
            raise LeanLMError(f"{folder}: only pickle weights (.bin/.pt) found; leanlm never unpickles — "
                              "convert them to safetensors with transformers' save_pretrained(safe_serialization=True)")
        raise LeanLMError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    paths = [folder / name for name in files]
    for path in paths:
        if not path.exists():
            raise LeanLMError(f"{path}: shard named in the index is missing")
    return paths


def _unreadable(path: Path, e: Exception) -> LeanLMError:
    return LeanLMError(f"{path}: cannot read safetensors ({str(e).splitlines()[0]}); "
                       "the file is truncated or damaged — download or save it again")


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    sd = {}
    for path in _safetensors_files(folder):
        try:
            # load_file memory-maps the file; tensors are copied out of the map only when touched.
            sd.update(load_file(str(path)))
        except (SafetensorError, OSError, RuntimeError) as e:
            raise _unreadable(path, e)
    return sd


def _read_quantizing(folder: Path, model: Transformer, quantize, skip=()) -> dict[str, torch.Tensor]:
    """Read the checkpoint one tensor at a time; each float nn.Linear weight goes through
    quantize(name, weight, bias) -> module | None as soon as it is read, and a returned module replaces
    the linear at once. Tensors are read into process memory (pread, not a memory map), so a quantized
    weight's float copy is freed right away: the float model is never whole in memory. Returns the
    tensors left for `materialize` (embedding, norms, linears the hook kept)."""
    from contextlib import ExitStack

    from safetensors import SafetensorError, safe_open

    def open_file(path):
        try:
            return stack.enter_context(safe_open(str(path), framework="pt", backend="pread"))
        except TypeError:  # safetensors without the pread backend
            return stack.enter_context(safe_open(str(path), framework="pt"))

    from leanlm.model.surgery import replace_module

    linears = [n for n in _float_linears(model) if n not in skip]
    with ExitStack() as stack:
        where: dict[str, tuple] = {}
        for path in _safetensors_files(folder):
            try:
                f = open_file(path)
                where.update({k: (f, path) for k in f.keys()})
            except (SafetensorError, OSError, RuntimeError) as e:
                raise _unreadable(path, e)

        # leanlm's names -> the checkpoint's (a family's key map renames; fused tensors stay as they are)
        where = {new: where[old] + (old,) for new, old in
                 family(model.config.model_type).load_keys({k: k for k in where}, model.config).items()}

        def read(key):
            f, path, key = where.pop(key)
            try:
                return f.get_tensor(key)
            except (SafetensorError, OSError, RuntimeError) as e:
                raise _unreadable(path, e)

        kept: dict[str, torch.Tensor] = {}
        for name in linears:
            wkey, bkey = f"{name}.weight", f"{name}.bias"
            if wkey not in where:
                continue  # materialize reports it missing
            weight = read(wkey)
            bias = read(bkey) if bkey in where else None
            new = quantize(name, weight, bias) if weight.is_floating_point() and weight.dim() == 2 else None
            if new is None:  # kept as it is: back to the tensors materialize assigns
                kept[wkey] = weight
                if bias is not None:
                    kept[bkey] = bias
                continue
            replace_module(model, name, new)
            del weight, bias
            trim_heap()
        rest = {k: read(k) for k in list(where)}
        return {**kept, **family(model.config.model_type).load_keys(rest, model.config)}


def trim_heap() -> None:
    """Hand freed memory back to the OS. glibc raises its mmap threshold after large frees, so the
    float weights read and dropped one by one end up in a fragmented heap that keeps growing (a
    quantizing load of the default model peaked at 909 MB without this, 510 MB with it)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_hf_folder(folder: str | Path, dtype: torch.dtype | None = None, quantize=None):
    """quantize(name, weight, bias) -> module | None: replace float linears as they are read (QLoRA)."""
    from leanlm.io.tokenizer import Tokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise LeanLMError(f"{folder}: no such folder; pass a Hugging Face model folder or a .gguf file")
    cfg = read_hf_config(folder)
    raw = json.loads((folder / "config.json").read_text())
    meta = raw.get("leanlm_compression")
    model = build_on_meta(cfg)
    if quantize is None:
        sd = family(cfg.model_type).load_keys(_read_safetensors(folder), cfg)
    else:  # compressed modules restore themselves in materialize; the hook sees only float linears
        sd = _read_quantizing(folder, model, quantize, skip=set((meta or {}).get("modules") or {}))
    model = materialize(model, sd, str(folder), meta=meta, dtype=dtype)
    if quantize is not None:  # linears stored fused (Phi-3's fused q/k/v, fused experts) meet the hook once split
        model = quantize_linears(model, quantize)
    tok = Tokenizer.from_folder(folder)
    return model, tok


def quantize_linears(model: Transformer, quantize) -> Transformer:
    """The same hook applied to a model already in memory (a GGUF dequantized without the cache)."""
    from leanlm.model.surgery import replace_module

    for name in _float_linears(model):
        lin = model.get_submodule(name)
        new = quantize(name, lin.weight.data, None if lin.bias is None else lin.bias.data)
        if new is not None:
            replace_module(model, name, new)
    return model


def _float_linears(model: Transformer) -> list[str]:
    """Names of the plain nn.Linear layers a quantize hook sees (a tied output head is the embedding's)."""
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    if model.config.tie_word_embeddings:
        names = [n for n in names if n != HEAD]
    return names


def save_hf_folder(model: Transformer, tokenizer, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write config.json, model.safetensors, tokenizer and generation config, atomically."""
    from safetensors.torch import save_file

    folder = Path(folder)
    cfg = model.config
    if cfg.residual_gates:
        raise LeanLMError(f"{folder}: the model has ReZero residual gates, which its family's checkpoint "
                          "cannot hold; call model.fold_residual_gates() first (the function is unchanged)")
    tensors, meta = modules.state_for_save(model)
    if cfg.tie_word_embeddings:
        tensors.pop(f"{HEAD}.weight", None)
    if not meta:  # the family's checkpoint names (compressed checkpoints keep leanlm's, which load as they are)
        tensors = family(cfg.model_type).save_keys(tensors, cfg)
    out, ptrs = {}, set()
    for k, v in tensors.items():
        v = v.detach()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        v = v.contiguous()
        # safetensors refuses shared storage: a second tensor on the same memory gets its own copy
        out[k] = v.clone() if v.data_ptr() in ptrs else v
        ptrs.add(out[k].data_ptr())
    hf = cfg.to_hf(dtype=str(next(iter(out.values())).dtype).replace("torch.", "") if dtype else
                   str(model.dtype).replace("torch.", ""))
    if meta:
        hf["leanlm_compression"] = meta
    with atomic_dir(folder) as tmp:
        save_file(out, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id or None}
        if tokenizer is not None and tokenizer.eos_ids:
            gen["eos_token_id"] = tokenizer.eos_ids if len(tokenizer.eos_ids) > 1 else tokenizer.eos_ids[0]
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
    return folder
