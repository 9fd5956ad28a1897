"""The Hydra callback around a multirun (`python train.py -m`).

Before the first job: every job's config is composed and validated (a bad value stops the sweep
before anything is trained or written), the MLflow store, experiment and the sweep's parent run
are created once in the launching process (SQLite dislikes several processes creating its schema
at once), and `mlflow_sweep.json` in the sweep folder tells each job where to log.
After the last job: the parent run is closed and the grid is printed as a table.

Each job asks here which sweep it belongs to (`current_sweep`), which job it is (`current_job`), and
whether an earlier launch of the same sweep already finished it (`finished_job_run`: the resume check).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

import pandas as pd
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import get_class
from mlflow.entities import Run
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from omegaconf import DictConfig

from lightning_modules.config import ConfigError, validate
from lightning_modules.contract import (
    ACC_DROP, ACC_DROP_VS_TEACHER, COMPRESSION_RATIO, COMPRESSION_RATIO_VS_TEACHER, ERROR_ARTIFACT, ERROR_TAG,
    FAILED_RUNS_TAG, GRID_ARTIFACT, JOB_TAG, JOBS_ARTIFACT, JOBS_TAG, NOISY_REASON_COLUMN, NOISY_TAG, ROLE_SWEEP, ROLE_TAG, SLOWER_TAG,
    SWEEP_TAG, TEACHER_TEST_ACC, TEST_ACC, speedup, vs_teacher,
)
from lightning_modules.contract import SEARCH_FILE, STUDY_TAG, TRIAL_TAG
from lightning_modules.liveness import end_dead_runs, end_killed, heartbeat, liveness_tags
from lightning_modules.tracking import Store, SweepInfo, TrackedRun, store_settings, read_sweep_info, write_sweep_info

log = logging.getLogger(__name__)

TABLE_COLUMNS = ["model", "method", "hardware", "seed", "status", TEST_ACC, ACC_DROP, COMPRESSION_RATIO, speedup(1)]
# runs that learned from a teacher (kd, kd_feature, agp_kd, qat_kd): their figures against it
TEACHER_COLUMNS = [TEACHER_TEST_ACC, ACC_DROP_VS_TEACHER, COMPRESSION_RATIO_VS_TEACHER, vs_teacher(speedup(1))]
NOISY_MARK = "*"


# ----------------------------------------------------------------------------- a job of the sweep


def current_sweep() -> SweepInfo | None:
    """The sweep this job belongs to (written by SweepCallback), or None for a single run."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return read_sweep_info(HydraConfig.get().sweep.dir)


def current_job() -> str | None:
    """The key of this sweep job (its overrides), or None outside a multirun."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return job_key(list(HydraConfig.get().overrides.task))


def job_key(overrides: list[str]) -> str:
    """A job of a sweep is known by its overrides (tag sweep_job): relaunching the sweep into the same
    folder (hydra.sweep.dir=...) skips the jobs that already have a FINISHED run and reruns the others."""
    return hashlib.sha256("\n".join(sorted(overrides)).encode()).hexdigest()[:16]


def trial_tags(sweep: SweepInfo | None) -> dict[str, str]:
    """{study, trial} for a job that a search launched (its sweep folder names the study; the job's
    number is the trial's), else {} (a grid's job, a single run)."""
    if sweep is None:
        return {}
    path = Path(HydraConfig.get().sweep.dir) / SEARCH_FILE
    if not path.exists():
        return {}
    return {STUDY_TAG: json.loads(path.read_text())[STUDY_TAG], TRIAL_TAG: str(HydraConfig.get().job.num)}


def where_to_log(tracking: DictConfig) -> tuple[Store, SweepInfo | None, str | None]:
    """The store a run logs to (its sweep's, else tracking's), and the sweep and job it belongs to
    (None, None for a single run)."""
    sweep = current_sweep()
    store = (Store(sweep.tracking_uri, sweep.experiment, **store_settings(tracking)) if sweep
             else Store.from_config(tracking))
    return store, sweep, current_job() if sweep else None


def finished_job_run(store: Store, sweep: SweepInfo | None, job: str | None) -> Run | None:
    """The FINISHED run of this job under the sweep's parent run, if any (a resumed sweep skips the job)."""
    if sweep is None or job is None:
        return None
    runs = store.client.search_runs(
        [store.experiment_id],
        filter_string=(f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{sweep.parent_run_id}' and tags.{JOB_TAG} = '{job}' "
                       "and attributes.status = 'FINISHED'"),
        max_results=1,
    )
    return runs[0] if runs else None


# ----------------------------------------------------------------------------- the callback


class SweepCallback(Callback):
    # Hydra's joblib launcher pickles the callbacks with every job: the callback holds no state (the
    # parent run's heartbeat thread and the running sweep are module state of the launching process)
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # as in a job (a copy: set_config makes its hydra node read-only): tracking.uri given on the command line wins
        HydraConfig.instance().set_config(copy.deepcopy(config))
        # Hydra turns a callback's exceptions into warnings and launches the jobs anyway;
        # a sweep that cannot work must stop here, before any job: hence SystemExit.
        try:
            jobs = expand_sweep(config)
            for number, overrides in enumerate(jobs, start=1):
                try:
                    validate(compose(config_name=kwargs.get("config_name") or "config", overrides=overrides))
                except Exception as error:
                    raise ConfigError(f"job {number} of {len(jobs)} ({' '.join(overrides) or 'no overrides'}): "
                                      f"{error}") from error
            log.info("validated the configs of %d jobs", len(jobs))
            store, parent_run_id = self.open_parent_run(config, jobs)
        except Exception as error:
            print(f"Error: {error}\nNothing was run.", file=sys.stderr)
            raise SystemExit(2) from error
        end_dead_runs(store)  # runs a killed launch left RUNNING (kill -9, a lost node) end KILLED
        _parent_heartbeat.enter_context(heartbeat(store, parent_run_id))
        _running_sweeps.append((store, parent_run_id))

    def open_parent_run(self, config: DictConfig, jobs: list[list[str]]) -> tuple[Store, str]:
        """The sweep's store and parent run: created, or found again when the sweep folder was launched
        before (a resumed sweep: the parent run RUNNING again, under this process)."""
        sweep_dir = Path(config.hydra.sweep.dir)
        existing = read_sweep_info(sweep_dir)
        if existing is not None:  # the same sweep folder again: resume under its parent run
            store = Store(existing.tracking_uri, existing.experiment, **store_settings(config.tracking))
            TrackedRun(store, existing.parent_run_id).set_tags(liveness_tags())  # this process runs it now
            store.client.update_run(existing.parent_run_id, "RUNNING")
            log.info("sweep %s resumed: jobs with a FINISHED run are skipped", existing.name)
            return store, existing.parent_run_id
        store = Store.from_config(config.tracking)
        name = sweep_dir.name
        run = store.client.create_run(store.experiment_id, run_name=f"sweep-{name}",
                                      tags={SWEEP_TAG: name, ROLE_TAG: ROLE_SWEEP, JOBS_TAG: str(len(jobs)),
                                            **liveness_tags()})
        TrackedRun(store, run.info.run_id).log_text("\n".join(" ".join(job) for job in jobs), JOBS_ARTIFACT)
        write_sweep_info(sweep_dir, SweepInfo(name, store.uri, store.experiment, run.info.run_id))
        log.info("sweep %s: parent run %s in %s", name, run.info.run_id, store.uri)
        return store, run.info.run_id

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        _parent_heartbeat.close()
        _running_sweeps.clear()
        info = read_sweep_info(config.hydra.sweep.dir)
        if info is None:
            return
        from lightning_modules.analysis import log_sweep_figures  # pandas, seaborn: only once the sweep is over

        store = Store(info.tracking_uri, info.experiment)
        table = sweep_table(info)
        parent = TrackedRun(store, info.parent_run_id)
        if not table.empty:
            parent.log_table(table.to_dict("records"), GRID_ARTIFACT)
        failed = int((table["status"] == "FAILED").sum()) if not table.empty else 0
        parent.set_tags({FAILED_RUNS_TAG: failed})
        log_sweep_figures(info)  # the grid's figures on the parent run, for the UI; warns, never raises
        store.client.set_terminated(info.parent_run_id, "FAILED" if failed else "FINISHED")
        try:
            print_grid(table, info)
        except Exception:  # Hydra would turn it into a warning and exit 0: the exit status below must stand
            log.exception("the grid table could not be printed; it is in the parent run's %s", GRID_ARTIFACT)
        if failed:
            print(f"{failed} of {len(table)} runs FAILED; their errors are in the runs' `{ERROR_TAG}` tag and {ERROR_ARTIFACT}",
                  file=sys.stderr)
            sys.exit(1)


_running_sweeps: list[tuple[Store, str]] = []  # (store, parent run id) of the sweep this process launched
_parent_heartbeat = contextlib.ExitStack()  # the running sweep's parent run beats while the sweep runs


def end_running_sweep_killed(reason: str) -> None:
    """A signal ended the process while its sweep ran: the parent run ends KILLED with the reason (the
    job's run already did); relaunching the sweep into its folder reruns the jobs that did not finish."""
    for store, parent_run_id in _running_sweeps:
        end_killed(store, parent_run_id, reason)
    _running_sweeps.clear()


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


def sweep_table(info: SweepInfo) -> pd.DataFrame:
    """analysis.grid_table of the sweep's runs, FAILED ones included: a job run more than once (a resumed
    sweep) shows its last attempt; the columns printed, the teacher's and the notes' (NOTE_TAGS)."""
    from lightning_modules.analysis import grid_table, last_attempts, load_runs

    runs = last_attempts(load_runs(info.tracking_uri, info.experiment, sweep=info.name, statuses=None))
    columns = ["run_name", *TABLE_COLUMNS, *TEACHER_COLUMNS, NOISY_TAG, NOISY_REASON_COLUMN, SLOWER_TAG, ERROR_TAG]
    return grid_table(runs, mark_noisy=False, columns=columns)


def print_grid(table: pd.DataFrame, info: SweepInfo) -> None:
    """The grid; a speedup timed under contention is starred, with the reasons below it; runs that
    learned from a teacher get a second table of their figures against it."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    view = Table(title=f"sweep {info.name}: {len(table)} runs (parent run {info.parent_run_id})")
    for column in TABLE_COLUMNS:
        view.add_column(column, justify="right" if column not in ("model", "method", "hardware", "status") else "left")
    for row in table.reindex(columns=[*TABLE_COLUMNS, NOISY_TAG]).itertuples(index=False):  # a column no run logged: "-"
        cells = [_cell(getattr(row, column)) for column in TABLE_COLUMNS]
        if _present_flag(getattr(row, NOISY_TAG)):
            cells[-1] += NOISY_MARK
        view.add_row(*cells)
    console.print(view)
    for line in grid_notes(table):
        console.print(line, highlight=False, soft_wrap=True)
    taught = table[table[TEACHER_TEST_ACC].notna()] if TEACHER_TEST_ACC in table else table.iloc[0:0]
    if not taught.empty:
        teachers = Table(title="runs with a teacher: the student against its teacher (timed side by side)")
        shown = ["run_name", *[column for column in TEACHER_COLUMNS if column in table]]
        for column in shown:
            teachers.add_column(column, justify="left" if column == "run_name" else "right")
        for row in taught.itertuples(index=False):
            teachers.add_row(*[_cell(getattr(row, column)) for column in shown])
        console.print(teachers)
    print(f"Browse them: scripts/mlflow_ui.sh   (store: {info.tracking_uri})")


def grid_notes(table: pd.DataFrame) -> list[str]:
    """Footnotes under the grid: noisy timings, and why slower runs are slower."""
    notes = []
    if table.empty:
        return notes
    noisy = table[table[NOISY_TAG].astype(bool)]
    if not noisy.empty:
        notes.append(f"{NOISY_MARK} timed under contention (tag {NOISY_TAG}); re-measure before trusting the speedup:")
        notes += [f"    {row.run_name}: {getattr(row, NOISY_REASON_COLUMN)}" for row in noisy.itertuples(index=False)]
    slower = table[table[SLOWER_TAG].map(_present)]
    if not slower.empty:
        notes.append(f"slower than the baseline (tag {SLOWER_TAG}):")
        notes += [f"    {row.run_name}: {getattr(row, SLOWER_TAG)}" for row in slower.itertuples(index=False)]
    return notes


def _present_flag(value: Any) -> bool:
    return bool(value) and not (isinstance(value, float) and pd.isna(value))


def _present(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if pd.isna(value) else f"{value:.2f}"
    return "" if value is None else str(value)
