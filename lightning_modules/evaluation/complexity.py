"""Multiply-accumulates (MACs) of a model (parameter counts and the per-layer table: ../layers.py)."""

from __future__ import annotations

import torch
from torch import nn

from lightning_modules.layers import weighted_layers


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
