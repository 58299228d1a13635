"""Pre-training from random init (or continuing a checkpoint): corpus packing, built-in shapes, init schemes,
function-preserving growth and attention up-training conversions.

The training itself is the one loop (leanlm/train/loop.py): packed rows of `seq_len` tokens, every
position labelled, the global batch split over `torchrun` processes by the loop.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn as nn

from leanlm.errors import LeanLMError
from leanlm.model.config import ModelConfig
from leanlm.model.layout import blocks, layout_of
from leanlm.model.transformer import Transformer

# Built-in shapes, from seconds per step on 2 cores up to the default model's shape (SmolLM2-135M).
BUILTIN: dict[str, dict] = {
    "tiny": dict(hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2),
    "small": dict(hidden_size=256, intermediate_size=768, num_layers=8, num_heads=8, num_kv_heads=4),
    "medium": dict(hidden_size=384, intermediate_size=1024, num_layers=12, num_heads=6, num_kv_heads=2),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3),
}
INITS = ("normal", "deepnet", "zero-out", "rezero")


def builtin_config(name: str, tokenizer, max_len: int = 2048) -> ModelConfig:
    if name not in BUILTIN:
        raise LeanLMError(f"unknown model config {name!r}; built-in: {', '.join(BUILTIN)}, or a config.json / "
                          "model folder")
    eos = tokenizer.eos_ids[0] if tokenizer.eos_ids else None
    return ModelConfig(vocab_size=tokenizer.vocab_size, tie_word_embeddings=True, rope_theta=100000.0,
                       rms_norm_eps=1e-5, max_position_embeddings=max_len, bos_token_id=tokenizer.bos_id,
                       eos_token_id=[] if eos is None else [eos], **BUILTIN[name])


def config_from_file(path: Path) -> ModelConfig:
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LeanLMError(f"{path}: cannot read a model config ({e})")
    if "model_type" in d:
        return ModelConfig.from_hf(d, str(path))
    try:
        return ModelConfig.from_dict(d)
    except TypeError as e:
        raise LeanLMError(f"{path}: not a leanlm or transformers config ({e})")


@torch.no_grad()
def init_weights(model: Transformer, scheme: str = "normal", std: float = 0.02, seed: int = 0) -> Transformer:
    """normal: N(0, std) matrices, unit norms, zero biases. deepnet: as normal, with the residual-branch
    matrices (v, o, MLP) scaled by (8 N)^(-1/4) (DeepNet, Wang et al. 2022, for pre-norm). zero-out: the
    matrices that write into the residual stream (o, down) start at zero, so every block starts as the
    identity (the output projections of GPT-2/nanoGPT-style zero-init). rezero: as normal, and every
    residual branch's ReZero gate at 0 (the config needs residual_gates: `new_model(cfg, "rezero")` sets it),
    so every block starts as the identity while its weights do not start at zero."""
    if scheme not in INITS:
        raise LeanLMError(f"unknown init {scheme!r}; choose {', '.join(INITS)}")
    if scheme == "rezero" and not model.config.residual_gates:
        raise LeanLMError("init rezero: the model has no residual gates (build it with new_model(cfg, 'rezero'))")
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.fill_(1.0)
    for gate in model.residual_gates():
        gate.zero_()
    lay, cfg = layout_of(model), model.config
    if scheme in ("normal", "rezero"):
        return model
    beta = (8 * cfg.num_layers) ** -0.25
    for i, blk in enumerate(blocks(model)):
        writers = lay.groups(cfg, i)["attn_out"] + lay.groups(cfg, i)["mlp_out"]
        scaled = writers + [lay.v] + lay.groups(cfg, i)["mlp_in"]
        for rel in (writers if scheme == "zero-out" else scaled):
            w = blk.get_submodule(rel).weight
            w.zero_() if scheme == "zero-out" else w.mul_(beta)
    return model


def new_model(cfg: ModelConfig, init: str = "normal", seed: int = 0) -> Transformer:
    """A model of shape cfg initialised by `init` (rezero turns the config's residual gates on)."""
    torch.manual_seed(seed)
    if init == "rezero":
        cfg = dataclasses.replace(cfg, residual_gates=True)
    return init_weights(Transformer(cfg), init, seed=seed)


MUP_OPTIMIZERS = ("adamw", "lion", "adafactor", "schedule-free", "sgd")


def apply_mup(model, base_width: int) -> dict[str, float]:
    """muP's learning-rate rule for Adam-style optimizers (Yang et al., 2021, Tensor Programs V, table 3):
    every hidden matrix (the 2-D weights inside the blocks, whose fan-in grows with the width) trains at
    lr x base_width / hidden_size; the embedding, the output head and 1-D parameters (norms, biases, gates)
    keep lr. Sets `lr_scale` on those parameters (the training loop gives each scale its own parameter
    group); call it after FSDP2 sharding, which replaces the parameter objects. Returns {name: scale}.

    Not applied: muP's output multiplier (logits x base_width / width) and 1/d attention scaling; every
    built-in shape ties the head to the embedding, which muP treats as an input weight."""
    from leanlm.model.layout import block_index

    if base_width < 1:
        raise LeanLMError("--mup-base-width must be at least 1")
    scale = base_width / model.config.hidden_size
    out = {}
    for name, p in model.named_parameters():
        if p.dim() == 2 and block_index(name) is not None:
            p.lr_scale = scale
            out[name] = scale
    return out


# ---------------------------------------------------------------- corpus
def read_documents(source: str) -> list[str]:
    """A .txt file (one document), a .jsonl file (one per record: text, messages or prompt+completion), a
    folder of either, or packaged:NAME (the packaged texts)."""
    from leanlm.data.text import packaged_text, read_texts

    if source.startswith("packaged:"):
        return [packaged_text(source.split(":", 1)[1])]
    p = Path(source)
    if not p.exists():
        raise LeanLMError(f"{source}: no such file or folder (pass .txt, .jsonl, a folder of them, or packaged:NAME)")
    files = sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".jsonl")) if p.is_dir() else [p]
    if not files:
        raise LeanLMError(f"{source}: no .txt or .jsonl files")
    return [d for f in files for d in read_texts(f) if d.strip()]


def pack(docs: list[str], tokenizer, seq_len: int, val_fraction: float = 0.05) -> tuple[list[dict], list[dict]]:
    """Tokenize, join documents with EOS, cut into rows of seq_len tokens; the last val_fraction of the
    rows (contiguous, so no training row overlaps them) is the validation split."""
    eos = tokenizer.eos_ids[0] if tokenizer.eos_ids else None
    stream: list[int] = []
    for d in docs:
        stream.extend(tokenizer.encode(d, add_special=False))
        if eos is not None:
            stream.append(eos)
    rows = [stream[i:i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
    n_val = max(1, int(round(len(rows) * val_fraction))) if val_fraction > 0 else 0
    if len(rows) < n_val + 1:
        raise LeanLMError(f"the corpus has {len(stream)} tokens: too few for rows of {seq_len} tokens plus a "
                          "validation split; add text or lower --seq-len")
    ex = [{"input_ids": r, "labels": list(r)} for r in rows]
    return ex[: len(ex) - n_val], ex[len(ex) - n_val:]


# ---------------------------------------------------------------- growth (function-preserving)
@torch.no_grad()
def grow_depth(model: Transformer, factor: int = 2) -> Transformer:
    """Each block is followed by factor-1 copies of itself whose residual writers (attention and MLP output
    projections) are zero, so the grown model computes the same function (a new block adds 0 to the
    residual stream) while its other weights start from trained ones, as stacking methods (MSG, LiGO) do."""
    import copy

    from leanlm.model.layout import BLOCKS

    if factor < 2:
        raise LeanLMError("grow_depth: factor must be at least 2")
    lay, cfg = layout_of(model), model.config
    grown = []
    for i, blk in enumerate(blocks(model)):
        grown.append(blk)
        for _ in range(factor - 1):
            twin = copy.deepcopy(blk)
            for rel in lay.groups(cfg, i)["attn_out"] + lay.groups(cfg, i)["mlp_out"]:
                lin = twin.get_submodule(rel)
                lin.weight.zero_()
                if lin.bias is not None:
                    lin.bias.zero_()
            grown.append(twin)
    for i, blk in enumerate(grown):
        blk.get_submodule(lay.attn).layer = i  # the KV cache indexes by layer
    parent, _, attr = BLOCKS.rpartition(".")
    setattr(model.get_submodule(parent), attr, nn.ModuleList(grown))
    per = lambda v: None if v is None else [x for x in v for _ in range(factor)]  # noqa: E731
    model.config = dataclasses.replace(cfg, num_layers=len(grown), layer_num_heads=per(cfg.layer_num_heads),
                                       layer_num_kv_heads=per(cfg.layer_num_kv_heads),
                                       layer_intermediate_size=per(cfg.layer_intermediate_size))
    return model


@torch.no_grad()
def grow_width(model: Transformer) -> Transformer:
    """Double the hidden size and the MLP width, keeping the function exactly (Net2Net / bert2BERT-style
    copies): every hidden unit and MLP channel appears twice; a matrix reading a doubled width takes half of
    each copy's column, one writing it repeats its rows; RMSNorm over [x, x] equals RMSNorm over x, so norms
    repeat their weights. Attention heads keep their number and size. With a tied head, the final norm is
    halved instead (the embedding must repeat, not halve). Training breaks the copies' symmetry."""
    from leanlm.model.layout import EMBED, FINAL_NORM

    cfg = model.config
    if cfg.num_experts or not cfg.uniform or cfg.model_type not in ("llama", "mistral", "qwen2", "qwen3"):
        raise LeanLMError("grow_width supports dense Llama-style models with uniform layers")
    grown = Transformer(dataclasses.replace(cfg, hidden_size=2 * cfg.hidden_size,
                                            intermediate_size=2 * cfg.intermediate_size, head_dim=cfg.head_dim))
    src = dict(model.named_parameters())
    for name, p in grown.named_parameters():
        w = src[name].detach()
        if w.shape == p.shape:
            p.copy_(w)
        elif name == f"{EMBED}.weight":
            p.copy_(torch.cat([w, w], 1))
        elif p.dim() == 1:
            v = torch.cat([w, w])
            p.copy_(v / 2 if name == f"{FINAL_NORM}.weight" and cfg.tie_word_embeddings else v)
        else:
            if p.shape[1] == 2 * w.shape[1]:
                w = torch.cat([w, w], 1) / 2
            if p.shape[0] == 2 * w.shape[0]:
                w = torch.cat([w, w], 0)
            p.copy_(w)
    grown.tie_weights()
    return grown.eval()


@torch.no_grad()
def to_mqa(model: Transformer, kv_heads: int = 1) -> Transformer:
    """GQA -> fewer KV heads (MQA with kv_heads=1): each new KV head is the mean of the old KV heads it
    replaces (Ainslie et al., 2023, mean-pooling); query heads are unchanged. Up-train afterwards."""
    cfg, lay = model.config, layout_of(model)
    if cfg.layer_num_kv_heads or cfg.num_kv_heads % kv_heads:
        raise LeanLMError(f"to_mqa: {cfg.num_kv_heads} KV heads cannot pool evenly into {kv_heads}")
    r, hd = cfg.num_kv_heads // kv_heads, cfg.head_dim
    for blk in blocks(model):
        attn = blk.get_submodule(lay.attn)
        for role in (lay.k, lay.v):
            lin = blk.get_submodule(role)
            w = lin.weight.view(kv_heads, r, hd, -1).mean(1).reshape(kv_heads * hd, -1)
            new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, dtype=w.dtype)
            new.weight.copy_(w)
            if lin.bias is not None:
                new.bias.copy_(lin.bias.view(kv_heads, r, hd).mean(1).reshape(-1))
            from leanlm.model.surgery import replace_module

            replace_module(blk, role, new)
        attn.nkv = kv_heads
    model.config = dataclasses.replace(cfg, num_kv_heads=kv_heads)
    return model


def kv_bytes_per_token(cfg: ModelConfig, bytes_per_value: int = 4) -> int:
    return sum(2 * cfg.heads(i)[1] * cfg.head_dim * bytes_per_value for i in range(cfg.num_layers))


def step_flops(model, tokens: int) -> float:
    """Training FLOPs of one step (6 N per token, the usual estimate; attention ignored)."""
    return 6.0 * model.num_parameters() * tokens


__all__ = ["BUILTIN", "builtin_config", "new_model", "init_weights", "apply_mup", "read_documents", "pack", "grow_depth",
           "grow_width", "to_mqa", "kv_bytes_per_token", "step_flops", "upcycle_moe", "load_balancing_loss",
           "moe_loss"]


# ---------------------------------------------------------------- sparse upcycling
@torch.no_grad()
def upcycle_moe(model: Transformer, num_experts: int = 8, top_k: int = 2, router_std: float = 0.02,
                seed: int = 0) -> Transformer:
    """Sparse upcycling (Komatsuzaki et al., 2023): every dense MLP becomes `num_experts` copies of itself
    behind a top-k router (a Mixtral-family model). With identical experts and top-k weights renormalized
    to 1, the upcycled model computes exactly the dense model's function whatever the router says; the
    router starts small and random, and training (with `load_balancing_loss`) makes the experts diverge."""
    from leanlm.model.layout import block_index, block_prefix

    cfg = model.config
    if cfg.num_experts:
        raise LeanLMError("upcycle_moe: the model is already a mixture of experts")
    if not cfg.uniform or cfg.model_type not in ("llama", "mistral"):
        raise LeanLMError("upcycle_moe: supports dense Llama/Mistral-shaped models with uniform layers")
    if not 0 < top_k <= num_experts:
        raise LeanLMError(f"upcycle_moe: top_k {top_k} must be in 1..{num_experts}")
    new_cfg = dataclasses.replace(cfg, model_type="mixtral", num_experts=num_experts, num_experts_per_tok=top_k,
                                  moe_intermediate_size=cfg.intermediate_size, norm_topk_prob=True, moe_layers=None)
    with torch.device("meta"):
        moe = Transformer(new_cfg)
    lay = layout_of(moe)
    src = model.state_dict()
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, p in moe.state_dict().items():
        if name in src:
            sd[name] = src[name].clone()
            continue
        i = block_index(name)
        rel = name[len(block_prefix(i)):]
        dense_mlp = lay.mlp_prefixes(cfg, i)[0]
        expert = next((e for e in lay.mlp_prefixes(new_cfg, i) if rel.startswith(e)), None)
        if expert is not None:  # each expert starts as the dense MLP
            sd[name] = src[block_prefix(i) + dense_mlp + rel[len(expert):]].clone()
        elif rel.rpartition(".")[0] in lay.groups(new_cfg, i)["router"]:
            sd[name] = torch.randn(p.shape, generator=g) * router_std
        else:
            raise LeanLMError(f"upcycle_moe: no source for {name}")
    moe.load_state_dict(sd, strict=False, assign=True)
    moe.tie_weights()
    return moe.eval()


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """Switch/Mixtral auxiliary loss: E * sum_e f_e * P_e, averaged over layers, where f_e is the share of
    routing slots (token x top-k) that went to expert e and P_e the mean router probability of e. Equals 1
    when routing is uniform, grows as experts are favoured."""
    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)  # [N, E]
        E = probs.shape[-1]
        top = probs.topk(top_k, dim=-1).indices
        f = torch.zeros(E, device=probs.device).scatter_add_(0, top.flatten(), torch.ones(top.numel(), device=probs.device))
        f = f / top.numel()
        losses.append(E * (f * probs.mean(0)).sum())
    return torch.stack(losses).mean()


class RouterCapture:
    """Collect every MoE router's logits during a forward (for the load-balancing loss)."""

    def __init__(self, model):
        from leanlm.model.moe import moe_blocks

        self.logits: list[torch.Tensor] = []
        self.hooks = [m.gate.register_forward_hook(lambda mod, i, o: self.logits.append(o)) for m in moe_blocks(model)]
        if not self.hooks:
            raise LeanLMError("RouterCapture: the model has no mixture-of-experts blocks")

    def close(self):
        for h in self.hooks:
            h.remove()


def moe_loss(aux_coef: float = 0.01, top_k: int = 2):
    """A training loss_fn: next-token loss plus aux_coef x the load-balancing loss."""
    import torch.nn.functional as F

    def fn(model, ids, labels):
        cap = RouterCapture(model)
        try:
            logits = model(ids)
        finally:
            cap.close()
        tgt = labels[:, 1:]
        keep = tgt != -100
        ce = F.cross_entropy(logits[:, :-1][keep].float(), tgt[keep])
        return ce + aux_coef * load_balancing_loss(cap.logits, top_k), int(keep.sum())
    return fn
