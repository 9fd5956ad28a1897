"""The protocol every compression method follows, so the pipeline treats all methods alike.

A method is a Lightning callback that acts during training through its hooks, and also answers:
    finalize(model) -> model   the deployable form (masks folded, layers replaced, int8 built)
    summary(model)  -> rows    per-layer facts for tracking (one dict per layer)
Hybrids are several callbacks listed in order in the method config; finalize runs in that order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import pytorch_lightning as pl
import torch
from torch import nn

from lightning_modules.layers import weighted_layers


class Timer(Protocol):
    """What a callback's `min_speedup` times layers and models with. The pipeline hands one over
    (`attach_timer`; evaluation/latency.py: LatencyTimer): compression/ never imports evaluation/."""

    def paired(self, first: nn.Module, second: nn.Module, inputs: torch.Tensor) -> tuple[float, float, float]: ...

    def int8_runtime(self, runtime: str, compile_mode: bool | str) -> str: ...

    def float_and_int8(self, runtime: str, float_layer: nn.Module, int8_layer: nn.Module,
                       input_shape: tuple[int, ...], batch: int, threads: int | None) -> tuple[float, float]: ...

    def whole_models(self, models: dict[str, nn.Module], runtime: str, input_shape: tuple[int, ...], batch: int,
                     threads: int | None) -> dict[str, float]: ...


class CompressionCallback(pl.Callback):
    """Base class: a Lightning callback with `finalize` and `summary`."""

    #: short name used in logs and metric prefixes
    name: str = "compression"
    #: set by methods that learn from a teacher; the pipeline then finds or trains the teacher
    #: and hands it over with `attach_teacher` before training starts
    requires_teacher: bool = False
    #: what `min_speedup` times with; handed over by the pipeline (attach_timer), None until then
    timer: Timer | None = None

    def attach_teacher(self, teacher: nn.Module) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not use a teacher")

    def attach_timer(self, timer: Timer) -> CompressionCallback:
        self.timer = timer
        return self

    def require_timer(self) -> Timer:
        """The attached timer; a ValueError naming min_speedup when none was handed over."""
        if self.timer is None:
            raise ValueError(f"{self.name}: min_speedup={getattr(self, 'min_speedup', None)} times layers with the "
                             f"timer the pipeline hands over (attach_timer), and none was given; allowed without "
                             f"one: min_speedup=null")
        return self.timer

    def finalize(self, model: nn.Module) -> nn.Module:
        """Return the deployable model; the default keeps the model as trained."""
        return model

    def summary(self, model: nn.Module) -> list[dict[str, Any]]:
        """Per-layer facts of the finalized model; one row per layer. A layer the method left
        alone has its reason in a `skipped` column (counted as the run's layers_skipped_<name>)."""
        return []

    def check_model(self, model: nn.Module, example: torch.Tensor, teacher: nn.Module | None = None) -> None:
        """Raise ValueError when this method's arguments do not fit `model`: a layer they name that is
        not a layer of `model` (or of `teacher`, for a method that learns from one), or a setting that
        cannot make a model of it (channel pruning that leaves a layer no channel). The config validation calls it on models built
        from the config, before any run opens, with `example` a zero input batch of the data's shape.
        The default checks the names in `skip_layers` and the keys of `layer_sparsity`/`layer_ranks`
        (`first` and `last` stand for the ends); a method whose arguments name layers otherwise
        overrides it."""
        named = {name for name, _ in model.named_modules() if name}
        given = [*getattr(self, "skip_layers", ()), *(getattr(self, "layer_sparsity", None) or {}),
                 *(getattr(self, "layer_ranks", None) or {})]
        unknown = [name for name in given if name not in named and name not in LAYER_ALIASES]
        if unknown:
            raise ValueError(f"unknown layers {unknown} for {type(model).__name__}; allowed: "
                             f"{', '.join(LAYER_ALIASES)}, {', '.join(n for n, _ in weighted_layers(model))}")

    def reference_models(self) -> dict[str, nn.Module]:
        """Training-time forms to score beside the deployed model, logged as test_acc_<name>
        (QAT's fake-quant model); none by default."""
        return {}


LAYER_ALIASES = ("first", "last")  # the model's first and last weighted layer, wherever a layer name is asked


def skipped_layers(model: nn.Module, skip_layers: list[str]) -> dict[str, str]:
    """{layer name: reason} for the Linear/Conv layers named in `skip_layers`, where `first` and
    `last` stand for the model's first and last weighted layer.

    Raises:
        ValueError: an entry names no weighted layer of the model (the message lists them).
    """
    names = [name for name, _ in weighted_layers(model)]
    aliases = {"first": names[0] if names else None, "last": names[-1] if names else None}
    skip = {aliases.get(entry, entry): entry for entry in skip_layers}
    unknown = [entry for name, entry in skip.items() if name not in names]
    if unknown:
        raise ValueError(f"skip_layers has unknown layers {unknown}; allowed: first, last, {', '.join(names)}")
    return {name: f"listed in skip_layers as {entry!r}" for name, entry in skip.items()}


def training_batches(trainer: pl.Trainer, count: int, purpose: str) -> list[tuple]:
    """The first `count` (images, labels) batches of the trainer's training data, for methods that
    look at data before they act (Taylor scores, calibration, sensitivity)."""
    loader = trainer.datamodule.train_dataloader() if trainer.datamodule is not None else trainer.train_dataloader
    if loader is None:
        raise RuntimeError(f"{purpose} needs training batches; fit with a datamodule or a train dataloader")
    batches = []
    for batch in loader:  # (images, labels) or (images, labels, indices)
        batches.append((batch[0], batch[1]))
        if len(batches) == count:
            break
    return batches


# ----------------------------------------------------------------------------- argument checks
# Shared by the callbacks' constructors: a ValueError naming the argument, the value and what is
# allowed (the pipeline prefixes it with the config key, method.callbacks.<slot>).


def check_fraction(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{key}={value!r} is not valid; allowed: a fraction in [0, 1)")
    return float(value)


def check_choice(key: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not valid; allowed: {', '.join(allowed)}")
    return value


def check_int(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key}={value!r} is not valid; allowed: an integer >= {minimum}")
    return value


def check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key}={value!r} is not valid; allowed: true or false")
    return value
