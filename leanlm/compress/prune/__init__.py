"""Pruning: unstructured and N:M sparsity (magnitude, Wanda, SparseGPT, OWL), structured pruning that
shrinks shapes, block dropping, and sparse storage. Recipe methods: name -> (config dataclass, how)."""
from __future__ import annotations

from leanlm.compress.prune.apply import (layer_drop, magnitude_prune, sparsegpt_prune, structured_prune,
                                         wanda_prune)
from leanlm.compress.prune.methods import PruneConfig
from leanlm.compress.prune.structured import LayerDropConfig, StructuredConfig

METHODS: dict[str, tuple[type, object]] = {
    "magnitude": (PruneConfig, magnitude_prune),
    "wanda": (PruneConfig, wanda_prune),
    "sparsegpt": (PruneConfig, sparsegpt_prune),
    "structured": (StructuredConfig, structured_prune),
    "layerdrop": (LayerDropConfig, layer_drop),
}

__all__ = ["METHODS", "PruneConfig", "StructuredConfig", "LayerDropConfig"]
