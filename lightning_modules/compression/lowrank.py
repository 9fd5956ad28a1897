"""Low-rank decomposition, a Lightning callback (see base.py for the protocol).

A weighted layer is replaced by a chain of smaller dense layers, a plain `nn.Sequential` of
`nn.Linear`/`nn.Conv2d`, so evaluation (MACs, latency) and the saved artifact need nothing new:
    svd     Linear W (out x in)      -> Linear(in, r) -> Linear(r, out)        truncated SVD, sqrt(s) to each side
            Conv k x k (C_out, C_in) -> k x k (C_in, r) -> 1x1 (r, C_out)      the same SVD of the kernel as a
                                        C_out x (C_in k k) matrix (Zhang et al. 2015's channel decomposition)
    tucker  Conv k x k (C_out, C_in) -> 1x1 (C_in, r_in) -> k x k core (r_in, r_out) -> 1x1 (r_out, C_out)
                                        Tucker-2 on the channel modes (HOSVD, refined by HOOI sweeps)
    cp      Conv k x k (C_out, C_in) -> 1x1 (C_in, R) -> k x 1 depthwise -> 1 x k depthwise -> 1x1 (R, C_out)
                                        CP by alternating least squares (Lebedev et al. 2015)
Ranks come from one rule (`rank_by`): an explicit rank, a fraction of the full rank, the share of
squared singular values kept (energy), or VBMF's estimate (Nakajima et al. 2013).

Three layers, as in pruning.py: pure math on tensors (`svd_factors`, `tucker2_factors`,
`cp_factors`, the rank rules), module surgery (`Decomposition.build`, `replace_module`), and the
callback. The cut happens in `setup` (before Lightning builds the optimizer, which happens before
`on_fit_start`), so the factors are what fine-tuning trains. With `gradual_epochs > 0` the layers are
factored at full rank first, and after each of those epochs the rank steps down on a cubic ramp:
the current factors are multiplied out, decomposed again at the smaller rank and written back
zero-padded, with a `rank_mask_<i>` buffer beside them; `finalize` slices the masked components
away for good.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_modules.compression.base import (
    CompressionCallback,
    check_choice,
    check_fraction,
    check_int,
    check_number,
    resolve_aliases,
    training_batches,
)
from lightning_modules.layers import weighted_layers

log = logging.getLogger(__name__)

Factors = dict[str, torch.Tensor | None]  # named factor tensors of one layer; "bias" may be None

# ----------------------------------------------------------------------------- rank rules (pure)

RANK_RULES = ("rank", "fraction", "energy", "vbmf")


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r whose leading singular values keep at least `energy` of the sum of squares."""
    squares = singular_values.double().square()
    total = float(squares.sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(squares, 0) / total
    return min(int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=kept.dtype))) + 1, len(kept))


def vbmf_rank(singular_values: torch.Tensor, shape: tuple[int, int]) -> int:
    """Rank estimated by empirical variational Bayesian matrix factorization (Nakajima et al. 2013).

    The noise variance is the minimizer of VBMF's free energy over its analytic bounds; components
    whose singular value exceeds the resulting threshold are signal. Needs the full spectrum.
    """
    from scipy.optimize import minimize_scalar

    rows, cols = sorted(shape)  # L <= M
    s = singular_values.double().cpu().numpy()
    if rows <= 1 or len(s) < 2 or float((s**2).sum()) == 0.0:
        return 1
    alpha = rows / cols
    tau_bar = 2.5129 * math.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    top = min(math.ceil(rows / (1 + alpha)) - 1, len(s)) - 1  # index bounding the largest possible rank
    upper = float((s**2).sum()) / (rows * cols)
    lower = max(float(s[top + 1] ** 2) / (cols * x_bar), float((s[top + 1:] ** 2).mean()) / cols)

    def free_energy(sigma2: float) -> float:
        x = s**2 / (cols * sigma2)
        signal, noise = x[x > x_bar], x[x <= x_bar]
        tau = 0.5 * (signal - (1 + alpha) + ((signal - (1 + alpha)) ** 2 - 4 * alpha) ** 0.5)
        return float((noise - _log(noise)).sum() + (signal - tau).sum() + _log((tau + 1) / signal).sum()
                     + alpha * _log(tau / alpha + 1).sum() + (rows - len(s)) * math.log(sigma2))

    if upper <= lower:
        sigma2 = upper
    else:
        sigma2 = float(minimize_scalar(free_energy, bounds=(lower, upper), method="bounded").x)
    threshold = math.sqrt(cols * sigma2 * x_bar)
    return max(1, int((s > threshold).sum()))


def _log(values: np.ndarray) -> np.ndarray:  # log that passes the empty side of a split spectrum
    return np.log(values) if len(values) else np.zeros(0)


def rule_rank(rule: str, value: float | int | None, singular_values: torch.Tensor, shape: tuple[int, int]) -> int:
    """The rank one rule picks for a matrix with these singular values, clamped to [1, full rank]."""
    full = len(singular_values)
    if rule == "rank":
        rank = int(value)
    elif rule == "fraction":
        rank = int(round(float(value) * full))
    elif rule == "energy":
        rank = energy_rank(singular_values, float(value))
    elif rule == "vbmf":
        rank = vbmf_rank(singular_values, shape)
    else:
        check_choice("rank_by", rule, RANK_RULES)
    return max(1, min(rank, full))


def scheduled_rank(full: int, target: int, step: int, steps: int) -> int:
    """Rank after `step` of `steps` reductions: a cubic ramp from `full` (step 0) to `target` (step `steps`)."""
    if steps <= 0 or step >= steps:
        return target
    return target + int(round((full - target) * (1 - step / steps) ** 3))


# ----------------------------------------------------------------------------- the math (pure)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the decomposition math on one thread, then restore the thread count (also a decorator).

    Its matrices are small (at most a few hundred rows): extra threads only synchronize, and on a
    busy machine their spinning makes LAPACK calls far slower (a 64 x 576 SVD in double: 1.2 s at
    two threads under load, 0.03 s at one; 100 CP-ALS sweeps of a 64x64x3x3 kernel: 53 s, 0.7 s).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def unfold(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-`mode` unfolding: that mode's index down the rows, the others (in order) along the columns."""
    return tensor.movedim(mode, 0).reshape(tensor.shape[mode], -1)


def _leading(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    return torch.linalg.svd(matrix, full_matrices=False).U[:, :rank]


@one_thread()
def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(matrix.detach().double())


@one_thread()
def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """W (out x in) ~= second @ first with first (rank x in), second (out x rank); and the energy kept.

    The singular values are split evenly (sqrt to each factor), so both factors train at one scale.
    """
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    root = s[:rank].sqrt()
    first = root[:, None] * vh[:rank]
    second = u[:, :rank] * root[None, :]
    energy = float(s[:rank].square().sum() / s.square().sum()) if float(s.square().sum()) > 0 else 1.0
    return first.to(weight.dtype), second.to(weight.dtype), energy


@one_thread()
def tucker2_factors(weight: torch.Tensor, rank_out: int, rank_in: int,
                    iterations: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Tucker-2 of a conv kernel (C_out, C_in, kh, kw) on its two channel modes.

    Returns u_out (C_out x rank_out), core (rank_out, rank_in, kh, kw), u_in (C_in x rank_in) with
    orthonormal columns, so W ~= core x_0 u_out x_1 u_in, and the energy kept ||core||^2 / ||W||^2.
    HOSVD starts it; each of `iterations` HOOI sweeps refits one factor with the other fixed.
    """
    w = weight.double()
    u_out = _leading(unfold(w, 0), rank_out)
    u_in = _leading(unfold(w, 1), rank_in)
    for _ in range(iterations):
        u_out = _leading(unfold(torch.einsum("oihw,ib->obhw", w, u_in), 0), rank_out)
        u_in = _leading(unfold(torch.einsum("oihw,oa->aihw", w, u_out), 1), rank_in)
    core = torch.einsum("oihw,oa,ib->abhw", w, u_out, u_in)
    total = float(w.square().sum())
    energy = float(core.square().sum()) / total if total > 0 else 1.0
    return u_out.to(weight.dtype), core.to(weight.dtype), u_in.to(weight.dtype), energy


def tucker2_compose(u_out: torch.Tensor, core: torch.Tensor, u_in: torch.Tensor) -> torch.Tensor:
    return torch.einsum("abhw,oa,ib->oihw", core, u_out, u_in)


@one_thread()
def cp_factors(tensor: torch.Tensor, rank: int, iterations: int = 100,
               seed: int = 0) -> tuple[list[torch.Tensor], float]:
    """CP decomposition by alternating least squares: tensor ~= sum_r outer(f_0[:, r], f_1[:, r], ...).

    Starts from the leading singular vectors of the unfoldings (random columns where a mode has
    fewer than `rank`); a small ridge keeps each least-squares step well posed. The factors come
    back balanced (every factor's column r has the same norm) and with the fit
    1 - ||tensor - approximation||^2 / ||tensor||^2.
    """
    x = tensor.double()
    generator = torch.Generator().manual_seed(seed)
    factors = []
    for mode, size in enumerate(x.shape):
        leading = _leading(unfold(x, mode), min(rank, size))
        extra = torch.randn(size, rank - leading.shape[1], generator=generator, dtype=x.dtype) / math.sqrt(size)
        factors.append(torch.cat([leading, extra.to(x.device)], dim=1))
    for _ in range(iterations):
        for mode in range(x.dim()):
            others = [f for m, f in enumerate(factors) if m != mode]
            gram = torch.ones(rank, rank, dtype=x.dtype, device=x.device)
            for f in others:
                gram = gram * (f.T @ f)
            gram = gram + 1e-9 * (float(gram.diagonal().mean()) + 1e-30) * torch.eye(rank, dtype=x.dtype, device=x.device)
            product = unfold(x, mode) @ _khatri_rao(others)
            factors[mode] = torch.linalg.solve(gram, product.T).T
    approximation = cp_compose(factors)
    total = float(x.square().sum())
    fit = 1.0 - float((x - approximation).square().sum()) / total if total > 0 else 1.0
    return [f.to(tensor.dtype) for f in _balance(factors)], fit


def _khatri_rao(factors: list[torch.Tensor]) -> torch.Tensor:
    """Column-wise Kronecker product, rows ordered like `unfold`'s columns (last factor fastest)."""
    product = factors[0]
    for f in factors[1:]:
        product = (product[:, None, :] * f[None, :, :]).reshape(-1, f.shape[1])
    return product


def _balance(factors: list[torch.Tensor]) -> list[torch.Tensor]:
    norms = [f.norm(dim=0) for f in factors]
    weight = torch.stack(norms).prod(dim=0)
    share = weight.clamp_min(1e-30) ** (1 / len(factors))
    return [f / n.clamp_min(1e-30) * share for f, n in zip(factors, norms, strict=True)]


def cp_compose(factors: list[torch.Tensor]) -> torch.Tensor:
    shape = [f.shape[0] for f in factors]
    return (_khatri_rao(factors[:1]) @ _khatri_rao(factors[1:]).T).reshape(shape)


# ----------------------------------------------------------------------------- module surgery


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


#: attribute naming the decomposition whose chain a module is: another decomposition in the same run leaves the
#: chain's layers alone and out of its summary (cp after svd sees svd's 1x1 chains, not 1x1 layers of the model)
CHAIN_OF = "lowrank_chain_of"


def mark_chain(chain: nn.Module, decomposition: str) -> nn.Module:
    setattr(chain, CHAIN_OF, decomposition)
    return chain


def in_chain(model: nn.Module, name: str) -> bool:
    """Whether the layer `name` is part of a factored chain (the layers of the model as built are not)."""
    parent = name.rpartition(".")[0]
    return bool(parent) and hasattr(model.get_submodule(parent), CHAIN_OF)


def _mask_name(dim: int) -> str:
    return f"rank_mask_{dim}"


class Decomposition:
    """How one decomposition turns a layer into factors and factors into a chain of layers.

    Factors are named tensors; `RANK_AXES` says which axis of which factor runs along each rank
    dimension, so padding (gradual mode) and slicing (finalize) are the same code for every kind.
    """

    layer_types: tuple[type[nn.Module], ...] = ()  # the layer types it can factor
    default_iterations = 0
    RANK_NAMES: tuple[str, ...] = ("rank",)
    RANK_AXES: dict[str, tuple[tuple[int, int], ...]] = {}  # factor -> ((rank dim, axis), ...)

    def unsupported(self, module: nn.Module) -> str | None:
        """Why this layer cannot be decomposed, or None."""
        return None

    def spectra(self, weight: torch.Tensor) -> list[tuple[torch.Tensor, tuple[int, int]]]:
        """(singular values, matrix shape) of the matrix behind each rank dimension."""
        raise NotImplementedError

    def full_ranks(self, spectra: list[tuple[torch.Tensor, tuple[int, int]]]) -> tuple[int, ...]:
        return tuple(len(s) for s, _ in spectra)

    def choose_ranks(self, rule: str, value: Any, spectra: list[tuple[torch.Tensor, tuple[int, int]]]) -> tuple[int, ...]:
        values = value if isinstance(value, (list, tuple)) else [value] * len(spectra)
        return tuple(rule_rank(rule, v, s, shape) for v, (s, shape) in zip(values, spectra, strict=True))

    def params_after(self, module: nn.Module, ranks: tuple[int, ...]) -> int:
        raise NotImplementedError

    def decompose(self, weight: torch.Tensor, ranks: tuple[int, ...], iterations: int,
                  seed: int) -> tuple[Factors, float]:
        raise NotImplementedError

    def compose(self, factors: Factors) -> torch.Tensor:
        raise NotImplementedError

    def build(self, module: nn.Module, factors: Factors, compact: bool) -> nn.Sequential:
        """The chain of layers computing the factored layer; `compact` drops factors that save nothing."""
        raise NotImplementedError

    def read(self, chain: nn.Sequential) -> Factors:
        """The factors of a chain this decomposition built with compact=False."""
        raise NotImplementedError

    def geometry(self, chain: nn.Sequential) -> Any:
        """What `build` reads of the original layer, recovered from a chain built with compact=False."""
        raise NotImplementedError

    def write(self, chain: nn.Sequential, factors: Factors) -> None:
        """Copy factors of the chain's own shapes into its parameters (the optimizer keeps them)."""
        fresh = self.build(self.geometry(chain), factors, compact=False)
        with torch.no_grad():
            for old, new in zip(chain.parameters(), fresh.parameters(), strict=True):
                old.copy_(new)

    # -- rank axes, shared by every kind
    def pad(self, factors: Factors, ranks: tuple[int, ...]) -> Factors:
        """Zero-pad every rank dimension up to `ranks` (active components first)."""
        padded = dict(factors)
        for key, axes in self.RANK_AXES.items():
            tensor = padded[key]
            for dim, axis in axes:
                missing = ranks[dim] - tensor.shape[axis]
                if missing > 0:
                    shape = list(tensor.shape)
                    shape[axis] = missing
                    tensor = torch.cat([tensor, tensor.new_zeros(shape)], dim=axis)
            padded[key] = tensor
        return padded

    def slice(self, factors: Factors, ranks: tuple[int, ...]) -> Factors:
        """Keep the first `ranks[d]` components of every rank dimension d."""
        sliced = dict(factors)
        for key, axes in self.RANK_AXES.items():
            tensor = sliced[key]
            for dim, axis in axes:
                tensor = tensor.narrow(axis, 0, ranks[dim])
            sliced[key] = tensor.contiguous()
        return sliced


def _like(module: nn.Module) -> dict[str, Any]:
    return {"device": module.weight.device, "dtype": module.weight.dtype}


def _bias(module: nn.Module) -> torch.Tensor | None:
    return None if module.bias is None else module.bias.detach().clone()


class SVD(Decomposition):
    """Truncated SVD of the weight as a matrix: out x (everything else).

    Linear (out x in) -> Linear(in, r, no bias) -> Linear(r, out, the original bias).
    Conv (C_out, C_in, kh, kw) -> Conv kh x kw (C_in -> r, the layer's stride and padding, no bias)
    -> 1x1 (r -> C_out, the original bias): the kernel matricized as C_out x (C_in kh kw). Both factors
    are kept as matrices (`first` r x (C_in kh kw), `second` C_out x r); `build` gives them their shapes.
    """

    layer_types = (nn.Linear, nn.Conv2d)
    RANK_AXES = {"first": ((0, 0),), "second": ((0, 1),)}

    def unsupported(self, module):
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            return f"grouped convolution (groups={module.groups}): SVD factors full channel mixing only"
        return None

    def spectra(self, weight):
        matrix = weight.detach().flatten(1)
        return [(singular_values(matrix), tuple(matrix.shape))]

    def params_after(self, module, ranks):
        (rank,) = ranks
        out_features, in_features = module.weight.flatten(1).shape
        return rank * (in_features + out_features) + (out_features if module.bias is not None else 0)

    def decompose(self, weight, ranks, iterations, seed):
        first, second, energy = svd_factors(weight.detach().flatten(1), ranks[0])
        return {"first": first, "second": second}, energy

    def compose(self, factors):
        return factors["second"] @ factors["first"]

    def build(self, module, factors, compact):
        first, second, bias = factors["first"], factors["second"], factors.get("bias")
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            spatial = first.reshape(first.shape[0], first.shape[1] // (kh * kw), kh, kw)
            return nn.Sequential(_conv(module, spatial, None, module), _conv(module, second[:, :, None, None], bias))
        down = nn.Linear(first.shape[1], first.shape[0], bias=False, **_like(module))
        up = nn.Linear(second.shape[1], second.shape[0], bias=bias is not None, **_like(module))
        with torch.no_grad():
            down.weight.copy_(first)
            up.weight.copy_(second)
            if bias is not None:
                up.bias.copy_(bias)
        return nn.Sequential(down, up)

    def geometry(self, chain):
        return chain[0]  # a conv chain's first layer keeps the kernel, stride and padding of the original

    def read(self, chain):
        return {"first": chain[0].weight.detach().flatten(1), "second": chain[1].weight.detach().flatten(1),
                "bias": _bias(chain[1])}


class Tucker2(Decomposition):
    """Conv (C_out, C_in, k, k) -> 1x1 (C_in -> r_in) -> k x k core (r_in -> r_out) -> 1x1 (r_out -> C_out).

    Ranks are (r_out, r_in). A factor whose rank equals its channel count is square and saves
    nothing: in the compact form it is folded into the core and its 1x1 layer left out.
    """

    layer_types = (nn.Conv2d,)
    default_iterations = 2
    RANK_NAMES = ("out", "in")
    RANK_AXES = {"u_out": ((0, 1),), "core": ((0, 0), (1, 1)), "u_in": ((1, 1),)}

    def unsupported(self, module):
        if module.groups != 1:
            return f"grouped convolution (groups={module.groups}): Tucker-2 factors full channel mixing only"
        return None

    def spectra(self, weight):
        w = weight.detach().double()
        return [(singular_values(unfold(w, mode)), tuple(unfold(w, mode).shape)) for mode in (0, 1)]

    def params_after(self, module, ranks):
        rank_out, rank_in = ranks
        kh, kw = module.kernel_size
        params = rank_out * rank_in * kh * kw + (module.out_channels if module.bias is not None else 0)
        params += 0 if rank_in == module.in_channels else rank_in * module.in_channels
        params += 0 if rank_out == module.out_channels else rank_out * module.out_channels
        return params

    def decompose(self, weight, ranks, iterations, seed):
        u_out, core, u_in, energy = tucker2_factors(weight.detach(), ranks[0], ranks[1], iterations)
        return {"u_out": u_out, "core": core, "u_in": u_in}, energy

    def compose(self, factors):
        return tucker2_compose(factors["u_out"], factors["core"], factors["u_in"])

    def build(self, module, factors, compact):
        u_out, core, u_in, bias = factors["u_out"], factors["core"], factors["u_in"], factors.get("bias")
        keep_in = not (compact and u_in.shape[1] == u_in.shape[0])
        keep_out = not (compact and u_out.shape[1] == u_out.shape[0])
        if not keep_in:
            core = torch.einsum("abhw,ib->aihw", core, u_in)
        if not keep_out:
            core = torch.einsum("abhw,oa->obhw", core, u_out)
        layers: list[nn.Conv2d] = []
        if keep_in:
            layers.append(_conv(module, u_in.T[:, :, None, None], None))
        layers.append(_conv(module, core, None if keep_out else bias, module))
        if keep_out:
            layers.append(_conv(module, u_out[:, :, None, None], bias))
        return nn.Sequential(*layers)

    def geometry(self, chain):
        core = chain[1]
        return _ConvGeometry(core.kernel_size, core.stride, core.padding, core.dilation, core.padding_mode, core.weight)

    def read(self, chain):
        return {"u_in": chain[0].weight.detach()[:, :, 0, 0].T, "core": chain[1].weight.detach(),
                "u_out": chain[2].weight.detach()[:, :, 0, 0], "bias": _bias(chain[2])}


class CP(Decomposition):
    """Conv (C_out, C_in, kh, kw) -> 1x1 (C_in -> R) -> kh x 1 depthwise -> 1 x kw depthwise -> 1x1 (R -> C_out).

    Its one rank R is given explicitly, or by the rule on the channel modes (the larger of the two).
    """

    layer_types = (nn.Conv2d,)
    default_iterations = 100
    RANK_AXES = {"a": ((0, 1),), "b": ((0, 1),), "h": ((0, 1),), "v": ((0, 1),)}

    def unsupported(self, module):
        if module.groups != 1:
            return f"grouped convolution (groups={module.groups}): CP factors full channel mixing only"
        if module.kernel_size == (1, 1):
            return "1x1 kernel: CP adds nothing to a matrix factorization (use svd or tucker)"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}: a separable kernel matches the layer only with zero padding"
        return None

    def spectra(self, weight):
        return Tucker2().spectra(weight)

    def full_ranks(self, spectra):
        return (max(len(s) for s, _ in spectra),)

    def choose_ranks(self, rule, value, spectra):
        if rule == "rank":
            return (max(1, int(value)),)
        return (max(rule_rank(rule, value, s, shape) for s, shape in spectra),)

    def params_after(self, module, ranks):
        (rank,) = ranks
        kh, kw = module.kernel_size
        bias = module.out_channels if module.bias is not None else 0
        return rank * (module.in_channels + kh + kw + module.out_channels) + bias

    def decompose(self, weight, ranks, iterations, seed):
        (a, b, h, v), fit = cp_factors(weight.detach(), ranks[0], iterations, seed)
        return {"a": a, "b": b, "h": h, "v": v}, fit

    def compose(self, factors):
        return cp_compose([factors["a"], factors["b"], factors["h"], factors["v"]])

    def build(self, module, factors, compact):
        a, b, h, v, bias = factors["a"], factors["b"], factors["h"], factors["v"], factors.get("bias")
        rank = a.shape[1]
        (sh, sw), (dh, dw) = module.stride, module.dilation
        if isinstance(module.padding, str):
            pad_h = pad_w = module.padding
        else:
            pad_h, pad_w = (module.padding[0], 0), (0, module.padding[1])
        like = _like(module)
        vertical = nn.Conv2d(rank, rank, (h.shape[0], 1), stride=(sh, 1), padding=pad_h, dilation=(dh, 1),
                             groups=rank, bias=False, **like)
        horizontal = nn.Conv2d(rank, rank, (1, v.shape[0]), stride=(1, sw), padding=pad_w, dilation=(1, dw),
                               groups=rank, bias=False, **like)
        with torch.no_grad():
            vertical.weight.copy_(h.T[:, None, :, None])
            horizontal.weight.copy_(v.T[:, None, None, :])
        return nn.Sequential(_conv(module, b.T[:, :, None, None], None), vertical, horizontal,
                             _conv(module, a[:, :, None, None], bias))

    def geometry(self, chain):
        vertical, horizontal = chain[1], chain[2]
        padding = vertical.padding if isinstance(vertical.padding, str) else (vertical.padding[0], horizontal.padding[1])
        return _ConvGeometry((vertical.kernel_size[0], horizontal.kernel_size[1]),
                             (vertical.stride[0], horizontal.stride[1]), padding,
                             (vertical.dilation[0], horizontal.dilation[1]), "zeros", vertical.weight)

    def read(self, chain):
        return {"b": chain[0].weight.detach()[:, :, 0, 0].T, "h": chain[1].weight.detach()[:, 0, :, 0].T,
                "v": chain[2].weight.detach()[:, 0, 0, :].T, "a": chain[3].weight.detach()[:, :, 0, 0],
                "bias": _bias(chain[3])}


@dataclass
class _ConvGeometry:
    """What `build` reads from a convolution: kernel, stride, padding, dilation, and its dtype/device."""

    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] | str
    dilation: tuple[int, int]
    padding_mode: str
    weight: torch.Tensor


def _conv(like: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None,
          geometry: nn.Module | None = None) -> nn.Conv2d:
    """A Conv2d holding `weight`; it copies stride/padding/dilation from `geometry` (1x1 stride 1 without)."""
    out_channels, in_channels, kh, kw = weight.shape
    settings: dict[str, Any] = {}
    if geometry is not None:
        settings = {"stride": geometry.stride, "padding": geometry.padding, "dilation": geometry.dilation,
                    "padding_mode": geometry.padding_mode}
    conv = nn.Conv2d(in_channels, out_channels, (kh, kw), bias=bias is not None, **settings,
                     device=like.weight.device, dtype=like.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    return conv


#: decomposition name -> its code; a new kind registers here and touches nothing else
DECOMPOSITIONS: dict[str, Decomposition] = {"svd": SVD(), "tucker": Tucker2(), "cp": CP()}


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- the callback


@dataclass
class LayerPlan:
    """One weighted layer's facts: what was decided for it and, once cut, what it became."""

    layer: str
    type: str
    shape: str
    full_rank: tuple[int, ...] = ()
    rank: tuple[int, ...] = ()          # target (deployable) ranks
    current: tuple[int, ...] = ()       # ranks the layer has now (gradual mode steps down to `rank`)
    start: tuple[int, ...] = ()         # ranks of the training-time chain (its parameter shapes)
    energy_kept: float | None = None
    measured_speedup: float | None = None  # dense layer latency / factored chain latency (min_speedup)
    params_before: int = 0
    params_after: int = 0
    skipped: str = ""


def _check_rank_value(key: str, rule: str, value: Any) -> None:
    if rule == "rank":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key}={value!r} is not valid for rank_by='rank'; allowed: an integer >= 1")
    elif rule in ("fraction", "energy"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
            raise ValueError(f"{key}={value!r} is not valid for rank_by={rule!r}; allowed: a number in (0, 1]")
    elif value is not None:
        raise ValueError(f"{key}={value!r} is not valid for rank_by='vbmf'; allowed: null (VBMF estimates each rank)")


class LowRankDecomposition(CompressionCallback):
    """Replace layers by low-rank chains of smaller dense layers, then fine-tune them.

    Args:
        decomposition: `svd` (Linear and Conv2d layers), `tucker` or `cp` (Conv2d layers).
        rank: the rank setting, read by `rank_by`: an integer rank, a fraction of the full rank,
            an energy share, or null for `vbmf`.
        rank_by: `rank` | `fraction` | `energy` (smallest rank keeping that share of the squared
            singular values) | `vbmf` (variational Bayesian estimate). Tucker applies the rule to
            each channel mode; CP takes the larger of the two modes' ranks.
        layer_ranks: {layer name: rank setting} overrides, read by the same rule; Tucker accepts a
            pair [out, in].
        skip_layers: layer names to leave alone; `first` and `last` stand for the first and last
            layer the decomposition factors.
        layer_types: null (every type the decomposition factors: svd Linear and Conv2d, tucker and cp
            Conv2d), or a list of those type names: `[Linear]` keeps svd off the convolutions where
            tucker or cp factor them.
        conv_kernel_sizes: null (convolutions of every kernel size), or the square kernel sizes of the
            convolutions it factors: `[1]` keeps svd to the 1x1 convolutions (matrices, like Linear
            layers) where cp factors the k x k ones.
        rank_multiple: round every chosen rank up to a multiple of this (clamped to the full rank):
            CPU kernels run channel counts in vectors of 8 or 16, so a rank of 5 costs what 8 does.
        min_saving: leave a layer alone unless factoring removes at least this share of its
            parameters (0: any saving); layers that would not shrink are always left alone.
        channels_last: lay the finalized model out channels-last (NHWC); oneDNN runs 1x1
            convolutions over few channels several times faster that way than in NCHW.
        gradual_epochs: 0 cuts to the target ranks once, before fine-tuning; N > 0 factors at
            full rank and steps the ranks down after each of the first N epochs (cubic ramp).
        min_speedup: null, or leave a layer alone unless its factored chain runs at least this much
            faster than the dense layer, timed side by side at `speed_batch` on the run's hardware
            and threads before the cut: fewer MACs do not always mean less time (an extra pass over
            the activations, thin 1x1 or depthwise convolutions), so a layer is factored only where
            it pays on the machine. Needs the training data for the layers' input shapes.
        speed_batch: the batch size at which `min_speedup` times the layers.
        iterations: HOOI sweeps (tucker) or ALS sweeps (cp); null for the decomposition's default.
        seed: seed of CP's random starting columns.
    """

    def __init__(
        self,
        decomposition: str,
        rank: float | int | None,
        rank_by: str = "fraction",
        layer_ranks: dict[str, Any] | None = None,
        skip_layers: Sequence[str] = (),
        layer_types: Sequence[str] | None = None,
        conv_kernel_sizes: Sequence[int] | None = None,
        rank_multiple: int = 1,
        min_saving: float = 0.0,
        channels_last: bool = False,
        gradual_epochs: int = 0,
        min_speedup: float | None = None,
        speed_batch: int = 32,
        iterations: int | None = None,
        seed: int = 0,
    ) -> None:
        self.kind = DECOMPOSITIONS[check_choice("decomposition", decomposition, tuple(DECOMPOSITIONS))]
        check_choice("rank_by", rank_by, RANK_RULES)
        _check_rank_value("rank", rank_by, rank)
        self.layer_ranks = {name: self._check_override(name, rank_by, value) for name, value in (layer_ranks or {}).items()}
        self.layer_types = self._check_layer_types(decomposition, layer_types)
        self.conv_kernel_sizes = self._check_kernel_sizes(conv_kernel_sizes)
        self.rank_multiple = check_int("rank_multiple", rank_multiple, 1)
        self.min_saving = check_fraction("min_saving", min_saving)
        self.gradual_epochs = check_int("gradual_epochs", gradual_epochs, 0)
        check_number("min_speedup", min_speedup, 0, bounds="(]", optional=True, allowed="null or a number > 0")
        self.speed_batch = check_int("speed_batch", speed_batch, 1)
        check_number("iterations", iterations, 0, integer=True, optional=True)
        self.name = decomposition
        self.rank = rank
        self.rank_by = rank_by
        self.skip_layers = list(skip_layers)
        self.channels_last = bool(channels_last)
        self.min_speedup = None if min_speedup is None else float(min_speedup)
        self.iterations = self.kind.default_iterations if iterations is None else iterations
        self.seed = seed
        self.cut = False
        self.step = 0  # rank reductions done (gradual mode)
        self.plans: dict[str, LayerPlan] = {}

    def _check_layer_types(self, decomposition: str, names: Sequence[str] | None) -> tuple[type[nn.Module], ...]:
        supported = {kind.__name__: kind for kind in self.kind.layer_types}
        if names is None:
            return self.kind.layer_types
        if isinstance(names, str) or not names or any(name not in supported for name in names):
            raise ValueError(f"layer_types={names!r} is not valid for decomposition={decomposition!r}; "
                             f"allowed: null or a list of {', '.join(supported)}")
        return tuple(supported[name] for name in names)

    @staticmethod
    def _check_kernel_sizes(sizes: Sequence[int] | None) -> tuple[int, ...] | None:
        if sizes is None:
            return None
        if isinstance(sizes, str) or not sizes or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in sizes):
            raise ValueError(f"conv_kernel_sizes={sizes!r} is not valid; allowed: null or a list of integers >= 1 "
                             f"(square kernel sizes, e.g. [1])")
        return tuple(sizes)

    def takes(self, module: nn.Module) -> bool:
        """Whether this decomposition is asked to factor the layer (by type, and a convolution by kernel size)."""
        if not isinstance(module, self.layer_types):
            return False
        return (self.conv_kernel_sizes is None or not isinstance(module, nn.Conv2d)
                or module.kernel_size in {(k, k) for k in self.conv_kernel_sizes})

    def _check_override(self, name: str, rule: str, value: Any) -> Any:
        if rule == "vbmf":
            raise ValueError(f"layer_ranks.{name}={value!r} is not valid with rank_by='vbmf'; "
                             f"allowed: layer_ranks with rank_by in rank, fraction, energy")
        modes = self.kind.RANK_NAMES
        if not hasattr(value, "__len__") or isinstance(value, str):
            _check_rank_value(f"layer_ranks.{name}", rule, value)
            return value
        values = list(value)
        if len(modes) == 1 or len(values) != len(modes):
            pair = f" or a pair [{', '.join(modes)}]" if len(modes) > 1 else ""
            raise ValueError(f"layer_ranks.{name}={values!r} is not valid; allowed: one rank setting{pair}")
        for mode, entry in zip(modes, values, strict=True):
            _check_rank_value(f"layer_ranks.{name}.{mode}", rule, entry)
        return values

    @property
    def state_key(self) -> str:
        # several decompositions may run in one Trainer (tucker for the convolutions, svd for the rest)
        return self._generate_state_key(decomposition=self.name)

    # -- hooks: each checks a flag and hands off to one worker
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning builds the optimizer after `setup` and before `on_fit_start`: cutting here lets
        # it see the factors. A resumed run is cut again to the same shapes, then its state loads.
        if stage == "fit" and not self.cut:
            example = None
            if self.min_speedup is not None:
                example = training_batches(trainer, 1, f"{self.name} min_speedup")[0][0][:1]
            self.decompose(pl_module.model, example)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.step < self.gradual_epochs:
            self.reduce(pl_module.model, trainer.optimizers)

    # -- the workers
    def decompose(self, model: nn.Module, example: torch.Tensor | None = None) -> None:
        """Plan every layer, then replace the chosen ones by their factor chains.

        `example`, an input batch of the model, gives the layers' input shapes for `min_speedup`.

        Raises:
            ValueError: min_speedup is set and no example input or no timer (attach_timer) is given.
        """
        self.plans = self.plan(model, example)
        for name, plan in self.plans.items():
            if plan.skipped:
                continue
            module = model.get_submodule(name)
            plan.start = plan.full_rank if self.gradual_epochs else plan.rank
            factors, plan.energy_kept = self.kind.decompose(module.weight, plan.start, self.iterations, self.seed)
            factors["bias"] = _bias(module)
            chain = mark_chain(self.kind.build(module, factors, compact=not self.gradual_epochs), self.name)
            if self.gradual_epochs:
                for dim, size in enumerate(plan.start):
                    chain.register_buffer(_mask_name(dim), torch.ones(size, device=module.weight.device))
            plan.current = plan.start
            replace_module(model, name, chain)
        self.cut = True

    def plan(self, model: nn.Module, example: torch.Tensor | None = None) -> dict[str, LayerPlan]:
        """The one filter deciding which layers are factored (and at which ranks); the others get a reason."""
        if self.min_speedup is not None and example is None:
            raise ValueError(f"{self.name}: min_speedup={self.min_speedup} times each layer on its input shape and "
                             f"needs an example input; allowed without one: min_speedup=null")
        if self.min_speedup is not None:
            self.require_timer()  # before any work
        layers = [(name, module) for name, module in weighted_layers(model) if not in_chain(model, name)]
        ours = [name for name, module in layers if self.takes(module)]
        skip = resolve_aliases(self.skip_layers, ours)  # first/last: of the layers this decomposition factors
        unknown = [entry for name, entry in skip.items() if name not in ours]
        unknown += [name for name in self.layer_ranks if name not in ours]
        if unknown:
            raise ValueError(f"{self.name}: unknown layers {unknown} in skip_layers/layer_ranks; "
                             f"allowed: first, last, {', '.join(ours)}")
        # names are checked above, before the one forward pass and the timings below
        input_shapes = layer_input_shapes(model, example) if self.min_speedup is not None else {}
        plans = {}
        for name, module in layers:
            params = _param_count(module)
            plan = LayerPlan(name, type(module).__name__, "x".join(map(str, module.weight.shape)),
                             params_before=params, params_after=params)
            plan.skipped = self._skip_reason(name, module, skip, plan) or self._slower_reason(module, plan, input_shapes.get(name))
            if plan.skipped:
                log.info("%s leaves %s alone: %s", self.name, name, plan.skipped)
            plans[name] = plan
        return plans

    def _skip_reason(self, name: str, module: nn.Module, skip: dict[str, str], plan: LayerPlan) -> str:
        if not isinstance(module, self.layer_types):
            kinds = " and ".join(kind.__name__ for kind in self.layer_types)
            limited = "" if self.layer_types == self.kind.layer_types else " here (layer_types)"
            return f"{plan.type} layer: {self.name} factors {kinds} layers{limited}"
        if not self.takes(module):
            sizes = " and ".join(f"{k}x{k}" for k in self.conv_kernel_sizes or ())
            kh, kw = module.kernel_size
            return f"{kh}x{kw} kernel: {self.name} factors {sizes} convolutions only here (conv_kernel_sizes)"
        if name in skip:
            return f"listed in skip_layers as {skip[name]!r}"
        reason = self.kind.unsupported(module)
        if reason is not None:
            return reason
        spectra = self.kind.spectra(module.weight)
        plan.full_rank = self.kind.full_ranks(spectra)
        chosen = self.kind.choose_ranks(self.rank_by, self.layer_ranks.get(name, self.rank), spectra)
        plan.rank = tuple(min(-(-r // self.rank_multiple) * self.rank_multiple, max(r, f))
                          for r, f in zip(chosen, plan.full_rank, strict=True))
        after = self.kind.params_after(module, plan.rank)
        if after > (1.0 - self.min_saving) * plan.params_before or after >= plan.params_before:
            return (f"rank {_ranks_text(plan.rank)} would keep {after} of {plan.params_before} parameters "
                    f"(min_saving={self.min_saving})")
        return ""

    def _slower_reason(self, module: nn.Module, plan: LayerPlan, input_shape: tuple[int, ...] | None) -> str:
        """Why factoring this layer does not pay in time (min_speedup), or "" when it does or is not asked."""
        if self.min_speedup is None or not plan.rank:
            return ""
        if input_shape is None:
            return "min_speedup: the example input never reached this layer, so it could not be timed"
        dense_ms, factored_ms, plan.measured_speedup = self.time_layer(module, plan.rank, input_shape)
        if plan.measured_speedup >= self.min_speedup:
            return ""
        return (f"rank {_ranks_text(plan.rank)} measured {factored_ms:.4f} ms against {dense_ms:.4f} ms dense at "
                f"batch {self.speed_batch} (median paired ratio {plan.measured_speedup:.2f}x < min_speedup={self.min_speedup})")

    def time_layer(self, module: nn.Module, ranks: tuple[int, ...],
                   input_shape: tuple[int, ...]) -> tuple[float, float, float]:
        """p50 latency (ms) of the dense layer and of its deployable chain at speed_batch, and the speedup.

        The chain's shapes are what matter for time, so the factors come from the cheap start (no
        HOOI/ALS sweeps). Both run in the deployed memory layout. The speedup is the median of the
        ratios of back-to-back pairs (see evaluation/latency.py: `paired_times`), steadier on a shared machine than a
        ratio of two medians. The timer is the one the pipeline handed over (attach_timer).
        """
        factors, _ = self.kind.decompose(module.weight, ranks, 0, self.seed)
        factors["bias"] = _bias(module)
        chain = self.kind.build(module, factors, compact=True)
        dense = copy.deepcopy(module)
        layout = torch.channels_last if self.channels_last and len(input_shape) == 3 else torch.contiguous_format
        inputs = torch.randn((self.speed_batch, *input_shape), device=module.weight.device)
        return self.require_timer().paired(_in_layout(dense.to(memory_format=layout), layout),
                                           _in_layout(chain.to(memory_format=layout), layout), inputs)

    @torch.no_grad()
    def reduce(self, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer] = (), step: int | None = None) -> None:
        """A step of the gradual schedule (the next one by default): refactor every chain at smaller ranks."""
        self.step = self.step + 1 if step is None else step
        for name, plan in self.plans.items():
            if plan.skipped:
                continue
            ranks = tuple(scheduled_rank(f, t, self.step, self.gradual_epochs)
                          for f, t in zip(plan.start, plan.rank, strict=True))
            if ranks == plan.current:
                continue
            chain = model.get_submodule(name)
            factors = self.kind.read(chain)
            new, plan.energy_kept = self.kind.decompose(self.kind.compose(factors), ranks, self.iterations, self.seed)
            new["bias"] = factors["bias"]
            self.kind.write(chain, self.kind.pad(new, plan.start))
            for dim, size in enumerate(ranks):
                getattr(chain, _mask_name(dim)).copy_((torch.arange(plan.start[dim]) < size).float())
            plan.current = ranks
            for optimizer in optimizers:  # moments of the old basis mean nothing in the new one
                for parameter in chain.parameters():
                    optimizer.state.pop(parameter, None)
        log.info("%s: rank reduction %d of %d done", self.name, self.step, self.gradual_epochs)

    # -- protocol
    def finalize(self, model: nn.Module) -> nn.Module:
        """Chains at their target ranks, masked components sliced away: smaller dense layers."""
        if not self.cut:
            self.decompose(model)
        if self.step < self.gradual_epochs:
            log.warning("%s: the gradual schedule stopped at step %d of %d; cutting to the target ranks without "
                        "fine-tuning", self.name, self.step, self.gradual_epochs)
            self.reduce(model, step=self.gradual_epochs)
        for name, plan in self.plans.items():
            if plan.skipped:
                continue
            chain = model.get_submodule(name)
            if any(buffer.startswith("rank_mask_") for buffer, _ in chain.named_buffers()):
                factors = self.kind.slice(self.kind.read(chain), plan.rank)
                replace_module(model, name, mark_chain(self.kind.build(self.kind.geometry(chain), factors, compact=True),
                                                       self.name))
            plan.params_after = _param_count(model.get_submodule(name))
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def summary(self, model: nn.Module) -> list[dict[str, Any]]:
        rows = []
        for plan in self.plans.values():
            row: dict[str, Any] = {"layer": plan.layer, "type": plan.type, "shape": plan.shape,
                                   "decomposition": "" if plan.skipped else self.name}
            for i, mode in enumerate(self.kind.RANK_NAMES):
                suffix = "" if len(self.kind.RANK_NAMES) == 1 else f"_{mode}"
                row[f"full_rank{suffix}"] = plan.full_rank[i] if plan.full_rank else ""
                row[f"rank{suffix}"] = plan.rank[i] if plan.rank else ""
            row.update({"energy_kept": "" if plan.energy_kept is None else plan.energy_kept,
                        "measured_speedup": "" if plan.measured_speedup is None else plan.measured_speedup,
                        "params_before": plan.params_before, "params_after": plan.params_after,
                        "skipped": plan.skipped})
            rows.append(row)
        return rows

    def state_dict(self) -> dict[str, Any]:
        return {"cut": self.cut, "step": self.step, "plans": {name: asdict(plan) for name, plan in self.plans.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.cut = state_dict["cut"]
        self.step = state_dict["step"]
        self.plans = {name: LayerPlan(**{k: tuple(v) if isinstance(v, list) else v for k, v in plan.items()})
                      for name, plan in state_dict["plans"].items()}


def layer_input_shapes(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """{layer name: its input's shape without the batch} of every Linear/Conv2d layer, for one example."""
    shapes: dict[str, tuple[int, ...]] = {}

    def recorder(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:  # returns None: the input stays
            shapes.setdefault(name, tuple(args[0].shape[1:]))
        return record

    hooks = [module.register_forward_pre_hook(recorder(name)) for name, module in weighted_layers(model)]
    training = model.training
    try:
        model.eval()  # train mode would move BatchNorm's running statistics
        with torch.no_grad():
            model(example.to(next(model.parameters()).device))
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    return shapes


def _in_layout(module: nn.Module, layout: torch.memory_format) -> nn.Module:
    """The module behind a conversion of its input to `layout` (the timed input is an NCHW tensor).

    Dense layer and chain pay the same conversion, so their ratio moves toward 1 but stays on its
    side of 1: the decision at min_speedup=1.0 is unchanged, a higher threshold is stricter.
    """
    if layout == torch.contiguous_format:
        return module.eval()
    return nn.Sequential(_ToLayout(layout), module).eval()


class _ToLayout(nn.Module):
    def __init__(self, layout: torch.memory_format) -> None:
        super().__init__()
        self.layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=self.layout)


def _ranks_text(ranks: tuple[int, ...]) -> str:
    return "x".join(map(str, ranks))
