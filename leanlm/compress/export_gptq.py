"""Export 4-bit QuantLinear models in the GPTQ checkpoint layout (AutoGPTQ/GPTQModel "gptq" format, v1).

Per quantized linear with K inputs, N outputs, G = ceil(K / group_size) groups:
    qweight int32 [K*bits/32, N]   codes packed along the input dim: qweight[i, n] = sum_j q[8i+j, n] << 4j
    qzeros  int32 [G, N*bits/32]   zero points minus one (the v1 convention) packed along the output dim
    scales  fp16  [G, N]
    g_idx   int32 [K]              group of each input column (k // group_size: our groups are static)
and config.json gets `quantization_config` {"quant_method": "gptq", "bits": 4, "group_size", "desc_act": false,
"sym", "checkpoint_format": "gptq"}. Readers dequantize w[k, n] = scales[g, n] * (q[k, n] - (qzeros[g, n] + 1)).
Only integer zero points fit this layout: symmetric grids (zero 8) always do; asymmetric ones (float
offsets) are refused. Other tensors are written in fp16.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from leanlm.errors import LeanLMError
from leanlm.model.layout import HEAD


def pack_int32(q: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack codes along `dim` (0 or 1) into int32: 32/bits codes per word, the first in the lowest bits."""
    per = 32 // bits
    q = q.to(torch.int64)
    if dim == 1:
        return pack_int32(q.t(), bits, 0).t().contiguous()
    if q.shape[0] % per:
        raise LeanLMError(f"GPTQ layout needs a multiple of {per} along the packed dimension, got {q.shape[0]}")
    q = q.view(q.shape[0] // per, per, -1)
    word = torch.zeros(q.shape[0], q.shape[2], dtype=torch.int64)
    for j in range(per):
        word |= q[:, j] << (bits * j)
    return (word - ((word >> 31) << 32)).to(torch.int32)  # reinterpret as signed int32


def gptq_tensors(name: str, m) -> dict[str, torch.Tensor]:
    if m.bits != 4:
        raise LeanLMError(f"{name}: GPTQ export supports 4-bit layers; this one has {m.bits} bits")
    codes = m.codes().to(torch.int64)  # [N, K]
    s = m.scales.float()
    zero = -m.offset_values() / s  # [N, G]
    if (zero - zero.round()).abs().max() > 1e-3:
        raise LeanLMError(f"{name}: asymmetric float zero points do not fit the GPTQ layout; quantize with sym: true")
    zero = zero.round().to(torch.int64)
    K = m.in_features
    t = {f"{name}.qweight": pack_int32(codes.t(), 4, 0),
         f"{name}.qzeros": pack_int32((zero - 1).t() & 0xF, 4, 1),
         f"{name}.scales": s.t().contiguous().half(),
         f"{name}.g_idx": (torch.arange(K) // m.group_size).to(torch.int32)}
    if m.bias is not None:
        t[f"{name}.bias"] = m.bias.detach().half()
    return t


def export_gptq(model, tokenizer, folder) -> Path:
    from safetensors.torch import save_file

    from leanlm.compress.quant.qlinear import QuantLinear
    from leanlm.io.atomic import atomic_dir

    folder = Path(folder)
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not quant:
        raise LeanLMError("GPTQ export: the model has no quantized linear layers; compress it with a 4-bit recipe")
    groups = {m.group_size if m.group_size < m.in_features else -1 for m in quant.values()}
    syms = {m.sym for m in quant.values()}
    if len(groups) != 1 or syms != {True}:
        raise LeanLMError("GPTQ export needs one group size and symmetric grids across all quantized layers")
    tensors: dict[str, torch.Tensor] = {}
    for n, m in quant.items():
        tensors.update(gptq_tensors(n, m))
    prefixes = tuple(n + "." for n in quant)
    for k, v in model.state_dict().items():
        if k.startswith(prefixes):
            continue
        if model.config.tie_word_embeddings and k == f"{HEAD}.weight":
            continue
        tensors[k] = v.detach().half() if v.is_floating_point() else v.detach()
    cfg = model.config.to_hf(dtype="float16")
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": groups.pop(), "desc_act": False,
                                  "sym": True, "checkpoint_format": "gptq", "true_sequential": True,
                                  "static_groups": False}
    with atomic_dir(folder) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
    return folder
