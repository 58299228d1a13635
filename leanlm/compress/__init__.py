"""Compression: quantization (quant/), pruning (prune/), low-rank; one calibration runner, YAML recipes.

Importing the package registers every compressed module type and the sparse storage codec with the
loader (leanlm/io/modules.py), so a compressed checkpoint loads once `leanlm.compress` is imported."""
from leanlm.compress import lowrank, quant  # noqa: F401  (QuantLinear, NF4Linear, W8A8Linear, ..., LowRankLinear)
from leanlm.compress.prune import storage  # noqa: F401  (the sparse codec)
