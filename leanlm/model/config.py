"""ModelConfig: one dataclass for every Llama-family variant leanlm runs.

Variants (GQA, RoPE scaling, sliding window, biases, q/k norm, per-layer sizes after structured
pruning) are fields here, never separate model files.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from leanlm.errors import LeanLMError

# "freq_factors": per-dimension divisors of the base inverse frequencies, as GGUF files store RoPE
# scaling (the rope_freqs tensor) when no transformers type reproduces them.
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope", "freq_factors")
ACTIVATIONS = ("silu", "swish", "gelu_pytorch_tanh", "gelu")  # the MLP's gate activation (SwiGLU, GeGLU)
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": ..., "factor": ..., ...} as transformers reads it
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections
    attention_out_bias: bool = False  # bias on o_proj (Llama's attention_bias sets both)
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    sliding_window: int | None = None  # Mistral: attend to at most this many previous tokens
    hidden_act: str = "silu"
    model_type: str = "llama"
    partial_rotary_factor: float = 1.0  # RoPE turns only the first head_dim * factor channels (Phi-3/4)
    # Gemma 2/3
    layer_types: list[str] | None = None  # per layer: "sliding_attention" (window) or "full_attention"
    local_rope_theta: float | None = None  # RoPE base of the sliding layers (None: rope_theta)
    local_rope_scaling: dict | None = None  # RoPE scaling of the sliding layers (used when local_rope_theta is set)
    norm_plus_one: bool = False  # RMSNorm scales by (1 + weight), computed in fp32
    post_norms: bool = False  # extra norms on the attention and MLP outputs (before the residual add)
    embed_scale: bool = False  # embeddings multiplied by sqrt(hidden_size)
    query_pre_attn_scalar: float | None = None  # attention scores scale 1/sqrt(this) (None: head_dim)
    attn_logit_softcapping: float | None = None  # scores -> cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None  # logits -> cap * tanh(logits / cap)
    # mixture of experts (0 experts: dense)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int | None = None  # each expert's width (None: intermediate_size)
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's always-on expert (0: none)
    norm_topk_prob: bool = True  # renormalize the top-k router weights to sum to 1 (Mixtral, Qwen3-MoE)
    moe_layers: list[int] | None = None  # which blocks are MoE (None: all when num_experts > 0)
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    # Per-layer shapes, set by structured pruning; None means uniform.
    layer_num_heads: list[int] | None = None
    layer_num_kv_heads: list[int] | None = None
    layer_intermediate_size: list[int] | None = None
    # ReZero (Bachlechner et al., 2020): a learnable scalar, initialised to 0, scales each residual branch, so
    # every block starts as the identity. Training-time only: Transformer.fold_residual_gates() folds the
    # gates into the branch output projections, so a saved model is a plain checkpoint of its family.
    residual_gates: bool = False

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        if self.num_heads % self.num_kv_heads:
            raise LeanLMError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        for rt in {self.rope_type, _rope_type(self.local_rope_scaling)}:
            if rt not in ROPE_TYPES:
                raise LeanLMError(f"unsupported RoPE scaling type {rt!r}; supported: {', '.join(ROPE_TYPES)}")
        if self.hidden_act not in ACTIVATIONS:
            raise LeanLMError(f"unsupported hidden_act {self.hidden_act!r}; supported: {', '.join(ACTIVATIONS)}")
        if self.layer_types is not None:
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if bad or len(self.layer_types) != self.num_layers:
                raise LeanLMError(f"layer_types must list {self.num_layers} of {', '.join(LAYER_TYPES)}; got "
                                  f"{bad[0] if bad else len(self.layer_types)!r}")

    @property
    def rope_type(self) -> str:
        return _rope_type(self.rope_scaling)

    def window(self, layer: int) -> int | None:
        """The layer's sliding window (None: it attends to every earlier token)."""
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    def local_rope(self, layer: int) -> bool:
        """True when the layer uses the sliding layers' own RoPE (Gemma 3)."""
        return self.local_rope_theta is not None and self.window(layer) is not None

    def heads(self, layer: int) -> tuple[int, int]:
        nh = self.layer_num_heads[layer] if self.layer_num_heads else self.num_heads
        nkv = self.layer_num_kv_heads[layer] if self.layer_num_kv_heads else self.num_kv_heads
        return nh, nkv

    def intermediate(self, layer: int) -> int:
        return self.layer_intermediate_size[layer] if self.layer_intermediate_size else self.intermediate_size

    def is_moe_layer(self, layer: int) -> bool:
        if not self.num_experts:
            return False
        return self.moe_layers is None or layer in self.moe_layers

    @property
    def uniform(self) -> bool:
        """True when every layer has the same shapes (so a transformers config can describe it)."""
        lists = [self.layer_num_heads, self.layer_num_kv_heads, self.layer_intermediate_size]
        return all(v is None or len(set(v)) <= 1 for v in lists)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    # ---- transformers config.json ----
    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        from leanlm.model.families import family

        mt = d.get("model_type")
        fam = family(mt, source)
        d = {**fam.hf_defaults, **{k: v for k, v in d.items() if v is not None or k not in fam.hf_defaults}}
        try:
            rope = dict(d.get("rope_scaling") or {})
            params = d.get("rope_parameters") or {}  # transformers >= 5 keeps theta and scaling here
            theta = d.get("rope_theta") or params.get("rope_theta", 10000.0)
            if params:
                rope = {k: v for k, v in params.items() if k != "rope_theta"}
            if rope.get("rope_type", rope.get("type")) in (None, "default"):
                rope = None
            bias = bool(d.get("attention_bias", False))
            out_bias = bias if fam.out_bias_follows_qkv else False
            sliding = d.get("sliding_window")
            if fam.sliding_flag and not d.get(fam.sliding_flag, False):
                sliding = None
            eos = d.get("eos_token_id")
            kw = dict(
                vocab_size=int(d["vocab_size"]),
                hidden_size=int(d["hidden_size"]),
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=int(d["num_attention_heads"]),
                num_kv_heads=int(d.get("num_key_value_heads") or d["num_attention_heads"]),
                head_dim=d.get("head_dim"),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=float(theta),
                rope_scaling=rope,
                max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=bias,
                attention_out_bias=out_bias,
                mlp_bias=bool(d.get("mlp_bias", False)),
                sliding_window=sliding,
                hidden_act=d.get("hidden_act", "silu"),
                model_type=mt,
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=[] if eos is None else eos,
                pad_token_id=d.get("pad_token_id"),
                layer_num_heads=d.get("leanlm_layer_num_heads"),
                layer_num_kv_heads=d.get("leanlm_layer_num_kv_heads"),
                layer_intermediate_size=d.get("leanlm_layer_intermediate_size"),
            )
            kw.update(fam.read_config(d, kw["num_layers"]))  # what the family reads its own way (Gemma, Phi-3, MoE)
            kw.update(fam.fixed)  # what the family always has (transformers hard-codes it)
            cfg = cls(**kw)
        except KeyError as e:
            raise LeanLMError(f"{source}: missing required field {e.args[0]!r}; is this a transformers config.json?")
        except (TypeError, ValueError) as e:
            raise LeanLMError(f"{source}: malformed field ({e}); fix or regenerate the file")
        except LeanLMError as e:
            msg = str(e)
            raise LeanLMError(msg if msg.startswith(source) else f"{source}: {msg}") from None
        return cfg

    def to_hf(self, dtype: str = "float32") -> dict:
        from leanlm.model.families import family

        fam = family(self.model_type)
        arch = fam.hf_arch
        eos = self.eos_token_id[0] if len(self.eos_token_id) == 1 else (self.eos_token_id or None)
        d = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "hidden_act": self.hidden_act,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": dtype,
        }
        d["sliding_window"] = self.sliding_window
        if fam.sliding_flag:
            d[fam.sliding_flag] = self.sliding_window is not None
        if fam.out_bias_follows_qkv and self.attention_bias != self.attention_out_bias:
            raise LeanLMError(f"{self.model_type} config cannot express q/k/v bias without o_proj bias")
        d.update(fam.write_config(self))
        if not self.uniform:
            d["leanlm_layer_num_heads"] = self.layer_num_heads
            d["leanlm_layer_num_kv_heads"] = self.layer_num_kv_heads
            d["leanlm_layer_intermediate_size"] = self.layer_intermediate_size
        return d


def _rope_type(rs: dict | None) -> str:
    if not rs:
        return "default"
    return rs.get("rope_type", rs.get("type", "default"))


def read_hf_config(folder: Path) -> ModelConfig:
    path = Path(folder) / "config.json"
    if not path.exists():
        raise LeanLMError(f"{folder}: no config.json; pass a Hugging Face model folder or a .gguf file")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LeanLMError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}")
    if not isinstance(d, dict):
        raise LeanLMError(f"{path}: expected a JSON object")
    return ModelConfig.from_hf(d, source=str(path))
