"""The one decoder: Llama 2/3, Mistral, Qwen2, Qwen3, Gemma 2/3, Phi-3 and SmolLM2 are config fields of this file.

Module names mirror transformers' (model.layers.N.self_attn.q_proj, ...) so Hugging Face
checkpoints load with an identity key map. The KV cache is an argument of forward, never state
inside the layers: anything with begin/update/end (KVCache here, the engine's paged cache) works. A
cache with `blockwise = True` computes attention itself (`attend(layer, q, k, v, scale, softcap)`:
the engine's paged cache reading each sequence's blocks where they lie) and its masks are None.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from leanlm.model.config import ModelConfig
from leanlm.model.moe import SparseMoE
from leanlm.model.rope import RopeTable, apply_rope


class RMSNorm(nn.Module):
    """RMSNorm; plus_one (Gemma): the scale is (1 + weight) and the whole op runs in fp32 before the cast."""

    def __init__(self, dim: int, eps: float, plus_one: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))
        self.eps, self.plus_one = eps, plus_one

    @torch.no_grad()
    def fold_scale_(self, s: torch.Tensor) -> None:
        """Divide the output by s per channel (AWQ/SmoothQuant fold s into the norm feeding their linears)."""
        w = self.weight
        if self.plus_one:
            w.copy_(((1.0 + w.float()) / s.float() - 1.0).to(w.dtype))
        else:
            w.div_(s.to(w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        if self.plus_one:
            x32 = x.float()
            x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
            return (x32 * (1.0 + self.weight.float())).to(dt)
        if dt == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused op
        # Normalise in fp32 like the reference, then cast back before the weight.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dt)


class KVCache:
    """Static cache: K/V preallocated for max_len positions, written in place, no per-token allocation.

    Rows may be left-padded: `valid[b, j]` says whether slot j of row b holds a real token.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype=torch.float32,
                 valid: torch.Tensor | None = None, device="cpu"):
        self.k, self.v = [], []
        for i in range(cfg.num_layers):
            nkv = cfg.heads(i)[1]
            self.k.append(torch.zeros(batch, nkv, max_len, cfg.head_dim, dtype=dtype, device=device))
            self.v.append(torch.zeros(batch, nkv, max_len, cfg.head_dim, dtype=dtype, device=device))
        self.batch, self.max_len, self.length, self.pending = batch, max_len, 0, 0
        self.valid = None
        if valid is not None:
            self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
            self.valid[:, : valid.shape[1]] = valid
            self.valid[:, valid.shape[1]:] = True

    def begin(self, T: int, positions: torch.Tensor | None, window: int | None):
        start, end = self.length, self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked for {end}")
        self.pending = T
        if positions is None:
            if self.valid is None:
                positions = torch.arange(start, end).unsqueeze(0).expand(self.batch, T)
            else:  # position = number of real tokens before this slot
                positions = (self.valid[:, :end].long().cumsum(-1) - 1).clamp_min(0)[:, start:end]
        return positions, self._mask(start, T, window)

    def window_mask(self, window: int | None):
        """The current step's mask for another window (models mixing local and global layers)."""
        return self._mask(self.length, self.pending, window)

    def _mask(self, start: int, T: int, window: int | None):
        end = start + T
        windowed = window is not None and end > window
        if self.valid is None and not windowed:
            if T == 1:
                return None  # one query sees every cached key
            if start == 0:
                return "causal"
        q = torch.arange(start, end).unsqueeze(1)
        k = torch.arange(end).unsqueeze(0)
        m = k <= q
        if windowed:
            m = m & (q - k < window)
        m = m.unsqueeze(0)
        if self.valid is not None:
            # pad queries attend to themselves only, so no row is empty (no NaN); real queries skip pads
            m = m & (self.valid[:, None, :end] | (k == q).unsqueeze(0))
        return m.unsqueeze(1)  # [B or 1, 1, T, end]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        s, e = self.length, self.length + self.pending
        self.k[layer][:, :, s:e] = k
        self.v[layer][:, :, s:e] = v
        return self.k[layer][:, :, :e], self.v[layer][:, :, :e]

    def end(self):
        self.length += self.pending
        self.pending = 0


def attention(q, k, v, mask, scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, Hkv, L, D]; mask: None (all), "causal", or bool [B|1, 1, T, L].
    scale: scores multiplier (None: 1/sqrt(D)); softcap: scores -> softcap * tanh(scores / softcap)."""
    if softcap is not None:
        return _attention_softcapped(q, k, v, mask, scale, softcap)
    groups = q.shape[1] // k.shape[1]
    B, H, T, D = q.shape
    if groups > 1 and not isinstance(mask, str):
        # Fold the query heads of a KV group into the row dimension: no K/V copy (the mask is tiled).
        Hkv = k.shape[1]
        qg = q.reshape(B, Hkv, groups * T, D)
        if mask is not None:
            mask = mask.repeat(1, 1, groups, 1)
        y = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
        return y.reshape(B, H, T, D)
    if groups > 1:  # causal prefill: SDPA's is_causal path needs equal head counts
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    if isinstance(mask, str):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _attention_softcapped(q, k, v, mask, scale, softcap) -> torch.Tensor:
    """Scores computed explicitly: SDPA has no soft-capping (Gemma 2). Softmax in fp32 like the reference."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    s = torch.tanh(s / softcap) * softcap
    if isinstance(mask, str):
        T, L = s.shape[-2:]
        mask = torch.ones(T, L, dtype=torch.bool, device=s.device).tril(L - T)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v


class _FusedLinear:
    """F.linear over weights concatenated by fuse_linears."""

    def __init__(self, w, b):
        self.w, self.b = w, b

    def __call__(self, x):
        return F.linear(x, self.w, self.b)


def _key_tensor(m: nn.Module):
    """The tensor whose storage says a module is still the one that was fused."""
    return m.weight if type(m) is nn.Linear else getattr(m, "qweight", None)


def fused_weight(owner: nn.Module, name: str, mods: tuple):
    """The fused forward (a callable) made by fuse_linears, if it still matches the modules.

    Falls back (None) while training or when a module has hooks (calibration), and drops the fused
    copy for good once a module was replaced (LoRA, quantization) or re-assigned (dtype change).
    """
    fused = owner.__dict__.get(name)
    if fused is None:
        return None
    fn, types, ptrs, dtype = fused
    keys = [_key_tensor(m) for m in mods]
    # A compiled step cannot read storage addresses; it was traced right after an eager check (and the
    # compiled decoder re-checks eagerly before every generation).
    if (tuple(type(m) for m in mods) != types or any(k is None for k in keys)
            or (not torch.compiler.is_compiling() and tuple(k.data_ptr() for k in keys) != ptrs)
            or keys[0].dtype != dtype):
        del owner.__dict__[name]  # stale: free it
        return None
    if torch.is_grad_enabled() and keys[0].requires_grad:
        return None
    if any(m._forward_hooks or m._forward_pre_hooks for m in mods):
        return None
    return fn


def fuse_linears(owner: nn.Module, name: str, mods: tuple, column_major: bool = False) -> bool:
    """One matmul for layers that read the same input. nn.Linear weights are concatenated into one matrix
    and the modules' weights become views of it (memory unchanged, state_dict keeps transformers'
    names); quantized layers of one format (a class with a `fused(mods)` constructor) get one fused
    packed kernel. column_major: store the concatenated weight column-major where `column_major_pays`."""
    if name in owner.__dict__ and fused_weight(owner, name, mods) is not None:
        return True  # already fused and still valid
    kind = type(mods[0])
    if any(type(m) is not kind for m in mods) or any(_key_tensor(m) is None or _key_tensor(m).is_meta for m in mods):
        return False
    if kind is nn.Linear:
        if len({m.weight.dtype for m in mods}) != 1:
            return False
        fn = _fuse_dense(mods, column_major)
    elif hasattr(kind, "fused"):
        fn = kind.fused(mods)
        if fn is None:
            return False
    else:
        return False
    keys = [_key_tensor(m) for m in mods]
    owner.__dict__[name] = (fn, tuple(type(m) for m in mods), tuple(k.data_ptr() for k in keys), keys[0].dtype)
    return True


def column_major_pays(out_features: int, in_features: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a weight [out, in] multiplies a few rows faster stored column-major (strides (1, out)).

    Measured (benchmarks/matvec_layout.py, docs/bench/decode.md): on CPU, PyTorch's fp32 product of one row
    with a row-major weight (MKL's NT sgemm: a dot product per output) reads the weight at ~7 GB/s on this
    machine kind; over a column-major weight (NN sgemm) it reads 10-13 GB/s when the matrix has more
    outputs than inputs (fused q/k/v, fused gate/up, the output head). For square and narrow shapes
    (o_proj, down_proj), and in bf16, the row-major layout is as fast or faster."""
    return dtype == torch.float32 and device.type == "cpu" and out_features > in_features


def is_column_major(w: torch.Tensor) -> bool:
    return w.dim() == 2 and w.shape[0] > 1 and w.stride() == (1, w.shape[0])


def set_matvec_layout(p: nn.Parameter, column_major: bool) -> None:
    """Store a 2-D parameter column-major or row-major, in place: the same Parameter object (ties and
    optimizers keep it), the same values; one copy made, the old storage freed."""
    if p.is_meta or is_column_major(p) == column_major:
        return
    # the new tensor of the parameter's own kind (an inference tensor only if the model was built in inference mode)
    with torch.inference_mode(p.is_inference()), torch.no_grad():
        p.data = p.data.t().contiguous().t() if column_major else p.data.contiguous()


def plain_layout(model) -> None:
    """Transformer.plain_layout on a model, or on the Transformer under a PEFT wrapper (others: a no-op)."""
    target = getattr(model, "base_model", model)
    if hasattr(target, "plain_layout"):
        target.plain_layout()


def _fuse_dense(mods: tuple, column_major: bool) -> _FusedLinear:
    # Outside inference mode even when called from generation, so the weights stay usable for training.
    with torch.inference_mode(False), torch.no_grad():
        w0 = mods[0].weight
        if column_major and column_major_pays(sum(m.out_features for m in mods), w0.shape[1], w0.dtype, w0.device):
            # the [in, out] transposes side by side, seen as [out, in] with strides (1, out): each module's
            # rows are still a view (strided), nothing is copied twice
            w = torch.cat([m.weight.t() for m in mods], dim=1).t()
        else:
            w = torch.cat([m.weight for m in mods])
        has_bias = [m.bias is not None for m in mods]
        b = None
        if any(has_bias):
            b = torch.cat([m.bias if m.bias is not None else w.new_zeros(m.out_features) for m in mods])
        off = 0
        for m in mods:
            n = m.out_features
            m.weight = nn.Parameter(w[off:off + n], requires_grad=m.weight.requires_grad)
            if m.bias is not None:
                m.bias = nn.Parameter(b[off:off + n], requires_grad=m.bias.requires_grad)
            off += n
    return _FusedLinear(w, b)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        nh, nkv = cfg.heads(layer)
        hd = cfg.head_dim
        self.nh, self.nkv, self.hd, self.layer = nh, nkv, hd, layer
        self.scale = None if cfg.query_pre_attn_scalar is None else float(cfg.query_pre_attn_scalar) ** -0.5
        self.softcap = cfg.attn_logit_softcapping
        self.q_proj = nn.Linear(cfg.hidden_size, nh * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, nkv * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, nkv * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(nh * hd, cfg.hidden_size, bias=cfg.attention_out_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, cfg.norm_plus_one)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, cfg.norm_plus_one)

    def forward(self, x, cos, sin, mask, cache):
        q, k, v = self.qkv(x, cos, sin)
        return self.out(self.core(q, k, v, mask, cache))

    def qkv(self, x, cos, sin):
        """Queries, keys and values [B, heads, T, head_dim] of x [B, T, hidden], RoPE applied."""
        B, T, _ = x.shape
        fused = fused_weight(self, "_qkv", (self.q_proj, self.k_proj, self.v_proj))
        if fused is not None and not hasattr(self, "q_norm"):
            # One matmul for q/k/v and one RoPE pass over the q and k heads together.
            y = fused(x)
            nq, nk = self.nh * self.hd, self.nkv * self.hd
            qk = apply_rope(y[..., : nq + nk].view(B, T, self.nh + self.nkv, self.hd).transpose(1, 2), cos, sin)
            q, k = qk[:, : self.nh], qk[:, self.nh:]
            v = y[..., nq + nk:].view(B, T, self.nkv, self.hd).transpose(1, 2)
            return q, k, v
        return self._qkv_unfused(x, cos, sin)

    def core(self, q, k, v, mask, cache):
        """Attention proper (through the cache): the output [B, heads, T, head_dim]."""
        if cache is not None and getattr(cache, "blockwise", False):
            return cache.attend(self.layer, q, k, v, self.scale, self.softcap)  # reads K/V where they lie
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        return attention(q, k, v, mask, self.scale, self.softcap)

    def out(self, y):
        """The output projection of the attention output y [B, heads, T, head_dim] -> [B, T, hidden]."""
        B, _, T, _ = y.shape
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))

    def _qkv_unfused(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        return q, k, v


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu_pytorch_tanh": gelu_tanh, "gelu": F.gelu}


class MLP(nn.Module):
    """act(gate(x)) * up(x) -> down: SwiGLU (silu) or GeGLU (gelu, Gemma)."""

    def __init__(self, cfg: ModelConfig, layer: int, width: int | None = None):
        super().__init__()
        inter = cfg.intermediate(layer) if width is None else width  # width: a MoE expert's
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.gate_proj = nn.Linear(cfg.hidden_size, inter, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, inter, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(inter, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        fused = fused_weight(self, "_gate_up", (self.gate_proj, self.up_proj))
        if fused is not None:
            gate, up = fused(x).chunk(2, dim=-1)
            return self.down_proj(self.act(gate) * up)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One decoder block. cos/sin and mask are tensors, or dicts when layers differ (Gemma's local and
    global layers): cos/sin keyed by "local RoPE?", mask by window; each block picks its own."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        h, eps, one = cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_plus_one
        self.window, self.local = cfg.window(layer), cfg.local_rope(layer)
        self.input_layernorm = RMSNorm(h, eps, one)
        self.self_attn = Attention(cfg, layer)
        # Llama: post_attention_layernorm feeds the MLP. Gemma (post_norms): it normalizes the attention
        # output, and pre_feedforward_layernorm feeds the MLP (layout.GEMMA names the roles).
        self.post_attention_layernorm = RMSNorm(h, eps, one)
        if cfg.post_norms:
            self.pre_feedforward_layernorm = RMSNorm(h, eps, one)
            self.post_feedforward_layernorm = RMSNorm(h, eps, one)
        self.post_norms = cfg.post_norms
        self.mlp = SparseMoE(cfg, layer, lambda w: MLP(cfg, layer, w)) if cfg.is_moe_layer(layer) else MLP(cfg, layer)
        self.gated = cfg.residual_gates
        if cfg.residual_gates:  # ReZero: shape [1] rather than a 0-dim scalar, so FSDP2 can shard it
            self.attn_gate = nn.Parameter(torch.zeros(1))
            self.mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x, cos, sin, mask, cache):
        if isinstance(cos, dict):
            cos, sin = cos[self.local], sin[self.local]
        if isinstance(mask, dict):
            mask = mask[self.window]
        return self.after_attention(x, self.self_attn(self.input_layernorm(x), cos, sin, mask, cache))

    # The block in three pieces (forward = attn_in, attn_core, attn_out): the engine's compiled path
    # compiles the first and the last and runs attention over the paged cache eagerly between them.
    def attn_in(self, x, cos, sin):
        """Normed x's queries, keys and values [B, heads, T, head_dim] (cos/sin: this block's own)."""
        return self.self_attn.qkv(self.input_layernorm(x), cos, sin)

    def attn_core(self, q, k, v, mask, cache):
        return self.self_attn.core(q, k, v, mask, cache)

    def attn_out(self, x, y):
        """The block's output from its input x and the attention output y [B, heads, T, head_dim]."""
        return self.after_attention(x, self.self_attn.out(y))

    def after_attention(self, x, a):
        """Everything after the attention branch's output a [B, T, hidden]: norms, residuals, the MLP."""
        gated = self.gated
        if self.post_norms:
            a = self.post_attention_layernorm(a)
            x = x + (self.attn_gate * a if gated else a)
            m = self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
            return x + (self.mlp_gate * m if gated else m)
        x = x + (self.attn_gate * a if gated else a)
        m = self.mlp(self.post_attention_layernorm(x))
        return x + (self.mlp_gate * m if gated else m)

    @torch.no_grad()
    def fold_residual_gates_(self) -> None:
        """Fold the ReZero gates into what writes each branch's output: the attention output projection and
        every MLP's down projection (a MoE's experts and shared expert alike, since the branch is linear in
        them), or the post norms where the family has them (Gemma). Then drop the gates."""
        if not self.gated:
            return
        for gate, post_norm, writers in (
                (self.attn_gate, getattr(self, "post_attention_layernorm", None) if self.post_norms else None,
                 [self.self_attn.o_proj]),
                (self.mlp_gate, getattr(self, "post_feedforward_layernorm", None) if self.post_norms else None,
                 [m.down_proj for m in self.mlp.modules() if isinstance(m, MLP)])):
            g = gate.detach().float()
            if post_norm is not None:
                w = post_norm.weight
                w.copy_((((1.0 + w.float()) * g - 1.0) if post_norm.plus_one else w.float() * g).to(w.dtype))
                continue
            for lin in writers:
                if type(lin) is not nn.Linear:
                    raise ValueError("fold_residual_gates: the branch output projection is not a plain Linear")
                lin.weight.mul_(g.to(lin.weight.dtype))
                if lin.bias is not None:
                    lin.bias.mul_(g.to(lin.bias.dtype))
        del self.attn_gate, self.mlp_gate
        self.gated = False


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_plus_one)


def _plain_mask(T: int, window: int | None, device):
    """Mask of a forward without a cache: causal, and banded when the window is shorter than T."""
    if window is None or T <= window:
        return "causal"
    i = torch.arange(T, device=device)
    return ((i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window))[None, None]


class Transformer(nn.Module):
    """Causal LM. forward(input_ids [B, T], cache=None, positions=None) -> logits [B, T, vocab]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope = RopeTable(cfg)
        self.rope_local = RopeTable(cfg, local=True) if cfg.local_rope_theta is not None else None
        self.tie_weights()

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings as the blocks take them (Gemma scales them by sqrt(hidden), in their dtype)."""
        x = self.model.embed_tokens(input_ids)
        if self.config.embed_scale:
            x = x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output head on final hidden states (with Gemma 2's logit soft-capping)."""
        y = self.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            y = torch.tanh(y / cap) * cap
        return y

    def forward(self, input_ids: torch.Tensor | None = None, cache=None, positions: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, last_only: bool = False,
                return_hidden: bool = False) -> torch.Tensor:
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        cfg = self.config
        if cfg.layer_types is None:
            windows = [cfg.sliding_window]
        else:  # layer 0's window first: a cache that cannot window says so in begin()
            windows = list(dict.fromkeys(cfg.window(i) for i in range(cfg.num_layers)))
        if cache is not None:
            positions, mask = cache.begin(T, positions, windows[0])
            if len(windows) > 1:
                mask = {windows[0]: mask, **{w: cache.window_mask(w) for w in windows[1:]}}
        else:
            if positions is None:
                positions = torch.arange(T, device=x.device).unsqueeze(0)
            mask = _plain_mask(T, windows[0], x.device)
            if len(windows) > 1:
                mask = {w: _plain_mask(T, w, x.device) for w in windows}
        # a cache that knows its largest position (the compiled decoder's) spares reading a tensor value
        max_pos = getattr(cache, "max_position", None)
        if max_pos is None:
            max_pos = int(positions.max()) if positions.numel() else 0
        cos, sin = self.rope.lookup(positions, max_pos, x.dtype)
        if self.rope_local is not None:
            cl, sl = self.rope_local.lookup(positions, max_pos, x.dtype)
            cos, sin = {False: cos, True: cl}, {False: sin, True: sl}
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.end()
        if last_only:
            x = x[:, -1:]
        x = self.model.norm(x)
        if return_hidden:
            return x
        return self.logits(x)

    def residual_gates(self) -> list[nn.Parameter]:
        """The ReZero gates (empty unless the config has residual_gates)."""
        return [p for layer in self.model.layers for p in (getattr(layer, "attn_gate", None),
                                                             getattr(layer, "mlp_gate", None)) if p is not None]

    def fold_residual_gates(self) -> "Transformer":
        """Fold every ReZero gate into its branch's output projection (the function is unchanged) and clear
        config.residual_gates: the model becomes a plain checkpoint of its family (saved, run, converted
        like any other)."""
        import dataclasses

        for layer in self.model.layers:
            layer.fold_residual_gates_()
        self.config = dataclasses.replace(self.config, residual_gates=False)
        return self

    # fuse_projections stores fp32 CPU weights with more outputs than inputs column-major, where one-row
    # matmuls run faster (column_major_pays); False (on the class or one model) keeps every weight row-major.
    column_major_matvec = True

    def fuse_projections(self) -> "Transformer":
        """Inference speed-up: q/k/v and gate/up each run as one matmul, and wide fp32 weights (those two and
        the output head, tied or not) are stored column-major where that runs faster (column_major_pays).
        Weights are shared or moved, never copied (memory unchanged); any later module swap (LoRA,
        quantization), training or dtype change falls back to the plain path. Call it again after such a
        change to re-fuse."""
        col = self.column_major_matvec
        for layer in self.model.layers:
            a = layer.self_attn
            fuse_linears(a, "_qkv", (a.q_proj, a.k_proj, a.v_proj), col)
            for m in layer.modules():  # the MLP, or each expert of a MoE block
                if isinstance(m, MLP):
                    fuse_linears(m, "_gate_up", (m.gate_proj, m.up_proj), col)
        head = self.lm_head
        if type(head) is nn.Linear and not head.weight.is_meta:
            w = head.weight  # the embedding's own Parameter when tied: it reads strided rows, a negligible cost
            set_matvec_layout(w, col and column_major_pays(w.shape[0], w.shape[1], w.dtype, w.device))
        return self

    def plain_layout(self) -> "Transformer":
        """Undo fuse_projections' column-major layout: every weight row-major and contiguous again (the same
        Parameter objects; each fused weight is dropped, so memory is unchanged). Transforms that reshape
        weights (quantization, pruning, adapters) call it first: a `.view` of a column-major weight, or of
        a tensor computed from one (elementwise results keep its layout), fails. The next generation re-fuses."""
        for m in self.modules():
            for name in ("_qkv", "_gate_up"):
                rec = m.__dict__.get(name)
                if rec is not None and isinstance(rec[0], _FusedLinear) and not rec[0].w.is_contiguous():
                    del m.__dict__[name]
        for p in self.parameters():
            if p.dim() == 2 and not p.is_contiguous() and not p.is_meta:
                with torch.inference_mode(p.is_inference()), torch.no_grad():
                    p.data = p.data.contiguous()
        return self

    def new_cache(self, batch: int, max_len: int, valid: torch.Tensor | None = None) -> KVCache:
        return KVCache(self.config, batch, max_len, dtype=self.dtype, valid=valid,
                       device=self.model.norm.weight.device)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
