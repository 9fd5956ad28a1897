"""Shared fixtures: the real configs composed with Hydra, shrunk for speed, and a fresh store."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from lightning_modules.contract import EXPERIMENT
from lightning_modules.evaluation.timing_lock import LOCK_DIR_ENV

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Each test worker (pytest-xdist) times apart from the others: the tests check behaviour, not speed, and
# with one lock for the machine each worker paused for the other's timings and waited for its compiles
# (evaluation/timing_lock.py): 26 minutes for the suite instead of 21. The runs a test starts share its lock.
os.environ.setdefault(LOCK_DIR_ENV, str(Path(tempfile.gettempdir()) / f"workbench-timing-tests-{os.getpid()}"))
# and a noisy timing (most are, beside the other worker) is not taken again (hardware.latency.retries)
os.environ.setdefault("WORKBENCH_LATENCY_RETRIES", "0")

# A run small enough for a test: 8x8 digits, one epoch of a few batches, short latency loops.
FAST_SHIPPED = [
    "data=digits",
    "baseline.epochs=1",
    "trainer.limit_train_batches=4",
    "trainer.enable_progress_bar=false",
    "hardware.latency.warmup=1",
    "hardware.latency.repeats=3",
    "hardware.latency.min_time_s=0",  # the shipped 1 s per batch size would add seconds to every run
    # 4 batches leave lenet5 near chance: the collapse check (a run within 2 points of chance ends
    # FAILED) is tested on its own in test_run_outcomes.py
    "run_checks.chance_margin=null",
]
# model/model.onnx (export and ORT scoring) and the MLflow models cost 2-5 s a run: FAST leaves them
# out; the tests of those files (test_mlflow_model, test_workbench's artifacts, the notebooks' sweep
# that register_best reads) run with FAST_SHIPPED, which keeps them as shipped
FAST = [*FAST_SHIPPED, "++hardware.export_onnx=false", "++tracking.log_model=false", "tracking.claim_settle_s=0"]


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    os.environ.setdefault("WORKBENCH_ROOT", str(ROOT))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides or []))


@pytest.fixture
def store_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite store for the test, announced the MLflow way (MLFLOW_TRACKING_URI wins)."""
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return uri


def run_train(args: list[str], tmp_path: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python train.py ARGS` as a user runs it, with the test's store and a sweep folder in tmp."""
    command = [sys.executable, str(ROOT / "train.py"), *args,
               f"hydra.sweep.dir={tmp_path / 'sweep'}", f"hydra.run.dir={tmp_path / 'run'}"]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())


def all_runs(uri: str, experiment: str = EXPERIMENT) -> list:
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id], max_results=1000)
