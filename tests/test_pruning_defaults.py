"""The shipped unstructured pruning defaults deliver what their names promise.

Fast tests compose the real method configs and check what they build: nothing spared, so the
measured sparsity over all Conv/Linear weights is `method.sparsity`; AGP and its Lightning peer
given the same ramp and recipe; enough epochs for every cycle. Slow tests run the shipped default
for real on mnist5k through train.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lightning_modules.compression.pruning import (
    IterativePruning, LightningReference, LotteryTicket, MagnitudePruning, NMPruning, iterative_sparsities,
)
from lightning_modules.config import build_callbacks, validate
from lightning_modules.layers import parameter_counts, weighted_layers
from lightning_modules.models import LeNet5, LeNet300
from tests.conftest import all_runs, compose_config, run_train

UNSTRUCTURED = ["magnitude", "agp", "iterative", "taylor", "random", "lottery", "lottery_reinit", "lightning", "nm"]
MODELS = {"lenet300": lambda: LeNet300(1, 28, 10), "lenet5": lambda: LeNet5(1, 28, 10)}


def _prune_callback(method: str, *overrides: str):
    cfg = compose_config([f"method={method}", *overrides])
    validate(cfg)
    (callback,) = build_callbacks(cfg.method)
    return cfg, callback


@pytest.mark.parametrize("method", UNSTRUCTURED)
def test_shipped_defaults_spare_no_layer(method: str) -> None:
    _, callback = _prune_callback(method)
    assert list(callback.skip_layers) == []


@pytest.mark.parametrize(("method", "model", "sparsity"), [("magnitude", "lenet300", 0.9), ("magnitude", "lenet5", 0.95),
                                                         ("random", "lenet300", 0.8), ("random", "lenet5", 0.8)])
def test_shipped_one_shot_cut_measures_the_sparsity_asked_over_all_weights(method: str, model: str, sparsity: float) -> None:
    _, callback = _prune_callback(method, f"method.sparsity={sparsity}")
    network = MODELS[model]()
    callback.prune(network)
    assert parameter_counts(callback.finalize(network))["sparsity"] == pytest.approx(sparsity, abs=0.001)


def test_user_can_still_spare_layers_by_name_first_and_last() -> None:
    _, callback = _prune_callback("magnitude", "method.sparsity=0.9", "method.callbacks.prune.skip_layers=[first,last]")
    network = LeNet300(1, 28, 10)
    callback.prune(network)
    assert set(callback.skipped) == {"classifier.1", "classifier.5"}
    assert float((network.classifier[1].weight == 0).float().mean()) == 0.0


@pytest.mark.parametrize(("model", "expected"), [("lenet300", 0.5), ("lenet5", 0.479)])
def test_shipped_nm_is_2_of_4_on_every_layer_whose_rows_split_into_fours(model: str, expected: float) -> None:
    """LeNet-5's convolutions have 25 and 150 inputs per row: no groups of 4, so they stay dense and
    the whole model measures 0.479 (58,920 of 61,470 weights are 2:4)."""
    _, callback = _prune_callback("nm")
    assert isinstance(callback, NMPruning) and (callback.n, callback.m) == (2, 4)
    network = MODELS[model]()
    callback.prune(network)
    assert parameter_counts(callback.finalize(network))["sparsity"] == pytest.approx(expected, abs=0.001)
    assert all("groups of m=4" in reason for reason in callback.skipped.values())


def test_agp_and_its_lightning_peer_get_the_same_ramp_and_recipe() -> None:
    agp_cfg, agp = _prune_callback("agp")
    peer_cfg, peer = _prune_callback("lightning")
    assert isinstance(peer, LightningReference)
    assert agp.ramp.unit == "epoch" and agp.ramp.begin == 0 and agp.ramp.end == peer.ramp_epochs
    assert agp.ramp.initial == peer.initial_sparsity and agp.ramp.power == 3
    assert agp.scope == "global"  # as ModelPruning's global L1
    recipe = lambda cfg: OmegaConf.to_container(cfg.method.fine_tune, resolve=True)  # noqa: E731
    assert recipe(agp_cfg) == recipe(peer_cfg)
    assert agp_cfg.method.fine_tune.epochs > agp.ramp.end  # epochs left to recover at the final sparsity


@pytest.mark.parametrize(("method", "sparsity"), [("iterative", 0.8), ("iterative", 0.95), ("lottery", 0.8)])
def test_shipped_cycles_fit_the_shipped_epochs(method: str, sparsity: float) -> None:
    cfg, callback = _prune_callback(method, f"method.sparsity={sparsity}")
    assert isinstance(callback, IterativePruning)
    cycles = len(iterative_sparsities(sparsity, callback.fraction_per_cycle))
    rounds = cycles + 1 if isinstance(callback, LotteryTicket) else cycles  # the lottery's dense round 0
    assert cfg.method.fine_tune.epochs >= rounds * callback.epochs_per_cycle


def test_shipped_lottery_anneals_every_round_and_restarts_the_rate_at_each_rewind() -> None:
    """Each round retrains from the rewind point, so it needs a whole schedule of its own: a rate that
    stays constant ends every round on a noisy step (mobilenetv2 lost 2.10 points that way)."""
    import hydra

    cfg, callback = _prune_callback("lottery")
    recipe, per_round = cfg.method.fine_tune, callback.epochs_per_cycle
    optimizer = hydra.utils.instantiate(recipe.optimizer)([torch.nn.Parameter(torch.zeros(1))])
    scheduler = hydra.utils.instantiate(recipe.scheduler)(optimizer)
    start, rates = optimizer.param_groups[0]["lr"], []
    for _ in range(recipe.epochs):  # the task steps the scheduler once an epoch
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    for first in range(0, recipe.epochs, per_round):  # round 0 (dense) and every round after a rewind
        assert rates[first] == pytest.approx(start)
        assert rates[first + per_round - 1] < 0.01 * start
        assert rates[first:first + per_round] == sorted(rates[first:first + per_round], reverse=True)


def test_lottery_rewind_point_in_epochs_past_the_dense_round_is_refused_before_any_work() -> None:
    """The shipped rewind point (epoch 1) with one-epoch rounds: a config error, not a failure once training runs."""
    cfg = compose_config(["method=lottery", "method.callbacks.prune.epochs_per_cycle=1"])
    with pytest.raises(ValueError, match=r"rewind_to=1 epoch\(s\) is not valid with epochs_per_cycle=1; allowed: a "
                                         r"rewind point inside the dense round \(< 1 epochs"):
        validate(cfg)


def test_lightning_peer_prunes_only_conv_and_linear_weights() -> None:
    network = LeNet5(1, 28, 10)
    peer = LightningReference(0.9, ramp_epochs=1)
    peer._model_layers = list(weighted_layers(network))
    peer.skipped = {}
    candidates = [(m, p) for m in network.modules() for p in ("weight", "bias") if getattr(m, p, None) is not None]
    chosen = peer.filter_parameters_to_prune(candidates)
    assert {id(m) for m, _ in chosen} == {id(m) for _, m in weighted_layers(network)}
    assert {p for _, p in chosen} == {"weight"}


def test_lightning_peer_whose_ramp_outlasts_training_stops_before_any_work() -> None:
    import pytorch_lightning as pl

    from lightning_modules.task import ClassificationTask

    peer = LightningReference(0.9, ramp_epochs=6)
    trainer = pl.Trainer(max_epochs=4, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    task = ClassificationTask(LeNet300(1, 8, 10), optimizer=lambda params: torch.optim.Adam(params))
    with pytest.raises(ValueError, match=r"ramp_epochs=6 does not reach sparsity=0.9 within fine_tune.epochs=4"):
        peer.setup(trainer, task, "fit")


# ----------------------------------------------------------------------------- the real thing, on mnist5k


def _run_shipped(tmp_path: Path, store_uri: str, model: str, method: str, sparsity: float) -> dict[str, float]:
    result = run_train([f"model={model}", f"method={method}", f"method.sparsity={sparsity}", "seed=0",
                        "trainer.enable_progress_bar=false", "hardware.latency.warmup=1", "hardware.latency.repeats=3",
                        "hardware.latency.batch_sizes=[1]"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = [r for r in all_runs(store_uri) if r.data.tags.get("method") == method]
    return run.data.metrics


@pytest.mark.slow
def test_shipped_agp_on_lenet300_measures_90_percent_and_keeps_its_accuracy(tmp_path: Path, store_uri: str) -> None:
    """Before the defaults spared nothing, this measured sparsity 0.10 (first layer: 88% of the weights)."""
    metrics = _run_shipped(tmp_path, store_uri, "lenet300", "agp", 0.9)
    assert metrics["sparsity"] == pytest.approx(0.9, abs=0.01)
    assert metrics["acc_drop"] <= 1.5  # one seed: the 3-seed mean target is 0.5
    assert metrics["compression_ratio"] > 3
