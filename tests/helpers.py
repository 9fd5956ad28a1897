"""Models used only by tests (importable by train.py since it runs from the repository root)."""

import torch
from torch import nn


class FailingNet(nn.Module):
    """Builds fine, so validation passes, and fails at its first forward pass: a run-time failure."""

    def __init__(self, num_classes: int = 10, width_multiplier: float = 1.0) -> None:
        super().__init__()
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("FailingNet refuses to run")


class ShapeRecorder(nn.Module):
    """Accepts only some of the shape arguments, to test that build_model passes just those."""

    def __init__(self, num_classes: int, hidden: int = 3) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)
