"""Checkpoints in and out: Hugging Face folders (safetensors), GGUF files, tokenizers, the default model."""
