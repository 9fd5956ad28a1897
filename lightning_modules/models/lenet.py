"""LeNet-300-100 (fully connected) and LeNet-5 (two convolutions), the classic MNIST pair."""

from __future__ import annotations

import torch
from torch import nn


def scaled_width(width: int, multiplier: float, smallest: int) -> int:
    """`width` x `multiplier`, rounded; a layer rounded to 0 channels is an error, not a silent
    1-channel layer (which trains to chance and would be stored as if it were a result).

    `smallest` is the model's narrowest published layer, to state the allowed range.

    Raises:
        ValueError: naming model.net.width_multiplier and its allowed range.
    """
    channels = int(round(width * multiplier))
    if not multiplier > 0 or channels < 1:
        raise ValueError(f"model.net.width_multiplier={multiplier!r} leaves a layer of {width} channels with "
                         f"{max(channels, 0)}; allowed: a number >= {0.5 / smallest:.4g} (every layer keeps "
                         f"at least one channel)")
    return channels


class LeNet300(nn.Module):
    """LeNet-300-100: input -> 300 -> 100 -> classes, ReLU between (LeCun et al. 1998)."""

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10,
                 hidden: tuple[int, int] = (300, 100), width_multiplier: float = 1.0) -> None:
        super().__init__()
        if len(hidden) != 2 or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
            raise ValueError(f"model.net.hidden={list(hidden)!r} is not valid; allowed: two layer sizes >= 1, e.g. [300, 100]")
        first, second = (scaled_width(h, width_multiplier, min(hidden)) for h in hidden)
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
        c1, c2, f1, f2 = (scaled_width(w, width_multiplier, 6) for w in (6, 16, 120, 84))
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
