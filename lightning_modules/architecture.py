"""A model's architecture as plain data (JSON), rebuilt without running code from the file.

The artifact (evaluation/artifact.py) must not pickle modules: unpickling runs whatever code the
file names. It records instead
    recipe   the model as built: its class (or workbench builder) and the keyword arguments it
             was built with, the model's config (`model.net`) plus the data's shape;
    changes  what compression did to that model, found by comparing it with a fresh build of the
             recipe, as a list of {path, kind, module}: a module at `path` resized (same class,
             other attributes: channels removed), replaced (another class: a factored layer, an int8
             layer), added or removed; a quantized model traced into a torch.fx graph is one change
             at the root, its module tree and its graph;
    graph    for a torch.fx GraphModule, its nodes, each calling a module of the tree, a tensor
             method or a function from SAFE_FUNCTIONS.
A module is described by its class and its own attributes (kernel sizes, strides, bit widths:
numbers, strings, tuples, dtypes); its tensors travel separately, by state-dict key. Loading
imports only classes that are nn.Module subclasses from torch.nn, torchvision, the workbench or the
recipe's own module, sets those attributes and calls no constructor but the recipe's: nothing the
file says can name a function to call, except the graph's, which must be in SAFE_FUNCTIONS.
"""

from __future__ import annotations

import importlib
import math
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

import lightning_modules.deployable_int8  # noqa: F401  (registers torch.ops.workbench.*, which graphs call)


class ArchitectureError(ValueError):
    """A model that cannot be described as data, or a description that cannot be rebuilt safely."""


# ----------------------------------------------------------------------------- plain values as JSON


def encode_value(value: Any, where: str) -> Any:
    """`value` as JSON: tuples, dtypes, devices, memory formats and slices tagged so they come back
    as themselves; anything else (a function, an object) is an ArchitectureError naming `where`."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        value = value.item()
        return value if not isinstance(value, float) or math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, (tuple, torch.Size)):
        return {"tuple": [encode_value(item, where) for item in value]}
    if isinstance(value, list):
        return [encode_value(item, where) for item in value]
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        return {"dict": {key: encode_value(item, where) for key, item in value.items()}}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": "cpu"}  # a loaded model starts on the CPU
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    if isinstance(value, slice):
        return {"slice": [encode_value(part, where) for part in (value.start, value.stop, value.step)]}
    if value is Ellipsis:
        return {"ellipsis": True}
    raise ArchitectureError(f"{where} is a {type(value).__name__}, which the artifact cannot store as data "
                            f"(numbers, strings, tuples, lists, dicts, dtypes only)")


MEMORY_FORMATS = {"contiguous_format": torch.contiguous_format, "channels_last": torch.channels_last,
                  "preserve_format": torch.preserve_format}


def decode_value(value: Any, nodes: dict[str, fx.Node] | None = None) -> Any:
    if isinstance(value, list):
        return [decode_value(item, nodes) for item in value]
    if not isinstance(value, dict):
        return value
    (tag, content), = value.items()
    if tag == "tuple":
        return tuple(decode_value(item, nodes) for item in content)
    if tag == "dict":
        return {key: decode_value(item, nodes) for key, item in content.items()}
    if tag == "float":
        return float(content)
    if tag == "dtype":
        dtype = getattr(torch, content, None)
        if not isinstance(dtype, torch.dtype):
            raise ArchitectureError(f"unknown dtype {content!r}")
        return dtype
    if tag == "device":
        return torch.device("cpu")
    if tag == "memory_format":
        return MEMORY_FORMATS[content]
    if tag == "slice":
        return slice(*(decode_value(part, nodes) for part in content))
    if tag == "ellipsis":
        return Ellipsis
    if tag == "node" and nodes is not None:
        return nodes[content]
    raise ArchitectureError(f"unknown value tag {tag!r}")


# ----------------------------------------------------------------------------- the recipe


@dataclass(frozen=True)
class ModelRecipe:
    """How the model was built: `target(**kwargs)`; kwargs are plain values (no nested _target_)."""

    target: str
    kwargs: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "kwargs": encode_value(self.kwargs, f"model.net of {self.target}")}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelRecipe:
        return cls(data["target"], decode_value(data["kwargs"]))

    def build(self, device: str = "cpu") -> nn.Module:
        """The model, built fresh (on `device`: "meta" builds the structure without computing any
        weight); the target must be an nn.Module class or a registered builder."""
        builder = resolve_builder(self.target)
        nested = [key for key, value in self.kwargs.items() if isinstance(value, dict) and "_target_" in value]
        if nested:
            raise ArchitectureError(f"model.net.{nested[0]} holds a nested _target_: an artifact may only name "
                                    f"the model's class, not further callables")
        # building initialises weights: the caller's RNG stays as it was
        with torch.random.fork_rng(devices=[]), torch.device(device):
            model = builder(**self.kwargs)
        if not isinstance(model, nn.Module):
            raise ArchitectureError(f"{self.target} built a {type(model).__name__}, not an nn.Module")
        return model


def _import(path: str) -> Any:
    module_name, _, attribute = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise ArchitectureError(f"{path!r} cannot be imported: {error}") from error


def resolve_builder(target: str) -> Any:
    """An nn.Module class, or a function the workbench registers as a model builder."""
    from lightning_modules.models import MODEL_BUILDERS

    builder = _import(target)
    if builder in MODEL_BUILDERS.values() or (isinstance(builder, type) and issubclass(builder, nn.Module)):
        return builder
    raise ArchitectureError(f"model target {target!r} is not an nn.Module class or a workbench model builder "
                            f"({', '.join(MODEL_BUILDERS)}): refused, calling it could run any code")


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# packages whose nn.Module classes a description may name (beside the recipe's own module)
TRUSTED_MODULE_PACKAGES = ("torch.nn.", "torch.fx.", "torchvision.", "lightning_modules.")


def resolve_module_class(path: str, recipe: ModelRecipe | None) -> type[nn.Module]:
    own_module = recipe.target.rpartition(".")[0] + "." if recipe is not None else None
    trusted = TRUSTED_MODULE_PACKAGES + ((own_module,) if own_module else ())
    if not path.startswith(trusted):
        raise ArchitectureError(f"module class {path!r} is outside the trusted packages ({', '.join(trusted)}): "
                                f"refused")
    cls = _import(path)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ArchitectureError(f"{path!r} is not an nn.Module class: refused")
    return cls


# ----------------------------------------------------------------------------- one module as data


# what every nn.Module keeps in its __dict__ for itself (hooks, registries): not the layer's own attributes
MODULE_INTERNALS = frozenset(vars(nn.Module())) | {"_compiled_call_impl"}
GRAPH_INTERNALS = frozenset({"_graph", "_code", "_tracer_cls", "_tracer_extras", "meta", "_in_spec", "_out_spec",
                             "_erased", "_lineno_map", "_prologue_start", "_codegen"})


def own_attributes(module: nn.Module, where: str) -> dict[str, Any]:
    """The module's own plain attributes (tensors excluded: they travel by key), JSON-encoded."""
    skip = MODULE_INTERNALS | (GRAPH_INTERNALS if isinstance(module, fx.GraphModule) else frozenset())
    return {name: encode_value(value, f"{where}.{name}") for name, value in vars(module).items()
            if name not in skip and not isinstance(value, torch.Tensor)
            and not (isinstance(module, fx.GraphModule) and name.startswith("_"))}


def plain_tensor_attributes(module: nn.Module) -> list[str]:
    """Tensors held as plain attributes (fx's `_tensor_constant0`, ...), outside parameters and buffers."""
    return [name for name, value in vars(module).items() if isinstance(value, torch.Tensor)]


def describe_module(module: nn.Module, where: str = "model") -> dict[str, Any]:
    """`module` and its children as data: class, own attributes, which tensor slots are None."""
    # a GraphModule's class is made per instance; its tree is rebuilt under a plain Module
    cls = nn.Module if isinstance(module, fx.GraphModule) else type(module)
    description: dict[str, Any] = {"class": class_path(cls), "attributes": own_attributes(module, where)}
    empty = [name for name, value in {**module._parameters, **module._buffers}.items() if value is None]
    if empty:
        description["none"] = empty
    children = {name: describe_module(child, f"{where}.{name}") for name, child in module._modules.items()
                if child is not None}
    if children:
        description["children"] = children
    return description


def build_module(description: dict[str, Any], recipe: ModelRecipe | None) -> nn.Module:
    """The module `describe_module` described, without its tensors and without calling its
    constructor (which could need arguments that are not attributes): its attributes set, its
    children built the same way. A GraphModule is rebuilt by `build_graph_module`."""
    cls = resolve_module_class(description["class"], recipe)
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    for name, value in description.get("attributes", {}).items():
        object.__setattr__(module, name, decode_value(value))
    for name in description.get("none", []):
        module._parameters[name] = None
    for name, child in description.get("children", {}).items():
        module._modules[name] = build_module(child, recipe)
    return module


# ----------------------------------------------------------------------------- torch.fx graphs


def _function_name(function: Any) -> str:
    if isinstance(function, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return f"torch.ops.{function}"
    return f"{getattr(function, '__module__', None) or 'builtins'}.{function.__qualname__}"


# the functions a stored graph may call: tensor arithmetic and layers' functional forms, nothing
# that touches files, processes or imports
_SAFE = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.neg, operator.getitem,
    operator.matmul, operator.iadd, getattr,
    torch.add, torch.sub, torch.mul, torch.div, torch.matmul, torch.flatten, torch.reshape, torch.cat,
    torch.stack, torch.relu, torch.sigmoid, torch.tanh, torch.softmax, torch.mean, torch.sum, torch.transpose,
    torch.permute, torch.squeeze, torch.unsqueeze, torch.chunk, torch.split, torch.clamp, torch.max_pool2d,
    torch.conv2d, torch.batch_norm, F.linear,
    F.relu, F.relu6, F.hardtanh, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh, F.softmax,
    F.log_softmax, F.adaptive_avg_pool2d, F.avg_pool2d, F.max_pool2d, F.dropout, F.conv2d, F.batch_norm,
    F.interpolate, F.pad,
    torch.ops.workbench.quantize_dequantize.default, torch.ops.workbench.dequantize.default,
    torch.ops.workbench.dynamic_linear.default,
]
SAFE_FUNCTIONS: dict[str, Any] = {_function_name(function): function for function in _SAFE}
# tensor methods a graph may call on its values
SAFE_METHODS = frozenset({
    "view", "reshape", "flatten", "size", "dim", "permute", "transpose", "contiguous", "mean", "sum", "relu",
    "add", "mul", "sub", "div", "squeeze", "unsqueeze", "chunk", "split", "float", "clamp", "softmax",
    "sigmoid", "tanh", "expand", "expand_as", "view_as", "__getitem__",
})


def _encode_argument(value: Any, where: str) -> Any:
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if isinstance(value, (tuple, list)):
        items = [_encode_argument(item, where) for item in value]
        return {"tuple": items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        return {"dict": {key: _encode_argument(item, where) for key, item in value.items()}}
    return encode_value(value, where)


def describe_graph(gm: fx.GraphModule) -> list[dict[str, Any]]:
    """The graph's nodes as data; a call outside SAFE_FUNCTIONS / SAFE_METHODS cannot be stored."""
    nodes = []
    for node in gm.graph.nodes:
        target = node.target
        if node.op == "call_function":
            target = _function_name(node.target)
            if target not in SAFE_FUNCTIONS:
                raise ArchitectureError(f"graph node {node.name} calls {target}, which is not in "
                                        f"architecture.SAFE_FUNCTIONS: the artifact cannot store it")
        elif node.op == "call_method" and target not in SAFE_METHODS:
            raise ArchitectureError(f"graph node {node.name} calls the tensor method {target!r}, which is not in "
                                    f"architecture.SAFE_METHODS: the artifact cannot store it")
        nodes.append({"name": node.name, "op": node.op, "target": target,
                      "args": _encode_argument(node.args, f"graph node {node.name}"),
                      "kwargs": _encode_argument(node.kwargs, f"graph node {node.name}")})
    return nodes


def build_graph(nodes: list[dict[str, Any]]) -> fx.Graph:
    graph, built = fx.Graph(), {}
    for node in nodes:
        op, target = node["op"], node["target"]
        if op not in ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output"):
            raise ArchitectureError(f"graph node {node['name']} has an unknown op {op!r}")
        if op == "call_function":
            if target not in SAFE_FUNCTIONS:
                raise ArchitectureError(f"graph node {node['name']} calls {target!r}, which is not in "
                                        f"architecture.SAFE_FUNCTIONS: refused")
            target = SAFE_FUNCTIONS[target]
        elif op == "call_method" and target not in SAFE_METHODS:
            raise ArchitectureError(f"graph node {node['name']} calls the tensor method {target!r}: refused")
        elif not isinstance(target, str):
            raise ArchitectureError(f"graph node {node['name']}: target {target!r} is not a name")
        args = decode_value(node["args"], built)
        kwargs = decode_value(node["kwargs"], built)
        built[node["name"]] = graph.create_node(op, target, tuple(args), dict(kwargs), name=node["name"])
    graph.lint()
    return graph


# ----------------------------------------------------------------------------- the model as changes to its recipe


def _slot_names(module: nn.Module) -> tuple[set[str], set[str]]:
    return set(module._parameters), set(module._buffers)


def _plain_attributes(module: nn.Module) -> dict[str, Any]:
    return {name: value for name, value in vars(module).items()
            if name not in MODULE_INTERNALS and not isinstance(value, torch.Tensor)}


def _same_kind(fresh: nn.Module, final: nn.Module) -> bool:
    return (type(fresh) is type(final) and _slot_names(fresh) == _slot_names(final)
            and _plain_attributes(fresh) == _plain_attributes(final))


def _diff(fresh: nn.Module, final: nn.Module, path: str) -> list[dict[str, Any]]:
    if not _same_kind(fresh, final):
        kind = "resized" if type(fresh) is type(final) else "replaced"
        return [{"path": path, "kind": kind, "module": describe_module(final, path or "model")}]
    changes = []
    for name in dict.fromkeys([*fresh._modules, *final._modules]):
        child_path = f"{path}.{name}" if path else name
        before, after = fresh._modules.get(name), final._modules.get(name)
        if after is None:
            changes.append({"path": child_path, "kind": "removed"})
        elif before is None:
            changes.append({"path": child_path, "kind": "added", "module": describe_module(after, child_path)})
        else:
            changes.extend(_diff(before, after, child_path))
    return changes


def describe_changes(model: nn.Module, recipe: ModelRecipe | None) -> list[dict[str, Any]]:
    """What makes `model` differ from a fresh build of `recipe` (no recipe: the whole model is one
    change at the root). A GraphModule is always described whole, with its graph."""
    if isinstance(model, fx.GraphModule):
        return [{"path": "", "kind": "graph", "module": describe_module(model), "graph": describe_graph(model)}]
    if recipe is None:
        return [{"path": "", "kind": "replaced", "module": describe_module(model)}]
    return _diff(recipe.build("meta"), model, "")


def _set_child(model: nn.Module, path: str, module: nn.Module | None) -> nn.Module:
    if not path:
        return module
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    if module is None:
        del parent._modules[name]
    else:
        parent._modules[name] = module
    return model


# ----------------------------------------------------------------------------- tensors by key


SLOTS = ("parameter", "buffer", "buffer_np", "constant")


@dataclass
class TensorSlot:
    """One tensor of the model: where it lives (`key`, as in a state dict) and in what kind of slot:
    a parameter, a buffer (buffer_np: one kept out of the state dict), or a plain tensor attribute
    (constant: fx's `_tensor_constant0`)."""

    key: str
    slot: str
    tensor: torch.Tensor
    requires_grad: bool = False
    channels_last: bool = False  # the layout the model chose for it (lowrank.py times convolutions in it)


def _channels_last_strides(shape: torch.Size) -> tuple[int, ...]:
    return torch.empty(shape, device="meta", memory_format=torch.channels_last).stride()


def _channels_last(tensor: torch.Tensor) -> bool:
    """Strides of channels-last layout, not the default's (a 1-channel kernel is both: strides tell)."""
    return (tensor.dim() == 4 and tensor.stride() == _channels_last_strides(tensor.shape)
            and tensor.stride() != torch.empty(tensor.shape, device="meta").stride())


def _in_channels_last(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(tensor.shape, _channels_last_strides(tensor.shape), dtype=tensor.dtype).copy_(tensor)


def tensor_slots(model: nn.Module) -> list[TensorSlot]:
    slots = []
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        for name, parameter in module._parameters.items():
            if parameter is not None:
                slots.append(TensorSlot(prefix + name, "parameter", parameter.detach(), parameter.requires_grad,
                                        _channels_last(parameter)))
        derived = getattr(module, "DERIVED_BUFFERS", ())  # recomputed at load from the others
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in derived:
                kind = "buffer_np" if name in module._non_persistent_buffers_set else "buffer"
                slots.append(TensorSlot(prefix + name, kind, buffer.detach()))
        slots.extend(TensorSlot(prefix + name, "constant", vars(module)[name].detach())
                     for name in plain_tensor_attributes(module))
    return slots


def install_tensors(model: nn.Module, slots: list[TensorSlot]) -> None:
    """Put each tensor in its slot; every parameter and buffer the model has must come from `slots`."""
    for item in slots:
        if item.slot not in SLOTS:
            raise ArchitectureError(f"tensor {item.key}: unknown slot {item.slot!r}")
        path, _, name = item.key.rpartition(".")
        tensor = _in_channels_last(item.tensor) if item.channels_last else item.tensor
        try:
            module = model.get_submodule(path)
        except AttributeError as error:
            raise ArchitectureError(f"tensor {item.key} belongs to no module of the model") from error
        if item.slot == "parameter":
            module._parameters[name] = nn.Parameter(tensor, requires_grad=item.requires_grad)
        elif item.slot == "constant":
            object.__setattr__(module, name, tensor)
        else:
            module._buffers[name] = tensor
            if item.slot == "buffer_np":
                module._non_persistent_buffers_set.add(name)
    for module in model.modules():
        if getattr(module, "DERIVED_BUFFERS", ()):
            module.derive_buffers()
    given = {item.key for item in slots} | {
        f"{path}.{name}" if path else name for path, module in model.named_modules()
        for name in getattr(module, "DERIVED_BUFFERS", ())}
    missing = [key for key in dict.fromkeys([*(k for k, _ in model.named_parameters(remove_duplicate=False)),
                                             *(k for k, _ in model.named_buffers(remove_duplicate=False))])
               if key not in given]
    if missing:
        raise ArchitectureError(f"the model has tensors the artifact does not hold: {', '.join(missing[:5])}")


def build_architecture(recipe: ModelRecipe | None, changes: list[dict[str, Any]],
                       slots: list[TensorSlot]) -> nn.Module:
    """The model: the recipe built fresh, each change replayed on it, the tensors put in place.

    The recipe is built on the meta device (its weights would be overwritten anyway: a 20 ms
    initialisation saved on LeNet-300-100); a constructor that keeps other tensors than those the
    file holds (a plain tensor attribute) is built again on the CPU."""
    model = _assemble(recipe, changes, slots, "meta")
    if any(value.is_meta for module in model.modules() for value in vars(module).values()
           if isinstance(value, torch.Tensor)):
        model = _assemble(recipe, changes, slots, "cpu")
    return model


def _assemble(recipe: ModelRecipe | None, changes: list[dict[str, Any]], slots: list[TensorSlot],
              device: str) -> nn.Module:
    model, graph = (recipe.build(device) if recipe is not None else None), None
    for change in changes:
        kind = change.get("kind")
        if kind not in ("resized", "replaced", "added", "removed", "graph"):
            raise ArchitectureError(f"unknown change kind {kind!r}")
        if model is None and change["path"]:
            raise ArchitectureError("the description has no recipe and no model at its root")
        if kind == "graph":
            if change["path"]:
                raise ArchitectureError("a graph change must be at the model's root")
            graph = build_graph(change["graph"])
        model = _set_child(model, change["path"], None if kind == "removed" else build_module(change["module"], recipe))
    if model is None:
        raise ArchitectureError("the description names no model")
    install_tensors(model, slots)
    if graph is None:
        return model
    # the tree and its tensors first: GraphModule copies what its nodes reach from them
    graph_module = fx.GraphModule(model, graph)
    for name, value in vars(model).items():  # the GraphModule's own attributes, if it had any
        if name not in MODULE_INTERNALS and not hasattr(graph_module, name):
            object.__setattr__(graph_module, name, value)
    return graph_module
