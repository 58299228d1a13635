"""Pruning: unstructured and N:M sparsity (magnitude, Wanda, SparseGPT, OWL), structured pruning that
shrinks shapes, block dropping, and sparse storage. Recipe methods: name -> (config dataclass, apply);
a method that needs no calibration data says so on its config class (`needs_data = False`)."""
from __future__ import annotations

from leanlm.compress.prune.apply import prune, structured_prune
from leanlm.compress.prune.layerdrop import LayerDropConfig, layer_drop
from leanlm.compress.prune.methods import MagnitudeConfig, PruneConfig, SparseGPTConfig, WandaConfig
from leanlm.compress.prune.structured import StructuredConfig

METHODS: dict[str, tuple[type, object]] = {
    "magnitude": (MagnitudeConfig, prune),
    "wanda": (WandaConfig, prune),
    "sparsegpt": (SparseGPTConfig, prune),
    "structured": (StructuredConfig, structured_prune),
    "layerdrop": (LayerDropConfig, layer_drop),
}

__all__ = ["METHODS", "PruneConfig", "MagnitudeConfig", "WandaConfig", "SparseGPTConfig", "StructuredConfig",
           "LayerDropConfig"]
