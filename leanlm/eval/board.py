"""`leanlm board [MODEL] --recipes all|NAME,... -o DIR`: every recipe on one model through one harness.

For each recipe: compress in a child process (`python -m leanlm compress`, so its time and peak RSS
are its own), then score the saved folder here: perplexity on the packaged evaluation and technical
texts, accuracy on the packaged tasks, size on disk. Then one interleaved speed pass times batch-1
decode and prefill of every row, round after round, so the speed columns compare.

Each row is cached in DIR/cache/rows under a key made of the model's identity, the recipe's text,
the code version (a hash of the leanlm sources that can change a figure) and the board's settings:
a killed board resumes at the first row without a result, and a rerun only measures what changed.
The speed pass is cached under the keys of all its rows together (a changed row re-times them all,
so they still compare). Outputs (results.jsonl, board.md, Pareto plots, board.html) are written
atomically by leanlm.eval.board_report.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from leanlm.errors import LeanLMError
from leanlm.eval.board_measure import measure_quality, speed_pass
from leanlm.io.atomic import atomic_write_text

PKG = Path(__file__).resolve().parent.parent  # the leanlm package folder
RECIPE_DIR = PKG / "compress" / "recipes"
# name patterns added to the built-in YAML recipes by --recipes all (leanlm.compress.recipe.PATTERN)
ALL_PATTERNS = ["w4a16-rtn-g128", "w4a16-gptq-g128", "w4a16-awq-g128", "w4a16-gptq-g128-e8", "w4a16-gptq-g32",
                "w3a16-gptq-g128", "w3a16-awq-g32"]
BASE = "base"  # the uncompressed model, always the first row
# the leanlm sources whose change can move a figure on the board (the report's own code is left out)
CODE_DIRS = ("model", "io", "data", "compress", "infer", "train", "peft")
CODE_FILES = ("api.py", "eval/perplexity.py", "eval/bench.py", "eval/describe.py", "eval/board_measure.py",
              "eval/tasks.py")
# recipe-name suffixes that `leanlm compress` understands: NAME+distill recovers the compressed model by
# distillation from the model before the recipe (present when leanlm/compress/recover.py is)
SUFFIXES = {"distill": PKG / "compress" / "recover.py"}


@dataclass
class BoardConfig:
    model: str | None = None
    recipes: list[str] = field(default_factory=list)
    out: str = "board"
    samples: int = 32          # calibration samples (x seq_len tokens) given to every recipe
    seq_len: int = 512
    eval_chars: int = 16000    # characters of each perplexity text (0: the whole text)
    ctx: int = 512
    task_records: int = 32     # test records per packaged task
    threads: int | None = None
    rounds: int = 3            # speed pass: rounds over all rows (median per row)
    prompt_len: int = 32
    decode_tokens: int = 32
    prefill_len: int = 256
    keep_models: bool = True
    update_doc: str | None = None  # a markdown file whose board:begin/end block gets board.md

    def quality_settings(self) -> dict:
        return {k: getattr(self, k) for k in ("samples", "seq_len", "eval_chars", "ctx", "task_records", "threads")}

    def speed_settings(self) -> dict:
        return {k: getattr(self, k) for k in ("rounds", "prompt_len", "decode_tokens", "prefill_len", "threads")}


# ---------------------------------------------------------------- identities and keys
def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def code_version() -> str:
    """Hash of the leanlm sources (and packaged data) that can change a figure on the board."""
    h = hashlib.sha256()
    files = [p for d in CODE_DIRS for p in (PKG / d).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    files += [PKG / f for f in CODE_FILES if (PKG / f).exists()]
    for p in sorted(set(files)):
        h.update(str(p.relative_to(PKG)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def model_identity(model: str | None) -> dict:
    """What names the model's weights: the default model's pinned checksum, or each file's name, size, mtime."""
    if model is None:
        from leanlm.io.registry import DEFAULT_GGUF, DEFAULT_SHA256

        return {"default": DEFAULT_GGUF, "sha256": DEFAULT_SHA256}
    p = Path(model).expanduser().resolve()
    if not p.exists():
        raise LeanLMError(f"{model}: no such file or folder; pass a Hugging Face model folder or a .gguf file")
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    return {"path": str(p), "files": [(str(f.relative_to(p.parent)), f.stat().st_size, f.stat().st_mtime_ns)
                                      for f in files]}


def split_recipe(name: str) -> tuple[str, list[str]]:
    """'structured-20+distill' -> ('structured-20', ['distill']); the whole name goes to `leanlm compress`."""
    base, *rec = name.split("+")
    for r in rec:
        if r not in SUFFIXES or not SUFFIXES[r].is_file():
            known = ", ".join(s for s, f in SUFFIXES.items() if f.is_file()) or "none in this build"
            raise LeanLMError(f"recipe {name!r}: no recovery step {r!r} (known: {known})")
    return base, rec


def recipe_text(name: str) -> str:
    """The text that defines a recipe: a YAML file's or built-in's content, or a pattern name itself."""
    base, rec = split_recipe(name)
    if base == BASE:
        text = BASE
    else:
        p = Path(base)
        builtin = RECIPE_DIR / f"{base}.yaml"
        if p.suffix in (".yaml", ".yml") or p.is_file():
            if not p.is_file():
                raise LeanLMError(f"{p}: no such recipe file")
            text = p.read_text()
        elif builtin.is_file():
            text = builtin.read_text()
        elif re.match(r"^w(\d)a16-([a-z0-9]+)-g(\d+)(-e8)?(-datafree)?$", base):
            text = base
        else:
            raise LeanLMError(f"unknown recipe {base!r}: not a file, not a built-in ({', '.join(builtin_names())}), "
                              "and not of the form w{bits}a16-{method}-g{size}[-e8]")
    return text + "".join(f"\n+{r}" for r in rec)


def builtin_names() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def expand_recipes(spec: str) -> list[str]:
    """'all' -> every built-in YAML recipe and the ALL_PATTERNS names; 'all,x' adds x; a list as given."""
    out: list[str] = [BASE]
    for part in (s.strip() for s in spec.split(",")):
        names = builtin_names() + ALL_PATTERNS if part == "all" else [part] if part else []
        out += [n for n in names if n not in out]
    for n in out:
        recipe_text(n)  # every name checked before any work
    return out


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", Path(name).stem if name.endswith((".yaml", ".yml")) else name)


def row_keys(cfg: BoardConfig) -> dict[str, str]:
    ident, code = model_identity(cfg.model), code_version()
    return {r: _sha({"model": ident, "recipe": recipe_text(r), "code": code, "settings": cfg.quality_settings()})[:20]
            for r in cfg.recipes}


# ---------------------------------------------------------------- one row
def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PKG.parent)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def compress_row(cfg: BoardConfig, name: str, folder: Path, log: Path) -> dict:
    """Run the recipe in a child process; -> {time_s, wall_s, cpu_s, peak_rss_mb}."""
    split_recipe(name)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "leanlm", "compress"] + ([cfg.model] if cfg.model else []) + [
        "--recipe", name, "-o", str(tmp), "--no-eval", "--json", "--samples", str(cfg.samples),
        "--seq-len", str(cfg.seq_len)] + (["--threads", str(cfg.threads)] if cfg.threads else [])
    steps = [cmd]
    took, wall, rss, cpu = 0.0, 0.0, 0.0, 0.0
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as lf:
        for argv in steps:
            lf.write("$ " + " ".join(argv) + "\n")
            lf.flush()
            t0, r0 = time.perf_counter(), os.times()
            proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=lf, text=True, env=_child_env())
            r1 = os.times()
            lf.write(proc.stdout)
            if proc.returncode != 0:
                raise LeanLMError(f"recipe {name!r} failed (exit {proc.returncode}); see {log}")
            wall += time.perf_counter() - t0
            cpu += (r1.children_user - r0.children_user) + (r1.children_system - r0.children_system)
            last = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}
            rss = max(rss, float(last.get("peak_rss_mb", 0.0)))
            took += float(last.get("time_s", 0.0))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    # time_s: the recipe itself (calibration data + every step), as each command reports it;
    # wall_s and cpu_s: the whole child processes (start-up, loading and saving included)
    return {"time_s": took, "wall_s": wall, "cpu_s": cpu, "peak_rss_mb": rss}


def size_on_disk_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e6


# ---------------------------------------------------------------- the board
def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_board(cfg: BoardConfig, progress: bool = True, on_row=None) -> list[dict]:
    """Measure every recipe (cached), run the speed pass (cached), write the outputs; -> rows.

    on_row(name): called after each freshly measured row (tests use it to simulate a kill)."""
    import torch

    from leanlm.eval.board_report import write_outputs
    from leanlm.report import progress as bar

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    rows_dir, models_dir, logs = out / "cache" / "rows", out / "models", out / "logs"
    keys = row_keys(cfg)
    speed_key = _sha({"rows": [keys[r] for r in cfg.recipes], "settings": cfg.speed_settings()})[:20]
    speed_file = out / "cache" / f"speed-{speed_key}.json"
    speed = _read_json(speed_file)
    speed_was_cached = speed is not None

    def folder(name):
        return models_dir / slug(name)

    def cached(name):
        row = _read_json(rows_dir / f"{slug(name)}-{keys[name]}.json")
        if row is None:
            return None
        if speed is None and name != BASE and _read_json(folder(name) / "board_key.json") != keys[name]:
            return None  # the speed pass needs the model folder this row measured
        return row

    rows: dict[str, dict] = {}
    todo = [r for r in cfg.recipes if cached(r) is None]
    with bar(disable=not progress) as pb:
        task = pb.add_task("board: recipes", total=len(cfg.recipes))
        for name in cfg.recipes:
            row = cached(name)
            if row is not None:
                row["cached"] = True
            else:
                pb.update(task, description=f"board: {name}")
                row = {"recipe": name, "key": keys[name]}
                if name == BASE:
                    row.update({"time_s": 0.0, "wall_s": 0.0, "cpu_s": 0.0, "peak_rss_mb": None})
                    src = cfg.model
                else:
                    f = folder(name)
                    row.update(compress_row(cfg, name, f, logs / f"{slug(name)}.log"))
                    src = str(f)
                t0, c0 = time.perf_counter(), time.process_time()
                row.update(measure_quality(cfg, src))
                row["eval_s"], row["eval_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
                if name == BASE:
                    row["size_mb"] = row["weights_mb"]  # what an uncompressed fp32 save holds
                else:
                    row["size_mb"] = size_on_disk_mb(f)
                    atomic_write_text(f / "board_key.json", json.dumps(keys[name]))
                atomic_write_text(rows_dir / f"{slug(name)}-{keys[name]}.json", json.dumps(row, indent=1))
                row["cached"] = False
                if on_row:
                    on_row(name)
            rows[name] = row
            pb.advance(task)
        if speed is None:
            sources = {n: (cfg.model if n == BASE else str(folder(n))) for n in cfg.recipes}
            t = pb.add_task("board: speed pass", total=cfg.rounds * len(sources))
            t0 = time.perf_counter()
            speed = speed_pass(cfg, sources, progress=lambda: pb.advance(t))
            speed["_pass"] = {"wall_s": time.perf_counter() - t0}
            atomic_write_text(speed_file, json.dumps(speed, indent=1))
    result = []
    for name in cfg.recipes:
        row = {**rows[name], **{k: v for k, v in speed[name].items() if not k.endswith("_runs")}}
        row["decode_runs"], row["prefill_runs"] = speed[name]["decode_runs"], speed[name]["prefill_runs"]
        result.append(row)
    if not cfg.keep_models:
        shutil.rmtree(models_dir, ignore_errors=True)
    meta = {"model": cfg.model or "default (SmolLM2-135M-Instruct, from Q4_1 GGUF)", "code_version": code_version(),
            "settings": asdict(cfg), "measured": todo, "speed_cached": speed_was_cached,
            "speed_pass_s": speed.get("_pass", {}).get("wall_s")}
    write_outputs(out, result, meta)
    if cfg.update_doc:
        splice_doc(Path(cfg.update_doc), out)
    return result


def splice_doc(doc: Path, out: Path) -> None:
    """Put board.md between the `<!-- board:begin -->` and `<!-- board:end -->` lines of a markdown file."""
    text = doc.read_text()
    begin, end = "<!-- board:begin -->", "<!-- board:end -->"
    if begin not in text or end not in text:
        raise LeanLMError(f"{doc}: no '{begin}' ... '{end}' lines to put the board between")
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    atomic_write_text(doc, head + begin + "\n" + (out / "board.md").read_text() + end + tail)


# ---------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="Hugging Face folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--recipes", default="all",
                   help="'all' (every built-in recipe and the main w{bits}a16 patterns), or NAME,NAME,... "
                        "(built-in names, w{bits}a16-{method}-g{size}[-e8], YAML files); 'base' is always first")
    p.add_argument("-o", "--output", required=True, help="output folder (results, cache, models, plots)")
    d = BoardConfig()
    p.add_argument("--samples", type=int, default=d.samples, help="calibration samples per recipe")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per calibration sample")
    p.add_argument("--eval-chars", type=int, default=d.eval_chars,
                   help="characters of each perplexity text (0: the whole text)")
    p.add_argument("--task-records", type=int, default=d.task_records, help="test records per packaged task")
    p.add_argument("--rounds", type=int, default=d.rounds, help="rounds of the interleaved speed pass")
    p.add_argument("--threads", type=int, default=None, help="torch threads (here and in each child)")
    p.add_argument("--no-keep-models", action="store_true",
                   help="delete the compressed folders at the end (a later change then recompresses every row)")
    p.add_argument("--update-doc", default=None, metavar="FILE.md",
                   help="also put the table between the <!-- board:begin/end --> lines of this markdown file")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def run(args) -> int:
    from leanlm.report import emit_json, print_table

    for k in ("samples", "seq_len", "task_records", "rounds"):
        if getattr(args, k) < 1:
            raise LeanLMError(f"--{k.replace('_', '-')} must be at least 1")
    if args.eval_chars < 0:
        raise LeanLMError("--eval-chars must be >= 0")
    cfg = BoardConfig(model=args.model, recipes=expand_recipes(args.recipes), out=args.output,
                      samples=args.samples, seq_len=args.seq_len, eval_chars=args.eval_chars,
                      task_records=args.task_records, threads=args.threads, rounds=args.rounds,
                      keep_models=not args.no_keep_models, update_doc=args.update_doc)
    import signal

    # a TERM (like Ctrl-C) ends the compression child too; finished rows stay cached
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t0 = time.perf_counter()
    rows = run_board(cfg, progress=sys.stderr.isatty() and not args.json)
    from leanlm.eval.board_report import COLUMNS, table_rows

    print_table(f"board -> {args.output}", table_rows(rows), [h for _, h in COLUMNS])
    fresh = sum(not r["cached"] for r in rows)
    print(f"{len(rows)} rows ({fresh} measured, {len(rows) - fresh} from cache) in {time.perf_counter() - t0:.0f} s; "
          f"{Path(args.output) / 'board.html'}", file=sys.stderr)
    if args.json:
        emit_json({"output": args.output, "rows": rows})
    return 0
