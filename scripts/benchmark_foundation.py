"""Benchmark of the foundation: the default sweep end to end, and where its time goes.

Runs `python train.py -m` (the default grid, or the overrides given) into a scratch MLflow store and
prints: the sweep's wall time, each run's share of time spent outside training (tracking,
evaluation, baseline lookup; target under 10% on mnist5k), and the dense baselines' accuracies.

    .venv/bin/python scripts/benchmark_foundation.py            # the default grid
    .venv/bin/python scripts/benchmark_foundation.py seed=0,1   # any train.py overrides
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere, installed or not

from lightning_modules.contract import EXPERIMENT, ROLE_SWEEP, ROLE_TAG, sqlite_uri  # noqa: E402


def run_sweep(overrides: list[str], folder: Path) -> tuple[float, str]:
    uri = sqlite_uri(folder)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    command = [sys.executable, str(ROOT / "train.py"), "-m", *overrides,
               f"hydra.sweep.dir={folder / 'sweep'}", "trainer.enable_progress_bar=false"]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"the sweep failed:\n{result.stderr[-4000:]}")
    return wall, uri


def runs_table(uri: str) -> pd.DataFrame:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    rows = []
    for run in client.search_runs([experiment.experiment_id]):
        tags, m = run.data.tags, run.data.metrics
        if tags.get(ROLE_TAG) == ROLE_SWEEP:
            continue
        tracked = m["run_time_s"] + m["time_baseline_s"]  # the run, plus fetching its baseline
        rows.append({
            "model": tags["model"], "method": tags["method"], "test_acc": m["test_acc"],
            "acc_drop": m["acc_drop"], "wall_s": tracked, "train_s": m["train_time_s"],
            "outside_training": (tracked - m["train_time_s"]) / tracked,
            "evaluate_s": m["time_evaluate_s"], "track_s": m["time_track_s"], "baseline_lookup_s": m["time_baseline_s"],
        })
    return pd.DataFrame(rows).sort_values(["model", "method"])


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="workbench-bench-") as folder:
        wall, uri = run_sweep(sys.argv[1:], Path(folder))
        table = runs_table(uri)
    pd.set_option("display.width", 160)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    training = table["train_s"].sum()
    print(f"\nsweep wall time: {wall:.1f} s for {len(table)} runs "
          f"(training {training:.1f} s = {training / wall:.0%} of the wall time; the rest is "
          f"process start-up, imports, Hydra, data loading, evaluation and tracking)")
    print(f"share of each tracked run spent outside training: mean {table['outside_training'].mean():.1%}, "
          f"max {table['outside_training'].max():.1%} (target < 10% on mnist5k)")
    for row in table[table["method"] == "baseline"].itertuples():
        print(f"dense baseline {row.model}: test_acc {row.test_acc:.2f}% in {row.train_s:.1f} s of training")


if __name__ == "__main__":
    main()
