"""The `distill` recipe step: win back what the earlier steps lost, from the model as it was before them.

The teacher is a copy of the model taken before the recipe's first step (the recipe runner makes it
when a recipe holds a distill step). What trains, with the teacher's distributions as targets
(leanlm.train.distill, forward KL by default):
- float weights: every float parameter (linears, norms, the embedding/head), except that weights a
  pruning step set to zero stay zero (their gradient is masked, so sparsity and 2:4 patterns survive);
- quantized linears (`QuantLinear`): the integer codes stay frozen and the per-group scales and offsets
  train (end-to-end training of the quantization parameters, as EfficientQAT's E2E-QP does); they are
  stored back in fp16, so the model keeps its packed format and speed;
- ternary linears (`BitLinear`, BitNet b1.58): quantization-aware training through a float latent weight,
  fake-quantized (ternary weights, 8-bit activations, straight-through gradient) at every forward and packed
  again at the end; the latent weight starts from the teacher's float weight of that layer when it
  quantizes to exactly the layer's codes (the usual `bitnet158+distill`), else from the codes themselves.
  It trains when float weights train, at `ternary_lr` (BitNet trains at far higher rates than fine-tuning:
  a weight must move about half its layer's absmean to change its code).
The training text is the recipe's calibration samples (`leanlm compress --samples N --seq-len L`),
cut into windows of `seq_len` tokens; or, with `data: generated`, text the teacher writes itself
(LLM-QAT's data-free recipe, leanlm/train/datafree.py: `gen_count` sequences of `gen_len` tokens, each
from a random first token, the first `gen_greedy` continuations greedy and the rest sampled; cached on
disk, so a rerun does not generate again). A recipe whose distill/qat steps all use generated text needs
no calibration data at all.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from leanlm.compress.quant.bitnet import BitLinear
from leanlm.compress.quant.grid import MASK_MIN_FRACTION
from leanlm.compress.quant.qlinear import QuantLinear
from leanlm.errors import LeanLMError
from leanlm.train.datafree import GenerationSpec, self_generated
from leanlm.train.distill import DistillConfig, distill

DATA = ("calib", "generated")


@dataclass
class DistillStepConfig(DistillConfig):
    steps: int = 200
    lr: float = 5e-5  # float weights
    scales_lr: float = 1e-5  # quantization scales/offsets (AdamW steps are absolute; scales are ~1e-2)
    train_float: bool = True  # float weights (linears, norms, embedding) train
    train_scales: bool = True  # quantized linears' scales and offsets train
    ternary_lr: float = 5e-4  # BitLinear latent weights
    progress: bool = True
    data: str = "calib"  # calib: the recipe's calibration samples | generated: the teacher's own text
    gen_count: int = 64  # data: generated -- sequences the teacher writes
    gen_len: int = 0  # tokens per generated sequence (0: seq_len)
    gen_greedy: int = 4  # greedy tokens after the random first one, then sampling
    targets: list | None = None
    ignore: list | None = None

    def validate(self) -> None:
        super().validate()
        if not (self.scales_lr > 0 and self.ternary_lr > 0):
            raise LeanLMError(f"scales_lr and ternary_lr must be > 0 (got {self.scales_lr}, {self.ternary_lr})")
        if self.data not in DATA:
            raise LeanLMError(f"data must be one of {', '.join(DATA)} (got {self.data!r})")
        if self.data == "generated":
            self.generation_spec().validate()

    def generation_spec(self) -> GenerationSpec:
        return GenerationSpec(count=self.gen_count, length=self.gen_len or self.seq_len, greedy=self.gen_greedy,
                              seed=self.seed)

    @staticmethod
    def step_needs_data(fields: dict) -> bool:
        """Whether a recipe step with these YAML fields reads calibration samples."""
        return fields.get("data", "calib") != "generated"


def _quant_params(model) -> list[tuple[QuantLinear, list[str]]]:
    out = []
    for m in model.modules():
        if isinstance(m, QuantLinear) and m._parts is None:
            out.append((m, ["scales"] + ([] if m.sym else ["offsets"])))
    return out


def make_trainable(model, cfg: DistillStepConfig, original=None):
    """Set requires_grad on what trains; returns an undo() that freezes again and restores packed storage.
    original: the model before the recipe (BitLinear latent weights start from its float weights)."""
    hooks, was = [], {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.train_float:
        for p in model.parameters():
            if not p.is_floating_point():
                continue
            p.requires_grad_(True)
            zeros = p.detach() == 0
            if p.dim() == 2 and zeros.float().mean().item() >= MASK_MIN_FRACTION:
                keep = (~zeros).to(p.dtype)  # pruned weights: their gradient is zero, so AdamW never moves them
                hooks.append(p.register_hook(lambda g, keep=keep: g * keep))
    quant = _quant_params(model) if cfg.train_scales else []
    for m, names in quant:
        for n in names:
            t = getattr(m, n)
            delattr(m, n)
            p = nn.Parameter(t.detach().float(), requires_grad=True)
            p.lr_scale = cfg.scales_lr / cfg.lr  # the training loop gives it its own parameter group
            setattr(m, n, p)
        m._kernel = None
    ternary = [(n, m) for n, m in model.named_modules() if isinstance(m, BitLinear)] if cfg.train_float else []
    for n, m in ternary:
        src = _float_weight(original, n)
        p = m.begin_latent(src)
        p.lr_scale = cfg.ternary_lr / cfg.lr

    def undo():
        for h in hooks:
            h.remove()
        for _, m in ternary:
            m.end_latent()
        for m, names in quant:
            for n in names:
                t = getattr(m, n).detach().half()
                delattr(m, n)
                m.register_buffer(n, t)
            m._kernel = None  # rebuilt from the trained scales at the next forward
        for p, r in was.items():
            p.requires_grad_(r)
    undo.plain_float = not (hooks or quant or ternary)  # nothing here that FSDP2 sharding would bypass
    return undo


def _float_weight(original, name: str):
    if original is None:
        return None
    try:
        m = original.get_submodule(name)
    except AttributeError:
        return None
    return m.weight if type(m) is nn.Linear else None


def windows(samples: torch.Tensor, seq_len: int) -> list[dict]:
    flat = samples.reshape(-1).tolist()
    return [{"input_ids": flat[i:i + seq_len], "labels": flat[i:i + seq_len]}
            for i in range(0, len(flat) - 1, seq_len) if len(flat[i:i + seq_len]) > 1]


def distill_step(model, cfg: DistillStepConfig, modules, samples, original=None, callback=None) -> None:
    if original is None:
        raise LeanLMError("the distill step needs the model as it was before the recipe (run it through "
                          "apply_recipe, which keeps that copy)")
    if cfg.data == "generated":
        data, _ = self_generated(original, cfg.generation_spec(), list(original.config.eos_token_id),
                                 progress=cfg.progress)
    elif samples is None:
        raise LeanLMError("the distill step needs calibration samples as training text (or data: generated)")
    else:
        data = windows(samples, cfg.seq_len)
    undo = make_trainable(model, cfg, original)
    try:
        if not any(p.requires_grad for p in model.parameters()):
            raise LeanLMError("the distill step found nothing to train (train_float and train_scales are off)")
        distill(model, original, data, cfg, progress=cfg.progress, callback=callback,
                eos_ids=original.config.eos_token_id or ())
    finally:
        undo()
        model.eval()


distill_step.wants_original = True  # apply_recipe passes the model as it was before the recipe

METHODS = {"distill": (DistillStepConfig, distill_step)}
