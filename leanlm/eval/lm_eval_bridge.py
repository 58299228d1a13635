"""A leanlm model for lm-evaluation-harness 0.4 (`--model leanlm`), and `leanlm eval --tasks` on top of it.

lm-eval is an optional dependency (`pip install "leanlm[lmeval]"`, pinned to the version the parity
test ran against); this module imports it at the top, so import the module only when it is needed.

    lm_eval --model leanlm --model_args pretrained=out/w4-gptq,batch_size=16 --tasks leanlm_mc \
        --include_path $(python -c "import leanlm.eval.lm_eval_bridge as b; print(b.task_dir())")

`pretrained` is anything `leanlm.load` takes (a folder, a .gguf, nothing for the default model), so
compressed and adapter models (`adapter=DIR`) run as they are. Requests are scored exactly as
lm-eval's own `hf` model scores them (tokens without special tokens, lm-eval's context/continuation
split, its rolling windows, greedy generation cut at the stop strings): the same task on the same
weights gives the same numbers (tests/test_lm_eval_bridge.py checks this against `hf`).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import yaml
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from leanlm.eval.tasks import TASKS_DIR, loglikelihood_tokens, prefix_token_id

ACC = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
YAMLS = {  # the packaged tasks as lm-eval task configs; data_files is made absolute by task_dir()
    "leanlm_mc": {"output_type": "multiple_choice", "doc_to_text": "context", "doc_to_choice": "choices",
                  "doc_to_target": "gold", "target_delimiter": "", "metric_list": [ACC]},
    "leanlm_cloze": {"output_type": "multiple_choice", "doc_to_text": "context", "doc_to_choice": "choices",
                     "doc_to_target": "gold", "target_delimiter": "", "metric_list": [ACC]},
    "leanlm_capitals": {"output_type": "generate_until", "doc_to_text": "prompt", "doc_to_target": "answer",
                        "target_delimiter": " ",
                        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 16, "do_sample": False},
                        "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"},
                                                                    {"function": "take_first"}]}],
                        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]},
}


def task_yaml(name: str) -> dict:
    return {"task": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(TASKS_DIR / f"{name}.jsonl")}},
            "test_split": "test", **YAMLS[name], "metadata": {"version": 1.0}}


_TASK_DIR: Path | None = None


def task_dir() -> Path:
    """A folder of lm-eval YAML configs for the packaged tasks (local JSONL: no hub access)."""
    global _TASK_DIR
    if _TASK_DIR is None:
        _TASK_DIR = Path(tempfile.mkdtemp(prefix="leanlm-lmeval-"))
        for name in YAMLS:
            (_TASK_DIR / f"{name}.yaml").write_text(yaml.safe_dump(task_yaml(name), sort_keys=False))
    return _TASK_DIR


@register_model("leanlm")
class LeanLMEval(TemplateLM):
    def __init__(self, pretrained=None, dtype: str = "float32", adapter=None, batch_size=16, max_length=None,
                 max_gen_toks: int = 256, model=None, tokenizer=None, **_ignored):
        super().__init__()
        import leanlm

        if model is None:
            model, tokenizer = leanlm.load(pretrained or None, dtype=dtype, adapter=adapter)
        self.model, self.tok = model.eval(), tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16  # "auto" -> 16
        cfg = getattr(model, "config", None)
        self._max_length = int(max_length) if max_length else getattr(cfg, "max_position_embeddings", 2048) or 2048
        self.max_gen_toks = int(max_gen_toks)

    # ---- tokens
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_ids[0]

    @property
    def prefix_token_id(self) -> int:
        return prefix_token_id(self.tok)

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens=None, **kw) -> list[int]:
        return self.tok.encode(string, add_special=bool(add_special_tokens))

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(tokens, skip_special=skip_special_tokens)

    # ---- requests
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None, **kw):
        pairs = [(list(ctx), list(cont)) for _, ctx, cont in requests]
        res = loglikelihood_tokens(self.model, pairs, self.max_length, override_bs or self.batch_size)
        for (key, _, _), r in zip(requests, res):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, r)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum of every token's log-probability of each string, in lm-eval's disjoint rolling windows."""
        out = []
        for (string,) in [r.args for r in requests]:
            windows = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            lls = loglikelihood_tokens(self.model, windows, self.max_length, self.batch_size)
            total = float(sum(ll for ll, _ in lls))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation, batched per set of generation arguments, cut at the first stop string."""
        from leanlm.infer.generate import generate_tokens
        from leanlm.infer.sampling import GenerationConfig

        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
        for idx in groups.values():
            kw = dict(requests[idx[0]].args[1])
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            if eos not in until:
                until.append(eos)
            max_gen = int(kw.pop("max_gen_toks", self.max_gen_toks))
            if kw.get("do_sample") or kw.get("temperature", 0.0):
                raise ValueError("the leanlm lm-eval model generates greedily only (do_sample=False, temperature=0)")
            stops = [u for u in until if u]

            def stop(_row, toks, stops=stops):  # as lm-eval's hf model: stop strings in the text with special tokens
                text = self.tok_decode(toks[-16:], skip_special_tokens=False)
                return any(s in text for s in stops)
            cfg = GenerationConfig(max_new_tokens=max_gen, stop_token_ids=list(self.tok.eos_ids))
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s:s + self.batch_size]
                ids = [self.tok_encode(requests[i].args[0])[-(self.max_length - max_gen):] for i in chunk]
                toks = [[] for _ in chunk]
                for step in generate_tokens(self.model, ids, cfg, stop):
                    for k, t in enumerate(step):
                        if t is not None:
                            toks[k].append(t)
                for k, i in enumerate(chunk):
                    text = self.tok_decode([t for t in toks[k] if t not in self.tok.eos_ids])
                    for term in until:
                        if term:
                            text = text.split(term)[0]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out  # type: ignore[return-value]


def evaluate(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 16) -> dict:
    """Run lm-eval tasks (the packaged ones, or any task lm-eval finds locally) on a loaded leanlm model."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm = LeanLMEval(model=model, tokenizer=tokenizer, batch_size=batch_size)
    tm = TaskManager(include_path=str(task_dir()))
    return simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=tm, log_samples=False,
                           bootstrap_iters=0)
