"""Inference: KV caches (static, paged, evicting), sampling, generation, engine, speculative decoding."""
