"""What a model holds: weight bytes in memory and a summary of its config (`leanlm info`)."""
from __future__ import annotations

import json


def model_bytes(model) -> int:
    """Bytes of weights (parameters and buffers, tied tensors once) as the model holds them in memory."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen or t.is_meta:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def describe(model) -> dict:
    cfg = model.config
    return {"source": getattr(model, "source", None), "model_type": cfg.model_type,
            "parameters": model.num_parameters(), "model_bytes": model_bytes(model), "dtype": str(model.dtype),
            "layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "heads": cfg.num_heads,
            "kv_heads": cfg.num_kv_heads, "vocab_size": cfg.vocab_size, "context": cfg.max_position_embeddings,
            "rope": cfg.rope_type, "tied_embeddings": cfg.tie_word_embeddings,
            "config": json.loads(json.dumps(cfg.to_dict()))}
