"""The same filters as `leanlm data filter`, as a datatrove pipeline step, for corpora past one machine.

datatrove (pip install 'leanlm[scale]') runs a pipeline of steps over shards of the input with a local
executor (processes on one machine) or a Slurm executor (one array job, `tasks` shards); each worker
loads the reference model once, on its first batch. Only value bounds work here: a percentile needs
the whole corpus's scores first (run `leanlm data filter` on a sample to find the value, then use it).

    from datatrove.executor import LocalPipelineExecutor   # or SlurmPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from leanlm.data.pipeline import leanlm_filter
    from leanlm.data.quality import FilterConfig

    steps = [JsonlReader("in/"), leanlm_filter(FilterConfig(min_words=50, max_perplexity=80)),
             JsonlWriter("out/")]
    LocalPipelineExecutor(steps, tasks=8, workers=2, logging_dir="logs/").run()
    # SlurmPipelineExecutor(steps, tasks=64, time="4:00:00", partition="cpu", cpus_per_task=4,
    #                       logging_dir="logs/", venv_path="venv/bin/activate").run()

Near-duplicate removal at that scale is datatrove's own MinHash stages (MinhashDedupSignature,
MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter), the same MinHash + LSH method as
`leanlm data dedup` in four passes over shards.
"""
from __future__ import annotations

from leanlm.errors import LeanLMError


def leanlm_filter(cfg, model: str | None = None, dtype: str = "float32", exclusion_writer=None):
    """A datatrove filter step that keeps a document when it passes every bound of `cfg` (a
    leanlm.data.quality.FilterConfig of value bounds); dropped documents get the same reason as the
    CLI's sidecar in datatrove's stats (and in metadata["filter_reason"] with an exclusion_writer).
    model: the reference model for perplexity bounds (None: the default model)."""
    from datatrove.pipeline.filters.base_filter import BaseFilter

    from leanlm.data.quality import PerplexityScorer, _scores_of_batch, _verdict

    bounds = cfg.bounds()
    if any(kind == "percentile" for kind, _ in bounds.values()):
        raise LeanLMError("percentile bounds need the whole corpus's scores; in a datatrove pipeline give "
                          "values (find them with `leanlm data filter` on a sample)")
    limits = {k: v for k, (_, v) in bounds.items()}
    needed = {s for s, _ in bounds}

    class LeanLMFilter(BaseFilter):
        name = "leanlm filter"

        def __init__(self):
            super().__init__(exclusion_writer=exclusion_writer, batch_size=cfg.batch_size)
            self._scorer = None

        def scorer(self):
            if self._scorer is None and "perplexity" in needed:
                import leanlm

                m, tok = leanlm.load(model, dtype=dtype)
                self._scorer = PerplexityScorer(m, tok, cfg.max_tokens, cfg.batch_size)
            return self._scorer

        def filter(self, doc):
            return self.filter_batch([doc])[0]

        def filter_batch(self, batch):
            out = []
            rows = _scores_of_batch([d.text for d in batch], needed, self.scorer())
            for d, sc in zip(batch, rows):
                d.metadata.update({f"leanlm_{k}": v for k, v in sc.items()})
                v = _verdict(sc, limits) if d.text.strip() else ("empty", None)
                out.append(True if v is None else (False, v[0]))
            return out

    return LeanLMFilter()
