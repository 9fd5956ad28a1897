"""A training killed mid-way goes on from its last checkpoint and ends where an uninterrupted one ends:
the same sparsity, bits, ranks and channels (the weights differ: the batches after the kill are drawn anew)."""

from __future__ import annotations

import contextlib
import logging
import signal
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from lightning_modules.checkpoints import (
    LAST, RESUMED_AT_EPOCH, STORE_FOLDER, TrainingCheckpoints, removed_unless_resumable,
)
from lightning_modules.config import build_callbacks
from lightning_modules.contract import REJECTED_TAG, RESUMED_FROM_TAG
from lightning_modules.evaluation.latency import LatencyTimer
from lightning_modules.experiment import finalize, fit
from lightning_modules.models import build_model
from lightning_modules.signals import RunKilled
from lightning_modules.tracking import RunRejected, Store, closing_run, open_run, record_failure, unfinished_attempts
from tests.conftest import FAST, compose_config

# what the structure of a compressed model is made of; the rest of a summary row (scales, timings) may differ
STRUCTURE_COLUMNS = ("layer", "shape", "weights", "nonzero", "sparsity", "bits", "weight_bits", "activation_bits",
                     "rank", "ranks", "channels_before", "channels_after", "clusters", "centroids", "skipped", "scheme")


class KillAt(pl.Callback):
    """SIGTERM's effect at the start of an epoch: the checkpoint of the epoch before is on disk."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise RunKilled(signal.SIGTERM)


# min_speedup decides from timings, which differ from one measurement to the next: off, so that both
# trainings make the same decisions
TIMED = {"qat": ["method.callbacks.quantize.min_speedup=null"], "agp_qat": ["method.callbacks.quantize.min_speedup=null"],
         "svd": ["method.min_speedup=null"], "channel_qat": ["method.callbacks.quantize.min_speedup=null"]}


def _config(method: str):
    """The method's shipped recipe (its schedules fit its epochs), on a few batches per epoch."""
    return compose_config([*FAST, "model=lenet5", f"method={method}", "trainer.limit_train_batches=2",
                           "trainer.limit_val_batches=1", *TIMED.get(method, [])])


def _train(method: str, store: Store, checkpoints: TrainingCheckpoints | None, kill_at: int | None = None):
    cfg = _config(method)
    import hydra.utils

    data = hydra.utils.instantiate(cfg.data)
    data.setup()
    pl.seed_everything(0)
    model = build_model(cfg.model.net, data.shape)
    callbacks = build_callbacks(cfg.method, timer=LatencyTimer())
    extra = [KillAt(kill_at)] if kill_at is not None else []
    with closing_run(open_run(store, method, {}, None)) as run:
        model, _ = fit(cfg, cfg.method.fine_tune, model, data, [*callbacks, *extra], run, checkpoints)
        model = finalize(model, callbacks)
    rows = {cb.name: [{k: v for k, v in row.items() if k in STRUCTURE_COLUMNS} for row in cb.summary(model)]
            for cb in callbacks}
    signature = {key: tuple(value.shape) for key, value in model.state_dict().items() if isinstance(value, torch.Tensor)}
    return run.run_id, rows, signature, callbacks


# one method per way a callback changes the model while it trains: masks (agp), parameters added once
# training started and modes (lowbit's learned steps), layers replaced at setup (svd), index buffers
# (cluster). iterative, qat, channel and agp_qat were checked the same way when this was written.
# channel_qat is killed at epoch 5 of 20, in the float epochs before its fake quantization begins (epoch 10):
# the resumed fit must go on in float and calibrate when that epoch comes.
@pytest.mark.parametrize("method,killed_at", [("agp", None), ("lowbit", None), ("svd", None), ("cluster", None),
                                              ("channel_qat", 5)])
def test_a_killed_training_resumes_at_its_epoch_and_ends_the_same(method: str, killed_at: int | None,
                                                                   tmp_path: Path, caplog) -> None:
    store = Store(f"sqlite:///{tmp_path / 'mlflow.db'}", "resume")
    killed_at = _config(method).method.fine_tune.epochs // 2 if killed_at is None else killed_at
    _, expected_rows, expected_signature, _ = _train(method, store, None)

    checkpoints = TrainingCheckpoints(tmp_path / "checkpoints")
    with pytest.raises(RunKilled):
        _train(method, store, checkpoints, kill_at=killed_at)
    assert checkpoints.last is not None
    killed_run = checkpoints.previous_attempt()
    assert store.client.get_run(killed_run).info.status == "KILLED"

    caplog.clear()
    caplog.set_level(logging.INFO, logger="lightning_modules.compression.quantization")
    run_id, rows, signature, callbacks = _train(method, store, checkpoints)
    resumed = store.client.get_run(run_id)
    assert resumed.data.metrics[RESUMED_AT_EPOCH] == killed_at  # the epochs before were not trained again
    assert resumed.data.tags[RESUMED_FROM_TAG] == killed_run
    assert signature == expected_signature
    assert rows == expected_rows
    if method == "channel_qat":  # the resumed fit went on in float and began fake quantization at its epoch
        quantizer = next(cb for cb in callbacks if cb.name == "qat")
        assert quantizer.calibrated_images > 0
        assert "qat: fake quantization started at epoch 10" in caplog.text


def test_a_job_resumed_on_another_machine_fetches_its_checkpoint_from_the_store(tmp_path: Path) -> None:
    """A server store keeps each checkpoint as the run's artifact: the sweep folder need not be shared."""
    store = Store(f"sqlite:///{tmp_path / 'mlflow.db'}", "resume")
    _, expected_rows, expected_signature, _ = _train("agp", store, None)
    killed_at = _config("agp").method.fine_tune.epochs // 2

    here = TrainingCheckpoints(tmp_path / "machine-1", store)
    with pytest.raises(RunKilled):
        _train("agp", store, here, kill_at=killed_at)
    killed_run = here.previous_attempt()
    assert f"{STORE_FOLDER}/{LAST}" in {a.path for a in store.client.list_artifacts(killed_run, STORE_FOLDER)}

    elsewhere = TrainingCheckpoints(tmp_path / "machine-2", store, earlier_attempts=lambda: [killed_run])
    run_id, rows, signature, _ = _train("agp", store, elsewhere)
    assert store.client.get_run(run_id).data.metrics[RESUMED_AT_EPOCH] == killed_at
    assert store.client.get_run(run_id).data.tags[RESUMED_FROM_TAG] == killed_run
    assert (signature, rows) == (expected_signature, expected_rows)


def test_a_fresh_training_starts_in_an_empty_checkpoint_folder_and_leaves_nothing(tmp_path: Path) -> None:
    """The attempt's record lies beside the folder: Lightning warns of a folder not empty at the start."""
    store = Store(f"sqlite:///{tmp_path / 'mlflow.db'}", "resume")
    checkpoints = TrainingCheckpoints(tmp_path / "checkpoints" / "job")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train("cluster", store, checkpoints)
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]
    checkpoints.remove()
    assert list((tmp_path / "checkpoints").iterdir()) == []


def _ended(store: Store, status: str, error: BaseException | None = None) -> str:
    """A finished attempt of job `j`: KILLED, FAILED by `error`, or FINISHED."""
    tracked = open_run(store, "attempt", {"job": "j"}, None)
    if error is not None:
        record_failure(tracked, error)
    else:
        store.client.set_terminated(tracked.run_id, status)
    return tracked.run_id


def test_a_relaunch_resumes_from_killed_or_crashed_attempts_but_never_from_before_a_rejected_one(tmp_path: Path) -> None:
    """A rejected run (collapsed, NaN loss) trained to a model that is not a result: resuming its training would
    only evaluate that model again, so the chain of attempts to go on from stops there."""
    store = Store(f"sqlite:///{tmp_path / 'mlflow.db'}", "resume")
    oldest_killed = _ended(store, "KILLED")
    rejected = _ended(store, "FAILED", RunRejected("collapsed: test_acc 10.0% is within 2 points of chance (10.0%)"))
    crashed = _ended(store, "FAILED", OSError("disk full"))
    killed = _ended(store, "KILLED")
    assert store.client.get_run(rejected).data.tags[REJECTED_TAG] == "true"
    assert REJECTED_TAG not in store.client.get_run(crashed).data.tags
    assert unfinished_attempts(store, "tags.job = 'j'") == [killed, crashed]
    assert oldest_killed not in unfinished_attempts(store, "tags.job = 'j'")


@pytest.mark.parametrize(("error", "kept"), [(None, False), (RunRejected("collapsed"), False), (RunKilled(signal.SIGTERM), True),
                                             (OSError("disk full"), True)])
def test_checkpoints_outlive_only_a_kill_or_a_crash(error: BaseException | None, kept: bool, tmp_path: Path) -> None:
    checkpoints = TrainingCheckpoints(tmp_path / "checkpoints" / "job")
    checkpoints.folder.mkdir(parents=True)
    (checkpoints.folder / LAST).write_bytes(b"a checkpoint")
    checkpoints.record_attempt("run-1")
    with contextlib.suppress(type(error) if error else ()), removed_unless_resumable(checkpoints):
        if error is not None:
            raise error
    assert (checkpoints.last is not None, checkpoints.attempt_file.is_file()) == (kept, kept)
    with removed_unless_resumable(None):  # a single run has no checkpoints
        pass
