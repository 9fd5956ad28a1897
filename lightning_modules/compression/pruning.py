"""Pruning methods, each a Lightning callback (see base.py for the protocol).

Masks live beside the weights as `weight_mask` buffers (so they land in checkpoints) until
`finalize` folds them in for good. The math is in pure functions on tensors (`importance`,
`layer_mask`, `global_masks`); module surgery is separate (`attach_masks`, `fold_masks`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from lightning_modules.compression.base import CompressionCallback, weighted_layers
from lightning_modules.evaluation.complexity import layer_table

log = logging.getLogger(__name__)

MASK = "weight_mask"

# ----------------------------------------------------------------------------- the math


def magnitude_importance(weight: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    return weight.detach().abs()


def random_importance(weight: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The control every pruning comparison should show: scores that know nothing of the weights."""
    return torch.rand(weight.shape, generator=generator, dtype=torch.float32).to(weight.device)


IMPORTANCE: dict[str, Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]] = {
    "magnitude": magnitude_importance,
    "random": random_importance,
}


def layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Mask (1 keep, 0 prune) that removes the `round(sparsity * n)` lowest-scoring entries."""
    n_pruned = int(round(sparsity * scores.numel()))
    mask = torch.ones_like(scores, dtype=torch.float32)
    if n_pruned > 0:
        lowest = torch.topk(scores.flatten(), n_pruned, largest=False).indices
        mask.view(-1)[lowest] = 0.0
    return mask


def global_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Masks that remove the lowest-scoring `sparsity` fraction across all layers together."""
    flat = torch.cat([s.flatten() for s in scores.values()])
    joint = layer_mask(flat, sparsity)
    masks, start = {}, 0
    for name, s in scores.items():
        masks[name] = joint[start : start + s.numel()].view_as(s)
        start += s.numel()
    return masks


# ----------------------------------------------------------------------------- module surgery


def attach_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Register each mask as a buffer beside its layer's weight and zero the pruned weights."""
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        module = modules[name]
        mask = mask.to(module.weight.device)
        if hasattr(module, MASK):
            getattr(module, MASK).copy_(mask)
        else:
            module.register_buffer(MASK, mask)
    apply_masks(model)


@torch.no_grad()
def apply_masks(model: nn.Module) -> None:
    for module in model.modules():
        mask = getattr(module, MASK, None)
        if mask is not None:
            module.weight.mul_(mask)


def mask_gradients(model: nn.Module) -> None:
    """Zero the gradients of pruned weights, so optimizer state never moves them off zero."""
    for module in model.modules():
        mask = getattr(module, MASK, None)
        if mask is not None and module.weight.grad is not None:
            module.weight.grad.mul_(mask)


def fold_masks(model: nn.Module) -> nn.Module:
    """Make the pruning permanent: weights keep their zeros, the mask buffers go away."""
    apply_masks(model)
    for module in model.modules():
        if hasattr(module, MASK):
            del module._buffers[MASK]
    return model


# ----------------------------------------------------------------------------- callbacks


def _check_fraction(key: str, value: float) -> float:
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{key}={value!r} is not valid; allowed: a fraction in [0, 1)")
    return float(value)


class MagnitudePruning(CompressionCallback):
    """One-shot unstructured pruning to `sparsity` when fine-tuning starts, masks held through it.

    Args:
        sparsity: fraction of the prunable weights to remove, in [0, 1).
        scope: `global` ranks all layers together; `layer` prunes each layer to `sparsity`.
        criterion: `magnitude` (|w|) or `random` (the control).
        skip_layers: layer names to leave dense; `first` and `last` stand for the model's first
            and last weighted layer. Every skipped layer is logged with its reason.
        layer_sparsity: per-layer overrides {layer name: sparsity} (`layer` scope only).
        seed: seed of the `random` criterion.
    """

    name = "magnitude"
    SCOPES = ("global", "layer")

    def __init__(
        self,
        sparsity: float,
        scope: str = "global",
        criterion: str = "magnitude",
        skip_layers: Sequence[str] = ("first", "last"),
        layer_sparsity: dict[str, float] | None = None,
        seed: int = 0,
    ) -> None:
        self.sparsity = _check_fraction("sparsity", sparsity)
        if scope not in self.SCOPES:
            raise ValueError(f"scope={scope!r} is not valid; allowed: {', '.join(self.SCOPES)}")
        if criterion not in IMPORTANCE:
            raise ValueError(f"criterion={criterion!r} is not valid; allowed: {', '.join(IMPORTANCE)}")
        self.layer_sparsity = {k: _check_fraction(f"layer_sparsity.{k}", v) for k, v in (layer_sparsity or {}).items()}
        if self.layer_sparsity and scope == "global":
            raise ValueError("layer_sparsity needs scope='layer'; with scope='global' one threshold ranks all layers")
        self.scope = scope
        self.criterion = criterion
        self.skip_layers = list(skip_layers)
        self.seed = seed
        self.pruned = False
        self.skipped: dict[str, str] = {}

    # -- hooks: each checks a flag and hands off to one worker
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.pruned:  # a run resumed from a checkpoint already has its masks
            self.prune(pl_module.model)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        mask_gradients(pl_module.model)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        apply_masks(pl_module.model)

    # -- the worker
    def prune(self, model: nn.Module) -> None:
        targets = self.select_layers(model)
        generator = torch.Generator().manual_seed(self.seed)
        scores = {name: IMPORTANCE[self.criterion](module.weight, generator) for name, module in targets.items()}
        if self.scope == "global":
            masks = global_masks(scores, self.sparsity)
        else:
            masks = {n: layer_mask(s, self.layer_sparsity.get(n, self.sparsity)) for n, s in scores.items()}
        attach_masks(model, masks)
        self.pruned = True

    def select_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        """The one filter deciding which layers are pruned; records why the others are not."""
        names = [name for name, _ in weighted_layers(model)]
        aliases = {"first": names[0] if names else None, "last": names[-1] if names else None}
        skip = {aliases.get(entry, entry): entry for entry in self.skip_layers}
        unknown = [entry for name, entry in skip.items() if name not in names]
        if unknown:
            raise ValueError(f"skip_layers has unknown layers {unknown}; allowed: first, last, {', '.join(names)}")
        self.skipped = {name: f"listed in skip_layers as {entry!r}" for name, entry in skip.items()}
        for name, reason in self.skipped.items():
            log.info("magnitude pruning skips %s: %s", name, reason)
        return {name: module for name, module in weighted_layers(model) if name not in self.skipped}

    # -- protocol
    def finalize(self, model: nn.Module) -> nn.Module:
        return fold_masks(model)

    def summary(self, model: nn.Module) -> list[dict[str, Any]]:
        return [{**row, "skipped": self.skipped.get(row["layer"], "")} for row in layer_table(model)]

    def state_dict(self) -> dict[str, Any]:
        return {"pruned": self.pruned, "skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pruned = state_dict["pruned"]
        self.skipped = state_dict["skipped"]
