"""Low-rank factorization of linear layers: plain SVD, activation-aware SVD, LASER-style reduction.

W [out, in] ~= up @ down with down [r, in] and up [out, r]; a LowRankLinear computes up(down(x)),
so it holds r * (in + out) weights instead of in * out and is smaller only when r < in*out/(in+out).

Activation-aware (SVD-LLM's truncation-aware whitening): with H = X^T X = L L^T over calibration
inputs, the SVD of W L truncated to rank r and multiplied back by L^-1 minimizes the layer's output
error ||X (W - W')^T|| over all rank-r W' — plain SVD minimizes ||W - W'|| instead, which ignores
that some input directions carry far more signal than others.

Rank comes from `ratio` (fraction of the layer's parameters kept), `energy` (fraction of the
squared singular values kept; whitened ones when activation-aware) or an explicit `rank`.
LASER (Sharma et al., 2023) replaces chosen layers by a low-rank approximation of themselves and
keeps them dense; `factorize: false` does that.

Calibration protocol (leanlm.compress.calibrate): init(layer, cfg) / accumulate(state, x) /
solve(state, layer, cfg) -> (down, up) factors; `replace_linear` swaps the module afterwards.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from leanlm.errors import LeanLMError
from leanlm.io.modules import register_module_type
from leanlm.model.layout import HEAD, all_block_linears, block_pattern


@register_module_type
class LowRankLinear(nn.Module):
    """y = up(down(x)); bias (if any) on `up`. Parameter names: <name>.down.weight, <name>.up.weight."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    def forward(self, x):
        return self.up(self.down(x))

    @property
    def weight(self) -> torch.Tensor:
        """The dense equivalent (for inspection and for methods that read .weight)."""
        return self.up.weight @ self.down.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"

    def config(self) -> dict:
        """Constructor arguments, for checkpoints (leanlm.io.modules rebuilds it with LowRankLinear(**config))."""
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "bias": self.up.bias is not None}


@dataclass
class LowRankConfig:
    target: float | None = None  # fraction of the whole model's parameters to remove (uniform ratio)
    ratio: float | None = None  # fraction of each targeted layer's parameters kept
    energy: float | None = None  # fraction of squared singular values kept
    rank: int | None = None
    activation_aware: bool = True
    dampening: float = 0.01  # fraction of mean(diag(H)) added before the Cholesky factorization
    factorize: bool = True  # False: keep the layer dense at its low-rank approximation (LASER)
    targets: list[str] = field(default_factory=lambda: [block_pattern()])  # every linear in the blocks
    ignore: list[str] = field(default_factory=list)

    def __post_init__(self):
        given = [k for k in ("target", "ratio", "energy", "rank") if getattr(self, k) is not None]
        if len(given) != 1:
            raise LeanLMError(f"lowrank: set exactly one of target, ratio, energy, rank (got {given or 'none'})")
        for k in ("target", "ratio", "energy"):
            v = getattr(self, k)
            if v is not None and not 0.0 < v <= 1.0:
                raise LeanLMError(f"lowrank {k} {v}: expected a fraction in (0, 1]")
        if self.rank is not None and self.rank < 1:
            raise LeanLMError(f"lowrank rank {self.rank}: expected a positive integer")


@dataclass
class LaserConfig:
    """Per-layer rank reduction: module-name pattern -> fraction of the rank kept (e.g. 0.05)."""
    layers: dict[str, float] = field(default_factory=dict)
    activation_aware: bool = False  # LASER itself uses plain SVD
    dampening: float = 0.01

    def __post_init__(self):
        if not self.layers:
            raise LeanLMError("laser: give `layers`, a mapping of module-name pattern to the fraction of rank kept")
        for k, v in self.layers.items():
            re.compile(k)
            if not 0.0 < float(v) <= 1.0:
                raise LeanLMError(f"laser layer {k!r}: rank fraction {v} is not in (0, 1]")


def rank_for_ratio(out_f: int, in_f: int, ratio: float) -> int:
    return max(1, min(min(out_f, in_f), int(math.floor(ratio * out_f * in_f / (out_f + in_f)))))


def rank_for_energy(s: torch.Tensor, energy: float) -> int:
    e = s.double().pow(2).cumsum(0)
    return int(torch.searchsorted(e / e[-1], torch.tensor([energy], dtype=e.dtype) - 1e-12).item()) + 1


def matching_modules(model: nn.Module, targets: list[str], ignore: list[str]) -> list[tuple[str, nn.Linear]]:
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name != HEAD and any(re.search(t, name) for t in targets) \
                and not any(re.search(i, name) for i in ignore):
            out.append((name, mod))
    return out


def uniform_ratio(model: nn.Module, cfg: LowRankConfig, modules: list[str] | None = None) -> float:
    """Per-layer kept ratio that removes cfg.target of all parameters from the targeted layers."""
    names = modules if modules is not None else [n for n, _ in matching_modules(model, cfg.targets, cfg.ignore)]
    layer_total = sum(model.get_submodule(n).weight.numel() for n in names)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    ratio = 1.0 - cfg.target * total / max(layer_total, 1)
    if ratio <= 0.02:
        raise LeanLMError(f"lowrank target {cfg.target}: the targeted layers hold only {layer_total / total:.0%} of the "
                          "parameters; lower the target or target more layers")
    return ratio


# ---------------------------------------------------------------- calibration protocol
def init(layer: nn.Linear, cfg) -> dict:
    if not getattr(cfg, "activation_aware", False):
        return {"H": None, "n": 0}
    return {"H": torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64), "n": 0}


def accumulate(state: dict, inputs: torch.Tensor) -> None:
    if state["H"] is None:
        return
    x = inputs.detach().reshape(-1, inputs.shape[-1]).double()
    state["H"].addmm_(x.t(), x)
    state["n"] += x.shape[0]


def _whitening(H: torch.Tensor, dampening: float) -> torch.Tensor:
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    damp = dampening * torch.diag(H).mean()
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    for f in (1, 10, 100):
        L, info = torch.linalg.cholesky_ex(H + f * damp * eye)
        if info == 0:
            return L
    raise LeanLMError("lowrank: the calibration Hessian is not positive definite; use more calibration samples")


def factorize(weight: torch.Tensor, H: torch.Tensor | None, cfg, ratio: float | None = None,
              rank_fraction: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(down [r, in], up [out, r]) with up @ down the best rank-r approximation (whitened when H is given)."""
    W = weight.detach().double()
    out_f, in_f = W.shape
    L = _whitening(H, cfg.dampening) if H is not None else None
    A = W @ L if L is not None else W
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    if rank_fraction is not None:
        r = max(1, int(round(rank_fraction * S.numel())))
    elif getattr(cfg, "rank", None) is not None:
        r = min(cfg.rank, S.numel())
    elif getattr(cfg, "energy", None) is not None:
        r = rank_for_energy(S, cfg.energy)
    else:
        r = rank_for_ratio(out_f, in_f, ratio if ratio is not None else cfg.ratio)
    sq = S[:r].sqrt()
    up = U[:, :r] * sq
    down = sq[:, None] * Vh[:r]
    if L is not None:  # down = sqrt(S) V^T L^-1, solved instead of inverting L
        down = torch.linalg.solve_triangular(L, down, upper=False, left=False)
    return down.to(weight.dtype), up.to(weight.dtype)


def solve(state: dict | None, layer: nn.Linear, cfg, ratio: float | None = None, rank_fraction: float | None = None):
    # No token reached the layer (a MoE expert nothing was routed to): plain SVD, the best it can do
    # without knowing its inputs (GPTQ falls back to RTN the same way).
    H = state["H"] if state is not None and state["n"] > 0 else None
    return factorize(layer.weight, H, cfg, ratio=ratio, rank_fraction=rank_fraction)


def make_lowrank(layer: nn.Linear, down: torch.Tensor, up: torch.Tensor) -> LowRankLinear:
    m = LowRankLinear(layer.in_features, layer.out_features, down.shape[0], bias=layer.bias is not None,
                      dtype=layer.weight.dtype, device=layer.weight.device)
    with torch.no_grad():
        m.down.weight.copy_(down)
        m.up.weight.copy_(up)
        if layer.bias is not None:
            m.up.bias.copy_(layer.bias.detach())
    return m


def replace_linear(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def apply_factors(model: nn.Module, name: str, down: torch.Tensor, up: torch.Tensor, factorized: bool) -> None:
    """Install rank-r factors: a LowRankLinear (only where it is smaller) or the dense product (LASER)."""
    layer = model.get_submodule(name)
    r = down.shape[0]
    if factorized and r * (layer.in_features + layer.out_features) < layer.in_features * layer.out_features:
        replace_linear(model, name, make_lowrank(layer, down, up))
    else:
        with torch.no_grad():
            layer.weight.copy_((up.double() @ down.double()).to(layer.weight.dtype))


# ---------------------------------------------------------------- checkpoints
def lowrank_meta(model: nn.Module) -> dict:
    """{"lowrank": {module name: rank}} for the compression metadata of a saved model."""
    ranks = {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    return {"lowrank": ranks} if ranks else {}


def restore_modules(model: nn.Module, meta: dict | None, source: str = "checkpoint") -> None:
    """Before loading weights into a fresh (meta-device) model: put LowRankLinear where meta says."""
    for name, rank in ((meta or {}).get("lowrank") or {}).items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise LeanLMError(f"{source}: low-rank module {name} is not in the model; config and metadata disagree")
        replace_linear(model, name, LowRankLinear(layer.in_features, layer.out_features, int(rank),
                                                  bias=layer.bias is not None, dtype=layer.weight.dtype,
                                                  device=layer.weight.device))


# ---------------------------------------------------------------- recipe steps
def _run(model, cfg, modules, samples, progress, pick) -> dict:
    """Factor `modules` through the one calibration runner; pick(name) -> (ratio, rank_fraction)."""
    from leanlm.compress.calibrate import Method, Step, run_steps

    names = {id(model.get_submodule(n)): n for n in modules}
    factorized = isinstance(cfg, LowRankConfig) and cfg.factorize
    ranks: dict[str, int] = {}

    def solve_layer(state, layer, c):
        name = names[id(layer)]
        ratio, frac = pick(name)
        down, up = solve(state, layer, c, ratio=ratio, rank_fraction=frac)
        ranks[name] = down.shape[0]
        smaller = down.shape[0] * (layer.in_features + layer.out_features) < layer.in_features * layer.out_features
        if factorized and smaller:
            return make_lowrank(layer, down, up)
        with torch.no_grad():  # dense low-rank approximation (LASER, or a rank too high to save space)
            layer.weight.copy_((up.double() @ down.double()).to(layer.weight.dtype))
        return None

    aware = cfg.activation_aware
    if aware and samples is None:
        raise LeanLMError("activation-aware low-rank needs calibration samples; pass --calib or set activation_aware: false")
    method = Method(init=init, accumulate=accumulate, solve=solve_layer, needs_data=aware)
    run_steps(model, [Step("lowrank", method, cfg, list(modules))], samples if aware else None, progress)
    return {"ranks": ranks}


def lowrank_apply(model, cfg: LowRankConfig, modules: list[str], samples=None, progress: bool = True) -> dict:
    """Factor every targeted Linear (ratio from cfg.target/ratio, or cfg.energy / cfg.rank)."""
    ratio = uniform_ratio(model, cfg, modules) if cfg.target is not None else cfg.ratio
    return _run(model, cfg, modules, samples, progress, lambda name: (ratio, None))


def laser_apply(model, cfg: LaserConfig, modules: list[str], samples=None, progress: bool = True) -> dict:
    """LASER: layers matching cfg.layers keep that fraction of their rank, dense; the others are untouched."""
    chosen = {}
    for n in modules:
        frac = next((float(f) for pat, f in cfg.layers.items() if re.search(pat, n)), None)
        if frac is not None:
            chosen[n] = frac
    if not chosen:
        raise LeanLMError(f"laser: no targeted layer matches {list(cfg.layers)}; names look like "
                          f"{all_block_linears(model)[-1]}")
    return _run(model, cfg, list(chosen), samples, progress, lambda name: (None, chosen[name]))



METHODS = {"lowrank": (LowRankConfig, lowrank_apply), "laser": (LaserConfig, laser_apply)}
