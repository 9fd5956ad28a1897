"""The protocol every compression method follows, so the pipeline treats all methods alike.

A method is a Lightning callback that acts during training through its hooks, and also answers:
    finalize(model) -> model   the deployable form (masks folded, layers replaced, int8 built)
    summary(model)  -> rows    per-layer facts for tracking (one dict per layer)
Hybrids are several callbacks listed in order in the method config; finalize runs in that order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import pytorch_lightning as pl
import torch
from torch import nn

from lightning_modules.layers import WEIGHTED_LAYERS, weighted_layers


class Timer(Protocol):
    """What a callback's `min_speedup` times layers and models with. The pipeline hands one over
    (`attach_timer`; evaluation/latency.py: LatencyTimer): compression/ never imports evaluation/."""

    def paired(self, first: nn.Module, second: nn.Module, inputs: torch.Tensor) -> tuple[float, float, float]: ...

    def int8_runtime(self, runtime: str, compile_mode: bool | str) -> str: ...

    def float_and_int8(self, runtime: str, float_layer: nn.Module, int8_layer: nn.Module,
                       input_shape: tuple[int, ...], batch: int, threads: int | None) -> tuple[float, float]: ...

    def whole_models(self, reference: nn.Module, candidates: Iterable[tuple[str, nn.Module]], runtime: str,
                     input_shape: tuple[int, ...], batch: int, threads: int | None,
                     min_time_s: float = ...) -> Iterator[tuple[str, float, float, float]]: ...


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

    def check_epochs(self, epochs: int) -> None:
        """Refuse (ValueError naming both) a fit of `epochs` epochs that this callback's schedule does not
        fit in. Called with method.fine_tune.epochs before any work, and again when the fit starts."""

    def finalize(self, model: nn.Module) -> nn.Module:
        """Return the deployable model; the default keeps the model as trained."""
        return model

    def summary(self, model: nn.Module) -> list[dict[str, Any]]:
        """Per-layer facts of the finalized model; one row per layer. A layer the method left
        alone has its reason in a `skipped` column (counted as the run's layers_skipped_<name>)."""
        return []

    def metrics(self, model: nn.Module, measured: dict[str, float]) -> dict[str, float]:
        """Figures of the finalized model this method adds to the run's metrics (Deep Compression's
        stage ratios); `measured` holds the contract's figures already measured (size_bytes, ...).
        None by default."""
        return {}

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


def resolve_aliases(entries: Sequence[str], names: Sequence[str]) -> dict[str, str]:
    """{layer name: entry as given}: `first` and `last` become the first and last of `names`,
    every other entry stays as it is (an unknown one is for the caller to report)."""
    ends = {"first": names[0], "last": names[-1]} if names else {}
    return {ends.get(entry, entry): entry for entry in entries}


def select_layers(model: nn.Module, skip_layers: Sequence[str], types: tuple[type[nn.Module], ...] = WEIGHTED_LAYERS,
                  key: str = "skip_layers") -> tuple[list[tuple[str, nn.Module]], dict[str, str]]:
    """(targets, skipped): the layers of `types` a method acts on, in definition order, and
    {layer name: reason} for those named in `skip_layers` (`first`/`last`: the first/last of them).

    Raises:
        ValueError: an entry names no layer of `types` (the message lists the model's layer names).
    """
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, types)]
    names = [name for name, _ in layers]
    skip = resolve_aliases(skip_layers, names)
    unknown = [entry for name, entry in skip.items() if name not in names]
    if unknown:
        raise ValueError(f"{key} has unknown layers {unknown}; allowed: {', '.join([*LAYER_ALIASES, *names])}")
    skipped = {name: f"listed in skip_layers as {entry!r}" for name, entry in skip.items()}
    return [(name, module) for name, module in layers if name not in skipped], skipped


def register_or_update_buffer(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """`value` as buffer `name` of `module`: copied into the buffer already there (in place, so
    whatever holds that tensor sees the new value), else registered."""
    if hasattr(module, name):
        getattr(module, name).copy_(value)
    else:
        module.register_buffer(name, value)


# ----------------------------------------------------------------------------- masks
# A masked method keeps a `<parameter>_mask` buffer (1 kept, 0 pruned) beside each parameter it prunes.

MASKED_PARAMETERS = ("weight", "bias")


def _masks_of(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(p, getattr(module, f"{p}_mask")) for p in MASKED_PARAMETERS
            if hasattr(module, f"{p}_mask") and getattr(module, p, None) is not None]


@torch.no_grad()
def apply_masks(model: nn.Module) -> None:
    for module in model.modules():
        for parameter, mask in _masks_of(module):
            getattr(module, parameter).mul_(mask)


def mask_gradients(model: nn.Module) -> None:
    """Zero the gradients of pruned weights, so optimizer state never moves them off zero."""
    for module in model.modules():
        for parameter, mask in _masks_of(module):
            grad = getattr(module, parameter).grad
            if grad is not None:
                grad.mul_(mask)


class MaskedTraining:
    """Mixin of a callback whose masks must hold while the model trains (unstructured and channel
    pruning): gradients of pruned entries are zeroed before each optimizer step, and the weights
    masked again after each batch (weight decay and momentum move them otherwise)."""

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        mask_gradients(pl_module.model)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        apply_masks(pl_module.model)


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
# Shared by the callbacks' constructors and config.py: a ValueError (or `error`) naming the key, the
# value and what is allowed (the pipeline prefixes a callback's with its key, method.callbacks.<slot>).


def check_number(key: str, value: Any, low: float | None = None, high: float | None = None, *, bounds: str = "[]",
                 integer: bool = False, optional: bool = False, noun: str | None = None, allowed: str | None = None,
                 error: type[ValueError] = ValueError) -> Any:
    """`value` when it is a number (an int with `integer`) between `low` and `high`, each end
    included or not as `bounds` says ("[]", "[)", "(]", "()"); None passes when `optional`.
    The message says what is allowed: `allowed` when given, else built from the bounds and
    `noun` ("a number", "an integer", "a fraction" ...)."""
    if value is None and optional:
        return None
    kinds = int if integer else (int, float)
    fits = not isinstance(value, bool) and isinstance(value, kinds)
    if fits and low is not None:
        fits = value >= low if bounds[0] == "[" else value > low
    if fits and high is not None:
        fits = value <= high if bounds[1] == "]" else value < high
    if not fits:
        raise error(f"{key}={value!r} is not valid; allowed: "
                    f"{allowed or _range_text(low, high, bounds, integer, noun) + (' or null' if optional else '')}")
    return value


def _range_text(low: float | None, high: float | None, bounds: str, integer: bool, noun: str | None) -> str:
    noun = noun or ("an integer" if integer else "a number")
    if low is not None and high is not None:
        return f"{noun} in {low}..{high}" if integer and bounds == "[]" else f"{noun} in {bounds[0]}{low}, {high}{bounds[1]}"
    if low is not None:
        return f"{noun} {'>=' if bounds[0] == '[' else '>'} {low}"
    if high is not None:
        return f"{noun} {'<=' if bounds[1] == ']' else '<'} {high}"
    return noun


def check_fraction(key: str, value: Any) -> float:
    """A fraction in [0, 1): a sparsity, a share of parameters."""
    return float(check_number(key, value, 0, 1, bounds="[)", noun="a fraction"))


def check_int(key: str, value: Any, minimum: int) -> int:
    return check_number(key, value, minimum, integer=True)


def check_choice(key: str, value: Any, allowed: Sequence[Any], error: type[ValueError] = ValueError) -> Any:
    if value not in allowed:
        raise error(f"{key}={value!r} is not valid; allowed: {', '.join(map(str, allowed))}")
    return value


def check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key}={value!r} is not valid; allowed: true or false")
    return value
