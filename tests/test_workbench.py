"""End to end, as a user runs it: `python train.py -m ...` into a fresh MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from lightning_modules.contract import (
    BASELINE_RUN_TAG, CONFIG_ARTIFACT, ENCODING_TABLE, FINGERPRINT_TAG, LAYERS_TABLE, MODEL_ARTIFACT, MODEL_FOLDER,
    ONNX_ARTIFACT, ROLE_SWEEP, ROLE_TAG, RUN_TAGS, contract_metrics,
)
from tests.conftest import FAST, FAST_SHIPPED, all_runs, run_train

pytestmark = pytest.mark.slow

CONTRACT = contract_metrics()  # README's metric table, at batch sizes 1 and 32
TAGS = list(RUN_TAGS)


def _children(uri: str) -> tuple[list, list]:
    runs = all_runs(uri)
    parents = [r for r in runs if r.data.tags.get(ROLE_TAG) == ROLE_SWEEP]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    return parents, children


def test_two_run_multirun_lands_every_contract_metric_tag_and_artifact(tmp_path: Path, store_uri: str) -> None:
    # a whole epoch of digits: after FAST's 4 batches lenet5 is still at chance, and a collapsed run is FAILED
    result = run_train(["-m", *FAST_SHIPPED, "trainer.limit_train_batches=null", "model=lenet300,lenet5", "method=baseline"],
                       tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    parents, children = _children(store_uri)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2
    client = MlflowClient(store_uri)
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        missing = [name for name in CONTRACT if name not in run.data.metrics]
        assert missing == []
        assert all(run.data.tags.get(tag) for tag in TAGS)
        assert run.data.tags["sweep"] == parents[0].data.tags["sweep"]
        assert run.data.metrics["acc_drop"] == 0.0 and run.data.metrics["speedup_bs1"] == 1.0
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {CONFIG_ARTIFACT, MODEL_FOLDER, LAYERS_TABLE, ENCODING_TABLE} <= artifacts
        model_files = [a.path for a in client.list_artifacts(run.info.run_id, MODEL_FOLDER)]
        assert model_files == [ONNX_ARTIFACT, MODEL_ARTIFACT]
        assert run.data.params["data.name"] == "digits"
        epochs = int(run.data.params["baseline.epochs"])  # an epoch's train_loss, train_acc, val_acc each once
        for metric in ("train_loss", "train_acc", "val_acc"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == list(range(epochs))
    assert {r.data.tags["model"] for r in children} == {"lenet300", "lenet5"}
    # the compact grid at the end of the multirun
    assert "test_acc" in result.stdout and "compression_ratio" in result.stdout and "lenet300" in result.stdout


def test_baseline_is_trained_once_for_two_compression_runs(tmp_path: Path, store_uri: str) -> None:
    result = run_train(["-m", *FAST, "model=lenet300", "method=magnitude", "method.sparsity=0.5,0.8",
                        "method.fine_tune.epochs=1"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    runs = all_runs(store_uri)
    trained_baselines = [r for r in runs if FINGERPRINT_TAG in r.data.tags]
    assert len(trained_baselines) == 1
    baseline_id = trained_baselines[0].info.run_id
    pruned = [r for r in runs if r.data.tags.get("method") == "magnitude"]
    assert len(pruned) == 2
    for run in pruned:
        assert run.info.status == "FINISHED"
        assert run.data.tags[BASELINE_RUN_TAG] == baseline_id
        assert run.data.metrics["layers_skipped_magnitude"] == 0  # no layer is spared by default
        assert run.data.metrics["baseline_test_acc"] == trained_baselines[0].data.metrics["test_acc"]
        assert run.data.metrics["time_baseline_s"] < trained_baselines[0].data.metrics["train_time_s"] + 5
    sparsities = sorted(r.data.metrics["sparsity"] for r in pruned)
    # every Linear layer is cut: the measured sparsity is the one asked
    assert sparsities == pytest.approx([0.5, 0.8], abs=0.01)
    assert all(r.data.metrics["compression_ratio"] > 1.2 for r in pruned)

    # A second sweep finds the baseline in the store and trains none.
    again = run_train(["-m", *FAST, "model=lenet300", "method=baseline"], tmp_path / "again")
    assert again.returncode == 0, again.stderr[-3000:]
    assert len([r for r in all_runs(store_uri) if FINGERPRINT_TAG in r.data.tags]) == 1


def test_a_sweep_whose_every_run_failed_before_measuring_exits_1(tmp_path: Path, store_uri: str) -> None:
    """No run logged a figure: the grid still prints (with blanks), and the exit status says FAILED."""
    result = run_train(["-m", *FAST, "method=baseline", "model=lenet300",
                        "model.net._target_=tests.helpers.FailingNet"], tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "1 of 1 runs FAILED" in result.stderr
    assert "could not be printed" not in result.stderr


def test_a_failing_run_is_recorded_failed_and_the_sweep_goes_on(tmp_path: Path, store_uri: str) -> None:
    result = run_train(["-m", *FAST, "method=baseline", "model=lenet300", "model.net._target_=tests.helpers.FailingNet,"
                        "tests.helpers.OutOfMemoryNet,lightning_modules.models.LeNet300"], tmp_path)
    assert result.returncode == 1
    assert "2 of 3 runs FAILED" in result.stderr

    parents, children = _children(store_uri)
    statuses = sorted(r.info.status for r in children)
    assert statuses == ["FAILED", "FAILED", "FINISHED"]
    errors = sorted(r.data.tags["error"] for r in children if r.info.status == "FAILED")
    assert "FailingNet refuses to run" in errors[1]
    assert errors[0].startswith("OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB")  # the message
    failed = next(r for r in children if r.info.status == "FAILED")
    assert "error.txt" in {a.path for a in MlflowClient(store_uri).list_artifacts(failed.info.run_id)}
    assert parents[0].info.status == "FAILED" and parents[0].data.tags["failed_runs"] == "2"
    assert all(r.info.status != "RUNNING" for r in all_runs(store_uri))


def test_single_run_without_sweep(tmp_path: Path, store_uri: str) -> None:
    result = run_train([*FAST, "model=lenet300"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = all_runs(store_uri)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert "mlflow.parentRunId" not in runs[0].data.tags


def test_train_loss_and_accuracy_are_each_epochs_means_over_its_images() -> None:
    import pytorch_lightning as pl
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_modules.task import ClassificationTask

    torch.manual_seed(0)
    inputs, targets = torch.randn(10, 4), torch.randint(0, 3, (10,))
    model = torch.nn.Linear(4, 3)
    # learning rate 0: the weights stay, so the epoch's mean is the model's loss on all 10 images,
    # whatever the batches (4, 4 and 2: a mean of the three batch means would differ)
    task = ClassificationTask(model, optimizer=lambda params: torch.optim.SGD(params, lr=0.0))
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(task, DataLoader(TensorDataset(inputs, targets), batch_size=4))
    with torch.no_grad():
        logits = model(inputs)
    assert trainer.callback_metrics["train_loss"].item() == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-5)
    assert trainer.callback_metrics["train_acc"].item() == pytest.approx(100.0 * (logits.argmax(1) == targets).float().mean().item())
