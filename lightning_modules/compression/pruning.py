"""Pruning methods, each a Lightning callback (see base.py for the protocol).

    MagnitudePruning   one-shot unstructured cut to `sparsity` (criterion magnitude | taylor | random)
    IterativePruning   prune-and-retrain cycles, a fraction of the remaining weights per cycle
    LotteryTicket      iterative magnitude pruning with weight rewinding (Frankle & Carbin)
    AGP                automated gradual pruning, Zhu & Gupta's polynomial ramp
    ChannelPruning     structured: whole filters / neurons, physically removed at finalize
    NMPruning          N:M semi-structured sparsity (2:4 by default)
    LightningReference Lightning's own ModelPruning, as the peer the benchmark compares against

Masks live beside the weights as `weight_mask` (and `bias_mask`) buffers, so they land in
checkpoints, until `finalize` folds them in for good. Gradients of pruned weights are zeroed before
the optimizer step and the masks are re-applied after it, so pruned weights stay exactly zero
whatever the optimizer's momentum or weight decay. The math is in pure functions on tensors
(`layer_mask`, `lamp_scores`, `global_masks`, `nm_mask`, `polynomial_sparsity`); module surgery is separate
(`attach_masks`, `fold_masks`, and channel_surgery.py for structured removal).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelPruning
from torch import nn

from lightning_modules.compression import channel_surgery
from lightning_modules.compression.base import (
    CompressionCallback, MaskedTraining, check_bool, check_choice, check_fraction, check_int, check_number,
    MASKED_PARAMETERS, apply_masks, register_or_update_buffer, resolve_aliases, select_layers, training_batches,
)
from lightning_modules.layers import layer_table, weighted_layers

log = logging.getLogger(__name__)

MASK = "weight_mask"

# A schedule is a value, or a function of the training step that returns the value at that step.
Schedule = float | Callable[[int], float]
# The units a schedule's points (begin, end, a rewind point) are given in.
UNITS = ("step", "epoch")

# ----------------------------------------------------------------------------- the math: importance


def magnitude_importance(weight: torch.Tensor, generator: torch.Generator | None = None,
                         saliency: torch.Tensor | None = None) -> torch.Tensor:
    return weight.detach().abs()


def random_importance(weight: torch.Tensor, generator: torch.Generator | None = None,
                      saliency: torch.Tensor | None = None) -> torch.Tensor:
    """The control every pruning comparison should show: scores that know nothing of the weights."""
    return torch.rand(weight.shape, generator=generator, dtype=torch.float32).to(weight.device)


def taylor_importance(weight: torch.Tensor, generator: torch.Generator | None = None,
                      saliency: torch.Tensor | None = None) -> torch.Tensor:
    """First-order Taylor estimate of the loss change when a weight is removed: |w * dL/dw|.

    `saliency` is that product accumulated over a few training batches (`taylor_saliency`).
    """
    if saliency is None:
        raise ValueError("criterion='taylor' needs |weight x gradient| accumulated over training batches")
    return saliency


IMPORTANCE: dict[str, Callable[..., torch.Tensor]] = {
    "magnitude": magnitude_importance,
    "random": random_importance,
    "taylor": taylor_importance,
}


def layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Mask (1 keep, 0 prune) that removes the `round(sparsity * n)` lowest-scoring entries."""
    n_pruned = int(round(sparsity * scores.numel()))
    mask = torch.ones_like(scores, dtype=torch.float32)
    if n_pruned > 0:
        lowest = torch.topk(scores.flatten(), n_pruned, largest=False).indices
        mask.view(-1)[lowest] = 0.0
    return mask


def lamp_scores(scores: torch.Tensor) -> torch.Tensor:
    """Layer-adaptive magnitude-based pruning scores (LAMP, Lee et al. 2021): each score squared, over the
    sum of the squares of the layer's scores not below it. A layer's best weight scores 1 and every layer's
    scores spread over (0, 1] whatever its scale, so one threshold across layers compares like with like.

    Raw magnitudes across layers do not: BatchNorm after a convolution makes its weights' scale arbitrary.
    mobilenetv2 (mnist5k baseline, seed 0) at 0.8 by one raw threshold had 20 of its 53 layers cut past
    0.95, every depthwise convolution among them; by LAMP none. Entries already pruned (-inf) stay lowest.
    """
    flat = scores.detach().flatten().double()
    alive = torch.isfinite(flat)
    squares = torch.where(alive, flat.pow(2), torch.zeros_like(flat))
    order = squares.argsort()
    ascending = squares[order]
    not_below = ascending.flip(0).cumsum(0).flip(0)  # the sum over each entry and every larger one
    lamp = torch.empty_like(flat)
    lamp[order] = ascending / not_below.clamp_min(torch.finfo(torch.float64).tiny)
    lamp[~alive] = -math.inf
    return lamp.view_as(scores).float()


def global_masks(scores: dict[str, torch.Tensor], sparsity: float,
                 max_layer_sparsity: float = 1.0) -> dict[str, torch.Tensor]:
    """Masks that remove the lowest-scoring `sparsity` fraction across all layers together, no layer
    beyond `max_layer_sparsity` (or `sparsity`, when that is higher).

    One threshold over layers whose weights live on different scales can empty a whole layer, and a
    network with an empty layer cannot learn (layer collapse, Tanaka et al. 2020): mobilenetv2 at 0.8,
    one-shot by magnitude, lost its classifier and three depthwise convolutions entirely and ended at
    chance. A layer the joint threshold would cut further keeps its best-scoring share, and the rest of
    the cut is ranked again over the other layers, so the total is still `sparsity`. At the shipped 0.98
    the LeNets are untouched: one threshold on their trained baselines (seeds 0-2) at 0.8/0.9/0.95 takes no
    layer past 0.966, and resnet20's agp at 0.95 none past 0.971.
    """
    ceiling = max(max_layer_sparsity, sparsity)
    sizes = {name: s.numel() for name, s in scores.items()}
    total = int(round(sparsity * sum(sizes.values())))
    capped: dict[str, torch.Tensor] = {}
    while True:
        free = {name: s for name, s in scores.items() if name not in capped}
        left = total - sum(int((mask == 0).sum()) for mask in capped.values())
        masks = _joint_masks(free, left / max(sum(sizes[name] for name in free), 1))
        over = [name for name, mask in masks.items() if int((mask == 0).sum()) > round(ceiling * sizes[name])]
        if not over:
            return {name: capped.get(name, masks.get(name)) for name in scores}
        capped.update({name: layer_mask(scores[name], ceiling) for name in over})


def _joint_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One threshold over all of `scores`: the lowest `sparsity` fraction of them removed."""
    if not scores:
        return {}
    flat = torch.cat([s.flatten() for s in scores.values()])
    joint = layer_mask(flat, min(max(sparsity, 0.0), 1.0))
    masks, start = {}, 0
    for name, s in scores.items():
        masks[name] = joint[start : start + s.numel()].view_as(s)
        start += s.numel()
    return masks


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the `n` highest-scoring of every `m` consecutive weights along each row's inputs.

    Rows are output units; a conv filter's inputs are its in_channels x kh x kw weights, flattened.

    Raises:
        ValueError: when a row's length is not a multiple of `m`.
    """
    rows = scores.reshape(scores.shape[0], -1)
    if rows.shape[1] % m != 0:
        raise ValueError(f"a row of {rows.shape[1]} inputs cannot be cut into groups of m={m}")
    blocks = rows.reshape(-1, m)
    mask = torch.zeros_like(blocks, dtype=torch.float32)
    mask.scatter_(1, torch.topk(blocks, n, dim=1).indices, 1.0)
    return mask.reshape(scores.shape)


# ----------------------------------------------------------------------------- the math: schedules


def resolve(schedule: Schedule, step: int) -> float:
    """The value of `schedule` at `step`: the value itself, or the function called with the step."""
    return float(schedule(step)) if callable(schedule) else float(schedule)


def polynomial_sparsity(step: int, initial: float, final: float, begin: int, end: int,
                        frequency: int = 1, power: float = 3.0) -> float:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^p.

    `t0 = begin`, `n dt = end - begin`, the mask is updated every `dt = frequency` steps, so `t` is
    the last update step at or before `step`. Before `begin` nothing is pruned; from `end` on the
    sparsity is `final`. Zhu & Gupta use p = 3: prune fast while the network is redundant, slowly
    near the target.
    """
    if step < begin:
        return 0.0
    if step >= end:
        return final
    last_update = begin + ((step - begin) // frequency) * frequency
    progress = (last_update - begin) / (end - begin)
    return final + (initial - final) * (1.0 - progress) ** power


@dataclass(frozen=True)
class PolynomialSchedule:
    """`polynomial_sparsity` as a function of the step, i.e. a Schedule."""

    initial: float
    final: float
    begin: int
    end: int
    frequency: int = 1
    power: float = 3.0

    def __call__(self, step: int) -> float:
        return polynomial_sparsity(step, self.initial, self.final, self.begin, self.end, self.frequency, self.power)


def iterative_sparsities(target: float, fraction_per_cycle: float) -> list[float]:
    """Sparsity after each prune-and-retrain cycle: each cycle removes `fraction_per_cycle` of the
    weights still left, the last one stops at `target`."""
    levels: list[float] = []
    while not levels or levels[-1] < target - 1e-9:
        levels.append(min(target, 1.0 - (1.0 - fraction_per_cycle) ** (len(levels) + 1)))
    return levels


# ----------------------------------------------------------------------------- module surgery


def attach_masks(model: nn.Module, masks: dict[str, torch.Tensor], parameter: str = "weight") -> None:
    """Register each mask as a `<parameter>_mask` buffer beside its layer's parameter and zero the pruned entries."""
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        module = modules[name]
        buffer = f"{parameter}_mask"
        register_or_update_buffer(module, buffer, mask.to(getattr(module, parameter).device, torch.float32))
    apply_masks(model)


def fold_masks(model: nn.Module) -> nn.Module:
    """Make the pruning permanent: weights keep their zeros, the mask buffers go away."""
    apply_masks(model)
    for module in model.modules():
        for parameter in MASKED_PARAMETERS:
            module._buffers.pop(f"{parameter}_mask", None)
    return model


def taylor_saliency(model: nn.Module, layers: dict[str, nn.Module], batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy) -> dict[str, torch.Tensor]:
    """|w * dL/dw| per weight of `layers`, summed over `batches`; leaves no gradient behind."""
    saved = {name: p.grad for name, p in model.named_parameters()}
    saliency = {name: torch.zeros_like(module.weight) for name, module in layers.items()}
    device = next(model.parameters()).device
    for inputs, targets in batches:
        model.zero_grad(set_to_none=True)
        loss_fn(model(inputs.to(device)), targets.to(device)).backward()
        for name, module in layers.items():
            saliency[name] += (module.weight.detach() * module.weight.grad).abs()
    for name, p in model.named_parameters():
        p.grad = saved[name]
    return saliency


# ----------------------------------------------------------------------------- validation


def _check_schedule(key: str, value: Schedule) -> Schedule:
    return value if callable(value) else check_fraction(key, value)


# ----------------------------------------------------------------------------- the shared base


class MaskedPruning(MaskedTraining, CompressionCallback):
    """What every unstructured pruning callback shares: which layers, how to score, how to cut,
    masks honoured by the optimizer, finalize, summary and checkpointed state.

    Subclasses decide *when* to cut and to which sparsity (their hooks call `cut`).

    Args:
        sparsity: the final fraction of the prunable weights to remove, in [0, 1).
        scope: `global` ranks all pruned layers together; `layer` prunes each layer to the sparsity.
        criterion: `magnitude` (|w|), `taylor` (|w x grad| over `taylor_batches` training batches)
            or `random` (the control).
        skip_layers: layer names to leave dense; `first` and `last` stand for the model's first
            and last weighted layer. Every skipped layer is logged with its reason. None by
            default, so `sparsity` is the sparsity of all Conv/Linear weights (LeNet-300-100's
            first layer holds 88% of them: sparing it by default made 0.9 measure 0.10).
        layer_sparsity: per-layer overrides {layer name: sparsity} (`layer` scope only); gradual
            methods scale them by the schedule's progress.
        taylor_batches: training batches whose gradients score the weights for `taylor`.
        seed: seed of the `random` criterion.
        max_layer_sparsity: under `global` scope no layer is cut beyond this (or beyond `sparsity`,
            when that is higher): a layer emptied by the joint threshold leaves a network that cannot
            learn (`global_masks`).
        normalize: under `global` scope, `lamp` makes each layer's scores comparable before the one
            threshold ranks them (`lamp_scores`); `none` ranks the criterion's raw scores.
    """

    name = "prune"
    SCOPES = ("global", "layer")
    NORMALIZATIONS = ("lamp", "none")

    def __init__(self, sparsity: float, scope: str = "global", criterion: str = "magnitude",
                 skip_layers: Sequence[str] = (), layer_sparsity: dict[str, float] | None = None,
                 taylor_batches: int = 8, seed: int = 0, max_layer_sparsity: float = 0.98,
                 normalize: str = "lamp") -> None:
        self.sparsity = check_fraction("sparsity", sparsity)
        self.normalize = check_choice("normalize", normalize, self.NORMALIZATIONS)
        self.max_layer_sparsity = check_fraction("max_layer_sparsity", max_layer_sparsity)
        self.scope = check_choice("scope", scope, self.SCOPES)
        self.criterion = check_choice("criterion", criterion, list(IMPORTANCE))
        self.layer_sparsity = {k: check_fraction(f"layer_sparsity.{k}", v) for k, v in (layer_sparsity or {}).items()}
        if self.layer_sparsity and scope == "global":
            raise ValueError("layer_sparsity needs scope='layer'; with scope='global' one threshold ranks all layers")
        self.skip_layers = list(skip_layers)
        self.taylor_batches = check_int("taylor_batches", taylor_batches, 1)
        self.seed = seed
        self.current_sparsity = 0.0  # the sparsity of the last cut
        self.cuts = 0
        self.skipped: dict[str, str] = {}
        self._generator = torch.Generator().manual_seed(seed)

    @property
    def pruned(self) -> bool:
        return self.cuts > 0

    # -- the worker
    def cut(self, model: nn.Module, sparsity: float, trainer: pl.Trainer | None = None) -> None:
        """Prune `model` to `sparsity` (of the selected layers); weights pruned before stay pruned."""
        sparsity = check_fraction("sparsity (scheduled)", sparsity)
        targets = self.target_layers(model)
        scores = {}
        for name, score in self.scores(model, targets, trainer).items():
            old = getattr(targets[name], MASK, None)
            scores[name] = score if old is None else score.masked_fill(old == 0, -math.inf)
        if self.scope == "global":
            if self.normalize == "lamp":
                scores = {name: lamp_scores(score) for name, score in scores.items()}
            masks = global_masks(scores, sparsity, self.max_layer_sparsity)
        else:
            masks = {n: layer_mask(s, self.layer_target(n, sparsity)) for n, s in scores.items()}
        attach_masks(model, masks)
        self.current_sparsity = sparsity
        self.cuts += 1
        log.info("%s pruning: cut %d to sparsity %.4f over %d layers", self.name, self.cuts, sparsity, len(targets))

    def scores(self, model: nn.Module, targets: dict[str, nn.Module], trainer: pl.Trainer | None) -> dict[str, torch.Tensor]:
        """The criterion's importance of every weight of the target layers (higher: kept)."""
        saliency = {}
        if self.criterion == "taylor":
            if trainer is None:
                raise ValueError("criterion='taylor' needs the trainer's training batches")
            saliency = taylor_saliency(model, targets, training_batches(trainer, self.taylor_batches, "criterion='taylor'"))
        return {name: IMPORTANCE[self.criterion](module.weight, self._generator, saliency.get(name)).float()
                for name, module in targets.items()}

    def layer_target(self, name: str, sparsity: float) -> float:
        """A layer's share of a (possibly intermediate) cut: its override scaled by the progress to the target."""
        if name not in self.layer_sparsity or self.sparsity == 0:
            return sparsity
        return min(self.layer_sparsity[name] * sparsity / self.sparsity, self.layer_sparsity[name])

    def target_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        """The one filter deciding which layers are pruned; records why the others are not."""
        targets, skipped = select_layers(model, self.skip_layers)
        names = [name for name, _ in weighted_layers(model)]
        unknown = [name for name in self.layer_sparsity if name not in names]
        if unknown:
            raise ValueError(f"layer_sparsity has unknown layers {unknown}; allowed: {', '.join(names)}")
        if skipped != self.skipped:
            for name, reason in skipped.items():
                log.info("%s pruning skips %s: %s", self.name, name, reason)
        self.skipped = skipped
        return dict(targets)

    # -- protocol
    def finalize(self, model: nn.Module) -> nn.Module:
        return fold_masks(model)

    def summary(self, model: nn.Module) -> list[dict[str, Any]]:
        return [{**row, "skipped": self.skipped.get(row["layer"], "")} for row in layer_table(model)]

    def state_dict(self) -> dict[str, Any]:
        return {"cuts": self.cuts, "current_sparsity": self.current_sparsity, "skipped": self.skipped,
                "generator": self._generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.cuts = state_dict["cuts"]
        self.current_sparsity = state_dict["current_sparsity"]
        self.skipped = state_dict["skipped"]
        self._generator.set_state(state_dict["generator"])


# ----------------------------------------------------------------------------- one-shot


class MagnitudePruning(MaskedPruning):
    """One-shot unstructured pruning to `sparsity` when fine-tuning starts, masks held through it.

    See MaskedPruning for the arguments. With criterion `taylor` the scores come from the gradients
    of `taylor_batches` training batches taken before the cut (the weights do not move meanwhile).
    """

    name = "magnitude"

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.pruned:  # a run resumed from a checkpoint already has its masks
            self.prune(pl_module.model, trainer)

    def prune(self, model: nn.Module, trainer: pl.Trainer | None = None) -> None:
        self.cut(model, self.sparsity, trainer)


# ----------------------------------------------------------------------------- iterative


class IterativePruning(MaskedPruning):
    """Prune-and-retrain cycles: every `epochs_per_cycle` epochs remove `fraction_per_cycle` of the
    weights still left, until `sparsity`; the last cycle's epochs retrain at the target.

    fine_tune.epochs must cover `len(iterative_sparsities(sparsity, fraction_per_cycle)) *
    epochs_per_cycle` epochs; the run stops with a ValueError naming the count otherwise.
    """

    name = "iterative"

    def __init__(self, sparsity: float, fraction_per_cycle: float = 0.5, epochs_per_cycle: int = 1, **kwargs: Any) -> None:
        super().__init__(sparsity, **kwargs)
        self.fraction_per_cycle = check_fraction("fraction_per_cycle", fraction_per_cycle)
        if self.fraction_per_cycle == 0.0 and self.sparsity > 0:
            raise ValueError("fraction_per_cycle=0.0 is not valid; allowed: a fraction in (0, 1) when sparsity > 0")
        self.epochs_per_cycle = check_int("epochs_per_cycle", epochs_per_cycle, 1)
        self.levels = iterative_sparsities(self.sparsity, self.fraction_per_cycle) if self.sparsity > 0 else []

    def cut_epoch(self, cut: int) -> int:
        """The epoch at whose start cut number `cut` (from 0) happens."""
        return cut * self.epochs_per_cycle

    def epochs_needed(self) -> int:
        """Epochs until the last cut's cycle has trained."""
        return self.cut_epoch(len(self.levels)) if self.levels else self.cut_epoch(0)

    def check_epochs(self, epochs: int) -> None:
        needed = self.epochs_needed()
        if epochs < needed:
            raise ValueError(f"{self.name} pruning to sparsity={self.sparsity} with fraction_per_cycle="
                             f"{self.fraction_per_cycle} takes {needed // self.epochs_per_cycle} cycles of "
                             f"{self.epochs_per_cycle} epoch(s): fine_tune.epochs={epochs} is not valid; "
                             f"allowed: >= {needed}")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.max_epochs is not None:
            self.check_epochs(trainer.max_epochs)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.next_cycle(trainer, pl_module)

    def next_cycle(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Cut to the next level if this epoch starts a cycle; True when it did."""
        if self.cuts >= len(self.levels) or trainer.current_epoch != self.cut_epoch(self.cuts):
            return False
        self.cut(pl_module.model, self.levels[self.cuts], trainer)
        return True


class LotteryTicket(IterativePruning):
    """Iterative magnitude pruning with rewinding to an early checkpoint (Frankle & Carbin 2019;
    Frankle et al. 2019, "Stabilizing the lottery ticket hypothesis", rewinding to iteration k).

    Round 0 trains the dense network for `epochs_per_cycle` epochs from its initialization
    (method=lottery starts from a fresh init: `student_init: scratch`), keeping the weights it has
    after `rewind_to` `unit`s of that training (0: the initialization itself, as Frankle & Carbin do).
    Every later round removes `fraction_per_cycle` of the surviving weights by magnitude, sends the
    survivors back to the kept weights, clears the optimizer's state and trains `epochs_per_cycle`
    epochs; the last round reaches `sparsity`. So a run needs (cycles + 1) x epochs_per_cycle epochs.

    `reinit: true` is the paper's control: the same rounds (so the same masks), but the last
    rewind goes to a fresh random initialization (PyTorch's default init of each layer, drawn with
    `seed + 1`) instead of the kept weights; the ticket's advantage over it is what rewinding buys.
    """

    name = "lottery"

    def __init__(self, sparsity: float, rewind_to: float = 0, unit: str = "epoch", reinit: bool = False,
                 **kwargs: Any) -> None:
        kwargs.setdefault("scope", "global")
        super().__init__(sparsity, **kwargs)
        self.rewind_to = check_number("rewind_to", rewind_to, 0)
        self.unit = check_choice("unit", unit, UNITS)
        self.reinit = check_bool("reinit", reinit)
        if self.unit == "epoch" and self.rewind_to >= self.epochs_per_cycle:  # in steps: checked once training starts
            raise ValueError(f"lottery: rewind_to={rewind_to} epoch(s) is not valid with epochs_per_cycle="
                             f"{self.epochs_per_cycle}; allowed: a rewind point inside the dense round "
                             f"(< {self.epochs_per_cycle} epochs; 0: the initialization)")
        self.rewind_step: int | None = None  # rewind_to in steps, known once training starts
        self.rewind_state: dict[str, torch.Tensor] | None = None

    def cut_epoch(self, cut: int) -> int:
        return (cut + 1) * self.epochs_per_cycle  # round 0 trains dense

    # -- hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        per_epoch = trainer.num_training_batches if self.unit == "epoch" else 1
        self.rewind_step = round(self.rewind_to * per_epoch)
        dense_steps = self.epochs_per_cycle * trainer.num_training_batches
        if self.rewind_step >= dense_steps:
            raise ValueError(f"lottery: rewind_to={self.rewind_to} {self.unit}(s) is step {self.rewind_step}, but the "
                             f"dense round has {dense_steps} steps (epochs_per_cycle={self.epochs_per_cycle}); "
                             f"allowed: a rewind point inside the dense round")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.rewind_state is None and trainer.global_step == self.rewind_step:
            self.rewind_state = weights_of(pl_module.model)  # after rewind_step optimizer steps

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.next_cycle(trainer, pl_module):
            last = self.cuts == len(self.levels)
            target = fresh_init(pl_module.model, self.seed + 1) if self.reinit and last else self.rewind_state
            self.rewind(trainer, pl_module.model, target)

    # -- the worker
    @staticmethod
    def rewind(trainer: pl.Trainer, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Survivors (and biases, BatchNorm) take the values of `state`; pruned weights stay zero."""
        model.load_state_dict(state, strict=False)
        apply_masks(model)
        for optimizer in trainer.optimizers:
            optimizer.state.clear()  # Adam's moments belong to the weights before the rewind

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rewind_state": self.rewind_state, "rewind_step": self.rewind_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.rewind_state, self.rewind_step = state_dict["rewind_state"], state_dict["rewind_step"]


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's state without the pruning masks (what rewinding restores)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_mask")}


def fresh_init(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The state of `model` re-initialized by each layer's `reset_parameters`, drawn from `seed`
    without touching the global random stream (training's data order stays as it was)."""
    copy_ = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in copy_.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return weights_of(copy_)


# ----------------------------------------------------------------------------- gradual (AGP)

class _Ramp:
    """Validates and resolves a gradual schedule: a user function of the step, or Zhu & Gupta's ramp
    from `initial` to `final` between `begin` and `end` (in steps or epochs), updated every `frequency` steps."""

    def __init__(self, final: Schedule, initial: float, begin: float, end: float, unit: str, frequency: int,
                 power: float) -> None:
        self.final = _check_schedule("sparsity", final)
        self.initial = check_fraction("initial_sparsity", initial)
        if not callable(final) and self.initial > final:
            raise ValueError(f"initial_sparsity={initial!r} is not valid; allowed: <= sparsity={final!r}")
        self.unit = check_choice("unit", unit, UNITS)
        self.begin = check_number("begin", begin, 0)
        self.end = check_number("end", end, begin, bounds="(]", allowed=f"a number > begin={begin!r}")
        self.frequency = check_int("frequency", frequency, 1)
        self.power = float(check_number("power", power, 0, bounds="(]"))
        self.schedule: Callable[[int], float] | None = final if callable(final) else None

    def check_epochs(self, epochs: int, who: str) -> None:
        """A ramp in epochs must end before a fit of `epochs` epochs does (in steps: checked by build)."""
        if self.unit == "epoch" and not callable(self.final) and self.end >= epochs:
            raise ValueError(f"{who}: end={self.end} epoch(s) is not valid with fine_tune.epochs={epochs}; allowed: "
                             f"end < {epochs} (the ramp reaches its sparsity before the last epoch)")

    def build(self, trainer: pl.Trainer, who: str) -> Callable[[int], float]:
        """The schedule in steps for this trainer; the ramp must end before training does."""
        if self.schedule is not None and not isinstance(self.schedule, PolynomialSchedule):
            return self.schedule
        per_epoch = trainer.num_training_batches if self.unit == "epoch" else 1  # known once training starts
        begin, end = int(round(self.begin * per_epoch)), int(round(self.end * per_epoch))
        total = trainer.estimated_stepping_batches
        if math.isfinite(total) and end >= total:
            raise ValueError(f"{who}: end={self.end} {self.unit}(s) is step {end}, but training has only {int(total)} steps "
                             f"(fine_tune.epochs={trainer.max_epochs}); allowed: end before the last step")
        self.schedule = PolynomialSchedule(self.initial, self.final, begin, end, self.frequency, self.power)
        return self.schedule


class AGP(MaskedPruning):
    """Automated gradual pruning (Zhu & Gupta 2017): the mask grows along a polynomial ramp from
    `initial_sparsity` to `sparsity` between `begin` and `end`, updated every `frequency` steps,
    while the network trains all the while; after `end` it recovers at the final sparsity.

    Args (besides MaskedPruning's; scope defaults to `layer`, as in the paper):
        sparsity: the final sparsity, or a Schedule function of the step (then the ramp's knobs are unused).
        initial_sparsity: the sparsity of the first cut, at `begin`.
        begin, end: where the ramp starts and reaches `sparsity`, in `unit`s (`step` or `epoch`).
        frequency: steps between two mask updates (Zhu & Gupta's dt).
        power: the polynomial's exponent (3 in the paper).
    """

    name = "agp"

    def __init__(self, sparsity: Schedule, initial_sparsity: float = 0.0, begin: float = 0, end: float = 2,
                 unit: str = "epoch", frequency: int = 10, power: float = 3.0, **kwargs: Any) -> None:
        kwargs.setdefault("scope", "layer")
        self.ramp = _Ramp(sparsity, initial_sparsity, begin, end, unit, frequency, power)
        super().__init__(sparsity if not callable(sparsity) else 0.5, **kwargs)
        self.schedule: Callable[[int], float] | None = None

    def check_epochs(self, epochs: int) -> None:
        self.ramp.check_epochs(epochs, self.name)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.schedule = self.ramp.build(trainer, self.name)  # steps per epoch are known from here on

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        target = resolve(self.schedule, trainer.global_step)
        if target > self.current_sparsity + 1e-9:
            self.cut(pl_module.model, target, trainer)


# ----------------------------------------------------------------------------- structured: channels


class ChannelPruning(MaskedTraining, CompressionCallback):
    """Structured pruning of conv filters and linear neurons, physically removed at finalize.

    Channels that must go together (a residual block's output and its shortcut, a conv and its
    BatchNorm, the next layer's inputs) form one group (channel_surgery.py). Each prunable group
    loses the `sparsity` fraction of its channels with the lowest scores; during fine-tuning the
    removed channels are masked to exactly zero (weights, biases and BatchNorm scale and shift), so
    the finalized smaller model computes what the masked one did.

    Args:
        sparsity: fraction of the channels of each prunable group to remove, in [0, 1).
        criterion: `l1` or `l2` norm of the filters, `bn_scale` (|gamma| of the group's
            BatchNorm, Liu et al. 2017: groups without one are skipped, with the reason), or
            `taylor` (Molchanov et al. 2019: the squared first-order estimate of the loss change
            when a whole channel goes, from `taylor_batches` training batches at each cut).
        mode: `oneshot` (cut when fine-tuning starts) or `gradual` (AGP's ramp over channels).
        skip_layers: producer layers whose output channels stay (their groups are skipped); `first` and
            `last` stand for the first and last of them;
            the model's input channels and classes are never pruned.
        layer_sparsity: per-group overrides, keyed by any producer of the group.
        round_to: the channels a group keeps are rounded up to a multiple of this (1: exact);
            8 or 16 suit oneDNN's blocked convolutions.
        initial_sparsity, begin, end, unit, frequency, power: the gradual ramp (see AGP).
        taylor_batches: training batches the `taylor` criterion averages over at each cut.
        remove_at: `finalize` (the removed channels are masked to zero while the model fine-tunes, then
            sliced away at finalize) or `setup` (oneshot only: cut and slice when fitting is set up,
            before the optimizer exists, so the smaller network fine-tunes; a later stage of a
            hybrid, a quantizer, then sees the pruned shapes).

    Raises ValueError when a group would keep no channel (`sparsity` or a `layer_sparsity` so close
    to 1 that `round(fraction * channels)` is all of them), naming the key, value and allowed range:
    the config validation runs `check_model` on the model the config builds, before any run opens.
    """

    name = "channel"
    CRITERIA = ("l1", "l2", "bn_scale", "taylor")
    MODES = ("oneshot", "gradual")
    REMOVE_AT = ("finalize", "setup")

    def __init__(self, sparsity: float, criterion: str = "l1", mode: str = "oneshot",
                 skip_layers: Sequence[str] = (), layer_sparsity: dict[str, float] | None = None,
                 round_to: int | None = None, initial_sparsity: float = 0.0, begin: float = 0, end: float = 2,
                 unit: str = "epoch", frequency: int = 10, power: float = 3.0, taylor_batches: int = 8,
                 remove_at: str = "finalize") -> None:
        self.sparsity = check_fraction("sparsity", sparsity)
        self.criterion = check_choice("criterion", criterion, self.CRITERIA)
        self.mode = check_choice("mode", mode, self.MODES)
        self.remove_at = check_choice("remove_at", remove_at, self.REMOVE_AT)
        if self.remove_at == "setup" and self.mode != "oneshot":
            raise ValueError(f"remove_at='setup' is not valid with mode={mode!r}; allowed: remove_at='finalize', "
                             f"or mode='oneshot' (a gradual cut keeps changing the channels while it trains)")
        self.removed = False  # the channels were sliced away (remove_at=setup, or finalize ran)
        self.skip_layers = list(skip_layers)
        self.layer_sparsity = {k: check_fraction(f"layer_sparsity.{k}", v) for k, v in (layer_sparsity or {}).items()}
        self.round_to = check_int("round_to", round_to, 1) if round_to is not None else 1
        self.ramp = _Ramp(self.sparsity, initial_sparsity, begin, end, unit, frequency, power) if mode == "gradual" else None
        self.taylor_batches = check_int("taylor_batches", taylor_batches, 1)
        self.schedule: Callable[[int], float] | None = None
        self.groups: list[channel_surgery.ChannelGroup] | None = None
        self.keep: dict[int, torch.Tensor] = {}  # group index -> bool mask over its channels
        self.skipped: dict[int, str] = {}
        self.current_sparsity = 0.0
        self.before: dict[str, int] = {}

    def check_epochs(self, epochs: int) -> None:
        if self.ramp is not None:
            self.ramp.check_epochs(epochs, self.name)

    # -- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.remove_at == "setup" and not self.removed:
            self.on_fit_start(trainer, pl_module)
            pl_module.model = self.remove(pl_module.model)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.removed:
            return
        if self.groups is None:
            self.analyse(pl_module.model, _example_input(trainer))
        if self.mode == "oneshot" and self.current_sparsity < self.sparsity:
            self.cut(pl_module.model, self.sparsity, trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.mode == "gradual":
            self.schedule = self.ramp.build(trainer, self.name)  # steps per epoch are known from here on

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.schedule is not None:
            target = resolve(self.schedule, trainer.global_step)
            if target > self.current_sparsity + 1e-9:
                self.cut(pl_module.model, target, trainer)

    def check_model(self, model: nn.Module, example: torch.Tensor, teacher: nn.Module | None = None) -> None:
        """The layer names and every group's kept channels, checked on the model the config builds
        (on a copy of this callback: the run's own analysis happens when fitting starts)."""
        copy.deepcopy(self).analyse(model, example)

    # -- workers
    def analyse(self, model: nn.Module, example_input: torch.Tensor) -> None:
        """Find the channel groups and decide, with reasons, which ones this callback will not touch."""
        self.groups = channel_surgery.channel_groups(model, example_input)
        modules = dict(model.named_modules())
        producers = {p for g in self.groups for p in g.producers}
        # first/last: the model's first and last layer whose output channels can be pruned
        skip = resolve_aliases(self.skip_layers, [name for name, _ in weighted_layers(model) if name in producers])
        unknown = [entry for name, entry in skip.items() if name not in producers]
        unknown += [n for n in self.layer_sparsity if n not in producers]
        if unknown:
            raise ValueError(f"channel pruning knows no producer layers {unknown}; allowed: {', '.join(sorted(producers))}, first, last")
        self.skipped = {}
        for i, group in enumerate(self.groups):
            if not group.producers:
                continue
            listed = [skip[p] for p in group.producers if p in skip]
            if group.frozen:
                self.skipped[i] = group.frozen
            elif listed:
                self.skipped[i] = f"listed in skip_layers as {listed[0]!r}"
            elif self.criterion == "bn_scale" and not any(
                    isinstance(modules[c], (nn.BatchNorm1d, nn.BatchNorm2d)) for c in group.carriers):
                self.skipped[i] = "criterion bn_scale needs a BatchNorm on these channels"
            for name in group.producers:
                self.before[name] = group.size
        for i, reason in self.skipped.items():
            log.info("channel pruning skips %s: %s", ", ".join(self.groups[i].producers), reason)
        self.check_every_group_keeps_a_channel()

    def check_every_group_keeps_a_channel(self) -> None:
        """A fraction that rounds to all of a group's channels would cut the network in two: refuse it."""
        for i, group in enumerate(self.groups):
            if not group.prunable or i in self.skipped:
                continue
            fraction = self.group_fraction(group, self.sparsity)
            if round(fraction * group.size) < group.size:
                continue
            overridden = [p for p in group.producers if p in self.layer_sparsity]
            key = f"layer_sparsity.{overridden[0]}" if overridden else "sparsity"
            value = self.layer_sparsity[overridden[0]] if overridden else self.sparsity
            raise ValueError(f"{key}={value!r} is not valid: it removes all {group.size} channels of "
                             f"{', '.join(group.producers)}; allowed: a fraction in [0, {(group.size - 0.5) / group.size:.4g}) "
                             f"for this layer (round(fraction x {group.size}) must leave at least one channel)")

    def group_fraction(self, group: channel_surgery.ChannelGroup, sparsity: float) -> float:
        override = [self.layer_sparsity[p] for p in group.producers if p in self.layer_sparsity]
        if not override or self.sparsity == 0:
            return sparsity
        return override[0] * sparsity / self.sparsity

    def scores(self, model: nn.Module, group: channel_surgery.ChannelGroup,
               taylor: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        modules = dict(model.named_modules())
        if self.criterion == "taylor":
            return taylor[group.producers[0]]
        if self.criterion == "bn_scale":
            return sum(modules[c].weight.detach().abs() for c in group.carriers
                       if isinstance(modules[c], (nn.BatchNorm1d, nn.BatchNorm2d)))
        return channel_surgery.channel_scores([modules[p].weight for p in group.producers], self.criterion)

    def cut(self, model: nn.Module, sparsity: float, trainer: pl.Trainer | None = None) -> None:
        modules = dict(model.named_modules())
        active = [g for i, g in enumerate(self.groups) if g.prunable and i not in self.skipped]
        taylor = None
        if self.criterion == "taylor":
            if trainer is None:
                raise ValueError("criterion='taylor' needs training batches: cut during fit, or use l1, l2, bn_scale")
            batches = training_batches(trainer, self.taylor_batches, "channel pruning's taylor criterion")
            taylor = channel_taylor_scores(model, active, batches)
        for i, group in enumerate(self.groups):
            if not group.prunable or i in self.skipped:
                continue
            removed = ~self.keep[i] if i in self.keep else None
            keep = channel_surgery.channel_keep_mask(self.scores(model, group, taylor), self.group_fraction(group, sparsity),
                                                     removed, self.round_to)
            self.keep[i] = keep.cpu()
            for name in group.producers + group.carriers:
                module = modules[name]
                _attach_row_mask(module, "weight", keep)
                _attach_row_mask(module, "bias", keep)
        apply_masks(model)
        self.current_sparsity = sparsity

    def remove(self, model: nn.Module) -> nn.Module:
        """The masks folded and the removed channels sliced away, once."""
        if self.removed:
            return model
        fold_masks(model)
        kept = {i: keep.nonzero().flatten() for i, keep in self.keep.items()}
        self.removed = True
        return channel_surgery.remove_channels(model, self.groups or [], kept)

    # -- protocol
    def finalize(self, model: nn.Module) -> nn.Module:
        return self.remove(model)

    def summary(self, model: nn.Module) -> list[dict[str, Any]]:
        modules = dict(model.named_modules())
        rows = []
        for i, group in enumerate(self.groups or []):
            for name in group.producers:
                module = modules[name]  # a later quantizer leaves an int8 layer holding weight_codes
                after = (module.weight if hasattr(module, "weight") else module.weight_codes).shape[0]
                rows.append({"layer": name, "group": i, "channels_before": group.size, "channels_after": after,
                             "fraction_removed": 1 - after / group.size, "skipped": self.skipped.get(i, "")})
        return rows

    def state_dict(self) -> dict[str, Any]:
        return {"groups": self.groups, "keep": self.keep, "skipped": self.skipped,
                "current_sparsity": self.current_sparsity, "removed": self.removed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.groups, self.keep = state_dict["groups"], state_dict["keep"]
        self.skipped, self.current_sparsity = state_dict["skipped"], state_dict["current_sparsity"]
        self.removed = state_dict.get("removed", False)


def channel_taylor_scores(model: nn.Module, groups: list[channel_surgery.ChannelGroup],
                          batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Group Taylor importance (Molchanov et al. 2019), keyed by each group's first producer.

    Removing channel c changes the loss by about -sum(theta * dL/dtheta) over every parameter that
    belongs to c alone (its producers' filter rows and biases, its BatchNorm's gamma and beta, its
    depthwise filters); the score is that sum squared, averaged over the batches. Channels whose
    removal the loss does not notice score lowest. Runs in eval mode, so BatchNorm's statistics stay
    as they were; leaves no gradient behind.
    """
    modules = dict(model.named_modules())
    was_training = model.training
    model.eval()
    saved = {name: p.grad for name, p in model.named_parameters()}
    device = next(model.parameters()).device
    scores = {g.producers[0]: torch.zeros(g.size, device=device) for g in groups}
    for inputs, targets in batches:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(inputs.to(device)), targets.to(device)).backward()
        for group in groups:
            first_order = torch.zeros(group.size, device=device)
            for name in group.producers + group.carriers:
                for parameter in (getattr(modules[name], "weight", None), getattr(modules[name], "bias", None)):
                    if isinstance(parameter, nn.Parameter) and parameter.grad is not None:
                        first_order += (parameter.detach() * parameter.grad).flatten(1).sum(1) \
                            if parameter.dim() > 1 else parameter.detach() * parameter.grad
            scores[group.producers[0]] += first_order.pow(2) / len(batches)
    for name, p in model.named_parameters():
        p.grad = saved[name]
    model.train(was_training)
    return scores


def _attach_row_mask(module: nn.Module, parameter: str, keep: torch.Tensor) -> None:
    tensor = getattr(module, parameter, None)
    if tensor is None:
        return
    mask = keep.to(tensor.device, torch.float32).view(-1, *([1] * (tensor.dim() - 1))).expand_as(tensor).clone()
    buffer = f"{parameter}_mask"
    register_or_update_buffer(module, buffer, getattr(module, buffer) * mask if hasattr(module, buffer) else mask)


def _example_input(trainer: pl.Trainer) -> torch.Tensor:
    datamodule = trainer.datamodule
    shape = getattr(datamodule, "shape", None)
    if shape is not None and hasattr(shape, "in_channels"):
        return torch.zeros(1, shape.in_channels, shape.image_size, shape.image_size)
    inputs = next(iter(datamodule.train_dataloader()))[0]
    return torch.zeros_like(inputs[:1])


# ----------------------------------------------------------------------------- semi-structured N:M


class SemiStructuredLinear(nn.Linear):
    """A Linear whose weight follows a 2:4 pattern; on a CUDA GPU that supports PyTorch's
    semi-structured sparse kernels, inference runs on them. The stored weight stays dense (so the
    artifact keeps its encodings); the compressed form is built on first use and rebuilt if the
    weight changes. Where the kernels are missing or refuse the shape, it runs dense and says so
    in `kernel`."""

    kernel: str = "dense"

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> SemiStructuredLinear:
        layer = cls.__new__(cls)
        layer.__dict__.update(linear.__dict__)
        layer.kernel = "dense"
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cuda or self.training or torch.is_grad_enabled() and self.weight.requires_grad and x.requires_grad:
            return F.linear(x, self.weight, self.bias)
        sparse = self._sparse_weight(x.dtype)
        if sparse is None:
            return F.linear(x, self.weight, self.bias)
        rows = x.reshape(-1, x.shape[-1])
        out = F.linear(rows, sparse, self.bias.to(x.dtype) if self.bias is not None else None)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def _sparse_weight(self, dtype: torch.dtype):
        key = (self.weight.data_ptr(), self.weight._version, dtype)
        cache = self.__dict__.get("_semi_structured")
        if cache is not None and cache[0] == key:
            return cache[1]
        try:
            from torch.sparse import to_sparse_semi_structured

            sparse = to_sparse_semi_structured(self.weight.detach().to(dtype))
            self.kernel = "semi_structured"
        except Exception as error:  # unsupported GPU, dtype or shape: run dense, and say why once
            if self.kernel != "dense (unsupported)":
                log.info("semi-structured kernels refuse %s: %s; running dense", tuple(self.weight.shape), error)
            sparse, self.kernel = None, "dense (unsupported)"
        self.__dict__["_semi_structured"] = (key, sparse)
        return sparse

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.pop("_semi_structured", None)
        return state


class NMPruning(MaskedPruning):
    """N:M semi-structured sparsity: in every `m` consecutive input weights of a row, keep `n`.

    `n` follows from `sparsity` (sparsity = 1 - n/m), so `method.sparsity` stays the sweep axis;
    0.5 with m=4 is NVIDIA's 2:4. One-shot by magnitude (or taylor/random) when fine-tuning
    starts; the masks hold through fine-tuning. At finalize, 2:4 Linear layers become
    SemiStructuredLinear: on a CUDA GPU with semi-structured kernels they run sparse; elsewhere
    they run dense and the gain is only theoretical (`macs_effective_theoretical`).
    Layers whose rows do not split into groups of `m` are skipped, with the reason.
    """

    name = "nm"

    def __init__(self, sparsity: float = 0.5, m: int = 4, n: int | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("scope", "layer")
        super().__init__(sparsity, **kwargs)
        self.m = check_int("m", m, 2)
        derived = self.m - self.sparsity * self.m
        if n is None:
            if abs(derived - round(derived)) > 1e-6 or round(derived) < 1:
                raise ValueError(f"sparsity={sparsity!r} is not valid for m={m}; allowed: 1 - n/m for an integer "
                                 f"1 <= n < m, e.g. {', '.join(str(1 - k / self.m) for k in range(1, self.m))}")
            n = int(round(derived))
        self.n = check_int("n", n, 1)
        if self.n >= self.m or abs((1 - self.n / self.m) - self.sparsity) > 1e-6:
            raise ValueError(f"n={n!r} is not valid for m={m} and sparsity={sparsity!r}; allowed: n = m * (1 - sparsity)")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.pruned:
            self.prune(pl_module.model, trainer)

    def prune(self, model: nn.Module, trainer: pl.Trainer | None = None) -> None:
        targets = self.target_layers(model)
        masks = {name: nm_mask(score, self.n, self.m) for name, score in self.scores(model, targets, trainer).items()}
        attach_masks(model, masks)
        self.current_sparsity, self.cuts = self.sparsity, self.cuts + 1

    def target_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        targets = super().target_layers(model)
        for name, module in list(targets.items()):
            inputs = module.weight[0].numel()
            if inputs % self.m != 0:
                self.skipped[name] = f"{inputs} inputs per row do not split into groups of m={self.m}"
                log.info("nm pruning skips %s: %s", name, self.skipped[name])
                del targets[name]
        return targets

    def finalize(self, model: nn.Module) -> nn.Module:
        fold_masks(model)
        if (self.n, self.m) == (2, 4):
            for parent in list(model.modules()):
                for child_name, child in parent.named_children():
                    if type(child) is nn.Linear and any(child is t for t in self._pruned_linears(model)):
                        setattr(parent, child_name, SemiStructuredLinear.from_linear(child))
        return model

    def _pruned_linears(self, model: nn.Module) -> list[nn.Module]:
        return [m for name, m in weighted_layers(model) if isinstance(m, nn.Linear) and name not in self.skipped]

    def summary(self, model: nn.Module) -> list[dict[str, Any]]:
        modules = dict(model.named_modules())
        return [{**row, "pattern": "" if row["layer"] in self.skipped else f"{self.n}:{self.m}",
                 "kernel": getattr(modules[row["layer"]], "kernel", "dense"), "skipped": self.skipped.get(row["layer"], "")}
                for row in layer_table(model)]


# ----------------------------------------------------------------------------- the reference peer


class LightningReference(ModelPruning, CompressionCallback):
    """Lightning's built-in ModelPruning (global L1 unstructured over the Conv/Linear weights), driven to `sparsity` over
    `ramp_epochs` epochs along the same cubic ramp as AGP but cut only at epoch ends, as
    ModelPruning does; the remaining epochs fine-tune. It is the peer the benchmark compares against.
    """

    name = "lightning"

    def __init__(self, sparsity: float, ramp_epochs: int = 2, initial_sparsity: float = 0.0,
                 skip_layers: Sequence[str] = ()) -> None:
        self.sparsity = check_fraction("sparsity", sparsity)
        self.ramp_epochs = check_int("ramp_epochs", ramp_epochs, 1)
        self.initial_sparsity = check_fraction("initial_sparsity", initial_sparsity)
        self.skip_layers = list(skip_layers)
        self.skipped: dict[str, str] = {}
        super().__init__(pruning_fn="l1_unstructured", amount=self.amount_at_epoch_end, use_global_unstructured=True,
                         make_pruning_permanent=True, verbose=0)

    def target(self, epoch: int) -> float:
        """Cumulative sparsity after epoch `epoch`'s end: the cubic ramp sampled at epoch ends."""
        if self.ramp_epochs == 1:
            return self.sparsity
        return polynomial_sparsity(epoch, self.initial_sparsity, self.sparsity, 0, self.ramp_epochs - 1)

    def amount_at_epoch_end(self, epoch: int) -> float:
        before = self.target(epoch - 1) if epoch > 0 else 0.0
        after = self.target(epoch)
        return 0.0 if after <= before else 1.0 - (1.0 - after) / (1.0 - before)  # of the weights still left

    def filter_parameters_to_prune(self, parameters_to_prune=()):
        """The weights of the Conv/Linear layers not skipped, as AGP prunes: ModelPruning's own default
        would also rank biases and BatchNorm scales in its global threshold."""
        names = {id(module): name for name, module in self._model_layers}
        return [(m, p) for m, p in parameters_to_prune
                if p == "weight" and id(m) in names and names[id(m)] not in self.skipped]

    def check_epochs(self, epochs: int) -> None:
        if 0 <= epochs < self.ramp_epochs:
            raise ValueError(f"lightning: ramp_epochs={self.ramp_epochs} does not reach sparsity={self.sparsity} within "
                             f"fine_tune.epochs={epochs}; allowed: ramp_epochs <= {epochs}")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.max_epochs is not None:
            self.check_epochs(trainer.max_epochs)
        self._model_layers = list(weighted_layers(pl_module.model))
        _, self.skipped = select_layers(pl_module.model, self.skip_layers)  # the same names and reasons as AGP's
        super().setup(trainer, pl_module, stage)

    def finalize(self, model: nn.Module) -> nn.Module:
        return model  # ModelPruning made its masks permanent at the end of training

    def summary(self, model: nn.Module) -> list[dict[str, Any]]:
        return [{**row, "skipped": self.skipped.get(row["layer"], "")} for row in layer_table(model)]


# Method names -> their callback classes, for scripts that build callbacks without Hydra.
REGISTRY: dict[str, type[CompressionCallback]] = {
    "magnitude": MagnitudePruning,
    "iterative": IterativePruning,
    "lottery": LotteryTicket,
    "agp": AGP,
    "channel": ChannelPruning,
    "nm": NMPruning,
    "lightning": LightningReference,
}


def pruning_callback(method: str, **kwargs: Any) -> CompressionCallback:
    """Build a registered pruning callback by name."""
    return REGISTRY[check_choice("method", method, tuple(REGISTRY))](**kwargs)


# ----------------------------------------------------------------------------- sensitivity analysis


@torch.no_grad()
def sparsity_sensitivity(model: nn.Module, evaluate: Callable[[nn.Module], float], sparsities: Sequence[float],
                         criterion: str = "magnitude", layers: Sequence[str] | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Prune each layer alone at each sparsity, without fine-tuning, and score the model.

    `evaluate(model) -> accuracy in percent`. Every layer gets its weights back before the next
    one is pruned, so the model is unchanged on return. Rows: layer, sparsity, test_acc, acc_drop
    (points below the unpruned model).

    Raises:
        ValueError: for a criterion that needs gradients or is unknown, a bad sparsity, an unknown layer.
    """
    check_choice("criterion", criterion, ["magnitude", "random"])
    sparsities = [check_fraction("sparsities", s) for s in sparsities]
    names = [name for name, _ in weighted_layers(model)]
    unknown = [name for name in (layers or []) if name not in names]
    if unknown:
        raise ValueError(f"layers has unknown layers {unknown}; allowed: {', '.join(names)}")
    generator = torch.Generator().manual_seed(seed)
    reference = evaluate(model)
    rows = []
    for name, module in weighted_layers(model):
        if layers is not None and name not in layers:
            continue
        original = module.weight.detach().clone()
        for sparsity in sparsities:
            scores = IMPORTANCE[criterion](original, generator, None)
            module.weight.mul_(layer_mask(scores, sparsity).to(original.device))
            accuracy = evaluate(model)
            rows.append({"layer": name, "sparsity": sparsity, "test_acc": accuracy, "acc_drop": reference - accuracy})
            module.weight.copy_(original)
    return rows
