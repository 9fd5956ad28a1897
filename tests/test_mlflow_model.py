"""A run's MLflow models and its ONNX file, through real runs of train.py into a fresh store.

Every FINISHED run logs two MLflow models that take raw pixels and return class probabilities: a
pyfunc whose loader is the workbench's own module reading model.pt (no pickle anywhere), and the
ONNX flavour. Loaded back with `mlflow.pyfunc.load_model` they score exactly the run's logged
test_acc on its test split; the run's model/model.onnx scores it in ONNX Runtime (test_acc_onnx).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import hydra.utils
import mlflow.pyfunc
import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from lightning_modules.config import ConfigError, validate
from lightning_modules.contract import (
    METHOD_TAG, MLFLOW_MODEL_NAME, MODEL_ARTIFACT, MODEL_FOLDER, ONNX_ARTIFACT, ONNX_ERROR_TAG, ONNX_MODEL_NAME,
    TEST_ACC, TEST_ACC_ONNX, TIMED_ON_TAG, TIME_LOG_MODEL_S, TIME_ONNX_S,
)
from lightning_modules.data import InMemoryDataModule
from lightning_modules.evaluation.accuracy import predict
from lightning_modules.evaluation.artifact import MAGIC, save_deployable
from lightning_modules.evaluation.runtime import OrtModel
from lightning_modules.mlflow_model import PIXELS, _load_pyfunc, to_probabilities
from lightning_modules.models import LeNet300
from tests.conftest import FAST_SHIPPED, all_runs, compose_config, run_train

RUN_ARGS = [*FAST_SHIPPED, "trainer.limit_train_batches=null", "model=lenet5", "method=agp"]


@dataclass(frozen=True)
class Store:
    uri: str
    runs: list  # the FINISHED runs: the trained baseline and the agp run


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """One agp run on digits (and the baseline it trains first, its own run), a whole epoch per
    training so the accuracies are far from chance and from each other."""
    folder = tmp_path_factory.mktemp("mlflow-model")
    uri = f"sqlite:///{folder / 'store' / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        result = run_train(RUN_ARGS, folder)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = all_runs(uri)
    assert sorted(run.data.tags[METHOD_TAG] for run in runs) == ["agp", "baseline"]
    assert all(run.info.status == "FINISHED" for run in runs)
    assert all(" core" in run.data.tags[TIMED_ON_TAG] for run in runs)  # where its latencies were measured
    return Store(uri, runs)


@pytest.fixture
def at_store(store: Store, monkeypatch: pytest.MonkeyPatch) -> Store:
    """The module's store, with MLflow's own calls (load_model, models:/ URIs) pointed at it."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    return store


@pytest.fixture(scope="module")
def test_split() -> tuple[np.ndarray, np.ndarray]:
    """The runs' test split as a user has it: raw pixels (0..16) and labels, rebuilt as data.py splits it."""
    data: InMemoryDataModule = hydra.utils.instantiate(compose_config(RUN_ARGS).data)
    data.setup()
    return data.raw_test


def logged_models(uri: str, run) -> dict[str, str]:
    """The run's logged models, model id by name."""
    client = MlflowClient(uri)
    ids = [output.model_id for output in run.outputs.model_outputs]
    return {client.get_logged_model(model_id).name: model_id for model_id in ids}


def accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return 100.0 * float((probabilities.argmax(axis=1) == labels).mean())


def test_every_finished_run_logs_both_models_with_a_signature_and_an_input_example(at_store: Store) -> None:
    for run in at_store.runs:
        models = logged_models(at_store.uri, run)
        assert set(models) == {MLFLOW_MODEL_NAME, ONNX_MODEL_NAME}
        for model_id in models.values():
            info = mlflow.models.get_model_info(f"models:/{model_id}")
            assert info.run_id == run.info.run_id
            assert MlflowClient(at_store.uri).get_logged_model(model_id).source_run_id == run.info.run_id
            inputs, outputs = info.signature.inputs.to_dict(), info.signature.outputs.to_dict()
            assert inputs == [{"name": PIXELS, "type": "tensor",
                               "tensor-spec": {"dtype": "float32", "shape": (-1, 1, 8, 8)}}]
            assert outputs[0]["tensor-spec"] == {"dtype": "float32", "shape": (-1, 10)}
            assert info.saved_input_example_info["type"] == "ndarray"
            assert info.metadata["class_names"] == [str(label) for label in range(10)]
        assert run.data.metrics[TIME_LOG_MODEL_S] < 30


@pytest.mark.parametrize("name", [MLFLOW_MODEL_NAME, ONNX_MODEL_NAME])
def test_the_loaded_model_reproduces_the_logged_test_acc_on_raw_pixels(at_store: Store, test_split, name: str) -> None:
    raw, labels = test_split
    assert raw.max() == 16.0  # raw pixels, not normalised ones
    scores = set()
    for run in at_store.runs:
        model = mlflow.pyfunc.load_model(f"models:/{logged_models(at_store.uri, run)[name]}")
        probabilities = to_probabilities(model.predict(raw))
        assert probabilities.shape == (len(labels), 10)
        assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
        assert accuracy(probabilities, labels) == pytest.approx(run.data.metrics[TEST_ACC], abs=1e-9)
        scores.add(round(run.data.metrics[TEST_ACC], 6))
    assert len(scores) == 2  # two different models, each reproduced


def test_the_pyfunc_loads_through_the_workbench_loader_and_holds_no_pickle(at_store: Store, test_split, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    run = at_store.runs[0]
    model_uri = f"models:/{logged_models(at_store.uri, run)[MLFLOW_MODEL_NAME]}"
    local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path)))
    flavour = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavour["loader_module"] == "lightning_modules.mlflow_model"
    assert "python_model" not in flavour and "cloudpickle_version" not in flavour
    files = [path.relative_to(local).as_posix() for path in local.rglob("*") if path.is_file()]
    assert "python_model.pkl" not in files and not [name for name in files if name.endswith((".pkl", ".py"))]
    assert flavour["data"] == "data/model.pt" and (local / "data" / "model.pt").read_bytes().startswith(MAGIC)

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling while loading a workbench model")

    for module, name in [(pickle, "load"), (pickle, "loads"), (torch, "load")]:
        monkeypatch.setattr(module, name, refuse)
    raw, labels = test_split
    probabilities = mlflow.pyfunc.load_model(str(local)).predict(raw)
    assert accuracy(probabilities, labels) == pytest.approx(run.data.metrics[TEST_ACC], abs=1e-9)


def test_model_onnx_scores_the_logged_test_acc_in_onnx_runtime(at_store: Store, test_split, tmp_path: Path) -> None:
    client = MlflowClient(at_store.uri)
    data: InMemoryDataModule = hydra.utils.instantiate(compose_config(RUN_ARGS).data)
    for run in at_store.runs:
        files = [a.path for a in client.list_artifacts(run.info.run_id, MODEL_FOLDER)]
        assert files == [ONNX_ARTIFACT, MODEL_ARTIFACT]
        metrics = run.data.metrics
        # hardware=cpu: fp32 eager PyTorch and ONNX Runtime agree on every test image of digits
        assert metrics[TEST_ACC_ONNX] == metrics[TEST_ACC]
        assert 0 < metrics[TIME_ONNX_S] < 60
        onnx_file = client.download_artifacts(run.info.run_id, ONNX_ARTIFACT, str(tmp_path))
        rescored = 100.0 * predict(OrtModel(onnx_file), data.split("test"), torch.device("cpu")).accuracy
        assert rescored == pytest.approx(metrics[TEST_ACC], abs=1e-9)


def test_a_model_that_does_not_export_says_why_and_its_run_finishes(tmp_path: Path, store_uri: str) -> None:
    result = run_train([*FAST_SHIPPED, "model=lenet300", "model.net._target_=tests.helpers.NotExportableNet"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = all_runs(store_uri)
    assert run.info.status == "FINISHED"
    assert "No ONNX function found" in run.data.tags[ONNX_ERROR_TAG]
    assert "bessel_i0e" in run.data.tags[ONNX_ERROR_TAG]
    assert TEST_ACC_ONNX not in run.data.metrics
    files = [a.path for a in MlflowClient(store_uri).list_artifacts(run.info.run_id, MODEL_FOLDER)]
    assert files == [MODEL_ARTIFACT]
    assert set(logged_models(store_uri, run)) == {MLFLOW_MODEL_NAME}  # the pyfunc still ships


# ----------------------------------------------------------------------------- without a run


def test_the_pyfunc_takes_images_in_every_layout_mlflow_hands_over(tmp_path: Path) -> None:
    data: InMemoryDataModule = hydra.utils.instantiate(compose_config(["data=digits"]).data)
    data.setup()
    torch.manual_seed(0)
    model = LeNet300(in_channels=1, image_size=8, num_classes=10).eval()
    save_deployable(model, tmp_path / "model.pt", input_spec=data.input_spec)
    classifier = _load_pyfunc(str(tmp_path / "model.pt"))
    raw = data.raw_test[0][:5]
    expected = torch.softmax(model(data.input_spec.normalise(raw)), dim=1).detach().numpy()
    for layout in (raw, raw[:, 0], raw.reshape(5, -1), {PIXELS: raw}):
        assert np.array_equal(classifier.predict(layout), expected)
    with pytest.raises(ValueError, match="this model takes one, 'pixels'"):
        classifier.predict({"images": raw})


@pytest.mark.parametrize("override, key", [("tracking.log_model=yes", "tracking.log_model"),
                                           ("hardware.export_onnx=1", "hardware.export_onnx")])
def test_the_switches_are_booleans(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"{key}=.* is not valid; allowed: true, false"):
        validate(compose_config(["data=digits", override]))
