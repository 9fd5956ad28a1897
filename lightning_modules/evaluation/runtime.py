"""Runtimes: what executes a finalized model when it is measured (accuracy and latency alike).

A runtime turns an nn.Module into the callable that is scored and timed. Later runtimes (ONNX
Runtime, compiled int8 graphs) register here and the measurement code stays the same.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Deployed = Callable[[torch.Tensor], torch.Tensor]


def torch_eager(model: nn.Module, device: torch.device) -> Deployed:
    return model.eval().to(device)


RUNTIMES: dict[str, Callable[[nn.Module, torch.device], Deployed]] = {"torch": torch_eager}


def deploy(model: nn.Module, runtime: str, device: torch.device) -> Deployed:
    if runtime not in RUNTIMES:
        raise ValueError(f"hardware.runtime={runtime!r} is not valid; allowed: {', '.join(RUNTIMES)}")
    return RUNTIMES[runtime](model, device)
