"""The Python API: load, save (generate and perplexity live in leanlm.infer / leanlm.eval)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from leanlm.errors import LeanLMError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise LeanLMError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_source(source) -> Path:
    """None -> the cached default GGUF (fetched once); otherwise the given path, which must exist."""
    from leanlm.io.registry import default_gguf_path

    if source is None:
        return default_gguf_path()
    path = Path(source).expanduser()
    if not path.exists():
        raise LeanLMError(f"{source}: no such file or folder; pass a Hugging Face model folder or a .gguf file "
                          "(or nothing, for the default model)")
    return path


def _register_compression(folder: Path) -> None:
    """A compressed checkpoint's module types come from leanlm.compress, which registers them with the
    loader when imported (leanlm/io never imports it)."""
    try:
        compressed = "leanlm_compression" in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return  # the loader reports a missing or broken config.json
    if compressed:
        import leanlm.compress  # noqa: F401


def load(source=None, dtype=None, adapter=None, progress: bool = False, convert_cache: bool = True, quantize=None):
    """Load a model and its tokenizer: `model, tokenizer = leanlm.load()` (None = default model).

    source: a Hugging Face folder (config.json + safetensors + tokenizer.json) or a .gguf file.
    A GGUF is dequantized once and cached as an fp32 folder (LEANLM_CACHE), so later loads are fast.
    quantize: a hook quantize(name, weight, bias) -> module | None, called for each float nn.Linear as
    its weight is read, e.g. `leanlm.peft.qlora.nf4_on_load(targets)` (QLoRA): from a folder (or the
    GGUF's cache) the float model is then never whole in memory; a GGUF read without the cache is
    dequantized whole (and converted to dtype) first and quantized after.
    """
    from leanlm.io.checkpoint import (build_on_meta, load_hf_folder, materialize, quantize_linears,
                                      save_hf_folder)
    from leanlm.io.gguf import load_gguf
    from leanlm.io.registry import converted_dir
    from leanlm.io.tokenizer import Tokenizer

    dt = parse_dtype(dtype)
    path = resolve_source(source)
    if path.is_dir():
        _register_compression(path)
        model, tok = load_hf_folder(path, dtype=dt, quantize=quantize)
    elif path.suffix.lower() == ".gguf":
        conv = converted_dir(path)
        if convert_cache and (conv / "model.safetensors").exists():
            model, tok = load_hf_folder(conv, dtype=dt, quantize=quantize)
        else:
            if progress:
                from leanlm.report import progress as bar

                with bar() as pb:
                    task = pb.add_task(f"dequantizing {path.name}", total=None)
                    cfg, sd, fields = load_gguf(path, progress=lambda: pb.advance(task))
            else:
                cfg, sd, fields = load_gguf(path)
            tok = Tokenizer.from_gguf_fields(fields, str(path))
            model = materialize(build_on_meta(cfg), sd, str(path))
            if convert_cache:
                try:
                    save_hf_folder(model, tok, conv)
                except OSError:
                    pass  # a read-only cache only costs speed
            if dt is not None:
                model = model.to(dt)
            if quantize is not None:
                model = quantize_linears(model, quantize)
    else:
        raise LeanLMError(f"{path}: not a folder or a .gguf file; pass a Hugging Face model folder or a .gguf file")
    model.source = str(path)
    if adapter is not None:
        from leanlm.peft import load_adapter

        # prompt/prefix adapters wrap the model, so use what load_adapter returns
        model = load_adapter(model, adapter)
    return model, tok


def save(model, tokenizer, folder, dtype=None) -> Path:
    """Save as a Hugging Face folder that transformers' from_pretrained loads with the same logits."""
    import leanlm.compress  # noqa: F401  (registers compressed module types and sparse packing with the saver)
    from leanlm.io.checkpoint import save_hf_folder

    return save_hf_folder(model, tokenizer, folder, dtype=parse_dtype(dtype))
