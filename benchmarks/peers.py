"""leanlm side by side with llm-compressor on the default model: same jobs, same calibration tokens.

    python benchmarks/peers.py --threads 1 --samples 128 --seq-len 512 --out docs/bench/peers.jsonl
    python benchmarks/peers.py --jobs gptq-w4-g64 --tools leanlm --samples 32      # one variant
    python benchmarks/peers.py --jobs gptq-w4-g64 --tools leanlm --damp 0.1 --no-act-order
    python benchmarks/peers.py --md docs/bench/peers-table.md --jobs none            # table only

Jobs: rtn-w4-g64 / gptq-w4-g64 (4-bit, groups of 64, symmetric, lm_head and embedding kept),
rtn-w4-g128 (llm-compressor refuses it on this model: 576 % 128 != 0), wanda-50, sparsegpt-50,
wanda-2:4, sparsegpt-2:4 (every Linear of the decoder blocks; lm_head kept dense on both sides).
For each job, leanlm and then llm-compressor run back to back, each in its own process with
--threads torch threads (peak RSS is per process): leanlm applies the equivalent recipe (what
`leanlm compress --recipe FILE --samples N --seq-len L` applies; the YAML is printed in the row) to
the calibration ids, llm-compressor runs `oneshot` in its own virtualenv (benchmarks/peers_llmc.py)
on the same ids. Both compressing processes report the compression's wall time and their peak RSS
(the model load included, the evaluation not). Then one evaluation process per output, for both
tools the same code: `leanlm.load(folder)` and `leanlm.eval.perplexity` (windows of --ctx tokens,
no overlap) on the first --eval-chars characters of the packaged literary text (Austen) and the first
--tech-chars of the packaged technical text (Python HOWTOs, `packaged_text("tech")`). llm-compressor's
output is written as a dense fp32 folder (its quantized weights fake-quantized with its own scales);
as a check of that export, llm-compressor's in-memory model scores the first 512 tokens of the
technical text in transformers and the row shows that beside leanlm's score of the export.
Finished rows in --out are kept (a rerun skips them).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

JOBS = ["rtn-w4-g64", "gptq-w4-g64", "rtn-w4-g128", "wanda-50", "sparsegpt-50", "wanda-2:4", "sparsegpt-2:4"]
HERE = Path(__file__).resolve().parent


def recipe_yaml(job: str, damp: float, act_order: bool) -> str:
    if job.startswith(("rtn-w4-g", "gptq-w4-g")):
        method, group = job.split("-")[0], int(job.split("-g")[1])
        y = f"- method: {method}\n  bits: 4\n  group_size: {group}\n  sym: true\n"
        if method == "gptq":
            y += f"  damp: {damp}\n  act_order: {str(act_order).lower()}\n  block_size: 128\n"
        return y
    method, pattern = job.split("-")
    if pattern == "50":
        return f"- method: {method}\n  sparsity: 0.5\n  pattern: unstructured\n" + (
            f"  dampening: {damp}\n  block_size: 128\n" if method == "sparsegpt" else "")
    return f"- method: {method}\n  pattern: '{pattern}'\n" + (
        f"  dampening: {damp}\n  block_size: 128\n" if method == "sparsegpt" else "")


def key(tool: str, job: str, args) -> str:
    k = f"{tool}|{job}|n{args.samples}x{args.seq_len}|damp{args.damp}|ao{int(args.act_order)}"
    return k + (f"|calib-{args.calib_name}" if args.calib_text else "")


# ---------------------------------------------------------------- child processes (main environment)
def leanlm_job(args) -> dict:
    """Compress the default model with the job's recipe on the calibration ids; save it to --out-dir."""
    import torch
    from safetensors.torch import load_file

    import leanlm
    from leanlm.compress.recipe import apply_recipe, parse_recipe
    from leanlm.eval.bench import peak_rss_mb

    torch.set_num_threads(args.threads)
    model, tok = leanlm.load(None, dtype=torch.float32)
    yaml = recipe_yaml(args.leanlm_job, args.damp, args.act_order)
    recipe = parse_recipe(yaml, args.leanlm_job)
    samples = load_file(args.calib)["input_ids"] if recipe.needs_data else None
    t0 = time.perf_counter()
    apply_recipe(model, recipe, samples, progress=False)
    row = {"tool": "leanlm", "job": args.leanlm_job, "recipe": yaml, "time_s": time.perf_counter() - t0,
           "peak_rss_mb": peak_rss_mb()}
    leanlm.save(model, tok, args.out_dir)
    return row


def evaluate(args) -> dict:
    """Perplexity of a saved folder (or the fp32 default model) on both packaged texts, plus the check NLL."""
    import torch
    from safetensors.torch import load_file

    import leanlm
    from leanlm.data import packaged_text
    from leanlm.eval.perplexity import perplexity

    torch.set_num_threads(args.threads)
    path = None if args.eval_dir == "fp32" else args.eval_dir
    model, tok = leanlm.load(path, dtype=torch.float32)
    out = {}
    for name, chars in (("eval", args.eval_chars), ("tech", args.tech_chars)):
        if chars < 0:
            continue
        text = packaged_text(name)
        text = text[:chars] if chars else text
        r = perplexity(model, tok, text, ctx=args.ctx, stride=args.ctx, progress=False)
        out[f"ppl_{name}"], out[f"tokens_{name}"] = r["perplexity"], r["tokens"]
    ids = load_file(args.check)["ids"]
    with torch.inference_mode():
        logits = model(ids).float()
    out["check_nll_leanlm_eval"] = float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]))
    return out


# ---------------------------------------------------------------- driver
def run_json(cmd: list[str], env: dict, log: Path) -> dict:
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=f, text=True)
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode != 0 or not lines:
        raise SystemExit(f"{cmd[:4]}... failed (exit {p.returncode}); see {log}")
    return json.loads(lines[-1])


def prepare_inputs(args, work: Path) -> tuple[Path, Path]:
    import torch
    from safetensors.torch import save_file

    import leanlm
    from leanlm.data import calibration_samples, packaged_text

    tag = f"-{args.calib_name}" if args.calib_text else ""
    calib = work / f"calib-{args.samples}x{args.seq_len}{tag}.safetensors"
    check = work / "check.safetensors"
    if not calib.exists() or not check.exists():
        _, tok = leanlm.load(None)
        ids = calibration_samples(tok, args.samples, args.seq_len, path=args.calib_text or "packaged:prose", seed=0)
        save_file({"input_ids": ids.contiguous()}, str(calib))
        ids = torch.tensor(list(tok.encode(packaged_text("tech"), add_special=False))[:512]).unsqueeze(0)
        save_file({"ids": ids.contiguous()}, str(check))
    return calib, check


def model_folder() -> Path:
    """The default model's fp32 HF folder (what transformers, hence llm-compressor, loads)."""
    import leanlm
    from leanlm.io.registry import converted_dir, default_gguf_path

    leanlm.load(None)  # converts the GGUF once if that has not happened yet
    return converted_dir(default_gguf_path())


def drive(args) -> None:
    out = Path(args.out)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "peers.log"
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.exists() else []
    done = {r["key"] for r in rows}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false")
    calib, check = prepare_inputs(args, work)
    common = ["--threads", str(args.threads), "--damp", str(args.damp)] + ([] if args.act_order else ["--no-act-order"])
    ev = [sys.executable, __file__, "--check", str(check), "--eval-chars", str(args.eval_chars),
          "--tech-chars", str(args.tech_chars), "--ctx", str(args.ctx), "--threads", str(args.threads)]
    todo = [] if args.jobs == "none" else (args.jobs.split(",") if args.jobs else ["fp32"] + JOBS)
    for job in todo:
        tools = ["fp32"] if job == "fp32" else args.tools.split(",")
        for tool in tools:
            k = "fp32" if job == "fp32" else key(tool, job, args)
            if k in done:
                continue
            outdir = work / k.replace("|", "_").replace(":", "-")
            load = os.getloadavg()[0]
            if tool == "fp32":
                row = {"tool": "fp32", "job": "fp32"}
                folder = "fp32"
            elif tool == "leanlm":
                row = run_json([sys.executable, __file__, "--leanlm-job", job, "--calib", str(calib),
                                "--out-dir", str(outdir), *common], env, log)
                folder = str(outdir)
            else:
                row = run_json([args.llmc_python, str(HERE / "peers_llmc.py"), "--job", job,
                                "--model", str(args.model or model_folder()), "--calib", str(calib),
                                "--check", str(check), "--out", str(outdir), *common], env, log)
                folder = None if "error" in row else str(outdir)
            row.update(key=k, samples=f"{args.samples}x{args.seq_len}", damp=args.damp, act_order=args.act_order,
                       calib=args.calib_name if args.calib_text else "packaged calib", threads=args.threads,
                       load_avg_1min=load)
            if folder is not None:
                row.update(run_json(ev + ["--eval-dir", folder], env, log))
            if outdir.exists():
                shutil.rmtree(outdir)
            rows.append(row)
            done.add(k)
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    table = markdown(rows)
    if args.md:
        from leanlm.io.atomic import atomic_write_text

        atomic_write_text(Path(args.md), table + "\n")
    print(table)


def ppl(row: dict, text: str) -> str:
    return f"{row['ppl_' + text]:.2f}" if "ppl_" + text in row else "-"


def markdown(rows: list[dict]) -> str:
    lines = ["| job | tool | calib | damp | act-order | ppl Austen | ppl tech | time s | peak RSS MB "
             "| check NLL (tool's own / leanlm eval) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['job']} | {r['tool']} | {r['samples']} | | | refused: {r['error'][:160]} | | | | |")
            continue
        gptq = r["job"].startswith("gptq")
        own = f"{r['check_nll']:.4f} / " if "check_nll" in r else ""
        lines.append(
            f"| {r['job']} | {r['tool']} | {r.get('samples', '-')}"
            f"{'' if r.get('calib', 'packaged calib') == 'packaged calib' else ' of ' + r['calib']} | "
            f"{r.get('damp', '') if gptq or 'sparsegpt' in r['job'] else ''} | "
            f"{('on' if r.get('act_order') else 'off') if gptq else ''} | {ppl(r, 'eval')} | {ppl(r, 'tech')} | "
            f"{r['time_s']:.0f} | {r['peak_rss_mb']:.0f} | {own}{r['check_nll_leanlm_eval']:.4f} |"
            if r["tool"] != "fp32" else
            f"| fp32 | - | - | | | {r['ppl_eval']:.2f} | {r['ppl_tech']:.2f} | | | {r['check_nll_leanlm_eval']:.4f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", default=None, help="comma-separated jobs (default: fp32 and all), or 'none'")
    p.add_argument("--tools", default="leanlm,llmc")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ / SparseGPT dampening (both tools)")
    p.add_argument("--no-act-order", dest="act_order", action="store_false", help="GPTQ without act-order")
    p.add_argument("--calib-text", default=None,
                   help="calibration .txt instead of the packaged calibration text (e.g. an in-domain text)")
    p.add_argument("--calib-name", default="user", help="label of --calib-text in the rows")
    p.add_argument("--eval-chars", type=int, default=16000, help="characters of the Austen text (0: all, -1: skip)")
    p.add_argument("--tech-chars", type=int, default=40000, help="characters of the technical text (0: all, -1: skip)")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--out", default="docs/bench/peers.jsonl")
    p.add_argument("--md", default=None, help="also write the markdown table here")
    p.add_argument("--work", default="/tmp/leanlm-peers", help="scratch folder for the compressed models")
    p.add_argument("--llmc-python", default="/work/llmc-venv/bin/python")
    p.add_argument("--model", default=None, help="HF folder of the default model (default: leanlm's cache)")
    # internal: child processes
    p.add_argument("--leanlm-job", default=None)
    p.add_argument("--calib", default=None)
    p.add_argument("--out-dir", default=None)
    p.add_argument("--eval-dir", default=None)
    p.add_argument("--check", default=None)
    args = p.parse_args()
    if args.leanlm_job:
        print(json.dumps(leanlm_job(args)))
    elif args.eval_dir:
        print(json.dumps(evaluate(args)))
    else:
        drive(args)


if __name__ == "__main__":
    main()
