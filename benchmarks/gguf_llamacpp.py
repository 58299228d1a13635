"""llama.cpp's own perplexity on GGUF files leanlm exports, against llama.cpp's own Q4_0 quantization.

Needs a llama.cpp build (llama-perplexity, llama-quantize) and a leanlm model quantized with symmetric
4-bit groups of 32 (e.g. `leanlm compress --recipe w4a16-gptq-g32 -o out/w4-gptq-g32`). Steps, all on
the same weights and the same text (the packaged evaluation text, or --text):
  1. leanlm export (default model) --type f32            -> f32.gguf
  2. llama-quantize f32.gguf q4_0-llamacpp.gguf Q4_0     (llama.cpp's round-to-nearest Q4_0)
  3. leanlm export (default model) --type q4_0           -> q4_0-leanlm-rtn.gguf (gguf-py's Q4_0 of the same weights)
  4. leanlm export out/w4-gptq-g32 --type q4_0           -> q4_0-leanlm-gptq.gguf (GPTQ codes written as they are)
  5. leanlm export (default model) --type q4_1           -> q4_1.gguf (the default model's own grid: lossless)
and llama-perplexity -c CTX -t THREADS -f TEXT on each.

    python benchmarks/gguf_llamacpp.py --llama-cpp /work/build/llama.cpp/build/bin \
        --gptq out/w4-gptq-g32 --work /tmp/gguf-bench --json
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path


def sh(cmd: list[str], log) -> str:
    print("$ " + " ".join(cmd), file=log, flush=True)
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    out = p.stdout + p.stderr
    if p.returncode:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{out[-2000:]}")
    print(f"  ({time.perf_counter() - t:.1f} s)", file=log, flush=True)
    return out


def types_of(path: Path) -> str:
    import gguf

    c: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        c[t.tensor_type.name] = c.get(t.tensor_type.name, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(c.items()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", required=True, help="folder with llama-perplexity and llama-quantize")
    ap.add_argument("--gptq", required=True, help="leanlm model folder with symmetric 4-bit groups of 32")
    ap.add_argument("--work", default="/tmp/gguf-bench")
    ap.add_argument("--text", default=None, help="text file (default: the packaged evaluation text)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=0, help="llama-perplexity --chunks (0: the whole text)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from leanlm.data import packaged_path

    bin_ = Path(args.llama_cpp)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    text = args.text or str(packaged_path("eval"))
    log = sys.stderr
    lean = [sys.executable, "-m", "leanlm", "export"]
    files = {
        "f32 (leanlm export)": work / "f32.gguf",
        "Q4_0 llama-quantize of the f32 file": work / "q4_0-llamacpp.gguf",
        "Q4_0 leanlm export, round-to-nearest (gguf-py)": work / "q4_0-leanlm-rtn.gguf",
        "Q4_0 leanlm export of GPTQ g32 (codes as solved)": work / "q4_0-leanlm-gptq.gguf",
        "Q4_1 leanlm export (the default model's own grid)": work / "q4_1.gguf",
    }
    f = list(files.values())
    sh(lean + ["--type", "f32", "-o", str(f[0])], log)
    sh([str(bin_ / "llama-quantize"), str(f[0]), str(f[1]), "Q4_0", str(args.threads)], log)
    sh(lean + ["--type", "q4_0", "-o", str(f[2])], log)
    sh(lean + [args.gptq, "--type", "q4_0", "-o", str(f[3])], log)
    sh(lean + ["--type", "q4_1", "-o", str(f[4])], log)
    rows = {}
    for name, path in files.items():
        cmd = [str(bin_ / "llama-perplexity"), "-m", str(path), "-f", text, "-c", str(args.ctx),
               "-t", str(args.threads), "-b", str(args.ctx)]
        if args.chunks:
            cmd += ["--chunks", str(args.chunks)]
        t = time.perf_counter()
        out = sh(cmd, log)
        m = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", out)
        rows[name] = {"file": path.name, "MB": round(path.stat().st_size / 1e6, 1), "tensors": types_of(path),
                      "ppl": float(m.group(1)) if m else None, "+/-": float(m.group(2)) if m else None,
                      "s": round(time.perf_counter() - t, 1)}
        print(json.dumps({name: rows[name]}), file=log, flush=True)
    print(json.dumps(rows, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
