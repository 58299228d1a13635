"""Quantization methods: name -> (config dataclass, Method of pure functions). See calibrate.py for the runner."""
from __future__ import annotations

import torch.nn as nn

from leanlm.compress.calibrate import Method
from leanlm.compress.quant.embedding import QuantEmbedding
from leanlm.compress.quant.awq import AWQConfig, awq_block
from leanlm.compress.quant.bitnet import BitLinear, BitNetConfig, bitnet_solve
from leanlm.compress.quant.gptq import GPTQConfig, gptq_accumulate, gptq_init, gptq_solve
from leanlm.compress.quant.int8 import W8A8Linear
from leanlm.compress.quant.llmint8 import LLMInt8Config, llmint8_accumulate, llmint8_init, llmint8_solve
from leanlm.compress.quant.rtn import RTNConfig, rtn_solve
from leanlm.compress.quant.smoothquant import SmoothQuantConfig, smoothquant_block
from leanlm.compress.quant.nf4 import NF4Config, NF4Linear, nf4_solve
from leanlm.compress.quant.qlinear import QuantLinear

METHODS: dict[str, tuple[type, Method]] = {
    "rtn": (RTNConfig, Method(solve=rtn_solve, needs_data=False, replaces=True, layer_types=(nn.Linear, nn.Embedding))),
    "gptq": (GPTQConfig, Method(init=gptq_init, accumulate=gptq_accumulate, solve=gptq_solve, replaces=True)),
    "awq": (AWQConfig, Method(block=awq_block, replaces=True)),
    "nf4": (NF4Config, Method(solve=nf4_solve, needs_data=False, replaces=True)),
    "smoothquant": (SmoothQuantConfig, Method(block=smoothquant_block, replaces=True)),
    "llmint8": (LLMInt8Config, Method(init=llmint8_init, accumulate=llmint8_accumulate, solve=llmint8_solve,
                                      replaces=True)),
    "bitnet158": (BitNetConfig, Method(solve=bitnet_solve, needs_data=False, replaces=True)),
}

__all__ = ["QuantEmbedding", "METHODS", "QuantLinear", "NF4Linear", "W8A8Linear", "BitLinear", "RTNConfig",
           "GPTQConfig", "AWQConfig", "NF4Config", "SmoothQuantConfig", "LLMInt8Config", "BitNetConfig"]
