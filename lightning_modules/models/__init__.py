"""Architectures, and `build_model`, which adapts any nn.Module class to the data's shape.

Bring your own model: point `model.net._target_` at any importable nn.Module class. Its
constructor may accept any of `in_channels`, `image_size`, `num_classes`; the workbench passes
those it accepts (and nothing else), plus the keys written under `model.net`.
"""

from __future__ import annotations

import inspect
from typing import Any

import hydra.utils
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lightning_modules.architecture import ModelRecipe
from lightning_modules.data import DataShape
from lightning_modules.models.lenet import LeNet5, LeNet300
from lightning_modules.models.mobilenet import mobilenetv2
from lightning_modules.models.resnet import ResNetCifar, resnet20

__all__ = ["LeNet300", "LeNet5", "ResNetCifar", "resnet20", "mobilenetv2", "build_model", "model_recipe"]

# functions (not classes) that build a model: an artifact may name these as its model's target
MODEL_BUILDERS = {f"{builder.__module__}.{builder.__name__}": builder for builder in (resnet20, mobilenetv2)}


def build_model(net_cfg: DictConfig, shape: DataShape) -> nn.Module:
    """Instantiate `net_cfg` (a `_target_` config), passing the data's shape where it is accepted."""
    target = hydra.utils.get_object(net_cfg._target_)
    accepted = _accepted_arguments(target)
    shape_kwargs: dict[str, Any] = {
        key: value for key, value in vars(shape).items() if accepted is None or key in accepted
    }
    model = hydra.utils.instantiate(net_cfg, **shape_kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model.net._target_={net_cfg._target_!r} built a {type(model).__name__}, not an nn.Module")
    return model


def model_recipe(net_cfg: DictConfig, shape: DataShape) -> ModelRecipe:
    """What `build_model(net_cfg, shape)` calls, as data the artifact stores to rebuild the model."""
    kwargs = OmegaConf.to_container(net_cfg, resolve=True)
    target = kwargs.pop("_target_")
    accepted = _accepted_arguments(hydra.utils.get_object(target))
    kwargs.update({key: value for key, value in vars(shape).items() if accepted is None or key in accepted})
    return ModelRecipe(target, kwargs)


def _accepted_arguments(target: Any) -> set[str] | None:
    """Names the callable accepts; None when it takes **kwargs (then it gets everything)."""
    parameters = inspect.signature(target).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters}
