"""LeNet-300-100 (fully connected) and LeNet-5 (two convolutions), the classic MNIST pair."""

from __future__ import annotations

import torch
from torch import nn


def _scaled(width: int, multiplier: float) -> int:
    return max(1, int(round(width * multiplier)))


class LeNet300(nn.Module):
    """LeNet-300-100: input -> 300 -> 100 -> classes, ReLU between (LeCun et al. 1998)."""

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10,
                 hidden: tuple[int, int] = (300, 100), width_multiplier: float = 1.0) -> None:
        super().__init__()
        first, second = (_scaled(h, width_multiplier) for h in hidden)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * image_size * image_size, first), nn.ReLU(inplace=True),
            nn.Linear(first, second), nn.ReLU(inplace=True),
            nn.Linear(second, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max-pooling: conv(6,5x5) -> pool -> conv(16,5x5) -> pool -> 120 -> 84.

    On small inputs (8x8 digits) the second convolution is padded so the map does not vanish.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10,
                 width_multiplier: float = 1.0) -> None:
        super().__init__()
        c1, c2, f1, f2 = (_scaled(w, width_multiplier) for w in (6, 16, 120, 84))
        second_padding = 0 if image_size // 2 >= 10 else 2
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, kernel_size=5, padding=second_padding), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, in_channels, image_size, image_size)).numel()
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, f1), nn.ReLU(inplace=True),
            nn.Linear(f1, f2), nn.ReLU(inplace=True),
            nn.Linear(f2, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
