"""The Hydra callback around a multirun (`python train.py -m`).

Before the first job: every job's config is composed and validated (a bad value stops the sweep
before anything is trained or written), the MLflow store, experiment and the sweep's parent run
are created once in the launching process (SQLite dislikes several processes creating its schema
at once), and `mlflow_sweep.json` in the sweep folder tells each job where to log.
After the last job: the parent run is closed and the grid is printed as a table.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import pandas as pd
from hydra import compose
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.utils import get_class
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME
from omegaconf import DictConfig

from lightning_modules.analysis import log_sweep_figures
from lightning_modules.config import validate
from lightning_modules.tracking import (
    JOB_TAG, Store, SweepInfo, TrackedRun, child_runs, read_sweep_info, write_sweep_info,
)

log = logging.getLogger(__name__)

TABLE_COLUMNS = ["model", "method", "hardware", "seed", "status", "test_acc", "acc_drop", "compression_ratio", "speedup_bs1"]
# runs that learned from a teacher (kd, kd_feature, agp_kd, qat_kd): their figures against it
TEACHER_COLUMNS = ["teacher_test_acc", "acc_drop_vs_teacher", "compression_ratio_vs_teacher", "speedup_bs1_vs_teacher"]
NOTE_TAGS = ["latency_noisy", "slower_reason", "error"]  # tags shown as footnotes (and kept in grid.csv)
NOISY_MARK = "*"


class SweepCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra turns a callback's exceptions into warnings and launches the jobs anyway;
        # a sweep that cannot work must stop here, before any job: hence SystemExit.
        try:
            jobs = expand_sweep(config)
            for overrides in jobs:
                validate(compose(config_name=kwargs.get("config_name") or "config", overrides=overrides))
            log.info("validated the configs of %d jobs", len(jobs))
            self.open_parent_run(config, jobs)
        except Exception as error:
            print(f"Error: {error}\nNothing was run.", file=sys.stderr)
            raise SystemExit(2) from error

    def open_parent_run(self, config: DictConfig, jobs: list[list[str]]) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        existing = read_sweep_info(sweep_dir)
        if existing is not None:  # the same sweep folder again: resume under its parent run
            Store(existing.tracking_uri, existing.experiment).client.update_run(existing.parent_run_id, "RUNNING")
            log.info("sweep %s resumed: jobs with a FINISHED run are skipped", existing.name)
            return
        store = Store.from_config(config.tracking)
        name = sweep_dir.name
        run = store.client.create_run(store.experiment_id, run_name=f"sweep-{name}",
                                      tags={"sweep": name, "role": "sweep", "jobs": str(len(jobs))})
        TrackedRun(store, run.info.run_id).log_text("\n".join(" ".join(job) for job in jobs), "jobs.txt")
        write_sweep_info(sweep_dir, SweepInfo(name, store.uri, store.experiment, run.info.run_id))
        log.info("sweep %s: parent run %s in %s", name, run.info.run_id, store.uri)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        info = read_sweep_info(config.hydra.sweep.dir)
        if info is None:
            return
        store = Store(info.tracking_uri, info.experiment)
        table = grid_table(store, info.parent_run_id)
        parent = TrackedRun(store, info.parent_run_id)
        if not table.empty:
            parent.log_table(table.to_dict("records"), "grid.csv")
        failed = int((table["status"] == "FAILED").sum()) if not table.empty else 0
        parent.set_tags({"failed_runs": failed})
        log_sweep_figures(info)  # the grid's figures on the parent run, for the UI; warns, never raises
        store.client.set_terminated(info.parent_run_id, "FAILED" if failed else "FINISHED")
        print_grid(table, info)
        if failed:
            print(f"{failed} of {len(table)} runs FAILED; their errors are in the runs' `error` tag and error.txt",
                  file=sys.stderr)
            sys.exit(1)


def expand_sweep(config: DictConfig) -> list[list[str]]:
    """The override list of every job, as Hydra's sweeper will launch them."""
    sweeper_cls = get_class(config.hydra.sweeper._target_)
    params = config.hydra.sweeper.get("params") or {}
    arguments = [f"{key}={value}" for key, value in params.items()]
    arguments += list(config.hydra.overrides.task)
    overrides = OverridesParser.create().parse_overrides(arguments)
    if not hasattr(sweeper_cls, "split_arguments"):  # another sweeper (optuna, ...): validate the base config only
        return [list(config.hydra.overrides.task)]
    return [job for batch in sweeper_cls.split_arguments(overrides, None) for job in batch]


def grid_table(store: Store, parent_run_id: str) -> pd.DataFrame:
    """One row per run of the sweep; a job run more than once (a resumed sweep) shows its last attempt."""
    latest_by_job = {}
    for run in child_runs(store, parent_run_id):  # oldest first: a later attempt replaces an earlier one
        latest_by_job[run.data.tags.get(JOB_TAG) or run.info.run_id] = run
    rows = []
    for run in latest_by_job.values():
        tags, metrics = run.data.tags, run.data.metrics
        rows.append({
            "run": tags.get(MLFLOW_RUN_NAME, run.info.run_id),
            "model": tags.get("model"), "method": tags.get("method"), "hardware": tags.get("hardware"),
            "seed": tags.get("seed"), "status": run.info.status,
            **{key: metrics.get(key) for key in TABLE_COLUMNS[5:]},
            **{key: metrics.get(key) for key in TEACHER_COLUMNS},
            **{key: tags.get(key) for key in NOTE_TAGS},
        })
    return pd.DataFrame(rows, columns=["run", *TABLE_COLUMNS, *TEACHER_COLUMNS, *NOTE_TAGS])


def print_grid(table: pd.DataFrame, info: SweepInfo) -> None:
    """The grid; a speedup timed under contention is starred, with the reasons below it; runs that
    learned from a teacher get a second table of their figures against it."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    view = Table(title=f"sweep {info.name}: {len(table)} runs (parent run {info.parent_run_id})")
    for column in TABLE_COLUMNS:
        view.add_column(column, justify="right" if column not in ("model", "method", "hardware", "status") else "left")
    for row in table.itertuples(index=False):
        cells = [_cell(getattr(row, column)) for column in TABLE_COLUMNS]
        if _present(row.latency_noisy):
            cells[-1] += NOISY_MARK
        view.add_row(*cells)
    console.print(view)
    for line in grid_notes(table):
        console.print(line, highlight=False, soft_wrap=True)
    taught = table[table["teacher_test_acc"].notna()] if not table.empty else table
    if not taught.empty:
        teachers = Table(title="runs with a teacher: the student against its teacher (timed side by side)")
        for column in ["run", *TEACHER_COLUMNS]:
            teachers.add_column(column, justify="left" if column == "run" else "right")
        for row in taught.itertuples(index=False):
            teachers.add_row(*[_cell(getattr(row, column)) for column in ["run", *TEACHER_COLUMNS]])
        console.print(teachers)
    print(f"Browse them: scripts/mlflow_ui.sh   (store: {info.tracking_uri})")


def grid_notes(table: pd.DataFrame) -> list[str]:
    """Footnotes under the grid: noisy timings, and why slower runs are slower."""
    notes = []
    if table.empty:
        return notes
    noisy = table[table["latency_noisy"].map(_present)]
    if not noisy.empty:
        notes.append(f"{NOISY_MARK} timed under contention (tag latency_noisy); re-measure before trusting the speedup:")
        notes += [f"    {row.run}: {row.latency_noisy}" for row in noisy.itertuples(index=False)]
    slower = table[table["slower_reason"].map(_present)]
    if not slower.empty:
        notes.append("slower than the baseline (tag slower_reason):")
        notes += [f"    {row.run}: {row.slower_reason}" for row in slower.itertuples(index=False)]
    return notes


def _present(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if pd.isna(value) else f"{value:.2f}"
    return "" if value is None else str(value)
