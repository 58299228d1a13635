from leanlm.model.config import ModelConfig
from leanlm.model.transformer import Transformer, KVCache

__all__ = ["ModelConfig", "Transformer", "KVCache"]
