"""Evaluation: sliding-window perplexity and bits per byte (speed benchmarks live in leanlm.eval.bench)."""
from leanlm.eval.perplexity import perplexity, sliding_windows

__all__ = ["perplexity", "sliding_windows"]
