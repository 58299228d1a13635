"""Quantization methods: name -> (config dataclass, Method of pure functions). See calibrate.py for the runner."""
from __future__ import annotations

from leanlm.compress.calibrate import Method
from leanlm.compress.quant.gptq import (GPTQConfig, RTNConfig, gptq_accumulate, gptq_init, gptq_solve,
                                        rtn_solve)
from leanlm.compress.quant.qlinear import QuantLinear

METHODS: dict[str, tuple[type, Method]] = {
    "rtn": (RTNConfig, Method(solve=rtn_solve, needs_data=False, replaces=True)),
    "gptq": (GPTQConfig, Method(init=gptq_init, accumulate=gptq_accumulate, solve=gptq_solve, replaces=True)),
}

# class name -> class, for checkpoints (leanlm.compress.serialize)
MODULE_TYPES: dict[str, type] = {"QuantLinear": QuantLinear}

__all__ = ["METHODS", "MODULE_TYPES", "QuantLinear", "RTNConfig", "GPTQConfig"]
