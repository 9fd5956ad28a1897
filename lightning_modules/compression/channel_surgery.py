"""Structured (channel) pruning: which channels must go together, and their physical removal.

A *channel group* is a set of channels that has to be pruned as one: the output channels of the
layers that write them (producers), the layers that carry them through unchanged (BatchNorm,
depthwise convolutions) and the layers that read them (consumers: the next Conv2d's input channels,
the next Linear's input features; after a flatten each channel is `repeat` consecutive features).
A residual addition joins the groups of its two operands into one, so a block's output and its
shortcut lose the same channels.

`channel_groups` finds the groups by tracing the model with torch.fx; any operation it does not
understand freezes the channels flowing into it (kept whole, with the reason recorded) rather than
guessing. The model's input channels and its output (the classes) are always frozen.
`remove_channels` then slices every member of a group to the kept channels and returns the model:
a smaller dense model that ordinary kernels run faster.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

# Modules that keep every channel where it is and map a zero channel to zero.
_ZERO_PRESERVING_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Tanh, nn.Hardtanh, nn.Dropout, nn.Identity,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)
_ZERO_PRESERVING_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.hardtanh, F.leaky_relu, F.gelu, F.silu, F.hardswish, torch.tanh, F.dropout,
    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
}
_ZERO_PRESERVING_METHODS = {"relu", "relu_", "contiguous", "clone"}
_RESHAPES = {torch.flatten, "flatten", "view", "reshape"}
_ADDS = {operator.add, operator.iadd, torch.add, "add", "add_"}


@dataclass
class ChannelGroup:
    """Channels pruned together; `frozen` says why a group must stay whole ('' when it may shrink)."""

    size: int
    producers: list[str] = field(default_factory=list)
    carriers: list[str] = field(default_factory=list)  # BatchNorm and depthwise Conv2d
    consumers: list[tuple[str, int]] = field(default_factory=list)  # (layer, features per channel)
    frozen: str = ""

    @property
    def prunable(self) -> bool:
        return not self.frozen and bool(self.producers)


class _Spaces:
    """Union-find over channel spaces, with the members and freeze reasons of each root."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.groups: list[ChannelGroup] = []

    def new(self, size: int, frozen: str = "") -> int:
        self.parent.append(len(self.parent))
        self.groups.append(ChannelGroup(size=size, frozen=frozen))
        return len(self.parent) - 1

    def find(self, space: int) -> int:
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space

    def group(self, space: int) -> ChannelGroup:
        return self.groups[self.find(space)]

    def freeze(self, space: int, reason: str) -> None:
        group = self.group(space)
        if not group.frozen:
            group.frozen = reason

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        ga, gb = self.groups[a], self.groups[b]
        self.parent[b] = a
        ga.producers += gb.producers
        ga.carriers += gb.carriers
        ga.consumers += gb.consumers
        ga.frozen = ga.frozen or gb.frozen
        return a


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def channel_groups(model: nn.Module, example_input: torch.Tensor) -> list[ChannelGroup]:
    """Trace `model` on `example_input` and return its channel groups (frozen ones included).

    Raises:
        ValueError: when torch.fx cannot trace the model (data-dependent control flow).
    """
    try:
        graph_module = fx.symbolic_trace(model)
    except Exception as error:  # fx raises many types; the user needs the model and the cause
        raise ValueError(f"channel pruning cannot trace {type(model).__name__} with torch.fx: {error}") from error
    was_training = model.training
    graph_module.eval()
    with torch.no_grad():
        ShapeProp(graph_module).propagate(example_input)
    model.train(was_training)
    modules = dict(model.named_modules())
    spaces = _Spaces()
    value: dict[fx.Node, tuple[int, int]] = {}  # node -> (space, features per channel)
    touched: dict[str, list[int]] = {}  # module -> spaces it belongs to
    calls: dict[str, int] = {}  # module -> how often the graph calls it, to catch reuse

    def fresh_frozen(node: fx.Node, reason: str) -> None:
        shape = _shape(node)
        if shape is not None:
            value[node] = (spaces.new(shape[1] if len(shape) > 1 else 1, frozen=reason), 1)

    def freeze_inputs(node: fx.Node, reason: str) -> None:
        for arg in node.all_input_nodes:
            if arg in value:
                spaces.freeze(value[arg][0], reason)

    def touch(name: str, space: int) -> None:
        touched.setdefault(name, []).append(space)

    for node in model_graph_nodes(graph_module):
        inputs = [arg for arg in node.all_input_nodes if arg in value]
        source = inputs[0] if inputs else None
        if node.op == "placeholder":
            fresh_frozen(node, "the model's input channels")
        elif node.op == "output":
            freeze_inputs(node, "the model's output (the classes)")
        elif node.op == "call_module":
            module = modules[node.target]
            calls[node.target] = calls.get(node.target, 0) + 1
            _module_rule(node, module, source, value, spaces, touch, fresh_frozen, freeze_inputs)
        elif node.op in ("call_function", "call_method"):
            _function_rule(node, inputs, value, spaces, fresh_frozen, freeze_inputs)
        elif _shape(node) is not None:
            fresh_frozen(node, f"produced by {node.op} {node.target}")

    for name, spaces_of_module in touched.items():
        if calls[name] > 1:  # a module called twice would be sliced twice
            for space in spaces_of_module:
                spaces.freeze(space, f"{name} is called more than once")
    roots = sorted({spaces.find(s) for s in range(len(spaces.parent))})
    return [spaces.groups[root] for root in roots]


def model_graph_nodes(graph_module: fx.GraphModule) -> list[fx.Node]:
    return list(graph_module.graph.nodes)


def _module_rule(node, module, source, value, spaces: _Spaces, touch, fresh_frozen, freeze_inputs) -> None:
    name = node.target
    in_shape = _shape(source) if source is not None else None
    out_shape = _shape(node)
    if source is None or in_shape is None or out_shape is None:
        fresh_frozen(node, f"{name} has no traced tensor input")
        return
    space, repeat = value[source]
    if isinstance(module, nn.Conv2d):
        if repeat != 1:
            freeze_inputs(node, f"{name} reads flattened features")
            fresh_frozen(node, f"{name} reads flattened features")
        elif module.groups == 1:
            spaces.group(space).consumers.append((name, 1))
            touch(name, space)
            value[node] = (spaces.new(module.out_channels), 1)
            spaces.group(value[node][0]).producers.append(name)
            touch(name, value[node][0])
        elif module.groups == module.in_channels == module.out_channels:  # depthwise: carries channels
            spaces.group(space).carriers.append(name)
            touch(name, space)
            value[node] = (space, 1)
        else:
            freeze_inputs(node, f"{name} is a grouped convolution (groups={module.groups})")
            fresh_frozen(node, f"{name} is a grouped convolution (groups={module.groups})")
    elif isinstance(module, nn.Linear):
        if len(in_shape) != 2:
            freeze_inputs(node, f"{name} is applied to a {len(in_shape)}-d tensor")
            fresh_frozen(node, f"{name} is applied to a {len(in_shape)}-d tensor")
            return
        spaces.group(space).consumers.append((name, repeat))
        touch(name, space)
        value[node] = (spaces.new(module.out_features), 1)
        spaces.group(value[node][0]).producers.append(name)
        touch(name, value[node][0])
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and repeat == 1:
        spaces.group(space).carriers.append(name)
        touch(name, space)
        value[node] = (space, 1)
    elif isinstance(module, _ZERO_PRESERVING_MODULES) and out_shape[:2] == in_shape[:2]:
        value[node] = (space, repeat)
    elif isinstance(module, nn.Flatten):
        _reshape_rule(node, source, value, fresh_frozen, freeze_inputs)
    else:
        freeze_inputs(node, f"{name} ({type(module).__name__}) is not understood by channel pruning")
        fresh_frozen(node, f"{name} ({type(module).__name__}) is not understood by channel pruning")


def _reshape_rule(node, source, value, fresh_frozen, freeze_inputs) -> None:
    """A flatten [N, C, H, W] -> [N, C*H*W] keeps the channels, each now H*W consecutive features."""
    in_shape, out_shape = _shape(source), _shape(node)
    space, repeat = value[source]
    if in_shape is not None and out_shape is not None and len(out_shape) == 2 and len(in_shape) >= 2 \
            and out_shape[0] == in_shape[0] and out_shape[1] == math.prod(in_shape[1:]):
        value[node] = (space, repeat * math.prod(in_shape[2:]))
    else:
        reason = f"reshaped by {node.target} from {in_shape} to {out_shape}"
        freeze_inputs(node, reason)
        fresh_frozen(node, reason)


def _function_rule(node, inputs, value, spaces: _Spaces, fresh_frozen, freeze_inputs) -> None:
    target = node.target
    if _shape(node) is None:
        return  # x.size() and friends: not a tensor, carries no channels
    if target in _ADDS and len(inputs) == 2 and _shape(inputs[0]) == _shape(inputs[1]) == _shape(node):
        (a, repeat_a), (b, repeat_b) = value[inputs[0]], value[inputs[1]]
        if repeat_a == repeat_b:
            value[node] = (spaces.union(a, b), repeat_a)
            return
    elif inputs and (target in _ZERO_PRESERVING_FUNCTIONS or target in _ZERO_PRESERVING_METHODS) \
            and len(inputs) == 1 and _shape(node)[:2] == _shape(inputs[0])[:2]:
        value[node] = value[inputs[0]]
        return
    elif target in _RESHAPES and len(inputs) == 1:
        _reshape_rule(node, inputs[0], value, fresh_frozen, freeze_inputs)
        return
    elif target == "mean" and len(inputs) == 1 and _shape(node) == _shape(inputs[0])[:2]:
        value[node] = value[inputs[0]]  # global average over the spatial dimensions
        return
    name = getattr(target, "__name__", str(target))
    freeze_inputs(node, f"used by {name}, which channel pruning does not understand")
    fresh_frozen(node, f"produced by {name}")


# ----------------------------------------------------------------------------- the math


def channel_scores(weights: list[torch.Tensor], norm: str) -> torch.Tensor:
    """Importance of each output channel of a group: the sum over its producers of the filter norms."""
    total = None
    for weight in weights:
        rows = weight.detach().flatten(1)
        score = rows.abs().sum(1) if norm == "l1" else rows.pow(2).sum(1).sqrt()
        total = score if total is None else total + score
    return total


def channel_keep_mask(scores: torch.Tensor, fraction: float, already_removed: torch.Tensor | None = None,
                      round_to: int = 1) -> torch.Tensor:
    """Bool mask over channels: drops the `round(fraction * C)` lowest-scoring ones, keeps at least one.

    With `round_to` > 1 the number kept is rounded up to a multiple of it (at most C), as
    Torch-Pruning's `round_to` does: oneDNN's convolutions run blocked over 8 or 16 channels, so
    a count between two multiples costs about as much as the next one up.
    Channels in `already_removed` rank lowest, so gradual pruning never brings a channel back.
    """
    scores = scores.detach().float().clone()
    if already_removed is not None:
        scores[already_removed] = -math.inf
    kept = max(scores.numel() - round(fraction * scores.numel()), 1)
    kept = min(math.ceil(kept / round_to) * round_to, scores.numel())
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if kept < scores.numel():
        keep[torch.topk(scores, scores.numel() - kept, largest=False).indices] = False
    return keep


# ----------------------------------------------------------------------------- module surgery


def _slice_parameter(module: nn.Module, name: str, index: torch.Tensor, dim: int) -> None:
    tensor = getattr(module, name, None)
    if tensor is None:
        return
    sliced = tensor.detach().index_select(dim, index.to(tensor.device)).clone()
    if isinstance(tensor, nn.Parameter):
        setattr(module, name, nn.Parameter(sliced, requires_grad=tensor.requires_grad))
    else:
        module._buffers[name] = sliced


def _shrink_outputs(module: nn.Module, keep: torch.Tensor) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        _slice_parameter(module, name, keep, 0)
    n = int(keep.numel())
    if isinstance(module, nn.Conv2d):
        module.out_channels = n
        if module.groups > 1:  # depthwise: its inputs are the same channels
            module.in_channels = module.groups = n
    elif isinstance(module, nn.Linear):
        module.out_features = n
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        module.num_features = n


def _shrink_inputs(module: nn.Module, keep: torch.Tensor, repeat: int) -> None:
    columns = (keep[:, None] * repeat + torch.arange(repeat, device=keep.device)).flatten()
    _slice_parameter(module, "weight", columns, 1)
    if isinstance(module, nn.Conv2d):
        module.in_channels = int(columns.numel())
    else:
        module.in_features = int(columns.numel())


def remove_channels(model: nn.Module, groups: list[ChannelGroup], keep: dict[int, torch.Tensor]) -> nn.Module:
    """Slice every member of group `i` to the channels `keep[i]` (sorted indices) and return the model.

    Raises:
        ValueError: when asked to shrink a frozen group.
    """
    modules = dict(model.named_modules())
    for i, kept in keep.items():
        group = groups[i]
        if group.frozen:
            raise ValueError(f"channel group {i} ({', '.join(group.producers)}) is frozen: {group.frozen}")
        kept = torch.as_tensor(kept, dtype=torch.long).sort().values
        if kept.numel() == group.size:
            continue
        for name in group.producers + group.carriers:
            _shrink_outputs(modules[name], kept)
        for name, repeat in group.consumers:
            _shrink_inputs(modules[name], kept, repeat)
    return model
