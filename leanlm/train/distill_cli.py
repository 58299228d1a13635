"""`leanlm distill --teacher T [--student S] --loss fkl|rkl|skl|srkl|jsd|ce --data FILE|packaged|generated -o OUT`.

The teacher is frozen (optionally held as 8-bit weights to save memory); the student trains all its
float weights (and, for a quantized student, its quantization scales; pruned zeros stay zero).
The student is a folder/.gguf (e.g. a model pruned by `leanlm compress --recipe minitron-depth-50`:
Minitron's prune-then-distil), a copy of the teacher, or `scratch:num_layers=12[,hidden_size=...]`: the
teacher's config with those fields changed, randomly initialised, with the teacher's tokenizer.
`--data generated` trains on text the teacher writes itself (LLM-QAT's data-free recipe,
leanlm/train/datafree.py; cached under the leanlm cache, so a rerun does not generate again).
Checks before any work: the data file exists, teacher and student share vocabulary and tokenizer.
Writes OUT/model (the student), checkpoints OUT/step-N (resume with --resume) and OUT/log.jsonl;
prints a before/after table (perplexity on a held-out text), `--json` one JSON object last.
"""
from __future__ import annotations

import argparse
import copy
import sys

import torch
import time
from pathlib import Path

from leanlm.errors import LeanLMError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", default=None, help="teacher: Hugging Face folder or .gguf (default: the default model)")
    p.add_argument("--student", default=None,
                   help="student folder/.gguf (default: a copy of the teacher), or scratch:FIELD=N,... for a "
                        f"randomly initialised student of the teacher's config with {', '.join(SCRATCH_FIELDS)} "
                        "changed (e.g. scratch:num_layers=12)")
    p.add_argument("--loss", default="fkl", choices=["fkl", "rkl", "skl", "srkl", "jsd", "ce"])
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=0.5, help="jsd: 0 = forward KL ... 1 = reverse KL")
    p.add_argument("--skew", type=float, default=0.1, help="skl/srkl: weight of the first distribution")
    p.add_argument("--data", default="packaged:calib",
                   help="training text: a .txt/.jsonl file, packaged:calib (default), or generated (the teacher "
                        "writes it: a random first token, --gen-greedy greedy tokens, then sampling; LLM-QAT)")
    p.add_argument("--gen-count", type=int, default=64, help="--data generated: sequences the teacher writes")
    p.add_argument("--gen-len", type=int, default=0, help="--data generated: tokens per sequence (0: --seq-len)")
    p.add_argument("--gen-greedy", type=int, default=4,
                   help="--data generated: greedy tokens after the random first one, then sampling")
    p.add_argument("-o", "--output", required=True, help="output folder (model/, checkpoints, log.jsonl)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--scales-lr", type=float, default=1e-5, help="learning rate of a quantized student's scales")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--chunk", type=int, default=1024, help="labelled positions per head projection")
    p.add_argument("--topk", type=int, default=0,
                   help="offline teacher: cache its top-k log-probs once in OUT/teacher-topk.safetensors")
    p.add_argument("--lmbda", type=float, default=0.0,
                   help="on-policy GKD: share of batches the student samples itself (teacher scores them)")
    p.add_argument("--lmbda-prompt", type=int, default=16, help="on-policy: prompt tokens kept from each row")
    p.add_argument("--lmbda-tokens", type=int, default=64,
                   help="on-policy: tokens the student samples after them (fewer where it ends the sequence)")
    p.add_argument("--seqkd", type=int, default=0, metavar="N",
                   help="sequence-level KD: add N teacher generations (sampled, prompts cut from the data) to the data")
    p.add_argument("--seqkd-prompt", type=int, default=16, help="prompt tokens per generation")
    p.add_argument("--seqkd-tokens", type=int, default=96, help="new tokens per generation")
    p.add_argument("--teacher-int8", action="store_true", help="hold the teacher's linears as int8 (less memory)")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT")
    p.add_argument("--eval-text", default="packaged:tech", help="held-out text for the perplexity columns")
    p.add_argument("--eval-chars", type=int, default=20000)
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    from leanlm.train.distributed import add_device_argument

    add_device_argument(p)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def read_source(spec: str, what: str) -> str:
    from leanlm.data import packaged_text
    from leanlm.data.text import read_text

    if spec.startswith("packaged:"):
        return packaged_text(spec.split(":", 1)[1])
    if not Path(spec).is_file():
        raise LeanLMError(f"{spec}: no such {what} file; give a .txt/.jsonl file or packaged:NAME")
    return read_text(spec)


SCRATCH_FIELDS = ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim")


def parse_scratch(spec: str | None) -> dict | None:
    """`scratch:num_layers=12,hidden_size=384` -> {"num_layers": 12, "hidden_size": 384}; None for a path."""
    if not spec or not spec.startswith("scratch:"):
        return None
    out = {}
    for part in filter(None, spec[len("scratch:"):].split(",")):
        k, eq, v = part.partition("=")
        if not eq or k not in SCRATCH_FIELDS or not v.isdigit() or int(v) < 1:
            raise LeanLMError(f"--student {spec}: expected scratch:FIELD=N[,FIELD=N...] with FIELD one of "
                              f"{', '.join(SCRATCH_FIELDS)} and N >= 1 (got {part!r})")
        out[k] = int(v)
    if not out:
        raise LeanLMError(f"--student {spec}: name at least one field, e.g. scratch:num_layers=12")
    return out


def scratch_student(teacher, shape: dict, seed: int):
    """A randomly initialised (N(0, 0.02), leanlm.train.pretrain) model of the teacher's family and vocabulary,
    the teacher's config with the fields in `shape` changed and uniform layers."""
    import dataclasses

    from leanlm.train.pretrain import new_model

    cfg = teacher.config
    shape = dict(shape)
    if ("hidden_size" in shape or "num_heads" in shape) and "head_dim" not in shape:
        shape["head_dim"] = None  # recomputed as hidden_size // num_heads
    if "num_layers" in shape and shape["num_layers"] != cfg.num_layers and (cfg.layer_types or cfg.moe_layers):
        raise LeanLMError("--student scratch: this teacher lists per-layer types; a student of another depth "
                          "needs a config.json of its own (--student FOLDER)")
    per_layer = {f.name: None for f in dataclasses.fields(cfg)
                 if f.name.startswith("layer_") and f.name != "layer_types"}
    new = dataclasses.replace(cfg, **per_layer, **shape)
    if new.head_dim * new.num_heads == 0 or (shape.get("head_dim") is None and new.hidden_size % new.num_heads):
        raise LeanLMError(f"--student scratch: hidden_size {new.hidden_size} is not a multiple of num_heads "
                          f"{new.num_heads}; give head_dim too")
    return new_model(new, "normal", seed=seed)


def check_data(spec: str) -> None:
    """Bad --data stops here, before any model is loaded."""
    if spec == "generated":
        return
    if spec.startswith("packaged:"):
        from leanlm.data.text import packaged_path

        name = spec.split(":", 1)[1]
        if name in ("eval", "tech"):
            raise LeanLMError(f"{spec} is a held-out evaluation text; train on packaged:calib or your own file")
        packaged_path(name)
    elif not Path(spec).is_file():
        raise LeanLMError(f"{spec}: no such data file; give a .txt/.jsonl file or packaged:calib")


def training_examples(spec: str, tok, seq_len: int) -> list[dict]:
    from leanlm.data.instruct import load_examples, text_examples

    if spec.startswith("packaged:"):
        return text_examples(read_source(spec, "data"), tok, seq_len)
    return load_examples(spec, tok, max_len=seq_len, seq_len=seq_len)


def teacher_generations(teacher, data: list[dict], n: int, prompt_len: int, new_tokens: int, seed: int,
                        eos: list[int] | None, batch: int = 8) -> list[dict]:
    """Sequence-level KD data: the teacher continues n prompts cut from the training examples (sampled at
    temperature 1 with a seed); the prompt is not trained on, the continuation is."""
    from leanlm.infer.generate import generate_tokens
    from leanlm.infer.sampling import GenerationConfig

    prompts = [ex["input_ids"][:prompt_len] for ex in data if len(ex["input_ids"]) > prompt_len]
    if not prompts:
        raise LeanLMError(f"--seqkd: no training example is longer than --seqkd-prompt={prompt_len} tokens")
    g = torch.Generator().manual_seed(seed)
    prompts = [prompts[int(i)] for i in torch.randint(0, len(prompts), (n,), generator=g)]
    out = []
    for i in range(0, n, batch):
        chunk = prompts[i:i + batch]
        cfg = GenerationConfig(max_new_tokens=new_tokens, temperature=1.0, seed=seed + i, stop_token_ids=eos)
        gens: list[list[int]] = [[] for _ in chunk]
        for step in generate_tokens(teacher, chunk, cfg):
            for j, t in enumerate(step):
                if t is not None:
                    gens[j].append(t)
        out += [{"input_ids": p + g_, "labels": [-100] * len(p) + g_} for p, g_ in zip(chunk, gens) if g_]
    return out


def int8_teacher_hook(name: str, weight, bias):
    """leanlm.load's quantize hook: the teacher's block linears as int8 rows (per-channel symmetric)."""
    from leanlm.compress.quant.grid import rtn_quantize
    from leanlm.compress.quant.qlinear import QuantLinear
    from leanlm.model.layout import block_index

    if block_index(name) is None:
        return None
    codes, scales, offsets = rtn_quantize(weight.float(), 8, 0, True)
    return QuantLinear.from_codes(codes, scales, offsets, 8, 0, True, bias)


def run(args) -> int:
    import leanlm
    from leanlm.compress.recover import DistillStepConfig, make_trainable
    from leanlm.report import emit_json, print_table
    from leanlm.train.distill import distill
    from leanlm.train.loop import peak_rss_mb
    from leanlm.train.teacher import check_pair

    from leanlm.train import distributed

    device = distributed.device_for(args.device)
    rank, world = distributed.init(device)
    if world > 1 and (args.topk or args.lmbda or args.seqkd):
        raise LeanLMError("--topk, --lmbda and --seqkd run on one process (not under torchrun)")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = DistillStepConfig(loss=args.loss, temperature=args.temperature, beta=args.beta, skew=args.skew,
                            steps=args.steps, lr=args.lr, scales_lr=args.scales_lr, batch_size=args.batch_size,
                            grad_accum=args.grad_accum, seq_len=args.seq_len, warmup=args.warmup, bf16=args.bf16,
                            grad_checkpointing=args.grad_checkpointing, chunk=args.chunk, topk=args.topk,
                            on_policy=args.lmbda, on_policy_prompt=args.lmbda_prompt,
                            on_policy_tokens=args.lmbda_tokens, seed=args.seed)
    cfg.validate()
    shape = parse_scratch(args.student)
    gen = None
    if args.data == "generated":
        from leanlm.train.datafree import GenerationSpec

        gen = GenerationSpec(count=args.gen_count, length=args.gen_len or args.seq_len, greedy=args.gen_greedy,
                             seed=args.seed)
        gen.validate()
    if args.loss == "ce" and args.student and (gen is not None or shape is not None):
        raise LeanLMError("--data generated and --student scratch:... need the teacher (its text, its config); "
                          "use a divergence loss, not ce")
    eval_text = None if args.no_eval else read_source(args.eval_text, "evaluation text")
    if eval_text is not None and args.eval_chars:
        eval_text = eval_text[: args.eval_chars]
    check_data(args.data)
    quant = int8_teacher_hook if args.teacher_int8 else None
    teacher, t_tok = (None, None) if args.loss == "ce" and args.student else leanlm.load(
        args.teacher, dtype=torch.float32, quantize=quant, progress=sys.stderr.isatty())
    if shape is not None:
        student, s_tok = scratch_student(teacher, shape, args.seed), t_tok
    else:
        student, s_tok = leanlm.load(args.student if args.student else args.teacher, dtype=torch.float32)
    student.to(device)
    if teacher is not None:
        teacher.to(device)
    if teacher is not None:
        check_pair(student, s_tok, teacher, t_tok, f"student {args.student or '(copy)'}",
                   f"teacher {args.teacher or '(default model)'}")
    generated_from_cache = None
    if gen is not None:
        from leanlm.train.datafree import self_generated

        eos = getattr(t_tok, "eos_ids", None) or teacher.config.eos_token_id
        data, generated_from_cache = self_generated(teacher, gen, eos, progress=not (args.no_progress or args.json))
    else:
        data = training_examples(args.data, s_tok, args.seq_len)
    if args.seqkd:
        if teacher is None:
            raise LeanLMError("--seqkd needs a teacher")
        data = data + teacher_generations(teacher, data, args.seqkd, args.seqkd_prompt, args.seqkd_tokens,
                                          args.seed, getattr(t_tok, "eos_ids", None))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)

    def ppl(m):
        from leanlm.eval.perplexity import perplexity

        return perplexity(m, s_tok, eval_text, ctx=512, stride=512, progress=False)["perplexity"]

    before = {} if eval_text is None else {"student_ppl": ppl(student)}
    if eval_text is not None and teacher is not None:
        before["teacher_ppl"] = ppl(teacher)
    plain = copy.deepcopy(student) if world > 1 and rank == 0 else None  # rank 0 saves from an unsharded copy
    undo = make_trainable(student, cfg)
    if world > 1 and not undo.plain_float:
        undo()
        raise LeanLMError("under torchrun, distill trains float students without pruning masks; pruned, "
                          "quantized or ternary students train on one process")
    distributed.shard(student, bf16=args.bf16 and world > 1)
    topk_file = out / "teacher-topk.safetensors"
    topk_before = topk_file.stat().st_mtime_ns if args.topk and topk_file.is_file() else None
    t0 = time.perf_counter()
    try:
        res = distill(student, teacher, data, cfg, out_dir=str(out), resume=args.resume, save_every=args.save_every,
                      progress=not (args.no_progress or args.json), pad_id=s_tok.pad_id or 0,
                      cache=str(topk_file) if args.topk else None,
                      teacher_name=str(args.teacher),
                      eos_ids=getattr(s_tok, "eos_ids", None) or student.config.eos_token_id or ())
    finally:
        undo()
    took = time.perf_counter() - t0
    after = ppl(student) if eval_text is not None else None  # every rank: a collective under FSDP2
    student = distributed.unsharded(student, plain)
    if rank != 0:
        distributed.finish()
        return 0
    leanlm.save(student.cpu(), s_tok, out / "model")
    result = {"loss": args.loss, "processes": world, "steps": res.steps, "examples": len(data),
              "train_seconds": round(took, 1), "student_params": student.num_parameters(),
              "tokens_per_s": round(res.tokens_per_s * world, 1),
              "peak_rss_mb": round(peak_rss_mb(), 1), "first_loss": res.losses[0] if res.losses else None,
              "last_loss": res.losses[-1] if res.losses else None, **before}
    if generated_from_cache is not None:
        result["generated_from_cache"] = generated_from_cache
    if args.topk:  # the cache file was there and left as it was: this run read it instead of running the teacher
        read = topk_before is not None and topk_file.stat().st_mtime_ns == topk_before
        result["topk_cache"] = "read" if read else "built"
        result["topk_cache_mb"] = round(topk_file.stat().st_size / 2**20, 2)
    if after is not None:
        result["student_ppl_after"] = after
    result["output"] = str(out / "model")
    print_table(f"distill ({args.loss})", result)
    if args.json:
        emit_json(result)
    distributed.finish()
    return 0
