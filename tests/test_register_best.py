"""scripts/register_best.py against a small real store: the notebooks' digits sweep (two models, magnitude
pruning, two seeds, and the baselines they train), shared with test_notebooks.py."""

from __future__ import annotations

import os
import subprocess
import sys

import hydra.utils
import mlflow.pyfunc
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from lightning_modules.analysis import load_runs
from lightning_modules.contract import (
    ACC_DROP, COMPRESSION_RATIO, HARDWARE_TAG, MLFLOW_MODEL_NAME, TEST_ACC, TEST_IMAGES, latency_ms_p50,
)
from lightning_modules.contract import CHANCE_MARGIN_POINTS
from tests.conftest import FAST, ROOT, compose_config
from tests.test_notebooks import DigitsSweep, build_digits_sweep

pytestmark = pytest.mark.slow

SCRIPT = ROOT / "scripts" / "register_best.py"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> DigitsSweep:
    return build_digits_sweep(tmp_path_factory)


def register_best(sweep: DigitsSweep, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--tracking-uri", sweep.uri, "--sweep", sweep.name, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"})


def eligible(sweep: DigitsSweep, max_drop: float):
    """The sweep's FINISHED runs within the budget and clear of chance (10 classes): what may be chosen."""
    runs = load_runs(sweep.uri, sweep=sweep.name)
    return runs[(runs[ACC_DROP] <= max_drop) & (runs[TEST_ACC] > 10.0 + CHANCE_MARGIN_POINTS)]


def registered_run(sweep: DigitsSweep, result: subprocess.CompletedProcess, name: str):
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"registered {name} version 1" in result.stdout
    return MlflowClient(sweep.uri).get_model_version(name, "1")


def test_the_most_compressed_run_within_the_budget_is_registered_with_its_figures(
        sweep: DigitsSweep, monkeypatch: pytest.MonkeyPatch) -> None:
    candidates = eligible(sweep, 100.0)
    assert len(candidates) >= 2
    result = register_best(sweep, "--max-drop", "100", "--objective", "compression", "--name", "digits-small")
    version = registered_run(sweep, result, "digits-small")

    best = candidates.sort_values([COMPRESSION_RATIO, ACC_DROP], ascending=[False, True]).iloc[0]
    assert version.run_id == best["run_id"]
    client = MlflowClient(sweep.uri)
    outputs = client.get_run(best["run_id"]).outputs.model_outputs
    model_id = next(o.model_id for o in outputs if client.get_logged_model(o.model_id).name == MLFLOW_MODEL_NAME)
    assert version.source == f"models:/{model_id}"
    tags = version.tags
    assert float(tags[TEST_ACC]) == pytest.approx(best[TEST_ACC], rel=1e-5)
    assert float(tags[COMPRESSION_RATIO]) == pytest.approx(best[COMPRESSION_RATIO], rel=1e-5)
    assert tags["objective"] == "compression" and tags["max_drop"] == "100" and tags["run_id"] == best["run_id"]
    assert {tags["data"], tags["model"], tags["method"], tags["hardware"]} <= {"digits", best["model"],
                                                                                 best["method"], "cpu"}
    images = int(best[TEST_IMAGES])
    assert images == 539  # 30% of the 1,797 digits
    text = version.description
    assert f"on {images} held-out test images" in text
    assert "paired 95% bootstrap interval" in text and "hardware=cpu" in text and "batch 32" in text
    assert ("latency_noisy" in text) == bool(best.get("latency_noisy"))

    # the registered version loads as the run's pyfunc and scores what the run logged
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sweep.uri)
    model = mlflow.pyfunc.load_model("models:/digits-small/1")
    data = hydra.utils.instantiate(compose_config(FAST).data)
    data.setup()
    raw, labels = data.raw_test
    accuracy = 100.0 * float((np.asarray(model.predict(raw)).argmax(axis=1) == labels).mean())
    assert accuracy == pytest.approx(best[TEST_ACC], abs=1e-9)


def test_the_fastest_run_on_the_named_hardware_is_registered(sweep: DigitsSweep) -> None:
    candidates = eligible(sweep, 100.0)
    result = register_best(sweep, "--max-drop", "100", "--objective", "speed", "--hardware", "cpu", "--batch", "32",
                           "--name", "digits-fast")
    version = registered_run(sweep, result, "digits-fast")
    fastest = candidates.sort_values([latency_ms_p50(32), ACC_DROP]).iloc[0]
    assert version.run_id == fastest["run_id"]
    assert version.tags["objective"] == "speed" and version.tags[HARDWARE_TAG] == "cpu"
    assert "lowest latency_ms_p50_bs32" in version.description


@pytest.mark.parametrize("args, message", [
    (["--max-drop", "-100"], "no FINISHED run is within the budget (acc_drop <= -100 points)"),
    (["--max-drop", "1", "--objective", "speed", "--hardware", "cuda"],
     "hardware='cuda' is not valid for these runs; allowed: cpu"),
])
def test_nothing_is_registered_when_nothing_qualifies(sweep: DigitsSweep, args: list[str], message: str) -> None:
    result = register_best(sweep, *args, "--name", "never")
    assert result.returncode == 2
    assert message in result.stderr
    assert not MlflowClient(sweep.uri).search_registered_models(filter_string="name = 'never'")
