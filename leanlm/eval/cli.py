"""`leanlm eval [MODEL]`: perplexity over a text, or lm-evaluation-harness tasks with --tasks."""
from __future__ import annotations

import argparse

from leanlm.errors import LeanLMError


def add_arguments(p: argparse.ArgumentParser) -> None:
    from leanlm.cli import add_model_args

    add_model_args(p)
    p.add_argument("--text", default=None, help=".txt or .jsonl file, or packaged:eval (default), "
                   "packaged:tech (held-out technical text)")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--max-chars", type=int, default=None, help="evaluate only the first N characters")
    p.add_argument("--tasks", default=None,
                   help="lm-evaluation-harness tasks instead of perplexity, e.g. leanlm_mc,leanlm_cloze,"
                        "leanlm_capitals (packaged, offline) or any task lm-eval has locally; needs leanlm[lmeval]")
    p.add_argument("--limit", type=int, default=None, help="with --tasks: first N documents per task")
    p.add_argument("--batch-size", type=int, default=16, help="with --tasks: requests per forward")
    p.add_argument("--json", action="store_true")


def run(args) -> int:
    from leanlm.cli import load_model
    from leanlm.data import packaged_text, read_text
    from leanlm.eval.perplexity import perplexity
    from leanlm.report import show

    if args.tasks:
        return _tasks(args)
    if args.ctx < 2 or args.stride < 1 or args.stride > args.ctx:
        raise LeanLMError("need --ctx >= 2 and 1 <= --stride <= --ctx")
    if args.text and args.text.startswith("packaged:"):
        text = packaged_text(args.text.split(":", 1)[1])
    else:
        text = read_text(args.text) if args.text else packaged_text("eval")
    if args.max_chars:
        text = text[: args.max_chars]
    model, tok = load_model(args)
    res = perplexity(model, tok, text, ctx=args.ctx, stride=args.stride, progress=not args.json)
    res = {"perplexity": res["perplexity"], "bits_per_byte": res["bits_per_byte"], "tokens": res["tokens"],
           **{k: v for k, v in res.items() if k not in ("perplexity", "bits_per_byte", "tokens")},
           "text": args.text or "packaged:eval", "ctx": args.ctx, "stride": args.stride}
    show("perplexity", res, args.json)
    return 0


def _tasks(args) -> int:
    """lm-evaluation-harness tasks (the packaged leanlm_* ones run offline) on any leanlm model."""
    import importlib.util

    from leanlm.cli import load_model
    from leanlm.report import emit_json

    if importlib.util.find_spec("lm_eval") is None:
        raise LeanLMError("`leanlm eval --tasks` needs lm-evaluation-harness: pip install \"leanlm[lmeval]\" "
                          "(lm_eval==0.4.13)")
    from leanlm.eval import lm_eval_bridge

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    model, tok = load_model(args)
    res = lm_eval_bridge.evaluate(model, tok, tasks, limit=args.limit, batch_size=args.batch_size)
    from lm_eval.utils import make_table

    print(make_table(res))
    if args.json:
        emit_json({"results": res["results"], "n-samples": res.get("n-samples"), "model": args.model,
                   "adapter": args.adapter})
    return 0
