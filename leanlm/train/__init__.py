"""The shared training loop (fine-tuning, distillation, pre-training): see leanlm/train/loop.py."""
from leanlm.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from leanlm.train.loop import (TrainConfig, TrainResult, causal_lm_loss, collate, enable_grad_checkpointing,
                               evaluate_loss, train)
from leanlm.train.optim import MeZO, Lion, lr_at

__all__ = ["TrainConfig", "TrainResult", "train", "causal_lm_loss", "collate", "evaluate_loss",
           "enable_grad_checkpointing", "save_checkpoint", "load_checkpoint", "latest_checkpoint",
           "Lion", "MeZO", "lr_at"]
