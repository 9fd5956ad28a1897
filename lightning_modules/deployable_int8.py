"""The deployable int8 model: what quantization.py's `convert` builds and what evaluation runs.

An int8 model is an ordinary nn.Module whose layers call three custom ops,
`workbench::quantize_dequantize`, `workbench::dequantize` and `workbench::dynamic_linear`, that
PyTorch runs as an exact integer simulation and the ONNX exporter translates to
QuantizeLinear/DequantizeLinear/MatMulInteger (`ONNX_TRANSLATIONS`). ONNX Runtime fuses that QDQ
form into QLinearConv/QGemm/QLinearAdd int8 kernels; `pt2e_reference_graph` rewrites it into the
form Inductor lowers to oneDNN int8 kernels. The layers:
    FixedQuantizeDequantize  a frozen activation quantizer (scale, zero point)
    Int8Layer                Conv2d/Linear with integer weight codes and an int32 bias
    DynamicInt8Linear        Linear with int8 weights, its input quantized at run time
and the readers: `int8_layers`, `is_quantized`, `float_layer`, `decode_low_bit`, `dequantized`.

Both compression/quantization.py (to convert) and evaluation/ (to run, export, load) import it;
it imports only layers.py of the workbench.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from lightning_modules.layers import called_module, trace


def broadcast_along(values: torch.Tensor, like: torch.Tensor, axis: int) -> torch.Tensor:
    """Per-channel `values` shaped to broadcast against `like` along `axis` (a scalar stays one)."""
    if values.numel() == 1:
        return values.reshape(())
    shape = [1] * like.dim()
    shape[axis] = -1
    return values.reshape(shape)


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("workbench::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Per-tensor QuantizeLinear then DequantizeLinear; the code type is zero_point's dtype."""
    info = torch.iinfo(zero_point.dtype)
    codes = torch.clamp(torch.round(x / scale) + zero_point.to(torch.float32), info.min, info.max)
    return (codes - zero_point.to(torch.float32)) * scale


@quantize_dequantize.register_fake
def _(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("workbench::dequantize", mutates_args=())
def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
    """DequantizeLinear of integer codes stored in the model (per channel along `axis`)."""
    scale_b = broadcast_along(scale, codes, axis)
    return (codes.to(torch.float32) - broadcast_along(zero_point, codes, axis).to(torch.float32)) * scale_b


@dequantize.register_fake
def _(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


@torch.library.custom_op("workbench::dynamic_linear", mutates_args=())
def dynamic_linear(x: torch.Tensor, weight_t: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor) -> torch.Tensor:
    """y = x W^T + b with x quantized to uint8 from its own range at run time (DynamicQuantizeLinear)
    and W stored as int8 codes (`weight_t` is W^T, per-column scales): ONNX's MatMulInteger."""
    low, high = torch.clamp(x.min(), max=0.0), torch.clamp(x.max(), min=0.0)
    scale = torch.clamp((high - low) / 255.0, min=torch.finfo(torch.float32).eps)
    zero_point = torch.clamp(torch.round(-low / scale), 0, 255)
    codes = torch.clamp(torch.round(x / scale) + zero_point, 0, 255) - zero_point
    return (codes @ weight_t.to(torch.float32)) * (scale * weight_scale) + bias


@dynamic_linear.register_fake
def _(x: torch.Tensor, weight_t: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight_t.shape[1]))


def _onnx_translations() -> dict[Callable, Callable]:
    """onnxscript functions the ONNX exporter uses for the custom ops above."""
    from onnxscript import opset18 as op  # imported only when exporting

    def qdq(x, scale, zero_point):
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point), scale, zero_point)

    def dq(codes, scale, zero_point, axis: int):
        return op.DequantizeLinear(codes, scale, zero_point, axis=axis)

    def dyn_linear(x, weight_t, weight_scale, bias):
        codes, scale, zero_point = op.DynamicQuantizeLinear(x)
        accumulated = op.MatMulInteger(codes, weight_t, zero_point)
        return op.Add(op.Mul(op.Cast(accumulated, to=1), op.Mul(scale, weight_scale)), bias)

    return {torch.ops.workbench.quantize_dequantize.default: qdq, torch.ops.workbench.dequantize.default: dq,
            torch.ops.workbench.dynamic_linear.default: dyn_linear}


ONNX_TRANSLATIONS: Callable[[], dict[Callable, Callable]] = _onnx_translations


def code_dtype(qmin: int) -> torch.dtype:
    """int8 holds every signed code of 8 bits or fewer, uint8 every unsigned one."""
    return torch.int8 if qmin < 0 else torch.uint8


class FixedQuantizeDequantize(nn.Module):
    """A frozen activation quantizer of the deployable model (scale and zero point as buffers)."""

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().float().reshape(()).clone())
        self.register_buffer("zero_point", zero_point.detach().reshape(()).to(code_dtype(qmin)).clone())

    def forward(self, x: torch.Tensor, observe: bool = True) -> torch.Tensor:
        return torch.ops.workbench.quantize_dequantize(x, self.scale, self.zero_point)


class Int8Layer(nn.Module):
    """The deployable Conv2d/Linear: integer weight codes, their scales, the bias in int32 at the
    scale input_scale x weight_scale (what an int8 kernel accumulates into), dequantized in the
    graph so that ONNX Runtime fuses DQ -> Conv -> Q into QLinearConv (QGemm for Linear)."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, codes: torch.Tensor, scale: torch.Tensor,
                 zero_point: torch.Tensor, qmin: int, weight_bits: int | str, input_scale: torch.Tensor) -> None:
        """`codes`, `scale`, `zero_point`: the layer's weight as integer codes (quantization.py's
        weight_codes), `qmin` the bottom of their range, `input_scale` the scale of its input."""
        super().__init__()
        self.kind = "conv" if isinstance(layer, nn.Conv2d) else "linear"
        self.conv_args = ((layer.stride, layer.padding, layer.dilation, layer.groups)
                          if isinstance(layer, nn.Conv2d) else None)
        self.weight_bits = weight_bits
        self.register_buffer("weight_codes", codes.to(code_dtype(qmin)))
        self.register_buffer("weight_scale", scale.float().clone())
        self.register_buffer("weight_zero_point", zero_point.to(code_dtype(qmin)))
        bias = layer.bias.detach() if layer.bias is not None else torch.zeros(codes.shape[0])
        self.register_buffer("input_scale", input_scale.detach().float().reshape(()).clone())
        self.derive_buffers()
        self.register_buffer("bias_codes", torch.round(bias.float() / self.bias_scale).to(torch.int32))
        self.register_buffer("bias_zero_point", torch.zeros(codes.shape[0], dtype=torch.int32))

    # computed from the others: the artifact does not store them (architecture.py calls derive_buffers)
    DERIVED_BUFFERS = ("bias_scale",)

    def derive_buffers(self) -> None:
        """The bias's scale, input_scale x weight_scale per channel: what an int8 kernel accumulates in."""
        self.register_buffer("bias_scale", (self.input_scale * self.weight_scale).expand(self.weight_codes.shape[0])
                             .clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = torch.ops.workbench.dequantize(self.weight_codes, self.weight_scale, self.weight_zero_point, 0)
        bias = torch.ops.workbench.dequantize(self.bias_codes, self.bias_scale, self.bias_zero_point, 0)
        if self.kind == "conv":
            stride, padding, dilation, groups = self.conv_args
            return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        return F.linear(x, weight, bias)


class DynamicInt8Linear(nn.Module):
    """Linear with int8 weights whose input is quantized from its own range at run time."""

    def __init__(self, layer: nn.Linear, codes: torch.Tensor, scale: torch.Tensor) -> None:
        """`codes`, `scale`: the layer's weight as symmetric int8 codes per output channel."""
        super().__init__()
        self.weight_bits = 8
        self.register_buffer("weight_t_codes", codes.t().contiguous().to(torch.int8))
        self.register_buffer("weight_scale", scale.float().clone())
        self.register_buffer("bias", layer.bias.detach().clone() if layer.bias is not None
                             else torch.zeros(codes.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.workbench.dynamic_linear(x, self.weight_t_codes, self.weight_scale, self.bias)


# ----------------------------------------------------------------------------- reading an int8 model


def int8_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (Int8Layer, DynamicInt8Linear))]


def is_quantized(model: nn.Module) -> bool:
    return any(True for _ in int8_layers(model))


@torch.no_grad()
def float_layer(module: Int8Layer | DynamicInt8Linear) -> nn.Module:
    if isinstance(module, DynamicInt8Linear):
        weight = module.weight_t_codes.t().float() * module.weight_scale.reshape(-1, 1)
        layer = nn.Linear(weight.shape[1], weight.shape[0])
        layer.bias.copy_(module.bias)
    else:
        weight = dequantize(module.weight_codes, module.weight_scale, module.weight_zero_point, 0)
        bias = dequantize(module.bias_codes, module.bias_scale, module.bias_zero_point, 0)
        if module.kind == "conv":
            stride, padding, dilation, groups = module.conv_args
            layer = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride, padding,
                              dilation, groups)
        else:
            layer = nn.Linear(weight.shape[1], weight.shape[0])
        layer.bias.copy_(bias)
    layer.weight.copy_(weight)
    return layer


def decode_low_bit(model: nn.Module) -> nn.Module:
    """Each layer whose codes are narrower than 8 bits (stored packed) as the plain Conv2d/Linear
    holding its dequantized weights, in place: decoded once, when the file is loaded, instead of
    at every call. No CPU kernel reads 2..7-bit codes, so this float form is what runs. The
    outputs are unchanged (the same weights and bias in the same float kernels); the activation
    quantizers stay. The layer keeps `weight_bits`, the width its weights are stored at (the
    report reads it to name the latency `dequantized`)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, Int8Layer) and module.weight_bits < 8:
            layer = float_layer(module).to(module.weight_scale.device)
            layer.weight_bits = module.weight_bits
            model.set_submodule(name, layer)
    return model


def dequantized(model: nn.Module) -> nn.Module:
    """A float copy of a quantized model: each int8 layer becomes the Conv2d/Linear holding its
    dequantized weights (for counting parameters and MACs, and for runtimes without int8 kernels)."""
    model = copy.deepcopy(model)
    for name, module in int8_layers(model):
        model.set_submodule(name, float_layer(module))
    return model


# ----------------------------------------------------------------------------- PT2E form (PyTorch int8 kernels)


def pt2e_reference_graph(model: nn.Module) -> fx.GraphModule:
    """The workbench's int8 model rewritten in the form torchao's PT2E `convert_pt2e` produces:
    `quantized_decomposed` quantize/dequantize ops around float Conv2d/Linear whose weights are
    int8 codes dequantized per channel. Inductor's x86 passes (registered by torchao's
    X86InductorQuantizer module) fuse that form into oneDNN qconv/qlinear int8 kernels.

    The scales, zero points and codes are the ones this workbench calibrated or trained, copied
    as they are: the model PyTorch runs is the model ptq_static/qat built, not a recalibration.
    Dynamic int8 Linear layers (ptq_dynamic) keep their custom op and run simulated.
    """
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401  (ops and Inductor passes)

    gm = copy.deepcopy(trace(model)).cpu().eval()
    for node in list(gm.graph.nodes):
        module = called_module(gm, node)
        if isinstance(module, FixedQuantizeDequantize):
            _replace(gm, node, _pt2e_quantize_dequantize(gm, node, module))
        elif isinstance(module, Int8Layer):
            _replace(gm, node, _pt2e_layer(gm, node, module))
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _replace(gm: fx.GraphModule, node: fx.Node, replacement: fx.Node) -> None:
    node.replace_all_uses_with(replacement)
    gm.graph.erase_node(node)


def _pt2e_quantize_dequantize(gm: fx.GraphModule, node: fx.Node, module: FixedQuantizeDequantize) -> fx.Node:
    ops = torch.ops.quantized_decomposed
    info = torch.iinfo(module.zero_point.dtype)
    qparams = (float(module.scale), int(module.zero_point), info.min, info.max, module.zero_point.dtype)
    with gm.graph.inserting_before(node):
        codes = gm.graph.call_function(ops.quantize_per_tensor.default, (node.args[0], *qparams))
        return gm.graph.call_function(ops.dequantize_per_tensor.default, (codes, *qparams))


def _pt2e_layer(gm: fx.GraphModule, node: fx.Node, module: Int8Layer) -> fx.Node:
    """dequantize_per_channel(int8 codes) -> conv2d/linear with the float bias (the int32 bias
    times its scale: the value the int8 kernel adds). oneDNN takes signed int8 weights only:
    asymmetric uint8 weights are stored dequantized, and that layer runs in float."""
    channels = module.weight_codes.shape[0]
    prefix = node.target.replace(".", "_")
    signed = module.weight_codes.dtype == torch.int8
    constants = {  # a per-tensor scale is the same scale in every channel
        "weight": module.weight_codes if signed else float_layer(module).weight.detach(),
        "scale": module.weight_scale.float().expand(channels).contiguous(),
        "zero_point": module.weight_zero_point.to(torch.int64).expand(channels).contiguous(),
        "bias": module.bias_codes.float() * module.bias_scale,
    }
    for name, value in constants.items():
        gm.register_buffer(f"{prefix}_{name}", value)
    with gm.graph.inserting_before(node):
        weight, scale, zero_point, bias = (gm.graph.get_attr(f"{prefix}_{name}") for name in constants)
        if signed:
            weight = gm.graph.call_function(torch.ops.quantized_decomposed.dequantize_per_channel.default,
                                            (weight, scale, zero_point, 0, -128, 127, torch.int8))
        if module.kind == "conv":
            stride, padding, dilation, groups = module.conv_args
            return gm.graph.call_function(F.conv2d, (node.args[0], weight, bias, stride, padding, dilation, groups))
        return gm.graph.call_function(F.linear, (node.args[0], weight, bias))
