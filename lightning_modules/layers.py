"""Layer helpers that compression and evaluation both use: the weighted layers of a model, their
per-layer table and parameter counts, and the torch.fx graph helpers (trace, BatchNorm fold).

It imports nothing of the workbench, so every other module may import it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn

# The layer types the method families act on by default.
WEIGHTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)


def weighted_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, module) of every Linear/Conv2d layer, in definition order."""
    for name, module in model.named_modules():
        if isinstance(module, WEIGHTED_LAYERS):
            yield name, module


def parameter_counts(model: nn.Module) -> dict[str, float]:
    """params_total/params_nonzero over all parameters; sparsity over Linear/Conv weights."""
    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    prunable = [module.weight for _, module in weighted_layers(model)]
    prunable_total = sum(w.numel() for w in prunable)
    prunable_zero = sum(w.numel() - int(torch.count_nonzero(w)) for w in prunable)
    return {
        "params_total": total,
        "params_nonzero": nonzero,
        "sparsity": prunable_zero / prunable_total if prunable_total else 0.0,
    }


def layer_table(model: nn.Module) -> list[dict[str, Any]]:
    """Per Linear/Conv layer: type, weight shape, weights, nonzero weights, sparsity."""
    rows = []
    for name, module in weighted_layers(model):
        weight = module.weight
        nonzero = int(torch.count_nonzero(weight))
        rows.append({"layer": name, "type": type(module).__name__, "shape": "x".join(map(str, weight.shape)),
                     "weights": weight.numel(), "nonzero": nonzero, "sparsity": 1 - nonzero / weight.numel()})
    return rows


# ----------------------------------------------------------------------------- torch.fx graphs


def called_module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The module a `call_module` node calls; None for any other node."""
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def trace(model: nn.Module) -> fx.GraphModule:
    """The model as a torch.fx graph (every model of the workbench traces symbolically)."""
    if isinstance(model, fx.GraphModule):
        return model
    try:
        return fx.symbolic_trace(model)
    except Exception as error:
        raise ValueError(f"quantization needs a model torch.fx can trace; {type(model).__name__} fails: {error}") from error


@torch.no_grad()
def fold_batchnorm_in_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold every BatchNorm2d that directly follows a Conv2d into the convolution (with the
    running statistics), in place, the way inference engines and QAT with frozen statistics do:
    w' = w gamma / sqrt(var + eps), b' = (b - mean) gamma / sqrt(var + eps) + beta."""
    for node in list(gm.graph.nodes):
        bn = called_module(gm, node)
        if not isinstance(bn, nn.BatchNorm2d) or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        source = node.args[0]
        conv = called_module(gm, source)
        if not isinstance(conv, nn.Conv2d) or len(source.users) != 1:
            continue
        factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        conv.weight.mul_(factor.reshape(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.bias = nn.Parameter((bias - bn.running_mean) * factor + bn.bias)
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
