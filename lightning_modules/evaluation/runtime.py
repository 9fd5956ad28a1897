"""Runtimes: what executes a finalized model when it is measured (accuracy and latency alike).

A runtime turns an nn.Module into the callable that is scored and timed. Three are registered:
    torch   PyTorch eager, each BatchNorm that follows a convolution folded into it (as ONNX
            Runtime and Inductor fold it on load). A quantized model (../deployable_int8.py) runs as an exact integer
            simulation in float kernels: its accuracy is the int8 model's, its latency is not an
            int8 kernel's (the report names that latency `simulated`).
    inductor  PyTorch compiled: torch.export, then torch.compile (Inductor, weights frozen). A
            quantized model is first rewritten in torchao's PT2E form (deployable_int8.py:
            pt2e_reference_graph), which Inductor's x86 passes lower to oneDNN int8 kernels
            (qconv/qlinear); an fp32 model is compiled the same way, so the two compare fairly.
            `hardware.compile` picks it for runtime torch: true (always), auto (when the measured
            model is int8: it and its baseline) or false.
    ort     ONNX Runtime on the CPU: the model is exported to ONNX (the dynamo exporter); a
            quantized model exports as QuantizeLinear/DequantizeLinear around each layer, which
            ONNX Runtime fuses into int8 kernels (QLinearConv, QGemm, QLinearAdd ...); the file
            is stored in that fused form, and the .onnx file is the deployable artifact whose
            size is reported and which is loaded and measured.
A runtime with its own file format sets `suffix`, `save` and `load`; the report then measures
that file. Without them the workbench's own artifact (artifact.py) is the deployable.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import re
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx
from torch import nn

from lightning_modules.contract import latency_ms_p50
from lightning_modules.deployable_int8 import ONNX_TRANSLATIONS, is_quantized, pt2e_reference_graph
from lightning_modules.layers import fold_batchnorm_in_graph

Deployed = Callable[[torch.Tensor], torch.Tensor]
log = logging.getLogger(__name__)

# ONNX Runtime's int8 kernels, as they appear in its optimized graph
INT8_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "QLinearAdd", "QLinearGlobalAveragePool",
            "QLinearAveragePool", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulInteger", "ConvInteger")


def torch_eager(model: nn.Module, device: torch.device, threads: int | None = None,
                input_shape: tuple[int, ...] | None = None) -> Deployed:
    return with_batchnorm_folded(model.eval()).to(device)


def with_batchnorm_folded(model: nn.Module) -> nn.Module:
    """A copy of the eval model with each BatchNorm that directly follows a convolution folded into
    it (layers.fold_batchnorm_in_graph, the fold QAT uses): what a deployed eval model computes,
    without BatchNorm's own pass over the activations, so eager timings are those of the model one
    would ship (ONNX Runtime and Inductor fold it too). A model torch.fx cannot trace is returned as
    it is, and said so."""
    if not any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules()):
        return model
    copied = copy.deepcopy(model)
    try:
        graph = LayerTracer().trace(copied)
    except Exception as error:  # data-dependent control flow between layers
        log.warning("BatchNorm left unfolded in the eager runtime: %s cannot be traced (%s: %s)",
                    type(model).__name__, type(error).__name__, error)
        return model
    return fold_batchnorm_in_graph(torch.fx.GraphModule(copied, graph))


class LayerTracer(torch.fx.Tracer):
    """Traces through containers but keeps every module without children whole: a workbench layer
    with its own forward (nm's SemiStructuredLinear, quantized and low-bit layers) stays the module
    it is, with its kernels, instead of being inlined into the graph or failing the trace."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return next(module.children(), None) is None or super().is_leaf_module(module, qualified_name)


# ----------------------------------------------------------------------------- PyTorch compiled (Inductor)

# oneDNN int8 kernels as Inductor's generated code calls them
INDUCTOR_INT8_KERNELS = re.compile(r"torch\.ops\.onednn\.q(?:conv|linear)_pointwise")


class CompiledModel:
    """A model compiled by Inductor with frozen weights, one graph per batch size.

    Inductor compiles on the first call with each new batch size (`dynamic=False`: oneDNN's int8
    convolutions fail a stride check under dynamic shapes in torch 2.14), which is the untimed
    warm-up of a latency measurement or the first batch of an accuracy pass; nothing compiles
    before a call, so a model timed at one batch size (a quantization gate's) compiles once, and
    a compile takes seconds. `int8_kernel_ops` counts the oneDNN int8 kernel calls in the code
    generated by the first compile (at batch 1 when asked before any call): what really runs,
    not what was asked for.
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...]) -> None:
        from torch._inductor import config as inductor_config

        # weights as constants: Inductor's int8 weight prepacking needs them. Set for the process
        # (not patched per call) because every batch size compiles on its first call.
        inductor_config.freezing = True
        self.input_shape = input_shape
        graph = pt2e_reference_graph(model) if is_quantized(model) else model.eval().cpu()
        # Compiled as it is, not through torch.export: the exported module's call wrapper (input
        # checks, pytree flattening) cost ~0.15 ms per call on 2 cores, as much as lenet300 runs.
        self.compiled = torch.compile(graph, dynamic=False)
        self._int8_kernel_ops: int | None = None

    @property
    def int8_kernel_ops(self) -> int:
        if self._int8_kernel_ops is None:
            self(torch.zeros((1, *self.input_shape)))
        return self._int8_kernel_ops

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        from torch._inductor.utils import run_and_get_code

        with torch.inference_mode():
            # Dynamo guards on the input's kind too: an ordinary tensor (an accuracy pass's batch) after
            # an inference tensor (every timing's input) of the same size would compile another graph
            inputs = inputs.cpu() if inputs.is_inference() else inputs.cpu().clone()
            if self._int8_kernel_ops is None:  # the first compile: read the code it generates
                outputs, code = healing_inductor_cache(run_and_get_code, self.compiled, inputs)
                self._int8_kernel_ops = sum(len(INDUCTOR_INT8_KERNELS.findall(source)) for source in code)
                return outputs
            return healing_inductor_cache(self.compiled, inputs)


BROKEN_KERNEL = re.compile(r"(/\S+\.so): (?:file too short|invalid ELF header)")


def healing_inductor_cache(function: Callable[..., Any], *args: Any, attempts: int = 16) -> Any:
    """`function(*args)`, compiled again if Inductor's on-disk cache held broken kernel libraries.

    A process killed while Inductor wrote a compiled kernel (`.so`) leaves the file truncated, and every
    later compile that needs the same kernel fails to load it ("file too short"), in every run, until
    the file goes: each one met is removed (only inside Inductor's cache folder) and the call compiles
    it anew, up to `attempts` files."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    for _ in range(attempts):
        try:
            return function(*args)
        except Exception as error:
            found = BROKEN_KERNEL.search(str(error))
            broken = Path(found.group(1)).resolve() if found else None
            if broken is None or Path(cache_dir()).resolve() not in broken.parents:
                raise
            log.warning("Inductor's cache held a broken kernel library (%s); removed, compiling it again", found.group(0))
            broken.unlink(missing_ok=True)
    return function(*args)


def torch_compiled(model: nn.Module, device: torch.device, threads: int | None = None,
                   input_shape: tuple[int, ...] | None = None) -> Deployed:
    if device.type != "cpu":
        raise ValueError(f"hardware.runtime='inductor' runs on the CPU; hardware.device={device.type!r} is not valid; "
                         f"allowed: cpu")
    if input_shape is None:
        raise ValueError("hardware.runtime='inductor' exports the model: pass input_shape to deploy()")
    return CompiledModel(model, input_shape)


# ----------------------------------------------------------------------------- ONNX Runtime


def export_onnx(model: nn.Module, path: str | Path, input_shape: tuple[int, ...]) -> int:
    """Export `model` to ONNX with a dynamic batch axis; return the file's size in bytes.

    Quantized models carry the workbench's custom ops; their ONNX translations come from
    deployable_int8.py.
    """
    path = Path(path)
    model = model.eval().cpu()
    example = torch.zeros((2, *input_shape))
    quiet = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.WARNING)  # the exporter reports every pass at INFO
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # and prints its progress
            program = torch.onnx.export(
                model, (example,), dynamo=True, input_names=["input"], output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
                custom_translation_table=ONNX_TRANSLATIONS(), verbose=False,
            )
            program.save(str(path))
    finally:  # a model that does not export is reported, and the loggers are as they were
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
    _strip_metadata(path)
    if is_quantized(model):
        _store_as_int8_operators(path)
    return path.stat().st_size


def _store_as_int8_operators(path: Path) -> None:
    """Replace a QDQ file by the graph ONNX Runtime fuses it into (QLinearConv, QGemm,
    QLinearAdd: its QOperator form), saved by ONNX Runtime at its `extended` level, which holds
    no layout or hardware-specific rewrite: one int8 node per layer instead of the six nodes and
    per-channel bias scales around each convolution. That file is what ships: ONNX Runtime loads
    and runs it (the same kernels, identical outputs) and its size is the size reported."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as folder:
        fused = str(Path(folder) / "fused.onnx")
        options = _session_options(1, fused)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        _session(path, options)
        model = onnx.load(fused)
    for node in model.graph.node:
        node.name = ""
    _drop_default_attributes(model.graph)
    _shorten_tensor_names(model.graph)  # ONNX Runtime names its shared zero point with a UUID
    used = {node.domain for node in model.graph.node}
    kept = [opset for opset in model.opset_import if opset.domain in used or opset.domain in ("", "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    del model.metadata_props[:]
    onnx.save(model, str(path))


def _strip_metadata(path: Path) -> None:
    """Drop the exporter's per-node provenance (source lines, torch node names): it is no part of
    the model and would weigh as much as the int8 weights of a small network."""
    import onnx

    model = onnx.load(str(path))
    for graph in [model.graph, *(function for function in model.functions)]:
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
        if hasattr(graph, "doc_string"):
            graph.doc_string = ""
    for value in [*model.graph.input, *model.graph.output]:
        del value.metadata_props[:]
    # intermediate shape annotations: ONNX Runtime infers them again when it loads the file
    del model.graph.value_info[:]
    for node in model.graph.node:
        node.name = ""  # optional in ONNX; the exporter's names are long
    _drop_default_attributes(model.graph)
    _deduplicate_initializers(model.graph)
    _shorten_tensor_names(model.graph)
    del model.graph.metadata_props[:]
    onnx.save(model, str(path))


# convolutions' attributes whose absence means the same: unit strides and dilations, no padding, and
# the kernel's shape, which ONNX infers from the weight (pooling needs its kernel_shape: not listed)
CONV_OPS = ("Conv", "QLinearConv", "ConvInteger")
NEUTRAL_CONV_ATTRIBUTES = {"strides": 1, "dilations": 1, "pads": 0}


def _drop_default_attributes(graph) -> None:
    """Remove attributes that state their default (the op schema's, or a convolution's neutral
    unit strides and zero pads): about 60 bytes per convolution, 1.5% of resnet20's int8 file."""
    import onnx
    from onnx import helper

    for node in graph.node:
        try:
            schema = onnx.defs.get_schema(node.op_type, domain=node.domain)
        except onnx.defs.SchemaError:
            schema = None  # an op ONNX does not define here: left as it is
        keep = []
        for attribute in node.attribute:
            value = helper.get_attribute_value(attribute)
            default = schema.attributes.get(attribute.name) if schema is not None else None
            stated_default = (default is not None and default.default_value.type != 0
                              and helper.get_attribute_value(default.default_value) == value)
            conv_neutral = node.op_type in CONV_OPS and (
                attribute.name == "kernel_shape" or (attribute.name in NEUTRAL_CONV_ATTRIBUTES and all(
                    item == NEUTRAL_CONV_ATTRIBUTES[attribute.name] for item in value)))
            if not (stated_default or conv_neutral):
                keep.append(attribute)
        del node.attribute[:]
        node.attribute.extend(keep)


def _shorten_tensor_names(graph) -> None:
    """Rename the graph's inner tensors (not its inputs and outputs) to the shortest ids, the
    most often read first: the exporter's module paths are repeated in every node that reads them."""
    keep = {value.name for value in [*graph.input, *graph.output]}
    uses = Counter(name for node in graph.node for name in [*node.input, *node.output] if name and name not in keep)
    names = {name: _compact_id(rank) for rank, (name, _) in enumerate(uses.most_common())}

    def short(name: str) -> str:
        return names.get(name, name)

    for initializer in graph.initializer:
        initializer.name = short(initializer.name)
    for node in graph.node:
        node.input[:] = [short(name) for name in node.input]
        node.output[:] = [short(name) for name in node.output]


def _compact_id(index: int, alphabet: str = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ") -> str:
    """a, b, ..., Z, ba, bb, ...: one letter for the first 52 tensors, two for the next 2,704."""
    digits = ""
    while True:
        index, rest = divmod(index, len(alphabet))
        digits = alphabet[rest] + digits
        if index == 0:
            return digits


def _deduplicate_initializers(graph) -> None:
    """One initializer for identical constants (same type, shape and bytes): the exporter writes
    a quantizer's scale and zero point once for its QuantizeLinear and again for each reader."""
    first: dict[tuple, str] = {}
    alias: dict[str, str] = {}
    for initializer in list(graph.initializer):
        key = (initializer.data_type, tuple(initializer.dims), initializer.SerializeToString(deterministic=True)
               .replace(initializer.name.encode(), b""))
        if key in first:
            alias[initializer.name] = first[key]
            graph.initializer.remove(initializer)
        else:
            first[key] = initializer.name
    for node in graph.node:
        node.input[:] = [alias.get(name, name) for name in node.input]


# ONNX Runtime's WeightBiasQuantization quantizes the weights of a float Conv/Gemm that sits
# between a DequantizeLinear and a QuantizeLinear: it would turn the layers the quantization
# callbacks left in float (slower in int8 on this machine, min_speedup) back into int8 kernels.
KEEP_FLOAT_LAYERS = ["WeightBiasQuantization", "QDQPropagationTransformer"]


def _session(path: str | Path, options):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=KEEP_FLOAT_LAYERS)


# What an intra-op pool thread does while it waits for work: "on" busy-waits (ONNX Runtime's default, which
# keeps spinning for a while after a call ends), "off" sleeps, "stop_after_run" spins during a call only.
SPINNING = {"on": {}, "off": {"session.intra_op.allow_spinning": "0"},
            "stop_after_run": {"session.force_spinning_stop": "1"}}
# What the workbench's sessions do: every timing here runs two or more sessions in one process (a model
# against its baseline, the int8 gate's candidates against the float model), and a session that spins after
# its call takes the cores the next session's call needs. lenet5 on all cores (2), batch 32, quiet, the same
# candidates read by the int8 gate and by measure_latency (scripts/benchmark_int8_gate.py --runtime ort,
# 2026-12-02): spinning "on", one int8 Linear read 0.75-1.82x in the gate where the run read 1.01-1.03x;
# "stop_after_run", gate and run within 0.04 of each other for every candidate (that one 0.97-1.02x). It costs
# batch-1 calls of tiny models the wake-up of the pool's threads (lenet300 0.036 -> 0.060 ms,
# scripts/benchmark_latency_noise.py): baseline and model alike. The stored .onnx file carries no
# session options: whoever serves it chooses.
MEASURED_SPINNING = "stop_after_run"


def _session_options(threads: int | None, optimized_path: str | None = None, spinning: str = "on"):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0  # 0: ONNX Runtime's default, one per physical core
    for key, value in SPINNING[spinning].items():
        options.add_session_config_entry(key, value)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if optimized_path is not None:
        options.optimized_model_filepath = optimized_path
    return options


class OrtModel:
    """An ONNX Runtime session that takes and returns torch tensors, like a module."""

    def __init__(self, path: str | Path, threads: int | None = None, spinning: str = MEASURED_SPINNING) -> None:
        self.path = Path(path)
        self.session = _session(self.path, _session_options(threads, spinning=spinning))
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(inputs.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])


def optimized_ops(path: str | Path) -> list[str]:
    """The op types of the graph ONNX Runtime really executes (after its fusions), in order."""
    import onnx

    with tempfile.TemporaryDirectory() as folder:
        optimized = str(Path(folder) / "optimized.onnx")
        _session(path, _session_options(1, optimized))
        return [node.op_type for node in onnx.load(optimized).graph.node]


def ort_load(path: str | Path, device: torch.device, threads: int | None = None) -> Deployed:
    if device.type != "cpu":
        raise ValueError(f"hardware.runtime='ort' runs on the CPU; hardware.device={device.type!r} is not valid; allowed: cpu")
    return OrtModel(path, threads)


# ----------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Runtime:
    """How a runtime runs a model, and, when it has one, how it writes and reads its own file."""

    deploy: Callable[..., Deployed]                             # (model, device, threads, input_shape)
    suffix: str | None = None                                   # e.g. ".onnx"
    save: Callable[[nn.Module, Path, tuple[int, ...]], int] | None = None   # -> bytes written
    load: Callable[..., Deployed] | None = None                 # (path, device, threads) -> Deployed
    int8_kernels: bool = False                                  # a quantized model runs on int8 kernels
    devices: tuple[str, ...] = ("cpu", "cuda")                  # the hardware.device values it runs on


def _ort_from_module(model: nn.Module, device: torch.device, threads: int | None = None,
                     input_shape: tuple[int, ...] | None = None) -> Deployed:
    if input_shape is None:
        raise ValueError("hardware.runtime='ort' exports the model: pass input_shape to deploy()")
    # the session holds the graph in memory once built: the file is not needed after it
    with tempfile.TemporaryDirectory(prefix="workbench-ort-") as folder:
        export_onnx(model, Path(folder) / "model.onnx", input_shape)
        return ort_load(Path(folder) / "model.onnx", device, threads)


RUNTIMES: dict[str, Runtime] = {
    "torch": Runtime(deploy=torch_eager),
    "inductor": Runtime(deploy=torch_compiled, int8_kernels=True),
    "ort": Runtime(deploy=_ort_from_module, suffix=".onnx", save=export_onnx, load=ort_load, int8_kernels=True,
                   devices=("cpu",)),
}


def deploy(model: nn.Module, runtime: str, device: torch.device, threads: int | None = None,
           input_shape: tuple[int, ...] | None = None) -> Deployed:
    if runtime not in RUNTIMES:
        raise ValueError(f"hardware.runtime={runtime!r} is not valid; allowed: {', '.join(RUNTIMES)}")
    return RUNTIMES[runtime].deploy(model, device, threads, input_shape)


def runtime_name(hardware, quantized: bool) -> str:
    """The runtime that measures a model on `hardware`: runtime torch becomes inductor when
    `hardware.compile` is true, or `auto` and the measured model is int8 (its baseline follows,
    so both are deployed the same way)."""
    return measured_runtime(hardware.runtime, hardware.get("compile", False), quantized)  # validated in config.py


def measured_runtime(runtime: str, compile_mode: bool | str, quantized: bool) -> str:
    if runtime == "torch" and (compile_mode is True or (compile_mode == "auto" and quantized)):
        return "inductor"
    return runtime


# ----------------------------------------------------------------------------- one layer, int8 against float


def time_int8_layer(runtime: str, float_layer: nn.Module, int8_layer: nn.Module, input_shape: tuple[int, ...],
                    batch: int, threads: int | None, warmup: int = 10, repeats: int = 40) -> tuple[float, float]:
    """p50 latency (ms) at `batch` of one layer in float and in int8 on `runtime` (ort or inductor),
    timed interleaved after warm-up on `threads` threads: what min_speedup of the quantization
    callbacks decides from.

    `int8_layer` is nn.Sequential(input quantizer, Int8Layer, output quantizer) of the deployable
    model. On ort both run in ONNX Runtime (graphs written directly), the int8 one fused into
    QuantizeLinear -> QLinearConv/QGemm -> DequantizeLinear: it pays a quantize and a dequantize
    that a layer between int8 neighbours does not, as a float layer between int8 neighbours pays a
    dequantize and a quantize. On inductor the int8 layer is the oneDNN kernel Inductor calls
    (qconv/qlinear, prepacked weights, uint8 NHWC in and out) and the float one the oneDNN float
    convolution/matmul on channels-last input, both without compiling (seconds per model, not minutes).
    """
    from lightning_modules.evaluation.latency import measure_latency

    if runtime == "ort":
        models = {}
        with tempfile.TemporaryDirectory(prefix="workbench-layer-") as folder:  # sessions keep their graphs in memory
            for kind, graph in _layer_graphs(float_layer, int8_layer, input_shape).items():
                _save_graph(graph, Path(folder) / f"{kind}.onnx")
                models[kind] = OrtModel(Path(folder) / f"{kind}.onnx", threads)
    elif runtime == "inductor":
        models = {"float": _channels_last(float_layer.eval()), "int8": _OneDnnInt8(int8_layer, (batch, *input_shape))}
    else:
        raise ValueError(f"runtime={runtime!r} has no int8 kernels to time; allowed: ort, inductor")
    times = measure_latency(models, input_shape, [batch], torch.device("cpu"), warmup, repeats)
    key = latency_ms_p50(batch)
    return times["float"][key], times["int8"][key]


def _layer_graphs(float_layer: nn.Module, int8_layer: nn.Sequential, input_shape: tuple[int, ...]) -> dict:
    """One layer as two ONNX graphs, written directly (the exporter takes seconds per graph): float
    Conv/Gemm, and the QDQ form the exporter writes for the deployable model (QuantizeLinear,
    DequantizeLinear of the input, of the int8 weight codes and of the int32 bias around the
    Conv/Gemm, QuantizeLinear and DequantizeLinear of the output), which ONNX Runtime fuses the same way."""
    from onnx import TensorProto, helper, numpy_helper

    source, layer, target = int8_layer[0], int8_layer[1], int8_layer[2]
    conv = layer.kind == "conv"

    def attributes() -> dict:
        if not conv:
            return {"transB": 1}
        stride, padding, dilation, groups = layer.conv_args
        return {"strides": list(stride), "pads": [*padding, *padding], "dilations": list(dilation), "group": groups}

    def const(name: str, value: torch.Tensor):
        return numpy_helper.from_array(value.detach().cpu().numpy(), name)

    op = "Conv" if conv else "Gemm"
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *input_shape])]
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)]
    float_graph = helper.make_graph([helper.make_node(op, ["input", "w", "b"], ["output"], **attributes())], "float",
                                    inputs, outputs, [const("w", float_layer.weight), const("b", float_layer.bias)])
    nodes = [helper.make_node("QuantizeLinear", ["input", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["x"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=0),
             helper.make_node("DequantizeLinear", ["bq", "bs", "bz"], ["b"], axis=0),
             helper.make_node(op, ["x", "w", "b"], ["y"], **attributes()),
             helper.make_node("QuantizeLinear", ["y", "ys", "yz"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["output"])]
    constants = [const("xs", source.scale), const("xz", source.zero_point), const("wq", layer.weight_codes),
                 const("ws", layer.weight_scale), const("wz", layer.weight_zero_point), const("bq", layer.bias_codes),
                 const("bs", layer.bias_scale), const("bz", layer.bias_zero_point), const("ys", target.scale),
                 const("yz", target.zero_point)]
    int8_graph = helper.make_graph(nodes, "int8", inputs, outputs, constants)
    return {"float": float_graph, "int8": int8_graph}


def _save_graph(graph, path: Path) -> None:
    from onnx import helper

    helper_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    helper_model.ir_version = 8
    path.write_bytes(helper_model.SerializeToString())


def _channels_last(layer: nn.Module) -> Deployed:
    if not isinstance(layer, nn.Conv2d):
        return layer
    layer = layer.to(memory_format=torch.channels_last)
    return lambda x: layer(x.contiguous(memory_format=torch.channels_last))


class _OneDnnInt8:
    """One Int8Layer as the oneDNN int8 kernel Inductor lowers it to, fed the uint8 NHWC codes of
    its input (quantized once, outside the timing, as an int8 neighbour would hand them over)."""

    def __init__(self, micro: nn.Sequential, shape: tuple[int, ...]) -> None:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401  (registers the onednn ops)

        source, layer, target = micro[0], micro[1], micro[2]
        self.x_scale, self.x_zero_point = float(source.scale), int(source.zero_point)
        self.out_scale, self.out_zero_point = float(target.scale), int(target.zero_point)
        self.layer = layer
        self.w_scale = layer.weight_scale.float().expand(layer.weight_codes.shape[0]).contiguous()
        self.w_zero_point = torch.zeros(layer.weight_codes.shape[0], dtype=torch.int64)
        self.bias = layer.bias_codes.float() * layer.bias_scale
        codes = torch.randint(0, 256, shape, dtype=torch.uint8)
        if layer.kind == "conv":
            self.stride, self.padding, self.dilation, self.groups = (list(a) if isinstance(a, tuple) else a
                                                                     for a in layer.conv_args)
            self.codes = codes.contiguous(memory_format=torch.channels_last)
            self.weight = torch.ops.onednn.qconv_prepack(layer.weight_codes, self.w_scale, self.x_scale,
                                                         self.x_zero_point, self.stride, self.padding, self.dilation,
                                                         self.groups, list(shape))
        else:
            self.codes = codes
            self.weight = torch.ops.onednn.qlinear_prepack(layer.weight_codes, list(shape))

    def __call__(self, _inputs: torch.Tensor) -> torch.Tensor:
        common = (self.codes, self.x_scale, self.x_zero_point, self.weight, self.w_scale, self.w_zero_point, self.bias)
        if self.layer.kind == "conv":
            return torch.ops.onednn.qconv_pointwise(*common, self.stride, self.padding, self.dilation, self.groups,
                                                    self.out_scale, self.out_zero_point, None, "none", [], "")
        return torch.ops.onednn.qlinear_pointwise(*common, self.out_scale, self.out_zero_point, None, "none", [], "")
