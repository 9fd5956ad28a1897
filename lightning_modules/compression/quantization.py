"""Quantization methods, each a Lightning callback (see base.py for the protocol).

    PTQStatic   int8 weights and activations, activation ranges calibrated on training batches
    PTQDynamic  int8 weights, activations quantized at run time from each batch's own range
    QAT         fake quantization with a straight-through estimator, fine-tuned from the baseline
    LowBit      QAT at `bits` of 8..2, ternary or binary, with learned step sizes (LSQ)
    MixedPrecision  per-layer weight bits chosen from per-layer sensitivity under an average-bit budget

Three layers, as in pruning.py:
- the math: pure functions on tensors (`quant_range`, `quant_params`, `fake_quantize`,
  `lsq_quantize`) and observers that track a tensor's range (`minmax`, `moving_average`,
  `histogram` with a percentile);
- module surgery on a torch.fx graph: `prepare` (BatchNorm folded or wrapped, quantizers inserted
  after the model input and every Conv/Linear/add/pool output, Conv/Linear wrapped to
  fake-quantize their weights), `convert` (the deployable form: int8 weights and biases in int32
  as buffers, fixed activation scales, ReLU and ReLU6 folded into the clamp of the next quantizer);
- the callbacks.
The deployable form itself (the custom ops, Int8Layer, their ONNX translations and PT2E rewrite)
lives in ../deployable_int8.py, which evaluation imports to run it.
"""

from __future__ import annotations

import copy
import logging
import math
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from lightning_modules.compression.base import (
    CompressionCallback, check_bool, check_choice, check_int, check_number, select_layers, training_batches,
)
from lightning_modules.deployable_int8 import (
    DynamicInt8Linear,
    FixedQuantizeDequantize,
    Int8Layer,
    broadcast_along,
    float_layer,
    int8_layers,
)
from lightning_modules.layers import called_module, fold_batchnorm_in_graph, trace

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- the math


def quant_range(bits: int, signed: bool, restricted: bool = False) -> tuple[int, int]:
    """Integer range of a `bits`-bit code; `restricted` drops the most negative value so the
    range is symmetric (-127..127 for int8 weights, -1..1 for ternary)."""
    if signed:
        low = -(2 ** (bits - 1)) + (1 if restricted else 0)
        return low, 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def quant_params(min_val: torch.Tensor, max_val: torch.Tensor, qmin: int, qmax: int,
                 symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) mapping [min_val, max_val] (per tensor or per channel) onto [qmin, qmax].

    The range always contains 0 so that zero padding and ReLU's zeros are exact. Symmetric
    quantization puts the zero point in the middle of the range (0 for a signed code).
    """
    min_val = torch.clamp(min_val.float(), max=0.0)
    max_val = torch.clamp(max_val.float(), min=0.0)
    tiny = torch.finfo(torch.float32).eps
    if symmetric:
        bound = torch.maximum(-min_val, max_val)
        scale = torch.clamp(bound / ((qmax - qmin) / 2), min=tiny)
        zero_point = torch.full_like(scale, (qmin + qmax + 1) // 2, dtype=torch.int64)
    else:
        scale = torch.clamp((max_val - min_val) / (qmax - qmin), min=tiny)
        zero_point = torch.clamp(qmin - torch.round(min_val / scale), qmin, qmax).to(torch.int64)
    return scale, zero_point


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
             axis: int = 0) -> torch.Tensor:
    """The integer codes of `x` (as int64), rounded half to even like ONNX QuantizeLinear."""
    scale, zero_point = broadcast_along(scale, x, axis), broadcast_along(zero_point, x, axis)
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax).to(torch.int64)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                  axis: int = 0) -> torch.Tensor:
    """Quantize then dequantize, with a straight-through estimator: the gradient passes unchanged
    inside the range and is zero where the value was clipped (Bengio et al. 2013; Jacob et al. 2018)."""
    s, z = broadcast_along(scale, x, axis), broadcast_along(zero_point, x, axis).to(x.dtype)
    low, high = (qmin - z) * s, (qmax - z) * s
    clipped = torch.minimum(torch.maximum(x, low), high)
    exact = (torch.clamp(torch.round(x / s) + z, qmin, qmax) - z) * s
    return clipped + (exact - clipped).detach()


def lsq_quantize(x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int, axis: int = 0) -> torch.Tensor:
    """Learned step size quantization (Esser et al. 2020): symmetric codes x/s rounded with a
    straight-through estimator, and the step `s` learned by backprop with its gradient scaled by
    1/sqrt(numel * qmax) so it moves at the pace of the weights."""
    grad_scale = 1.0 / math.sqrt(max(x.numel() // max(step.numel(), 1), 1) * max(qmax, 1))
    s = broadcast_along(step, x, axis)
    s = (s - s * grad_scale).detach() + s * grad_scale
    codes = torch.clamp(x / s, qmin, qmax)
    codes = codes + (torch.round(codes) - codes).detach()
    return codes * s


def lsq_initial_step(x: torch.Tensor, qmax: int, per_channel: bool) -> torch.Tensor:
    """LSQ's initial step 2 E|x| / sqrt(qmax), per output channel or for the whole tensor."""
    flat = x.detach().reshape(x.shape[0], -1) if per_channel else x.detach().reshape(1, -1)
    return torch.clamp(2 * flat.abs().mean(1) / math.sqrt(max(qmax, 1)), min=1e-8)


# ----------------------------------------------------------------------------- observers


class Observer(nn.Module):
    """Tracks the range of the tensors it sees; `range()` gives (min, max) for `quant_params`."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    @property
    def initialized(self) -> bool:
        return bool(torch.isfinite(self.min_val))

    def observe(self, x: torch.Tensor) -> None:
        self.min_val.fill_(torch.minimum(self.min_val, x.detach().min()).item())
        self.max_val.fill_(torch.maximum(self.max_val, x.detach().max()).item())

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.initialized:
            raise RuntimeError(f"{type(self).__name__} has seen no data: calibrate before converting")
        return self.min_val, self.max_val


class MinMaxObserver(Observer):
    """The smallest and largest value seen over all batches."""


class MovingAverageObserver(Observer):
    """Exponential moving average of each batch's min and max (TF's and PyTorch's QAT default)."""

    def __init__(self, momentum: float = 0.1) -> None:
        super().__init__()
        self.momentum = momentum

    def observe(self, x: torch.Tensor) -> None:
        low, high = x.detach().min(), x.detach().max()
        if not self.initialized:
            self.min_val.fill_(low.item())
            self.max_val.fill_(high.item())
            return
        self.min_val.lerp_(low.to(self.min_val), self.momentum)
        self.max_val.lerp_(high.to(self.max_val), self.momentum)


class HistogramObserver(Observer):
    """A histogram of all values seen; the range is cut at the `percentile` of it on each side, so
    a few outliers do not stretch the scale (the percentile calibration of TensorRT and ORT).

    The bins span the first batch's range; later values outside it widen the range by re-binning
    the counts into the wider span."""

    def __init__(self, percentile: float = 99.99, bins: int = 2048) -> None:
        super().__init__()
        self.percentile = percentile
        self.bins = bins
        self.register_buffer("histogram", torch.zeros(bins, dtype=torch.float64))

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float().flatten().cpu()
        low, high = float(x.min()), float(x.max())
        if not self.initialized:
            self.min_val.fill_(min(low, 0.0))
            self.max_val.fill_(max(high, 1e-8))
        elif low < self.min_val or high > self.max_val:
            self._widen(min(low, float(self.min_val)), max(high, float(self.max_val)))
        self.histogram += torch.histc(x, self.bins, float(self.min_val), float(self.max_val)).to(torch.float64).to(
            self.histogram.device)

    def _widen(self, low: float, high: float) -> None:
        old_edges = torch.linspace(float(self.min_val), float(self.max_val), self.bins + 1, dtype=torch.float64)
        centres = ((old_edges[:-1] + old_edges[1:]) / 2).float()
        counts = self.histogram.cpu()
        widened = torch.zeros(self.bins, dtype=torch.float64)
        index = ((centres - low) / (high - low) * self.bins).long().clamp(0, self.bins - 1)
        widened.index_add_(0, index, counts)
        self.histogram.copy_(widened)
        self.min_val.fill_(low)
        self.max_val.fill_(high)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        super().range()
        cumulative = torch.cumsum(self.histogram, 0) / self.histogram.sum()
        tail = (100.0 - self.percentile) / 100.0
        width = (self.max_val - self.min_val) / self.bins
        low_bin = int(torch.searchsorted(cumulative, torch.tensor(tail, dtype=torch.float64)))
        high_bin = int(torch.searchsorted(cumulative, torch.tensor(1.0 - tail, dtype=torch.float64)))
        low = self.min_val + width * low_bin if self.min_val < 0 else self.min_val
        return low, self.min_val + width * min(high_bin + 1, self.bins)


OBSERVERS: dict[str, Callable[..., Observer]] = {
    "minmax": lambda cfg: MinMaxObserver(),
    "moving_average": lambda cfg: MovingAverageObserver(cfg.momentum),
    "histogram": lambda cfg: HistogramObserver(cfg.percentile),
}


# ----------------------------------------------------------------------------- the scheme


@dataclass(frozen=True)
class QuantScheme:
    """How weights and activations are quantized; validated when built.

    Args:
        weight_bits: bits of the weight codes, 2..8; `ternary` is 2 bits restricted to -1, 0, 1
            and `binary` is sign(w) times a per-channel step (1 bit).
        activation_bits: bits of the activation codes, 2..8 (8 for every int8 runtime).
        per_channel: one weight scale per output channel (else one per tensor).
        symmetric_weights: weights symmetric around 0 (int8 codes -127..127, zero point 0); else
            asymmetric uint8 codes with a zero point.
        symmetric_activations: activations as int8 around 0; else uint8 with a zero point.
        observer: `minmax`, `moving_average` or `histogram` (cut at `percentile`).
        learn_scales: LSQ steps for weights and PACT-like learned activation clipping (QAT only).
        reduce_range: 8-bit symmetric weights take the codes -63..63 (stored in int8), as ONNX Runtime's
            `reduce_range`. An x86 CPU without VNNI (AVX2; AVX-512 before VNNI) multiplies uint8
            activations by int8 weights with VPMADDUBSW, which adds each pair of products into a
            saturating 16-bit sum: 2 x 255 x 127 overflows it, 2 x 255 x 63 does not. With -127..127 the
            int8 file computed other numbers on such a CPU than on one with VNNI and than its simulation
            (2026-12-03, an AVX2 host: lenet5, resnet20 and a ReLU6 net several output steps off, up to
            38; with -63..63 none); one bit of weight resolution buys an artifact that computes the same
            on every x86 CPU.
    """

    weight_bits: int | str = 8
    activation_bits: int = 8
    per_channel: bool = True
    symmetric_weights: bool = True
    symmetric_activations: bool = False
    observer: str = "minmax"
    percentile: float = 99.99
    momentum: float = 0.1
    learn_scales: bool = False
    reduce_range: bool = True

    WEIGHT_BITS = (8, 7, 6, 5, 4, 3, 2, "ternary", "binary")

    def __post_init__(self) -> None:
        if isinstance(self.weight_bits, bool):  # True == 1 would pass as a choice
            raise ValueError(f"bits={self.weight_bits!r} is not valid; allowed: {', '.join(map(str, self.WEIGHT_BITS))}")
        check_choice("bits", self.weight_bits, self.WEIGHT_BITS)
        check_number("activation_bits", self.activation_bits, 2, 8, integer=True)
        check_choice("observer", self.observer, OBSERVERS)
        check_number("percentile", self.percentile, 50, 100, bounds="(]")
        check_number("momentum", self.momentum, 0, 1, bounds="(]")
        if not self.symmetric_weights and self.weight_bits != 8:
            raise ValueError(f"symmetric_weights=False is not valid with bits={self.weight_bits!r}; "
                             f"allowed: asymmetric weights at 8 bits only")

    @property
    def bits(self) -> int:
        """Storage bits per weight code."""
        return {"ternary": 2, "binary": 1}.get(self.weight_bits, self.weight_bits)  # type: ignore[arg-type]

    def weight_range(self) -> tuple[int, int]:
        if self.weight_bits == "binary":
            return -1, 1
        if self.weight_bits == "ternary":
            return -1, 1
        if not self.symmetric_weights:
            return quant_range(8, signed=False)
        if self.reduce_range and self.bits == 8:
            return quant_range(7, signed=True, restricted=True)
        return quant_range(self.bits, signed=True, restricted=True)

    def activation_range(self) -> tuple[int, int]:
        return quant_range(self.activation_bits, signed=self.symmetric_activations)

    def with_bits(self, bits: int | str) -> QuantScheme:
        return QuantScheme(**{**self.__dict__, "weight_bits": bits})


def weight_codes(weight: torch.Tensor, scheme: QuantScheme,
                 step: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale, zero_point) of a weight under `scheme`: codes are integers, scale per channel
    or per tensor. A learned `step` (LSQ) replaces the range-derived scale."""
    qmin, qmax = scheme.weight_range()
    flat = weight.detach().reshape(weight.shape[0], -1) if scheme.per_channel else weight.detach().reshape(1, -1)
    if scheme.weight_bits == "binary":
        scale = flat.abs().mean(1).clamp(min=1e-8)  # XNOR-Net's per-channel mean magnitude
        codes = torch.where(weight >= 0, 1, -1).to(torch.int64)
        return codes, scale, torch.zeros_like(scale, dtype=torch.int64)
    if step is not None:
        scale = step.detach().clamp(min=1e-8)
    elif scheme.weight_bits == "ternary":
        scale = _ternary_scale(flat)
    else:
        scale, _ = quant_params(flat.min(1).values, flat.max(1).values, qmin, qmax, scheme.symmetric_weights)
    if scheme.symmetric_weights:
        zero_point = torch.zeros_like(scale, dtype=torch.int64)
    else:
        _, zero_point = quant_params(flat.min(1).values, flat.max(1).values, qmin, qmax, False)
    codes = quantize(weight.detach(), scale, zero_point, qmin, qmax, axis=0)
    return codes, scale, zero_point


def _ternary_scale(flat: torch.Tensor) -> torch.Tensor:
    """Ternary weight networks' scale (Li & Liu 2016): the mean magnitude of the weights above the
    threshold 0.7 E|w|; codes are round(w / scale) clamped to -1, 0, 1."""
    threshold = 0.7 * flat.abs().mean(1, keepdim=True)
    above = flat.abs() > threshold
    magnitude = (flat.abs() * above).sum(1) / above.sum(1).clamp(min=1)
    return torch.clamp(magnitude, min=1e-8)


# ----------------------------------------------------------------------------- training-time modules


class ActivationQuantizer(nn.Module):
    """Observes activations (calibration) and/or fake-quantizes them (QAT, evaluation of the
    simulated model). With `learn_scales`, the step is a Parameter trained by LSQ from the
    calibrated range (PACT-like learned clipping)."""

    def __init__(self, scheme: QuantScheme) -> None:
        super().__init__()
        self.scheme = scheme
        self.observer = OBSERVERS[scheme.observer](scheme)
        self.observing = True
        self.fake_quant = False
        self.step: nn.Parameter | None = None

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        qmin, qmax = self.scheme.activation_range()
        if self.step is not None:
            scale = self.step.detach().clamp(min=1e-8).reshape(())
            zero_point = torch.tensor(0 if self.scheme.symmetric_activations else self._lsq_zero_point(scale, qmin))
            return scale, zero_point
        low, high = self.observer.range()
        return quant_params(low, high, qmin, qmax, self.scheme.symmetric_activations)

    def _lsq_zero_point(self, scale: torch.Tensor, qmin: int) -> int:
        low, _ = self.observer.range()
        return int(torch.clamp(qmin - torch.round(low / scale), qmin, self.scheme.activation_range()[1]))

    def learn(self) -> None:
        """Turn the calibrated scale into a learned step (LSQ)."""
        scale, _ = self.qparams()
        self.step = nn.Parameter(scale.reshape(1).clone())

    def forward(self, x: torch.Tensor, observe: bool = True) -> torch.Tensor:
        if self.observing and observe and (self.training or not self.observer.initialized or not self.fake_quant):
            self.observer.observe(x)
        if not self.fake_quant:
            return x
        qmin, qmax = self.scheme.activation_range()
        if self.step is not None:
            # codes round(x / s) + z clamped to [qmin, qmax], minus z: round(x / s) clamped to
            # [qmin - z, qmax - z], exactly what the deployed FixedQuantizeDequantize computes
            zero_point = int(self.qparams()[1])
            return lsq_quantize(x, self.step, qmin - zero_point, qmax - zero_point)
        scale, zero_point = self.qparams()
        return fake_quantize(x, scale.to(x), zero_point.to(x), qmin, qmax)


class QuantizedWeightLayer(nn.Module):
    """A Conv2d or Linear whose weight is fake-quantized on every forward (STE, or LSQ steps)."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, scheme: QuantScheme) -> None:
        super().__init__()
        self.layer = layer
        self.scheme = scheme
        self.fake_quant = True
        self.step: nn.Parameter | None = None
        if scheme.learn_scales and scheme.weight_bits != "binary":
            _, scale, _ = weight_codes(layer.weight, scheme)
            self.step = nn.Parameter(scale.clone())

    def float_weight(self) -> torch.Tensor:
        """The weight the int8 kernel will hold (before quantization)."""
        return self.layer.weight

    def quantized_weight(self) -> torch.Tensor:
        weight = self.float_weight()
        if not self.fake_quant:
            return weight
        qmin, qmax = self.scheme.weight_range()
        if self.step is not None:
            return lsq_quantize(weight, self.step, qmin, qmax, axis=0)
        codes, scale, zero_point = weight_codes(weight, self.scheme)
        if self.scheme.weight_bits == "binary":
            s = broadcast_along(scale, weight, 0)
            return weight + ((codes.to(weight) * s) - weight).detach()  # STE through sign()
        return fake_quantize(weight, scale.to(weight), zero_point.to(weight), qmin, qmax, axis=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.quantized_weight()
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, weight, self.layer.bias)
        return F.linear(x, weight, self.layer.bias)


class QuantizedConvBatchNorm(QuantizedWeightLayer):
    """A Conv2d and the BatchNorm2d after it, trained with BatchNorm folding simulated
    (Krishnamoorthi 2018, section 3.2; Jacob et al. 2018): the weight is folded with the running
    statistics, w gamma / sqrt(running_var + eps), and fake-quantized as the int8 kernel will hold
    it; the convolution's output is unscaled again and normalized by the BatchNorm. Until
    `frozen`, the BatchNorm normalizes with the batch's statistics and updates its running ones
    (the folded weight follows them); once frozen it uses the running statistics, so the output is
    exactly the folded convolution the deployable model computes. `folded()` makes the fold
    permanent (at convert)."""

    def __init__(self, layer: nn.Conv2d, batchnorm: nn.BatchNorm2d, scheme: QuantScheme) -> None:
        super().__init__(layer, scheme)
        self.bn = batchnorm
        self.batchnorm_frozen = False
        if self.step is not None:  # LSQ steps start from the folded weight's range, not the raw one
            self.step = nn.Parameter(weight_codes(self.float_weight(), scheme)[1].clone())

    def fold_factor(self) -> torch.Tensor:
        return self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)

    def float_weight(self) -> torch.Tensor:
        return self.layer.weight * self.fold_factor().reshape(-1, 1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = self.fold_factor()
        # a channel whose gamma is 0 has a zero folded weight; divide by 1 there (BatchNorm gives beta)
        safe_factor = torch.where(factor == 0, torch.ones_like(factor), factor).reshape(1, -1, 1, 1)
        y = self.layer._conv_forward(x, self.quantized_weight(), None) / safe_factor
        if self.layer.bias is not None:
            y = y + self.layer.bias.reshape(1, -1, 1, 1)
        if self.batchnorm_frozen:  # running statistics even in train mode: Lightning calls train() each epoch
            return F.batch_norm(y, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias,
                                training=False, eps=self.bn.eps)
        return self.bn(y)

    @torch.no_grad()
    def folded(self) -> QuantizedWeightLayer:
        """The plain wrapper of the convolution with the BatchNorm folded in for good (running
        statistics), keeping the learned weight steps: they were learned for the folded weight."""
        conv = copy.deepcopy(self.layer)
        factor = self.fold_factor()
        conv.weight.copy_(self.float_weight())
        bias = conv.bias if conv.bias is not None else torch.zeros_like(self.bn.running_mean)
        conv.bias = nn.Parameter((bias - self.bn.running_mean) * factor + self.bn.bias)
        wrapper = QuantizedWeightLayer(conv, self.scheme)
        wrapper.fake_quant, wrapper.step = self.fake_quant, self.step
        return wrapper


def int8_layer(wrapper: QuantizedWeightLayer, input_scale: torch.Tensor) -> Int8Layer:
    """The deployable form of a trained wrapper: its weight as integer codes under its scheme
    (and learned step), the bias at input_scale x weight_scale."""
    qmin, _ = wrapper.scheme.weight_range()
    codes, scale, zero_point = weight_codes(wrapper.layer.weight, wrapper.scheme, wrapper.step)
    return Int8Layer(wrapper.layer, codes, scale, zero_point, qmin, wrapper.scheme.bits, input_scale)


# ----------------------------------------------------------------------------- module surgery (torch.fx)

ADDS = (operator.add, torch.add, operator.iadd)
# ops whose output lies on the grid of their input: they reuse their input's quantizer
SHARED_MODULES = (nn.MaxPool2d, nn.Flatten, nn.Identity, nn.Dropout)
SHARED_FUNCTIONS = (torch.flatten, F.max_pool2d)
SHARED_METHODS = ("view", "reshape", "flatten")
OWN_SCALE_MODULES = (nn.AdaptiveAvgPool2d, nn.AvgPool2d)


def _relu_top(gm: fx.GraphModule, node: fx.Node) -> float | None:
    """The value a ReLU-like node clamps its input to from above (inf for ReLU, 6 for ReLU6 and any
    Hardtanh from 0); None for every other node. These clamp at 0 from below: the next quantizer, whose
    range starts at 0 and ends at or below that top, does their work (`convert` folds them)."""
    if node.op == "call_module":
        module = called_module(gm, node)
        if isinstance(module, nn.ReLU):
            return math.inf
        if isinstance(module, nn.Hardtanh) and module.min_val == 0:  # nn.ReLU6 is Hardtanh(0, 6)
            return float(module.max_val)
        return None
    if node.op == "call_function":
        return math.inf if node.target in (F.relu, torch.relu) else 6.0 if node.target is F.relu6 else None
    return math.inf if node.op == "call_method" and node.target == "relu" else None


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    return _relu_top(gm, node) is not None


def _is_shared(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(called_module(gm, node), SHARED_MODULES)
    if node.op == "call_function":
        return node.target in SHARED_FUNCTIONS
    return node.op == "call_method" and node.target in SHARED_METHODS


@dataclass
class Prepared:
    """What `prepare` inserted: activation quantizers and wrapped layers, by module name."""

    quantizers: dict[str, ActivationQuantizer]
    layers: dict[str, QuantizedWeightLayer]
    skipped: dict[str, str]


def _insert_quantizer(gm: fx.GraphModule, after: fx.Node, name: str, shared: bool = False) -> fx.Node:
    with gm.graph.inserting_after(after):
        quantized = gm.graph.call_module(name, (after,), {} if not shared else {"observe": False})
    after.replace_all_uses_with(quantized, delete_user_cb=lambda user: user is not quantized)
    return quantized


def _batchnorm_after(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 and isinstance(called_module(gm, users[0]), nn.BatchNorm2d) else None


def _wrap_conv_batchnorm(gm: fx.GraphModule, node: fx.Node, conv: nn.Conv2d, bn_node: fx.Node,
                         scheme: QuantScheme) -> QuantizedConvBatchNorm:
    """Take the BatchNorm node out of the graph: the wrapper of its convolution now applies it."""
    wrapper = QuantizedConvBatchNorm(conv, called_module(gm, bn_node), scheme)
    bn_node.replace_all_uses_with(node)
    gm.graph.erase_node(bn_node)
    return wrapper


BATCHNORM_MODES = ("fold", "freeze")


def prepare(model: nn.Module, scheme: QuantScheme, layer_schemes: dict[str, QuantScheme] | None = None,
            skip: Iterable[str] | dict[str, str] = (), batchnorm: str = "fold") -> tuple[fx.GraphModule, Prepared]:
    """Trace, handle BatchNorm, wrap every Conv2d/Linear to fake-quantize its weights and insert an
    activation quantizer on each tensor an int8 kernel reads or writes (the model input included).

    `batchnorm="fold"` folds each Conv2d's BatchNorm into it now, with the running statistics,
    which then never change; `"freeze"` keeps the BatchNorm beside its convolution with the fold
    simulated (QuantizedConvBatchNorm) until `freeze_batchnorm` and folds it at `convert`.
    ReLU (or ReLU6) after a layer or an add is quantized after it, so it can fold into the clamp: one
    quantizer instead of two around it (two made ONNX Runtime dequantize and requantize at the ReLU6s of
    mobilenetv2: 134 nodes, 71 with them folded).
    `layer_schemes` overrides the scheme per layer (mixed precision); `skip` leaves layers in float
    (names, or {name: reason} as select_layers gives them).
    """
    skip = skip if isinstance(skip, dict) else {name: "listed in skip_layers" for name in skip}
    gm = trace(copy.deepcopy(model) if not isinstance(model, fx.GraphModule) else model)
    if batchnorm == "fold":
        gm = fold_batchnorm_in_graph(gm)
    layer_schemes = layer_schemes or {}
    prepared = Prepared({}, {}, {})
    quantizer_of: dict[fx.Node, str] = {}  # node -> quantizer quantizing its output

    def new_quantizer(after: fx.Node) -> fx.Node:
        name = f"act_quant_{len(prepared.quantizers)}"
        prepared.quantizers[name] = ActivationQuantizer(scheme)
        gm.add_submodule(name, prepared.quantizers[name])
        quantized = _insert_quantizer(gm, after, name)
        quantizer_of[quantized] = name
        return quantized

    def output_of(node: fx.Node) -> fx.Node:
        users = list(node.users)
        return users[0] if len(users) == 1 and _is_relu(gm, users[0]) else node

    # the model input is quantized where an int8 layer first reads it (not at the placeholder): a
    # first layer left in float then reads the float input, without a quantize-dequantize pair
    for node in list(gm.graph.nodes):
        module = called_module(gm, node)
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            if node.target in skip:
                prepared.skipped[node.target] = skip[node.target]
                continue
            source = node.args[0]
            if source not in quantizer_of:
                new_quantizer(source)
            layer_scheme = layer_schemes.get(node.target, scheme)
            bn_node = _batchnorm_after(gm, node) if isinstance(module, nn.Conv2d) else None
            wrapper = (_wrap_conv_batchnorm(gm, node, module, bn_node, layer_scheme) if bn_node is not None
                       else QuantizedWeightLayer(module, layer_scheme))
            gm.set_submodule(node.target, wrapper)  # same parameters: an optimizer built before still trains them
            prepared.layers[node.target] = wrapper
            new_quantizer(output_of(node))
        elif (node.op == "call_function" and node.target in ADDS) or isinstance(module, OWN_SCALE_MODULES):
            new_quantizer(output_of(node))
        elif _is_shared(gm, node) and node.args and node.args[0] in quantizer_of:
            name = quantizer_of[node.args[0]]
            quantizer_of[_insert_quantizer(gm, node, name, shared=True)] = name
    gm.recompile()
    for name, reason in prepared.skipped.items():
        log.info("quantization skips %s: %s", name, reason)
    return gm, prepared


def set_mode(prepared: Prepared, observing: bool, fake_quant: bool) -> None:
    for quantizer in prepared.quantizers.values():
        quantizer.observing, quantizer.fake_quant = observing, fake_quant


def freeze_batchnorm(prepared: Prepared) -> int:
    """Stop updating the BatchNorm statistics of every simulated-fold layer; returns how many."""
    layers = [layer for layer in prepared.layers.values() if isinstance(layer, QuantizedConvBatchNorm)]
    for layer in layers:
        layer.batchnorm_frozen = True
    return len(layers)


@torch.no_grad()
def calibrate(gm: nn.Module, prepared: Prepared, batches: Iterable[torch.Tensor]) -> int:
    """Run `batches` through the model in eval mode with the observers on; returns the images seen."""
    set_mode(prepared, observing=True, fake_quant=False)
    was_training = gm.training
    gm.eval()
    device = next(gm.parameters()).device
    seen = 0
    for inputs in batches:
        gm(inputs.to(device))
        seen += len(inputs)
    gm.train(was_training)
    return seen


# A whole-model candidate that reads within this of min_speedup is timed once more, for longer, before the
# model is left float. lenet5's forms with int8 Linears run at parity on ONNX Runtime and read 0.96-1.00x from
# one half-second window to the next: in 1 of 3 seeds of svd_qat every candidate read under 0.98 and the
# model shipped float (2.56x smaller against qat's 3.03x); a form really slower (0.93x and under) is not retried.
CONFIRM_MARGIN = 0.03
WHOLE_MODEL_CONFIRM_TIME_S = 2.0


def _candidate_label(floated: int, slow: int, layers: int) -> str:
    """A whole-model candidate of the speed gate by its float layers: all int8, the slow layers float, or
    the k slowest float."""
    if floated == 0:
        return "all int8"
    if floated == slow:
        return "slow layers float"
    return f"{floated} of {layers} layers float"


def convert(gm: fx.GraphModule, prepared: Prepared, keep_float: Iterable[str] = ()) -> fx.GraphModule:
    """The deployable int8 form: fixed quantizers, integer weights, ReLU and ReLU6 folded where the
    next quantizer's clamp already does their work (zero point at the bottom of the code range, its top
    at or below the activation's: half a step above counts, a rounding of the range).

    Layers named in `keep_float` become plain float Conv2d/Linear (BatchNorm folded in, weights
    as trained); then the quantizers between float tensors go (`_drop_float_quantizers`).
    """
    gm = gm.cpu()
    keep_float = set(keep_float)
    fixed: dict[str, FixedQuantizeDequantize] = {}
    clamps: dict[str, tuple[float, float]] = {}  # quantizer -> (bottom, top) of its range
    for name, quantizer in prepared.quantizers.items():
        scale, zero_point = quantizer.qparams()
        qmin, qmax = quantizer.scheme.activation_range()
        fixed[name] = FixedQuantizeDequantize(scale, zero_point, qmin)
        gm.set_submodule(name, fixed[name])
        clamps[name] = (float(scale) * (qmin - int(zero_point)), float(scale) * (qmax - int(zero_point)))
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target in prepared.layers:
            wrapper = prepared.layers[node.target]
            if isinstance(wrapper, QuantizedConvBatchNorm):
                wrapper = wrapper.folded()
            if node.target in keep_float:
                gm.set_submodule(node.target, copy.deepcopy(wrapper.layer).requires_grad_(False))
                continue
            source = node.args[0]
            input_scale = fixed[source.target].scale if source.op == "call_module" and source.target in fixed else None
            if input_scale is None:
                raise RuntimeError(f"layer {node.target} reads an unquantized tensor; prepare() should have quantized it")
            gm.set_submodule(node.target, int8_layer(wrapper, input_scale))
    _drop_float_quantizers(gm, set(fixed))
    for node in list(gm.graph.nodes):
        users = list(node.users)
        # a float layer keeps its ReLU: the runtime fuses it into the float kernel
        top = _relu_top(gm, node)
        if top is not None and len(users) == 1 and users[0].op == "call_module" and users[0].target in fixed \
                and not _isfloat_layer(gm, node.args[0]):
            bottom, quantizer_top = clamps[users[0].target]
            if bottom == 0 and quantizer_top <= top + float(fixed[users[0].target].scale) / 2:
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm.eval()


def _isfloat_layer(gm: fx.GraphModule, node: fx.Node) -> bool:
    return type(called_module(gm, node)) in (nn.Conv2d, nn.Linear)


def _drop_float_quantizers(gm: fx.GraphModule, quantizers: set[str]) -> None:
    """Remove each quantizer call whose input comes from float (the model input or a float layer,
    through ReLU and grid-keeping ops) and that no int8 kernel reads directly: it would only round
    a float tensor, and between a DequantizeLinear and a QuantizeLinear ONNX Runtime would quantize
    a float layer itself."""
    def is_quantizer(node: fx.Node) -> bool:
        return node.op == "call_module" and node.target in quantizers

    def float_source(node: fx.Node) -> bool:
        source = node.args[0]
        while _is_relu(gm, source) or _is_shared(gm, source):
            source = source.args[0]
        return source.op == "placeholder" or _isfloat_layer(gm, source)

    def read_by_int8(node: fx.Node) -> bool:
        # directly: a float tensor is quantized at the last shared call before the int8 layer, so
        # pooling and flatten after a float layer run in float (ONNX Runtime's uint8 NCHW MaxPool
        # is 20x slower than its float NCHWc one on LeNet-5's second pooling)
        return any(isinstance(called_module(gm, user), (Int8Layer, *OWN_SCALE_MODULES)) or
                   (user.op == "call_function" and user.target in ADDS) for user in node.users)

    for node in list(gm.graph.nodes):
        if is_quantizer(node) and float_source(node) and not read_by_int8(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


def _layer_pairs(converted: fx.GraphModule, example: torch.Tensor) -> dict[str, tuple[nn.Module, nn.Sequential, tuple]]:
    """{layer: (float layer, Sequential(input quantizer, Int8Layer, output quantizer), input shape)}
    for every Int8Layer of a converted model whose output is quantized; the shapes come from
    running `example` through it."""
    shapes: dict[str, tuple[int, ...]] = {}

    def recorder(name: str) -> Callable[..., None]:
        def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:  # None: the input stays
            shapes.setdefault(name, tuple(args[0].shape[1:]))
        return record

    hooks = [module.register_forward_pre_hook(recorder(name))
             for name, module in converted.named_modules() if isinstance(module, Int8Layer)]
    try:
        with torch.no_grad():
            converted(example)
    finally:
        for hook in hooks:
            hook.remove()
    pairs = {}
    for node in converted.graph.nodes:
        layer = called_module(converted, node)
        if not isinstance(layer, Int8Layer) or node.target not in shapes:
            continue
        source = called_module(converted, node.args[0])
        targets = [called_module(converted, user) for user in node.users]
        if not isinstance(source, FixedQuantizeDequantize) or len(targets) != 1 or \
                not isinstance(targets[0], FixedQuantizeDequantize):
            continue
        pairs[node.target] = (float_layer(layer).eval(), nn.Sequential(source, layer, targets[0]).eval(),
                              shapes[node.target])
    return pairs


def convert_dynamic(model: nn.Module, skip: Iterable[str] | dict[str, str] = ()) -> tuple[nn.Module, dict[str, str]]:
    """Dynamic quantization: every Linear gets int8 weights and quantizes its input at run time.

    Convolutions stay in float (skipped with the reason): ONNX Runtime's dynamic path covers
    MatMul; its ConvInteger kernel is far slower than its float convolution."""
    skipped: dict[str, str] = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name not in skip:
            model.set_submodule(name, DynamicInt8Linear(module, *weight_codes(module.weight, QuantScheme())[:2]))
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            skipped[name] = (skip[name] if isinstance(skip, dict) else "listed in skip_layers") if name in skip \
                else "no dynamic int8 convolution kernel"
    for name, reason in skipped.items():
        log.info("dynamic quantization skips %s: %s", name, reason)
    return model.eval(), skipped


# ----------------------------------------------------------------------------- validation


def _scheme(**kwargs: Any) -> QuantScheme:
    for key in ("per_channel", "symmetric_weights", "symmetric_activations", "learn_scales", "reduce_range"):
        if key in kwargs:
            check_bool(key, kwargs[key])
    return QuantScheme(**kwargs)


# ----------------------------------------------------------------------------- the callbacks


class StaticQuantization(CompressionCallback):
    """What static PTQ, QAT, low-bit and mixed precision share: prepare the model when fitting is
    set up (before the optimizer exists, so new learned steps are trained), calibrate on
    `calibration_batches` training batches when fitting starts, convert at finalize, report the
    bits per layer.

    Args:
        bits: weight bits (8, 6, 4, 3, 2, ternary, binary); activation_bits: activation bits.
        observer, percentile, momentum, per_channel, symmetric_weights, symmetric_activations,
        learn_scales, reduce_range: see QuantScheme.
        calibration_batches: training batches the observers see before the scales are fixed.
        skip_layers: Conv/Linear layer names left in float (logged); `first` and `last` stand for the
            model's first and last of them, an unknown name is an error.
        min_speedup: null, or at finalize time every layer in float and in int8 on the run's
            runtime and threads (side by side, interleaved, after warm-up, at `speed_batch`) and
            keep in float each layer whose int8 form is not at least this much faster: an int8
            kernel is not faster everywhere (LeNet-5's one-channel first convolution runs ~6x
            slower in ONNX Runtime's QLinearConv than in its float Conv). The layers kept float
            are listed in the summary with both timings. Needs 8-bit weights and activations.
        speed_batch: the batch size at which `min_speedup` times the layers.
        runtime, compile, threads: the run's hardware.runtime, hardware.compile and
            hardware.threads: where `min_speedup` times (ort: ONNX Runtime; torch with compile
            true/auto: Inductor's oneDNN kernels; torch eager simulates int8 and times nothing).
    """

    name = "quantization"
    train_with_fake_quant = False
    batchnorm = "fold"  # nothing trains after PTQ: its BatchNorm statistics are final

    def __init__(self, bits: int | str = 8, activation_bits: int = 8, observer: str = "minmax",
                 percentile: float = 99.99, momentum: float = 0.1, per_channel: bool = True,
                 symmetric_weights: bool = True, symmetric_activations: bool = False, learn_scales: bool = False,
                 reduce_range: bool = True, calibration_batches: int = 16, skip_layers: Iterable[str] = (),
                 min_speedup: float | None = None, speed_batch: int = 32, runtime: str = "torch", compile: bool | str = "auto",
                 threads: int | None = None) -> None:
        self.scheme = _scheme(weight_bits=bits, activation_bits=activation_bits, observer=observer,
                              percentile=percentile, momentum=momentum, per_channel=per_channel,
                              symmetric_weights=symmetric_weights, symmetric_activations=symmetric_activations,
                              learn_scales=learn_scales, reduce_range=reduce_range)
        self.calibration_batches = check_int("calibration_batches", calibration_batches, 1)
        self.skip_layers = list(skip_layers)
        self.min_speedup = self._check_min_speedup(min_speedup)
        self.speed_batch = check_int("speed_batch", speed_batch, 1)
        self.runtime = check_choice("runtime", runtime, ("torch", "inductor", "ort"))
        if not (isinstance(compile, bool) or compile == "auto"):  # not check_choice: 0 == False
            raise ValueError(f"compile={compile!r} is not valid; allowed: false, true, auto")
        self.compile = compile
        self.threads = None if threads is None else check_int("threads", threads, 1)
        self.example: torch.Tensor | None = None  # one training image: the layers' input shapes for min_speedup
        self.layer_timings: dict[str, tuple[float, float]] = {}  # layer -> (float ms, int8 ms) at speed_batch
        self.kept_float: dict[str, str] = {}  # layer -> why min_speedup kept it float
        self.model_timings: dict[str, float] = {}  # candidate -> whole-model ms at speed_batch
        self.model_speedups: dict[str, float] = {}  # candidate -> its last speedup over the float model
        self.layer_schemes: dict[str, QuantScheme] = {}
        self.prepared: Prepared | None = None
        self.calibrated_images = 0
        self.fakequant_model: nn.Module | None = None  # the training-time form, kept for test_acc_fakequant
        self.unprepared: nn.Module | None = None  # the model as handed over, before tracing: see plain_float_model

    # -- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.prepared is None:
            self.prepare(pl_module, trainer)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.take_example(trainer)
        if self.calibrated_images == 0:
            self.calibrate(pl_module.model, trainer)
        else:  # resumed from a checkpoint: calibrated (and the steps learned) before, only the modes are gone
            self.set_training_mode()

    def take_example(self, trainer: pl.Trainer) -> None:
        """One training image, whose shape min_speedup times the layers at."""
        if self.min_speedup is not None and self.example is None:
            self.example = training_batches(trainer, 1, f"{self.name} min_speedup")[0][0][:1].detach().cpu()

    def _check_min_speedup(self, min_speedup: float | None) -> float | None:
        if min_speedup is None:
            return None
        check_number("min_speedup", min_speedup, 0, bounds="(]", allowed="null or a number > 0")
        if self.scheme.weight_bits != 8 or self.scheme.activation_bits != 8:
            raise ValueError(f"min_speedup={min_speedup!r} is not valid with bits={self.scheme.weight_bits!r}, "
                             f"activation_bits={self.scheme.activation_bits}; allowed: null (it times int8 kernels: "
                             f"8-bit weights and activations)")
        return float(min_speedup)

    # -- the workers
    def prepare(self, pl_module: pl.LightningModule, trainer: pl.Trainer | None = None) -> None:
        _, skip = select_layers(pl_module.model, self.skip_layers)  # first/last and unknown names: as every family
        # prepare() traces a copy, so the model as handed over stays as it was; a GraphModule it changes in place
        self.unprepared = None if isinstance(pl_module.model, fx.GraphModule) else pl_module.model
        pl_module.model, self.prepared = prepare(pl_module.model, self.scheme, self.layer_schemes, skip,
                                                 batchnorm=self.batchnorm)
        for wrapper in self.prepared.layers.values():
            wrapper.fake_quant = self.train_with_fake_quant

    def calibrate(self, model: nn.Module, trainer: pl.Trainer) -> None:
        self.calibrated_images = calibrate(model, self.prepared, [images for images, _ in training_batches(trainer, self.calibration_batches, 'calibration')])
        log.info("%s: calibrated %d activation quantizers on %d images (observer %s)", self.name,
                 len(self.prepared.quantizers), self.calibrated_images, self.scheme.observer)
        self.set_training_mode()
        if self.train_with_fake_quant and self.scheme.learn_scales:
            for quantizer in self.prepared.quantizers.values():
                quantizer.learn()
                for optimizer in trainer.optimizers:
                    optimizer.add_param_group({"params": [quantizer.step]})

    def set_training_mode(self) -> None:
        """QAT trains through fake quantization and keeps observing; PTQ calibrated and trains float."""
        set_mode(self.prepared, observing=self.train_with_fake_quant, fake_quant=self.train_with_fake_quant)

    # -- protocol
    def finalize(self, model: nn.Module) -> nn.Module:
        if self.prepared is None:
            raise RuntimeError(f"{self.name}: finalize before the model was prepared (no fit ran)")
        set_mode(self.prepared, observing=False, fake_quant=True)
        for wrapper in self.prepared.layers.values():
            wrapper.fake_quant = True
        self.fakequant_model = copy.deepcopy(model).eval()
        self.kept_float = self.slower_in_int8(model) if self.min_speedup is not None else {}
        converted = convert(model, self.prepared, keep_float=self.kept_float)
        if any(isinstance(module, Int8Layer) for module in converted.modules()):
            return converted
        return self.plain_float_model(converted)

    def plain_float_model(self, converted: fx.GraphModule) -> nn.Module:
        """A model left wholly float, in the form it was handed over (the baseline's class) with the
        trained weights, where its parameters and buffers map one to one: run eagerly, the traced
        GraphModule costs its calls (lenet300 on one thread, identical weights: 0.85x of the baseline at
        batch 1, 0.90-0.97x at 32). A model whose BatchNorm was folded keeps the converted form."""
        if self.unprepared is None:
            return converted
        plain = copy.deepcopy(self.unprepared)
        try:
            plain.load_state_dict(converted.state_dict(), strict=True)
        except RuntimeError:  # names or shapes differ (BatchNorm folded, a layer rebuilt): keep the graph
            return converted
        return plain.eval().requires_grad_(False)

    def slower_in_int8(self, model: nn.Module) -> dict[str, str]:
        """{layer: reason} for each layer whose int8 form runs less than `min_speedup` times as fast
        as its float form on the run's runtime (each timed alone, float and int8 interleaved)."""
        timer = self.require_timer()
        runtime = timer.int8_runtime(self.runtime, self.compile)
        if runtime == "torch":
            log.info("%s: min_speedup not applied: runtime torch without compile simulates int8 (no int8 kernels "
                     "to time); every layer is quantized", self.name)
            return {}
        if self.example is None:
            raise RuntimeError(f"{self.name}: min_speedup={self.min_speedup} needs an example input (taken when "
                               f"fitting starts); allowed without one: min_speedup=null")
        trial = convert(copy.deepcopy(model), self.prepared)
        kept: dict[str, str] = {}
        for name, (float_layer, int8_layer, input_shape) in _layer_pairs(trial, self.example).items():
            float_ms, int8_ms = timer.float_and_int8(runtime, float_layer, int8_layer, input_shape, self.speed_batch,
                                                     self.threads)
            self.layer_timings[name] = (float_ms, int8_ms)
            if float_ms / int8_ms < self.min_speedup:
                kept[name] = (f"int8 {int8_ms:.4f} ms vs float {float_ms:.4f} ms at batch {self.speed_batch} on "
                              f"{runtime} ({float_ms / int8_ms:.2f}x < min_speedup={self.min_speedup})")
        kept = self.slower_as_a_whole(model, kept, runtime)
        for name, reason in kept.items():
            log.info("%s keeps %s in float: %s", self.name, name, reason)
        return kept

    def slower_as_a_whole(self, model: nn.Module, slow_layers: dict[str, str], runtime: str) -> dict[str, str]:
        """A layer's own timing misses what the model around it pays: on Inductor each
        quantize/dequantize fuses into the int8 kernels beside it, so a float layer between int8
        layers adds a dequantize/quantize pair (lenet5, cpu_1t: 0.39x of fp32 with its slow layers
        float, 1.16x all int8), and a model of small int8 kernels can be slower than its float form
        although no layer is alone (LeNets on 2 cores: 0.8-0.9x); on ONNX Runtime the layers left
        int8 may win less than their quantize/dequantize cost. So candidates are timed whole against
        the float model, in back-to-back pairs, one after another until one reaches `min_speedup`:
        every layer int8, then the layers slower alone kept float, then one more layer float at a
        time (the slowest in int8 alone first). When every layer reads slower alone, the candidates
        float the slowest one, two, ...: a layer timed alone near the threshold (LeNet-5's first
        Linear, 0.93-0.96x on ONNX Runtime) then no longer decides the whole model (0.99x with it int8).
        If none reaches it, the candidates that read within CONFIRM_MARGIN of it are timed again, longer,
        in the same order; if none of those reaches it either, every layer stays float."""
        order = sorted(self.prepared.layers, key=self._alone_speedup)  # slowest in int8 first
        first = len(slow_layers) if len(slow_layers) < len(order) else 1
        float_model = convert(copy.deepcopy(model), self.prepared, keep_float=order)
        plans = {}  # label -> {layer kept float: why}, in the order the candidates are timed
        for count in dict.fromkeys([0, *range(first, len(order))]):
            plans[_candidate_label(count, len(slow_layers), len(order))] = {
                name: slow_layers.get(name, f"kept float as one of the {count} layers slowest in int8 alone, "
                                            f"so that the whole model reaches min_speedup={self.min_speedup}")
                for name in order[:count]}
        self.model_timings, self.model_speedups, summary = {}, {}, []
        chosen = self._first_fast_enough(model, float_model, plans, runtime, summary)
        near = {label: keep for label, keep in plans.items()
                if self.model_speedups.get(label, 0.0) >= self.min_speedup - CONFIRM_MARGIN}
        if chosen is None and near:  # none read fast enough: time the ones at the line again, for longer
            chosen = self._first_fast_enough(model, float_model, near, runtime, summary, confirm=True)
        if chosen is not None:
            log.info("%s on %s at batch %d: %s, float %.4f ms; keeping %s", self.name, runtime, self.speed_batch,
                     ", ".join(summary), self.model_timings["float"], chosen)
            return plans[chosen]
        reason = (f"no int8 form of the model reaches min_speedup={self.min_speedup} on {runtime} at batch "
                  f"{self.speed_batch}: {', '.join(summary)}, float {self.model_timings['float']:.4f} ms (1.00x)")
        return {name: "; ".join(filter(None, (slow_layers.get(name), reason))) for name in order}

    def _first_fast_enough(self, model: nn.Module, float_model: nn.Module, plans: dict[str, dict[str, str]],
                           runtime: str, summary: list[str], confirm: bool = False) -> str | None:
        """The label of the first candidate in `plans` whose whole model, timed against `float_model`,
        reaches min_speedup (None if none does); each reading goes into `summary` and the timings.
        `confirm` times each for WHOLE_MODEL_CONFIRM_TIME_S instead of the timer's default."""
        timer = self.require_timer()
        # built lazily: the timer converts and deploys no candidate past the first fast enough
        candidates = ((label, convert(copy.deepcopy(model), self.prepared, keep_float=keep))
                      for label, keep in plans.items())
        options = {"min_time_s": WHOLE_MODEL_CONFIRM_TIME_S} if confirm else {}
        for label, ms, float_ms, speedup in timer.whole_models(float_model, candidates, runtime,
                                                               tuple(self.example.shape[1:]), self.speed_batch,
                                                               self.threads, **options):
            self.model_timings.update({label: ms, "float": float_ms})
            self.model_speedups[label] = speedup
            again = f" again for {WHOLE_MODEL_CONFIRM_TIME_S:g} s" if confirm else ""
            summary.append(f"{label}{again} {ms:.4f} ms ({speedup:.2f}x)")
            if speedup >= self.min_speedup:
                return label
        return None

    def _alone_speedup(self, name: str) -> float:
        """float / int8 ms of a layer timed alone (1.0 when it was not timed)."""
        float_ms, int8_ms = self.layer_timings.get(name, (1.0, 1.0))
        return float_ms / int8_ms

    def reference_models(self) -> dict[str, nn.Module]:
        """The fake-quant training model, scored beside the deployed one as test_acc_fakequant."""
        return {"fakequant": self.fakequant_model} if self.fakequant_model is not None else {}

    def summary(self, model: nn.Module) -> list[dict[str, Any]]:
        rows = []
        for name, module in model.named_modules():
            if isinstance(module, Int8Layer):
                rows.append({"layer": name, "type": module.kind, "weight_bits": module.weight_bits,
                             "activation_bits": self.scheme.activation_bits, "weights": module.weight_codes.numel(),
                             "weight_scale_mean": float(module.weight_scale.mean()), **self._timing_columns(name),
                             "skipped": ""})
        skipped = {**(self.prepared.skipped if self.prepared else {}), **self.kept_float}
        rows += [{"layer": name, "type": "float", "weight_bits": 32, "activation_bits": 32, "weights": None,
                  "weight_scale_mean": None, **self._timing_columns(name), "skipped": reason}
                 for name, reason in skipped.items()]
        return rows

    def _timing_columns(self, name: str) -> dict[str, float | None]:
        if self.min_speedup is None:
            return {}
        float_ms, int8_ms = self.layer_timings.get(name, (None, None))
        return {"float_ms": float_ms, "int8_ms": int8_ms}

    def state_dict(self) -> dict[str, Any]:
        return {"calibrated_images": self.calibrated_images, "layer_schemes": dict(self.layer_schemes)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.calibrated_images = state_dict["calibrated_images"]
        self.layer_schemes = state_dict["layer_schemes"]


class PTQStatic(StaticQuantization):
    """Post-training static quantization: calibrate, then convert; nothing is trained
    (method.fine_tune.epochs is 0). In a hybrid whose earlier stages train (agp_ptq: prune, then
    quantize), it is post-training for real: the model is prepared and calibrated when training
    ends, on the trained (pruned) weights, so the ranges are those of the model it converts."""

    name = "ptq_static"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.after_training(trainer):
            super().setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.after_training(trainer):
            super().on_fit_start(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.prepared is None:
            self.prepare(pl_module, trainer)
            super().on_fit_start(trainer, pl_module)

    @staticmethod
    def after_training(trainer: pl.Trainer) -> bool:
        """Whether the fit trains at all (then the quantizer waits for its end)."""
        return bool(trainer.max_epochs) and trainer.limit_train_batches != 0


def epoch_of_fit(setting: int, epochs: int | None) -> int:
    """A 0-based epoch setting in a fit of `epochs` epochs: negative counts from its end (-2: the last two
    epochs), never before epoch 0, so that a hybrid's shorter fine-tune keeps the same tail."""
    return setting if setting >= 0 else max((epochs or 0) + setting, 0)


class QAT(StaticQuantization):
    """Quantization-aware training (Jacob et al. 2018; Krishnamoorthi 2018) from the baseline:
    weights fake-quantized per channel with a straight-through estimator, activation ranges
    calibrated first and then tracked by a moving average during training. Converts to the same
    int8 form as PTQStatic.

    Args:
        batchnorm: `fold`: each BatchNorm is folded into its convolution before training, with the
            baseline's running statistics, which stay fixed. `freeze`: the fold is simulated during
            training (QuantizedConvBatchNorm): batch statistics normalize and update the running
            ones until epoch `freeze_bn_epoch`, then the running statistics are frozen so the
            folded weights stop moving with each batch; folded for good at convert.
        freeze_bn_epoch: the epoch (0-based) from which the statistics are frozen (`freeze` only);
            negative counts from the end of the fit (-2: the last two epochs train with frozen
            statistics), for hybrids whose pruning or factoring moves the network for many epochs.
        begin_epoch: the epoch (0-based) fake quantization starts at, negative counting from the
            end as freeze_bn_epoch (-10: the last ten epochs); the epochs before it train the float
            network (wrapped, nothing quantized), and the activation ranges are calibrated when it
            starts. For hybrids whose earlier stage damages the network (channel_qat): the network
            recovers in float first, then learns to live with int8.
    """

    name = "qat"
    train_with_fake_quant = True

    def __init__(self, observer: str = "moving_average", batchnorm: str = "fold", freeze_bn_epoch: int = 1,
                 begin_epoch: int = 0, **kwargs: Any) -> None:
        super().__init__(observer=observer, **kwargs)
        self.batchnorm = check_choice("batchnorm", batchnorm, BATCHNORM_MODES)
        self.freeze_bn_epoch = check_number("freeze_bn_epoch", freeze_bn_epoch, integer=True,
                                            allowed="an integer (negative: counted from the last epoch)")
        self.begin_epoch = check_number("begin_epoch", begin_epoch, integer=True,
                                        allowed="an integer (negative: counted from the last epoch)")
        self.batchnorm_frozen_at: int | None = None  # the epoch the statistics were frozen

    def check_epochs(self, epochs: int) -> None:
        if self.begin_epoch > 0 and self.begin_epoch >= epochs:
            raise ValueError(f"begin_epoch={self.begin_epoch} is not valid; allowed: an integer below "
                             f"fine_tune.epochs={epochs} (the fit must train through fake quantization)")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.max_epochs is not None:
            self.check_epochs(trainer.max_epochs)
        if self.calibrated_images == 0 and trainer.current_epoch < self.begin_at(trainer.max_epochs):
            self.take_example(trainer)
            self.set_fake_quant(False)
            log.info("%s: the float network trains until epoch %d, then fake quantization starts", self.name,
                     self.begin_at(trainer.max_epochs))
            return
        super().on_fit_start(trainer, pl_module)

    def set_fake_quant(self, on: bool) -> None:
        """Weights and activations fake-quantized (and activation ranges tracked), or all float."""
        set_mode(self.prepared, observing=on, fake_quant=on)
        for wrapper in self.prepared.layers.values():
            wrapper.fake_quant = on

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.calibrated_images == 0 and trainer.current_epoch >= self.begin_at(trainer.max_epochs):
            self.set_fake_quant(True)  # weights as the int8 kernels hold them while the ranges are calibrated
            self.calibrate(pl_module.model, trainer)
            log.info("%s: fake quantization started at epoch %d", self.name, trainer.current_epoch)
        if self.batchnorm == "freeze" and trainer.current_epoch >= self.freeze_epoch(trainer.max_epochs):
            self.freeze_batchnorm(trainer.current_epoch)

    def freeze_epoch(self, epochs: int | None) -> int:
        """The epoch the statistics freeze at in a fit of `epochs` epochs."""
        return epoch_of_fit(self.freeze_bn_epoch, epochs)

    def begin_at(self, epochs: int | None) -> int:
        """The epoch fake quantization starts at in a fit of `epochs` epochs."""
        return epoch_of_fit(self.begin_epoch, epochs)

    def freeze_batchnorm(self, epoch: int) -> None:
        frozen = freeze_batchnorm(self.prepared)
        if self.batchnorm_frozen_at is None:
            self.batchnorm_frozen_at = epoch
            log.info("%s: BatchNorm statistics of %d layers frozen at epoch %d", self.name, frozen, epoch)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "batchnorm_frozen_at": self.batchnorm_frozen_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.batchnorm_frozen_at = state_dict.get("batchnorm_frozen_at")


class LowBit(QAT):
    """Low-bit QAT: weights at `bits` (8..2, ternary, binary) with learned steps (LSQ) by default,
    activations at `activation_bits`. The deployable model keeps the integer codes; the artifact
    stores them packed at their bit width."""

    name = "lowbit"

    def __init__(self, bits: int | str = 4, learn_scales: bool = True, **kwargs: Any) -> None:
        super().__init__(bits=bits, learn_scales=learn_scales, **kwargs)


class PTQDynamic(CompressionCallback):
    """Post-training dynamic quantization: int8 weights, each Linear's input quantized from its
    own range at run time; no calibration, nothing trained."""

    name = "ptq_dynamic"

    def __init__(self, skip_layers: Iterable[str] = ()) -> None:
        self.skip_layers = list(skip_layers)
        self.skipped: dict[str, str] = {}

    def finalize(self, model: nn.Module) -> nn.Module:
        _, skip = select_layers(model, self.skip_layers)
        model, self.skipped = convert_dynamic(model, skip)
        return model

    def summary(self, model: nn.Module) -> list[dict[str, Any]]:
        rows = [{"layer": name, "type": "dynamic_linear", "weight_bits": 8, "skipped": ""}
                for name, _ in int8_layers(model)]
        return rows + [{"layer": name, "type": "float", "weight_bits": 32, "skipped": reason}
                       for name, reason in self.skipped.items()]


# ----------------------------------------------------------------------------- mixed precision


@torch.no_grad()
def bit_sensitivity(model: nn.Module, layers: dict[str, nn.Module], bits: Iterable[int],
                    batches: list[tuple[torch.Tensor, torch.Tensor]], scheme: QuantScheme) -> dict[str, dict[int, float]]:
    """Loss increase when only one layer's weights are quantized to b bits, for every (layer, b)."""
    model = model.eval()

    def loss() -> float:
        return sum(float(F.cross_entropy(model(x), y)) for x, y in batches) / len(batches)

    base = loss()
    table: dict[str, dict[int, float]] = {}
    for name, layer in layers.items():
        original = layer.weight.detach().clone()
        table[name] = {}
        for b in bits:
            codes, scale, _ = weight_codes(original, scheme.with_bits(b))
            layer.weight.copy_(codes.to(original) * broadcast_along(scale, original, 0))
            table[name][b] = max(loss() - base, 0.0)
        layer.weight.copy_(original)
    return table


def allocate_bits(sensitivity: dict[str, dict[int, float]], sizes: dict[str, int], budget: float) -> dict[str, int]:
    """Per-layer bits with a weight-averaged width <= `budget`: start every layer at its widest
    option and repeatedly narrow the layer whose next step costs the least loss per bit saved."""
    choice = {name: max(options) for name, options in sensitivity.items()}
    total = sum(sizes.values())

    def average() -> float:
        return sum(choice[n] * sizes[n] for n in choice) / total

    while average() > budget + 1e-9:
        candidates = []
        for name, options in sensitivity.items():
            narrower = sorted(b for b in options if b < choice[name])
            if narrower:
                b = narrower[-1]
                cost = (options[b] - options[choice[name]]) / ((choice[name] - b) * sizes[name])
                candidates.append((cost, name, b))
        if not candidates:
            raise ValueError(f"budget_bits={budget} is not valid; allowed: >= {average():.2f} (every layer at its narrowest)")
        _, name, b = min(candidates)
        choice[name] = b
    return choice


class MixedPrecision(LowBit):
    """Per-layer weight bits from per-layer sensitivity under an average-bit budget (HAWQ's idea
    with a measured loss increase in place of the Hessian), then low-bit QAT with learned steps.

    Args (besides LowBit's):
        budget_bits: the weight-averaged bits per weight the model may use (e.g. 4.0).
        candidate_bits: widths a layer may get.
        sensitivity_batches: training batches scoring each (layer, bits).
    """

    name = "mixed"

    def __init__(self, budget_bits: float = 4.0, candidate_bits: Iterable[int] = (8, 6, 4, 3, 2),
                 sensitivity_batches: int = 4, **kwargs: Any) -> None:
        kwargs.setdefault("bits", 8)
        super().__init__(**kwargs)
        self.candidate_bits = [int(b) for b in candidate_bits]
        for b in self.candidate_bits:
            if b not in range(2, 9):
                raise ValueError(f"candidate_bits has {b!r}; allowed: integers in 2..8")
        self.budget_bits = float(check_number("budget_bits", budget_bits, min(self.candidate_bits),
                                              max(self.candidate_bits)))
        self.sensitivity_batches = check_int("sensitivity_batches", sensitivity_batches, 1)
        self.sensitivity: dict[str, dict[int, float]] = {}

    def prepare(self, pl_module: pl.LightningModule, trainer: pl.Trainer | None = None) -> None:
        if not self.layer_schemes and trainer is not None:
            self.choose_bits(pl_module.model, trainer)
        super().prepare(pl_module, trainer)

    def choose_bits(self, model: nn.Module, trainer: pl.Trainer) -> None:
        batches = training_batches(trainer, self.sensitivity_batches, "mixed precision's sensitivity")
        _, skipped = select_layers(model, self.skip_layers)
        folded = fold_batchnorm_in_graph(trace(copy.deepcopy(model)))
        layers = {name: m for name, m in folded.named_modules()
                  if isinstance(m, (nn.Conv2d, nn.Linear)) and name not in skipped}
        self.sensitivity = bit_sensitivity(folded, layers, self.candidate_bits, batches, self.scheme)
        bits = allocate_bits(self.sensitivity, {n: m.weight.numel() for n, m in layers.items()}, self.budget_bits)
        self.layer_schemes = {name: self.scheme.with_bits(b) for name, b in bits.items()}
        for name, b in bits.items():
            log.info("mixed precision: %s at %d bits (loss increase %.4f)", name, b, self.sensitivity[name][b])

    def summary(self, model: nn.Module) -> list[dict[str, Any]]:
        return [{**row, "sensitivity": self.sensitivity.get(row["layer"], {}).get(row["weight_bits"])}
                for row in super().summary(model)]
