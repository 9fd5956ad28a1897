from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from lightning_modules.data import DataShape
from lightning_modules.models import build_model
from tests.conftest import compose_config

SHAPES = [DataShape(1, 8, 10), DataShape(1, 28, 10), DataShape(3, 32, 10)]


@pytest.mark.parametrize("model", ["lenet300", "lenet5", "resnet20", "mobilenetv2"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s.in_channels}x{s.image_size}")
def test_models_adapt_to_the_data_shape(model: str, shape: DataShape) -> None:
    net = build_model(compose_config([f"model={model}"]).model.net, shape).eval()
    logits = net(torch.randn(2, shape.in_channels, shape.image_size, shape.image_size))
    assert logits.shape == (2, shape.num_classes)


def test_lenet300_has_the_classic_parameter_count() -> None:
    net = build_model(compose_config(["model=lenet300"]).model.net, DataShape(1, 28, 10))
    assert sum(p.numel() for p in net.parameters()) == 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10


def test_width_multiplier_shrinks_the_model() -> None:
    full = build_model(OmegaConf.create({"_target_": "lightning_modules.models.LeNet5"}), DataShape(1, 28, 10))
    half = build_model(OmegaConf.create({"_target_": "lightning_modules.models.LeNet5", "width_multiplier": 0.5}),
                       DataShape(1, 28, 10))
    assert sum(p.numel() for p in half.parameters()) < 0.5 * sum(p.numel() for p in full.parameters())


def test_bring_your_own_model_gets_only_the_shape_arguments_it_accepts() -> None:
    net = build_model(OmegaConf.create({"_target_": "tests.helpers.ShapeRecorder", "hidden": 5}), DataShape(1, 8, 7))
    assert net.num_classes == 7 and net.fc.in_features == 5


def test_resnet_depth_must_be_6n_plus_2() -> None:
    from lightning_modules.models import ResNetCifar

    with pytest.raises(ValueError, match=r"model.net.depth=21 is not valid; allowed: 6n\+2"):
        ResNetCifar(depth=21)


@pytest.mark.parametrize(("model", "multiplier", "message"), [
    ("LeNet5", 0.05, r"model.net.width_multiplier=0.05 leaves a layer of 6 channels with 0; allowed: a number >= 0.08333"),
    ("LeNet300", 0.001, r"model.net.width_multiplier=0.001 leaves a layer of 300 channels with 0; allowed: a number >= 0.005"),
    ("resnet20", 0.0, r"model.net.width_multiplier=0.0 leaves a layer of 16 channels with 0; allowed: a number >= 0.03125"),
])
def test_a_width_that_rounds_a_layer_to_nothing_is_refused(model: str, multiplier: float, message: str) -> None:
    # never a silent 1-channel layer: that model trains to chance and looked like a result
    import lightning_modules.models as models

    with pytest.raises(ValueError, match=message):
        getattr(models, model)(width_multiplier=multiplier)
