"""GGUF tensor names -> leanlm's state-dict keys, by layout role (llama.cpp names tensors the same way
for every family it stores: `blk.N.attn_q.weight`, `token_embd.weight`, ...). io/gguf.py only applies it."""
from __future__ import annotations

import re

from leanlm.model.layout import EMBED, FINAL_NORM, HEAD, LLAMA, Layout, block_prefix


def block_names(lay: Layout) -> dict[str, str]:
    """llama.cpp's name of a block tensor -> the module it belongs to, relative to the block."""
    mlp = f"{lay.mlp}."
    return {"attn_norm": lay.attn_norm, "ffn_norm": lay.mlp_norm, "attn_q": lay.q, "attn_k": lay.k,
            "attn_v": lay.v, "attn_output": lay.o, "attn_q_norm": lay.q_norm, "attn_k_norm": lay.k_norm,
            "ffn_gate": mlp + lay.gate, "ffn_up": mlp + lay.up, "ffn_down": mlp + lay.down}


TOP = {"token_embd.weight": f"{EMBED}.weight", "output_norm.weight": f"{FINAL_NORM}.weight",
       "output.weight": f"{HEAD}.weight"}
_BLK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def hf_name(gguf_name: str, lay: Layout = LLAMA) -> str | None:
    """The state-dict key of a GGUF tensor, or None for a tensor leanlm does not map."""
    if gguf_name in TOP:
        return TOP[gguf_name]
    m = _BLK.match(gguf_name)
    names = block_names(lay)
    if m and m.group(2) in names:
        return f"{block_prefix(int(m.group(1)))}{names[m.group(2)]}.{m.group(3)}"
    return None
