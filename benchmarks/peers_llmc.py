"""llm-compressor's side of benchmarks/peers.py: runs in llm-compressor's own virtualenv, never imports leanlm.

    /work/llmc-venv/bin/python benchmarks/peers_llmc.py --job gptq-w4-g64 --model HF_DIR \
        --calib calib.safetensors --check check.safetensors --out OUT_DIR --threads 1

Loads the HF folder with transformers, runs `llmcompressor.oneshot` with one modifier on the token
ids in --calib (the driver cut them from leanlm's packaged calibration text, so both tools see the
same samples), then writes OUT_DIR as a *dense fp32* HF folder: pruned weights as they are, quantized
weights fake-quantized (quantize + dequantize with compressed-tensors' own `fake_quantize` and the
scales llm-compressor chose). The driver evaluates that folder with leanlm's perplexity function, the
same one it uses for leanlm's outputs. As a check of the export, this process also scores the
--check token ids with llm-compressor's in-memory model in transformers (its own quantized forward);
the driver compares that with leanlm's score of the exported folder on the same ids.

Prints one JSON object as the last line: time_s (oneshot only), peak_rss_mb (this process, after
oneshot, before the export), check_nll, versions; or {"error": "..."} when llm-compressor refuses.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def modifier(job: str, args):
    """The llm-compressor modifier for a job name (the same names as leanlm's side in peers.py)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    def scheme(group):
        return {"group_0": QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
            num_bits=4, type="int", symmetric=True, strategy="group", group_size=group))}

    if job.startswith(("rtn-w4-g", "gptq-w4-g")):
        group = int(job.split("-g")[1].split("-")[0])
        if job.startswith("rtn"):
            from llmcompressor.modifiers.quantization import QuantizationModifier

            return QuantizationModifier(config_groups=scheme(group), ignore=["lm_head"])
        from llmcompressor.modifiers.gptq import GPTQModifier

        return GPTQModifier(config_groups=scheme(group), ignore=["lm_head"], dampening_frac=args.damp,
                            actorder="static" if args.act_order else None, block_size=128)
    sparsity, structure = {"wanda-50": (0.5, "0:0"), "sparsegpt-50": (0.5, "0:0"),
                           "wanda-2:4": (0.5, "2:4"), "sparsegpt-2:4": (0.5, "2:4")}[job]
    if job.startswith("wanda"):
        from llmcompressor.modifiers.pruning import WandaPruningModifier

        return WandaPruningModifier(sparsity=sparsity, mask_structure=structure, ignore=["re:.*lm_head"])
    from llmcompressor.modifiers.pruning import SparseGPTModifier

    return SparseGPTModifier(sparsity=sparsity, mask_structure=structure, dampening_frac=args.damp, block_size=128,
                             ignore=["re:.*lm_head"])


def export_dense(model, src: Path, out: Path) -> int:
    """Write model's weights, quantized ones fake-quantized, as an fp32 safetensors HF folder."""
    import torch
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from safetensors.torch import save_file

    n_quant = 0
    replaced = {}
    with torch.no_grad():
        for name, mod in model.named_modules():
            qs = getattr(mod, "quantization_scheme", None)
            if qs is None or qs.weights is None or not hasattr(mod, "weight_scale"):
                continue
            zp = getattr(mod, "weight_zero_point", None)
            if zp is None:
                zp = torch.zeros_like(mod.weight_scale, dtype=torch.int8)
            w = mod.weight.detach().float()
            g_idx = getattr(mod, "weight_g_idx", None)
            if g_idx is not None and qs.weights.actorder is not None and not bool((g_idx == g_idx.sort()[0]).all()):
                raise SystemExit(f"{name}: group actorder (g_idx) export is not implemented here")
            replaced[name + ".weight"] = fake_quantize(w, mod.weight_scale.float(), zp, qs.weights).float()
            n_quant += 1
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith(("weight_scale", "weight_zero_point", "weight_g_idx", "input_scale", "input_zero_point",
                       "weight_global_scale")):
            continue
        sd[k] = replaced.get(k, v).detach().float().contiguous()
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in src.iterdir():
        if f.suffix in (".json",) and f.name != "model.safetensors.index.json":
            shutil.copy(f, out / f.name)
    return n_quant


def check_nll(model, ids) -> float:
    """Mean next-token NLL of ids [B, T] under model (its own forward, whatever wraps it)."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
        return float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                       ids[:, 1:].reshape(-1)))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--job", required=True)
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--calib", required=True, type=Path)
    p.add_argument("--check", type=Path, default=None)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--no-act-order", dest="act_order", action="store_false")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import compressed_tensors
    import llmcompressor
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    row = {"tool": "llm-compressor", "job": args.job, "versions": {
        "llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
        "transformers": transformers.__version__, "torch": torch.__version__}}
    ids = load_file(str(args.calib))["input_ids"]
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32)
    t0 = time.perf_counter()
    try:
        oneshot(model=model, processor=str(args.model), dataset=ds, recipe=modifier(args.job, args),
                num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1],
                shuffle_calibration_samples=False)
    except Exception as e:  # llm-compressor refusing a setting is a result here, not a crash
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:400]}"
        row["time_s"] = time.perf_counter() - t0
        print(json.dumps(row))
        return 0
    row["time_s"] = time.perf_counter() - t0
    row["peak_rss_mb"] = peak_rss_mb()
    if args.check is not None:
        row["check_nll"] = check_nll(model, load_file(str(args.check))["ids"])
    row["quantized_modules"] = export_dense(model, args.model, args.out)
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
