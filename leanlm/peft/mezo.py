"""MeZO (Malladi et al., 2023): fine-tune every weight with forward passes only (zeroth-order SGD).

The optimizer is leanlm/train/optim.py's MeZO; as a method this makes every parameter trainable and
tells the trainer to use that optimizer. The result is a full model, not an adapter.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn as nn


@dataclass
class MeZOConfig:
    optimizer: ClassVar[str] = "mezo"  # the trainer's optimizer for this method
    full_model: ClassVar[bool] = True  # saved as a model folder (every weight changed), not an adapter


def apply_mezo(model: nn.Module, cfg: MeZOConfig) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model
