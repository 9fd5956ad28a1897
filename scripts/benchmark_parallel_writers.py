"""Parallel writers (issue 16, "What to measure"): one 16-run grid launched with `hydra/launcher=joblib`
at 1, 2 and 4 workers, each into a fresh SQLite store, side by side: the jobs FINISHED, how many times
each (model, seed) baseline was trained (1 is right: the others wait for it through the store's claims),
the "database is locked" errors in the output and the jobs' logs, and the wall time against 1 worker.

    PYTHONPATH=. WORKBENCH_ROOT=. flock /tmp/timing.lock .venv/bin/python scripts/benchmark_parallel_writers.py \\
        --store /tmp/parallel-writers
    ... --workers 2 4                    # only these worker counts (the ratio needs 1 among them)
    ... --report-only --store DIR        # the table from the stores already there
    ... --threads 1                      # hardware.threads=1 in every job (see below)

The grid is data=digits, model=lenet5,lenet300 x method=baseline,agp,magnitude,cluster x seed=0,1 with
the trainer shrunk as the tests shrink it: the accuracies mean nothing, the jobs write to the store what
real ones write. Every run times latency, so hold /tmp/timing.lock; on a shared machine the wall times
are still contended by whatever else runs: say so beside them.

Threads: at 1 worker joblib runs the jobs one after another in the launching process, where torch
takes every core (hardware.threads: null); its loky workers start with OMP_NUM_THREADS = cores //
workers (at least 1). `--threads 1` gives every job one thread, so that only the worker count differs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from lightning_modules.contract import EXPERIMENT, FINGERPRINT_TAG, JOB_TAG, MODEL_TAG, SEED_TAG, sqlite_uri

ROOT = Path(__file__).resolve().parents[1]
GRID = ["data=digits", "model=lenet5,lenet300", "method=baseline,agp,magnitude,cluster", "seed=0,1"]
GRID_JOBS = 16
FAST = ["baseline.epochs=1", "trainer.limit_train_batches=4", "trainer.enable_progress_bar=false",
        "hardware.latency.warmup=1", "hardware.latency.repeats=3", "run_checks.chance_margin=null",
        "++hardware.export_onnx=false", "++tracking.log_model=false"]
LOCKED = "database is locked"
WALLS_FILE = "walls.json"


@dataclass(frozen=True)
class GridOutcome:
    """What a grid left in its store, and what its output said."""

    statuses: dict[str, int]  # the sweep jobs' runs by status (a job run twice counts twice)
    baselines_trained: dict[tuple[str, str], int]  # (model, seed): runs that trained that baseline
    locked: int  # "database is locked" in the launcher's output and the jobs' logs

    @property
    def finished(self) -> int:
        return self.statuses.get("FINISHED", 0)

    def ok(self, jobs: int = GRID_JOBS) -> bool:
        return (self.finished == jobs == sum(self.statuses.values()) and self.locked == 0
                and set(self.baselines_trained.values()) == {1})


def grid_outcome(uri: str, sweep_dir: Path, output: str = "") -> GridOutcome:
    """Count the store's runs and the lock errors in `output` and in every log under `sweep_dir`.

    A claim that lost to another job's is deleted at once: it trained nothing and is not counted.
    """
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = [] if experiment is None else client.search_runs(
        [experiment.experiment_id], run_view_type=ViewType.ACTIVE_ONLY, max_results=1000)
    statuses = Counter(run.info.status for run in runs if run.data.tags.get(JOB_TAG))
    trained = Counter((run.data.tags[MODEL_TAG], run.data.tags[SEED_TAG]) for run in runs
                      if FINGERPRINT_TAG in run.data.tags)
    logs = [path.read_text(errors="replace") for path in sweep_dir.rglob("*.log")] if sweep_dir.exists() else []
    return GridOutcome(dict(statuses), dict(trained), sum(text.count(LOCKED) for text in [output, *logs]))


def launch(store: Path, workers: int, threads: int | None = None) -> tuple[float, str]:
    """The grid at `workers` joblib workers into a fresh store in `store`: (wall seconds, its output);
    `threads`: hardware.threads of every job (None: the config's)."""
    if store.exists():
        shutil.rmtree(store)
    store.mkdir(parents=True)
    command = [sys.executable, str(ROOT / "train.py"), "-m", *GRID, *FAST, "hydra/launcher=joblib",
               f"hydra.launcher.n_jobs={workers}", f"tracking.uri={sqlite_uri(store)}", f"hydra.sweep.dir={store / 'sweep'}"]
    if threads is not None:
        command.append(f"hardware.threads={threads}")
    env = {**os.environ, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "WORKBENCH_ROOT": str(ROOT)}
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    output = result.stdout + result.stderr
    (store / "output.log").write_text(output)
    if result.returncode not in (0, 1):  # 1: some run FAILED (counted below)
        raise SystemExit(f"{workers} workers: train.py exited {result.returncode}:\n{output[-3000:]}")
    return wall, output


def report(root: Path, workers: list[int], walls: dict[str, float]) -> bool:
    """The side-by-side table; True when every grid ended as it should."""
    reference = walls.get("1")
    header = (f"{'workers':>7}  {'FINISHED':>8}  {'other':>5}  {'baselines trained once':>22}  {'trainings':>9}  "
              f"{'locked':>6}  {'wall s':>7}  {'vs 1 worker':>11}")
    print(header)
    print("-" * len(header))
    all_ok = True
    for count in workers:
        store = root / f"workers-{count}"
        outcome = grid_outcome(sqlite_uri(store), store / "sweep",
                               (store / "output.log").read_text() if (store / "output.log").exists() else "")
        wall = walls.get(str(count))
        trainings = list(outcome.baselines_trained.values())
        once = f"{trainings.count(1)} of {len(trainings)}"
        ratio = f"{wall / reference:.2f}" if wall is not None and reference else "-"
        print(f"{count:>7}  {outcome.finished:>5}/{GRID_JOBS:<2}  {sum(outcome.statuses.values()) - outcome.finished:>5}  "
              f"{once:>22}  {sum(trainings):>9}  {outcome.locked:>6}  {wall if wall is not None else float('nan'):>7.1f}  {ratio:>11}")
        all_ok &= outcome.ok()
    print("other: the jobs' runs not FINISHED; trainings: runs that trained one of the (model, seed) baselines "
          "(right: one each); wall times on a shared machine are contended")
    return all_ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, required=True, help="folder for one store per worker count")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--threads", type=int, default=None, help="hardware.threads of every job (default: the config's)")
    parser.add_argument("--report-only", action="store_true", help="only the table, from the stores already there")
    opts = parser.parse_args()
    opts.store.mkdir(parents=True, exist_ok=True)
    walls_path = opts.store / WALLS_FILE
    walls = json.loads(walls_path.read_text()) if walls_path.exists() else {}
    if not opts.report_only:
        for count in opts.workers:
            walls[str(count)], _ = launch(opts.store / f"workers-{count}", count, opts.threads)
            walls_path.write_text(json.dumps(walls, indent=2))
            print(f"{count} workers: {walls[str(count)]:.1f} s", flush=True)
    sys.exit(0 if report(opts.store, opts.workers, walls) else 1)


if __name__ == "__main__":
    main()
