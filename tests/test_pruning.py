"""Unstructured pruning: the mask math, the schedules, and every masked method through a real Trainer."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_modules.compression.pruning import (
    AGP, MASK, IterativePruning, LightningReference, LotteryTicket, MagnitudePruning, PolynomialSchedule, global_masks,
    iterative_sparsities, lamp_scores, layer_mask, polynomial_sparsity, pruning_callback, resolve, taylor_saliency,
)
from lightning_modules.data import InMemoryDataModule
from lightning_modules.models import LeNet300
from lightning_modules.task import ClassificationTask

BATCHES_PER_EPOCH = 5


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8, 0.95])
def test_layer_mask_removes_exactly_the_lowest_scores(sparsity: float) -> None:
    scores = torch.randn(40, 25).abs()
    mask = layer_mask(scores, sparsity)
    assert int((mask == 0).sum()) == round(sparsity * scores.numel())
    if 0 < sparsity:
        assert scores[mask == 0].max() <= scores[mask == 1].min()


def test_global_masks_rank_all_layers_together() -> None:
    scores = {"small": torch.full((10,), 0.1), "large": torch.full((30,), 5.0)}
    masks = global_masks(scores, 0.25)
    assert int(masks["small"].sum()) == 0 and int(masks["large"].sum()) == 30


def test_global_masks_never_empty_a_layer_and_still_cut_the_sparsity_asked() -> None:
    # mobilenetv2's classifier read 100% sparse under one threshold and the run ended at chance
    torch.manual_seed(0)
    scores = {"classifier": torch.rand(100) * 0.01, "body": torch.rand(900) + 1.0, "tiny": torch.rand(50) * 0.001}
    masks = global_masks(scores, 0.8, max_layer_sparsity=0.9)
    kept = {name: int(mask.sum()) for name, mask in masks.items()}
    assert kept["classifier"] == 10 and kept["tiny"] == 5  # each at the ceiling, its best-scoring share kept
    assert all(scores[name][masks[name] == 1].min() >= scores[name][masks[name] == 0].max() for name in scores)
    assert sum(int((mask == 0).sum()) for mask in masks.values()) == round(0.8 * 1050)  # the rest cut from body
    # a sparsity above the ceiling raises it: every layer at most the sparsity asked
    assert all(int(mask.sum()) == 5 for mask in global_masks({"a": torch.rand(50), "b": torch.rand(50) * 9},
                                                               0.9, max_layer_sparsity=0.5).values())


def test_one_shot_magnitude_keeps_every_layer_alive_where_one_threshold_would_empty_one() -> None:
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    with torch.no_grad():
        model[2].weight.mul_(1e-3)  # a last layer on a much smaller scale, as after BatchNorm-scaled features
    pruner = MagnitudePruning(sparsity=0.9, normalize="none")  # raw scores: LAMP alone would keep it alive
    pruner.cut(model, 0.9)
    assert int((getattr(model[2], MASK) == 0).sum()) <= round(0.98 * 256)
    weights = [model[0].weight.numel(), model[2].weight.numel()]
    pruned = sum(int((getattr(model[i], MASK) == 0).sum()) for i in (0, 2))
    assert pruned == round(0.9 * sum(weights))
    with pytest.raises(ValueError, match="max_layer_sparsity=1.0 is not valid"):
        MagnitudePruning(sparsity=0.5, max_layer_sparsity=1.0)


def test_lamp_scores_are_each_square_over_the_squares_not_below_it() -> None:
    scores = torch.tensor([[0.1, -0.3], [0.2, -math.inf]])  # -inf: pruned by an earlier cut
    lamp = lamp_scores(scores)
    expected = torch.tensor([[0.01 / 0.14, 1.0], [0.04 / 0.13, -math.inf]])
    assert torch.allclose(lamp, expected)
    assert torch.equal(lamp_scores(scores * 1e-4), lamp)  # a layer's scale does not matter
    assert torch.equal(lamp_scores(torch.zeros(3)), torch.zeros(3))


def _two_layer_net(last_scale: float) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    with torch.no_grad():
        model[2].weight.mul_(last_scale)  # the scale BatchNorm makes arbitrary before a layer
    return model


def _layer_sparsities(model: nn.Sequential, normalize: str) -> list[float]:
    MagnitudePruning(sparsity=0.8, normalize=normalize).cut(model, 0.8)
    return [round(1 - getattr(model[i], MASK).mean().item(), 4) for i in (0, 2)]


def test_lamp_cuts_each_layer_alike_whatever_its_scale_where_raw_scores_follow_the_scale() -> None:
    assert _layer_sparsities(_two_layer_net(1e-3), "lamp") == _layer_sparsities(_two_layer_net(1.0), "lamp")
    assert _layer_sparsities(_two_layer_net(1e-3), "none")[1] == pytest.approx(0.98, abs=0.002)  # cut to the cap
    assert _layer_sparsities(_two_layer_net(1e3), "none")[1] < 0.1
    with pytest.raises(ValueError, match="normalize='l2' is not valid; allowed: lamp, none"):
        MagnitudePruning(sparsity=0.5, normalize="l2")


# ----------------------------------------------------------------------------- schedules


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.5),                               # the first cut, at begin
        (5, 0.5),                               # between updates the last update holds
        (10, 0.8 - 0.3 * 0.9 ** 3),             # 0.58130
        (50, 0.8 - 0.3 * 0.5 ** 3),             # 0.7625
        (99, 0.8 - 0.3 * 0.1 ** 3),             # the update at 90
        (100, 0.8),                             # end
        (1000, 0.8),                            # after end
    ],
)
def test_polynomial_sparsity_is_zhu_and_gupta_cubic_ramp(step: int, expected: float) -> None:
    assert polynomial_sparsity(step, 0.5, 0.8, begin=0, end=100, frequency=10) == pytest.approx(expected)


def test_polynomial_sparsity_before_begin_and_with_another_power() -> None:
    assert polynomial_sparsity(10, 0.0, 0.9, begin=20, end=120) == 0.0
    assert polynomial_sparsity(70, 0.0, 0.9, begin=20, end=120, power=1) == pytest.approx(0.45)
    assert PolynomialSchedule(0.0, 0.9, 20, 120, 1, 1)(70) == pytest.approx(0.45)


def test_resolve_takes_a_value_or_a_function_of_the_step() -> None:
    assert resolve(0.7, 123) == 0.7
    assert resolve(lambda step: step / 100, 30) == pytest.approx(0.3)


def test_iterative_sparsities_remove_a_fraction_of_what_is_left_and_stop_at_the_target() -> None:
    assert iterative_sparsities(0.8, 0.5) == pytest.approx([0.5, 0.75, 0.8])
    assert iterative_sparsities(0.95, 0.5) == pytest.approx([0.5, 0.75, 0.875, 0.9375, 0.95])
    assert iterative_sparsities(0.5, 0.5) == pytest.approx([0.5])


# ----------------------------------------------------------------------------- training with the masks


class SparsityProbe(pl.Callback):
    """Records (step, sparsity of the masked layers) at every batch, after the pruning callback acted."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, float]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        masks = [m for m in pl_module.model.modules() if hasattr(m, MASK)]
        zero = sum(int((getattr(m, MASK) == 0).sum()) for m in masks)
        total = sum(getattr(m, MASK).numel() for m in masks)
        self.seen.append((trainer.global_step, zero / total if total else 0.0))


def _train(callbacks: list[pl.Callback], model: nn.Module, epochs: int = 2) -> nn.Module:
    pl.seed_everything(0, verbose=False)
    data = InMemoryDataModule("digits", batch_size=64)
    task = ClassificationTask(model, optimizer=lambda params: torch.optim.Adam(params, lr=1e-2, weight_decay=1e-3))
    trainer = pl.Trainer(max_epochs=epochs, callbacks=callbacks, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_train_batches=BATCHES_PER_EPOCH,
                         limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(task, datamodule=data)
    return task.model


def _assert_masks_honoured(model: nn.Module) -> None:
    masked = [m for m in model.modules() if hasattr(m, MASK)]
    assert masked, "the callback attached no mask"
    for layer in masked:
        mask = getattr(layer, MASK)
        assert torch.all(layer.weight[mask == 0] == 0)  # Adam's momentum and weight decay never moved them
        assert torch.any(layer.weight[mask == 1] != 0)


def _layer_sparsity(layer: nn.Module) -> float:
    return float((layer.weight == 0).float().mean())


# (callback factory, epochs, expected sparsity of each pruned layer)
METHODS: dict[str, tuple[Callable[[], pl.Callback], int, float]] = {
    "magnitude": (lambda: MagnitudePruning(0.7, scope="layer", skip_layers=[]), 2, 0.7),
    "taylor": (lambda: MagnitudePruning(0.7, scope="layer", criterion="taylor", taylor_batches=2, skip_layers=[]), 2, 0.7),
    "random": (lambda: MagnitudePruning(0.7, scope="layer", criterion="random", skip_layers=[]), 2, 0.7),
    "agp": (lambda: AGP(0.8, initial_sparsity=0.5, end=2, frequency=2, skip_layers=[]), 3, 0.8),
    "iterative": (lambda: IterativePruning(0.8, fraction_per_cycle=0.5, scope="layer", skip_layers=[]), 3, 0.8),
    "lottery": (lambda: LotteryTicket(0.75, fraction_per_cycle=0.5, scope="layer", skip_layers=[]), 3, 0.75),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_reaches_its_sparsity_and_pruned_weights_stay_zero(method: str) -> None:
    factory, epochs, expected = METHODS[method]
    callback = factory()
    trained = _train([callback], LeNet300(1, 8, 10), epochs)
    _assert_masks_honoured(trained)
    finalized = callback.finalize(trained)
    assert not any(hasattr(m, MASK) for m in finalized.modules())
    for index in (1, 3, 5):
        assert _layer_sparsity(finalized.classifier[index]) == pytest.approx(expected, abs=0.01)


def test_pruned_weights_stay_zero_through_fine_tuning_with_adam() -> None:
    callback = MagnitudePruning(sparsity=0.7, scope="layer", skip_layers=[])
    trained = _train([callback], LeNet300(1, 8, 10))
    _assert_masks_honoured(trained)
    for layer in (trained.classifier[1], trained.classifier[3], trained.classifier[5]):
        assert float((getattr(layer, MASK) == 0).float().mean()) == pytest.approx(0.7, abs=0.01)


def test_agp_follows_the_cubic_ramp_step_by_step() -> None:
    callback, probe = AGP(0.8, initial_sparsity=0.5, end=2, frequency=2, skip_layers=[]), SparsityProbe()
    _train([callback, probe], LeNet300(1, 8, 10), epochs=3)
    expected = PolynomialSchedule(0.5, 0.8, begin=0, end=2 * BATCHES_PER_EPOCH, frequency=2)
    assert len(probe.seen) == 3 * BATCHES_PER_EPOCH
    for step, sparsity in probe.seen:
        assert sparsity == pytest.approx(expected(step), abs=0.005), step
    assert probe.seen[0][1] == pytest.approx(0.5, abs=0.005) and probe.seen[-1][1] == pytest.approx(0.8, abs=0.005)


def test_agp_takes_a_function_of_the_step_as_its_schedule() -> None:
    callback, probe = AGP(lambda step: 0.1 * (step // 3), skip_layers=[]), SparsityProbe()
    _train([callback, probe], LeNet300(1, 8, 10), epochs=2)
    assert [s for _, s in probe.seen] == pytest.approx([0.1 * (step // 3) for step, _ in probe.seen], abs=0.005)


def test_agp_whose_ramp_outlasts_training_stops_with_the_step_count() -> None:
    with pytest.raises(ValueError, match=r"agp: end=4 epoch\(s\) is step 20, but training has only 10 steps"):
        _train([AGP(0.8, end=4)], LeNet300(1, 8, 10), epochs=2)


def test_iterative_needs_enough_epochs_for_its_cycles() -> None:
    with pytest.raises(ValueError, match=r"takes 5 cycles of 1 epoch\(s\): fine_tune.epochs=2 is not valid; allowed: >= 5"):
        _train([IterativePruning(0.95, fraction_per_cycle=0.5)], LeNet300(1, 8, 10), epochs=2)


def test_iterative_cuts_once_per_cycle_at_the_listed_levels() -> None:
    callback, probe = IterativePruning(0.8, fraction_per_cycle=0.5, epochs_per_cycle=2, scope="layer", skip_layers=[]), SparsityProbe()
    _train([callback, probe], LeNet300(1, 8, 10), epochs=6)
    by_epoch = {step // BATCHES_PER_EPOCH: s for step, s in probe.seen}
    assert [by_epoch[e] for e in range(6)] == pytest.approx([0.5, 0.5, 0.75, 0.75, 0.8, 0.8], abs=0.005)


class WeightProbe(pl.Callback):
    """Records classifier.3's weight at every batch start, after the pruning callback acted."""

    def __init__(self) -> None:
        self.at_step: dict[int, torch.Tensor] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        self.at_step[trainer.global_step] = pl_module.model.classifier[3].weight.detach().clone()


@pytest.mark.parametrize(("rewind_to", "unit", "rewind_step"), [(0, "epoch", 0), (3, "step", 3), (0.4, "epoch", 2)])
def test_lottery_rewinds_the_survivors_to_the_early_checkpoint_after_every_cut(rewind_to: float, unit: str,
                                                                               rewind_step: int) -> None:
    callback = LotteryTicket(0.75, fraction_per_cycle=0.5, rewind_to=rewind_to, unit=unit, scope="layer", skip_layers=[])
    probe = WeightProbe()
    trained = _train([callback, probe], LeNet300(1, 8, 10), epochs=3)  # a dense round, then a round per cut
    checkpoint = probe.at_step[rewind_step]
    assert torch.equal(callback.rewind_state["classifier.3.weight"], checkpoint)
    assert callback.cuts == 2
    for cut, sparsity in ((1, 0.5), (2, 0.75)):
        rewound = probe.at_step[cut * BATCHES_PER_EPOCH]  # first step of the round after cut number `cut`
        kept = rewound != 0
        assert float((~kept).float().mean()) == pytest.approx(sparsity, abs=0.01)
        assert torch.equal(rewound[kept], checkpoint[kept])  # survivors are the checkpoint's values
    mask = getattr(trained.classifier[3], MASK)
    assert torch.all(trained.classifier[3].weight[mask == 0] == 0)
    assert not torch.equal(trained.classifier[3].weight, checkpoint * mask)  # and the last round trained from there


def test_lottery_prunes_the_trained_weights_not_the_checkpoint() -> None:
    callback, probe = LotteryTicket(0.5, fraction_per_cycle=0.5, scope="layer", skip_layers=[]), WeightProbe()
    _train([callback, probe], LeNet300(1, 8, 10), epochs=2)
    trained_dense = probe.at_step[BATCHES_PER_EPOCH - 1]  # before the last step of round 0: close to what was cut
    mask = probe.at_step[BATCHES_PER_EPOCH] != 0
    assert trained_dense[mask].abs().mean() > 2 * trained_dense[~mask].abs().mean()


def test_lottery_reinit_control_keeps_the_masks_and_draws_fresh_weights() -> None:
    runs = {}
    for reinit in (False, True):
        callback, probe = LotteryTicket(0.75, fraction_per_cycle=0.5, reinit=reinit, scope="layer", skip_layers=[]), WeightProbe()
        torch.manual_seed(0)  # the same initialization for both
        _train([callback, probe], LeNet300(1, 8, 10), epochs=3)
        runs[reinit] = (callback, probe.at_step[2 * BATCHES_PER_EPOCH])  # the last round's starting weights
    (ticket, ticket_start), (_, control_start) = runs[False], runs[True]
    assert torch.equal(ticket_start != 0, control_start != 0)  # the same masks
    kept = ticket_start != 0
    assert torch.equal(ticket_start[kept], ticket.rewind_state["classifier.3.weight"][kept])
    assert not torch.allclose(control_start[kept], ticket_start[kept])


def test_lottery_rewind_point_must_lie_in_the_dense_round() -> None:
    with pytest.raises(ValueError, match=r"lottery: rewind_to=10 step\(s\) is step 10, but the dense round has 5 steps"):
        _train([LotteryTicket(0.5, rewind_to=10, unit="step")], LeNet300(1, 8, 10), epochs=2)


def test_lottery_needs_a_dense_round_and_a_round_per_cut() -> None:
    with pytest.raises(ValueError, match=r"takes 3 cycles of 1 epoch\(s\): fine_tune.epochs=2 is not valid; allowed: >= 3"):
        _train([LotteryTicket(0.75, fraction_per_cycle=0.5)], LeNet300(1, 8, 10), epochs=2)


def test_taylor_saliency_is_weight_times_gradient() -> None:
    torch.manual_seed(0)
    model = LeNet300(1, 8, 10)
    inputs, targets = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    layers = {"classifier.3": model.classifier[3]}
    saliency = taylor_saliency(model, layers, [(inputs, targets)])
    torch.nn.functional.cross_entropy(model(inputs), targets).backward()
    expected = (model.classifier[3].weight * model.classifier[3].weight.grad).abs()
    assert torch.allclose(saliency["classifier.3"], expected)


def test_global_scope_hits_the_target_over_the_pruned_layers_and_skips_first_and_last() -> None:
    model = LeNet300(1, 8, 10)
    callback = MagnitudePruning(sparsity=0.9, scope="global", skip_layers=["first", "last"])
    callback.prune(model)
    assert set(callback.skipped) == {"classifier.1", "classifier.5"}
    assert not hasattr(model.classifier[1], MASK) and not hasattr(model.classifier[5], MASK)
    assert float((model.classifier[3].weight == 0).float().mean()) == pytest.approx(0.9, abs=0.001)
    rows = {row["layer"]: row for row in callback.summary(model)}
    assert rows["classifier.1"]["skipped"] == "listed in skip_layers as 'first'"
    assert rows["classifier.3"]["sparsity"] == pytest.approx(0.9, abs=0.001)


def test_by_default_no_layer_is_spared_so_the_whole_model_reaches_the_sparsity() -> None:
    model = LeNet300(1, 8, 10)
    callback = MagnitudePruning(sparsity=0.9)
    callback.prune(model)
    assert callback.skipped == {}
    weights = [model.classifier[i].weight for i in (1, 3, 5)]
    assert sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights) == pytest.approx(0.9, abs=1e-4)


def test_random_criterion_differs_from_magnitude() -> None:
    torch.manual_seed(0)
    model_a, model_b = LeNet300(1, 8, 10), LeNet300(1, 8, 10)
    model_b.load_state_dict(model_a.state_dict())
    MagnitudePruning(0.5, scope="layer", skip_layers=[]).prune(model_a)
    MagnitudePruning(0.5, scope="layer", criterion="random", skip_layers=[]).prune(model_b)
    assert not torch.equal(getattr(model_a.classifier[1], MASK), getattr(model_b.classifier[1], MASK))


def test_per_layer_overrides() -> None:
    model = LeNet300(1, 8, 10)
    MagnitudePruning(0.5, scope="layer", skip_layers=[], layer_sparsity={"classifier.3": 0.9}).prune(model)
    assert float((model.classifier[1].weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    assert float((model.classifier[3].weight == 0).float().mean()) == pytest.approx(0.9, abs=0.01)


def test_lightning_reference_reaches_the_target_at_the_end_of_its_ramp() -> None:
    reference = LightningReference(0.9, ramp_epochs=3, initial_sparsity=0.5)
    remaining = 1.0
    for epoch in range(4):
        remaining *= 1 - reference.amount_at_epoch_end(epoch)
    assert 1 - remaining == pytest.approx(0.9)
    assert reference.target(0) == pytest.approx(0.5) and reference.target(1) == pytest.approx(0.9 - 0.4 * 0.5 ** 3)


@pytest.mark.slow
def test_lightning_reference_trains_to_the_target_with_its_first_and_last_layers_dense() -> None:
    callback = LightningReference(0.8, ramp_epochs=2, initial_sparsity=0.5, skip_layers=["first", "last"])
    trained = callback.finalize(_train([callback], LeNet300(1, 8, 10), epochs=3))
    assert _layer_sparsity(trained.classifier[3]) == pytest.approx(0.8, abs=0.01)
    assert _layer_sparsity(trained.classifier[1]) == 0.0 and _layer_sparsity(trained.classifier[5]) == 0.0
    assert int(torch.count_nonzero(trained.classifier[3].bias)) == 100  # weights only, as AGP: biases stay


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: MagnitudePruning(1.0), r"sparsity=1.0 is not valid; allowed: a fraction in \[0, 1\)"),
        (lambda: MagnitudePruning(0.5, scope="row"), r"scope='row' is not valid; allowed: global, layer"),
        (lambda: MagnitudePruning(0.5, criterion="l3"), r"criterion='l3' is not valid; allowed: magnitude, random, taylor"),
        (lambda: MagnitudePruning(0.5, layer_sparsity={"fc": 2.0}), r"layer_sparsity.fc=2.0 is not valid"),
        (lambda: MagnitudePruning(0.5, layer_sparsity={"fc": 0.2}), r"layer_sparsity needs scope='layer'"),
        (lambda: MagnitudePruning(0.5, taylor_batches=0), r"taylor_batches=0 is not valid; allowed: an integer >= 1"),
        (lambda: IterativePruning(0.5, fraction_per_cycle=1.0), r"fraction_per_cycle=1.0 is not valid"),
        (lambda: IterativePruning(0.5, fraction_per_cycle=0.0), r"fraction_per_cycle=0.0 is not valid; allowed: a fraction in \(0, 1\)"),
        (lambda: IterativePruning(0.5, epochs_per_cycle=0), r"epochs_per_cycle=0 is not valid; allowed: an integer >= 1"),
        (lambda: LotteryTicket(0.5, rewind_to=-1), r"rewind_to=-1 is not valid; allowed: a number >= 0"),
        (lambda: LotteryTicket(0.5, unit="round"), r"unit='round' is not valid; allowed: step, epoch"),
        (lambda: LotteryTicket(0.5, reinit="yes"), r"reinit='yes' is not valid; allowed: true or false"),
        (lambda: AGP(0.5, initial_sparsity=0.6), r"initial_sparsity=0.6 is not valid; allowed: <= sparsity=0.5"),
        (lambda: AGP(0.8, unit="hour"), r"unit='hour' is not valid; allowed: step, epoch"),
        (lambda: AGP(0.8, begin=-1), r"begin=-1 is not valid; allowed: a number >= 0"),
        (lambda: AGP(0.8, begin=2, end=2), r"end=2 is not valid; allowed: a number > begin=2"),
        (lambda: AGP(0.8, frequency=0), r"frequency=0 is not valid; allowed: an integer >= 1"),
        (lambda: AGP(0.8, power=0), r"power=0 is not valid; allowed: a number > 0"),
        (lambda: LightningReference(0.8, ramp_epochs=0), r"ramp_epochs=0 is not valid; allowed: an integer >= 1"),
        (lambda: pruning_callback("obd", sparsity=0.5), r"method='obd' is not valid; allowed: magnitude, iterative, lottery, agp"),
    ],
)
def test_constructors_reject_bad_arguments(factory: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        factory()


def test_unknown_skip_layer_lists_the_layers() -> None:
    with pytest.raises(ValueError, match=r"skip_layers has unknown layers \['fc9'\]; allowed: first, last, classifier.1"):
        MagnitudePruning(0.5, skip_layers=["fc9"]).prune(LeNet300(1, 8, 10))


def test_unknown_layer_override_lists_the_layers() -> None:
    with pytest.raises(ValueError, match=r"layer_sparsity has unknown layers \['fc9'\]; allowed: classifier.1"):
        MagnitudePruning(0.5, scope="layer", layer_sparsity={"fc9": 0.5}).prune(LeNet300(1, 8, 10))


def test_taylor_without_a_trainer_says_it_needs_batches() -> None:
    with pytest.raises(ValueError, match=r"criterion='taylor' needs the trainer's training batches"):
        MagnitudePruning(0.5, criterion="taylor").prune(LeNet300(1, 8, 10))


def test_pruning_state_round_trips_through_a_checkpoint_dict() -> None:
    callback = MagnitudePruning(0.5)
    callback.prune(LeNet300(1, 8, 10))
    restored = MagnitudePruning(0.5)
    restored.load_state_dict(callback.state_dict())
    assert restored.pruned and restored.skipped == callback.skipped and restored.current_sparsity == 0.5
