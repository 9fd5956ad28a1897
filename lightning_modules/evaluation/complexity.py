"""Parameters, sparsity and multiply-accumulates (MACs) of a model."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_modules.compression.base import weighted_layers


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


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, float]:
    """MACs of one forward pass at batch 1 over Linear and Conv2d layers.

    `macs_dense` counts every weight; `macs_nonzero` counts only nonzero weights, i.e. what a
    kernel that skips zeros would do. Whether any runtime really skips them is the caller's call.
    """
    dense, nonzero = 0, 0

    def hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
        nonlocal dense, nonzero
        weight = module.weight
        if isinstance(module, nn.Conv2d):
            positions = output.shape[2] * output.shape[3]  # each output position uses the whole kernel
        else:
            positions = output.numel() // output.shape[-1]
        dense += positions * weight.numel()
        nonzero += positions * int(torch.count_nonzero(weight))

    handles = [module.register_forward_hook(hook) for _, module in weighted_layers(model)]
    was_training = model.training
    try:
        model.eval()
        device = next(model.parameters()).device
        model(torch.zeros((1, *input_shape), device=device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {"macs_dense": dense, "macs_nonzero": nonzero}


def layer_table(model: nn.Module) -> list[dict[str, Any]]:
    """Per Linear/Conv layer: type, weight shape, weights, nonzero weights, sparsity."""
    rows = []
    for name, module in weighted_layers(model):
        weight = module.weight
        nonzero = int(torch.count_nonzero(weight))
        rows.append({"layer": name, "type": type(module).__name__, "shape": "x".join(map(str, weight.shape)),
                     "weights": weight.numel(), "nonzero": nonzero, "sparsity": 1 - nonzero / weight.numel()})
    return rows
