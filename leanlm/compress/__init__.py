"""Compression: quantization (quant/), pruning (prune/), low-rank; one calibration runner, YAML recipes."""
