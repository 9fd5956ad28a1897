"""torchvision's MobileNetV2, adapted to small images: any input channels, a stride-1 stem."""

from __future__ import annotations

from torch import nn
from torchvision.models import mobilenet_v2


def mobilenetv2(in_channels: int = 3, image_size: int = 32, num_classes: int = 10,
                width_multiplier: float = 1.0) -> nn.Module:
    model = mobilenet_v2(num_classes=num_classes, width_mult=width_multiplier)
    stem: nn.Conv2d = model.features[0][0]
    # ImageNet's stride-2 stem would leave a 1x1 map after the network's 16x reduction on 28x28 inputs.
    stride = 1 if image_size <= 64 else 2
    model.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3, stride=stride, padding=1, bias=False)
    return model
