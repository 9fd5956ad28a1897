"""Reading the MLflow store back: the code behind the notebooks and the sweep's figures.

    load the runs   `load_runs` turns the runs of an experiment, or of one sweep, into a tidy
                    DataFrame: one row per run, one column per tag, metric (contract names) and
                    param (`params.<dotted key>`)
    Pareto          `pareto_mask` / `pareto_front`: the runs no other run beats on both axes
    grid overview   accuracy vs compression ratio and vs latency with their fronts, heatmaps
                    method x model, the best run per (model, hardware) under an accuracy-drop budget
    one run         per-layer facts (layers.csv + every `<method>_summary.csv`), weight histograms
                    before and after, confusion matrices of the finalized model and its baseline
    curves          accuracy vs sparsity with the spread over seeds; per-layer sensitivity tables
    Deep Compression  its stages (pruned, + quantized, + Huffman) and errors beside the paper's rows,
                    and one run's per-layer table beside the paper's kept fractions
    statistics      mean and t-interval over seeds; method vs reference, paired by seed
    the sweep       `log_sweep_figures` logs the overview on the sweep's parent run (sweep.py)

Figures are `matplotlib.figure.Figure` objects made without pyplot: no global state, no GUI
backend, nothing to close; a notebook shows them with `%matplotlib inline`, the sweep saves them.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from mlflow.entities import Run, ViewType
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from scipy import stats

from lightning_modules.contract import (
    ACCURACY_VS_COMPRESSION, ACCURACY_VS_LATENCY, ACC_DROP, ACC_DROP_CI95_HIGH, ACC_DROP_CI95_LOW, BASELINE_METHOD,
    BASELINE_RUN_TAG, BASELINE_TEST_ACC, BITS_PER_WEIGHT, CLUSTER_SUMMARY, COMPRESSION_RATIO,
    COMPRESSION_RATIO_HUFFMAN, COMPRESSION_RATIO_PRUNED, COMPRESSION_RATIO_QUANTIZED, CONFIGURATIONS_ARTIFACT, CONFIG_ARTIFACT, ERROR_TAG, EXPERIMENT, HEATMAPS,
    JOB_TAG, LAYERS_TABLE, MODEL_ARTIFACT, NOISY_REASON_COLUMN, NOISY_TAG, ROLE_RUN, ROLE_SENSITIVITY, ROLE_SWEEP,
    ROLE_TAG, RUN_TAGS, SENSITIVITY_ARTIFACT, SIZE_BYTES, SLOWER_TAG, SPARSITY, SUMMARY_SUFFIX, SWEEP_TAG,
    TEACHER_METRICS, TEACHER_TAG, TEACHER_TEST_ACC, TEST_ACC, best_artifact, figure_artifact, latency_ms_p50,
    pareto_artifact, resolve_store_uri, speedup, sqlite_path,
)

if TYPE_CHECKING:  # torch and Lightning load only for the per-run views, not to read the store
    import torch
    from torch import nn

    from lightning_modules.tracking import SweepInfo

log = logging.getLogger(__name__)

#: tags that identify or explain a run; they become plain columns of the tidy frame
ID_TAGS = (*RUN_TAGS, ROLE_TAG, BASELINE_RUN_TAG, ERROR_TAG, TEACHER_TAG, JOB_TAG, SLOWER_TAG)
FINISHED = "FINISHED"
#: tag of a run whose latency was timed under contention (its speedups are to be measured again): the
#: frame's LATENCY_NOISY_TAG column is a flag, NOISY_REASON_COLUMN (contract) keeps the tag's text
LATENCY_NOISY_TAG = NOISY_TAG
NOISY_MARK = "*"
#: a configuration is compared only within one of these; seeds are the only thing averaged over
GROUP_KEYS = ("data", "model", "hardware", "method")
#: params that say where files went or how much was printed, never what was measured: not knobs; and
#: kd_teacher and its table, read only through method.teacher.model (the knob, resolved, where a method has one)
NOT_KNOBS = frozenset({"seed", "data.root", "data.eval_batch_size", "trainer.enable_progress_bar",
                       "trainer.enable_model_summary", "trainer.enable_checkpointing", "trainer.log_every_n_steps",
                       "trainer.logger", "kd_teacher"})
NOT_KNOB_PREFIXES = ("paths.", "tracking.", "hydra.", "kd_teachers.")
UNSET = "unset"
NOT_COUNTED_COLUMNS = ["run_name", "status", "data", "model", "method", "knobs", "hardware", "seed", "error",
                       "start_time", "run_id"]
NUMBER = re.compile(r"(-?\d+(?:\.\d+)?(?:e[-+]?\d+)?)")
#: the means a configuration's row shows (those the runs have); TEACHER_METRICS: the student against its teacher
SUMMARY_METRICS = (TEST_ACC, ACC_DROP, COMPRESSION_RATIO, SPARSITY, speedup(1), speedup(32), *TEACHER_METRICS)
RUN_COLUMNS = ("run_id", "run_name", "status", "start_time", "end_time", "parent_run_id", *ID_TAGS, LATENCY_NOISY_TAG,
               NOISY_REASON_COLUMN)
#: the columns most tables show
GRID_COLUMNS = ["run_name", "data", "model", "method", "knobs", "hardware", "seed", TEST_ACC, ACC_DROP,
                ACC_DROP_CI95_LOW, ACC_DROP_CI95_HIGH, COMPRESSION_RATIO, SIZE_BYTES, SPARSITY,
                latency_ms_p50(1), speedup(1), speedup(32), *TEACHER_METRICS]
HEATMAP_METRICS = (ACC_DROP, COMPRESSION_RATIO, speedup(1))
LAYER_FACTS = ("sparsity", "bits", "rank")
PROGRESS_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
SENSITIVITY_COLUMNS = ["run_id", "data", "model", "method", "seed", "layer", "sparsity", TEST_ACC]
NO_SENSITIVITY_MESSAGE = (
    "**No sensitivity analysis in this store yet.** The per-layer sensitivity tables come from runs "
    f"tagged `role=sensitivity` that log a `{SENSITIVITY_ARTIFACT}` artifact (columns layer, sparsity, "
    "test_acc). Run the sensitivity analysis, then run this notebook again."
)


# ----------------------------------------------------------------------------- loading


def open_client(tracking_uri: str | None = None) -> MlflowClient:
    """A client on `tracking_uri` (None: MLFLOW_TRACKING_URI when set, else the checkout's store
    `mlruns/mlflow.db`, as train.py); a missing SQLite file is an error, not a new store."""
    uri = resolve_store_uri(tracking_uri)
    if (database := sqlite_path(uri)) is not None and not database.exists():
        raise FileNotFoundError(f"No MLflow store at {database}: run `python train.py -m` "
                                f"first, or pass tracking_uri / set MLFLOW_TRACKING_URI")
    return MlflowClient(tracking_uri=uri)


def experiment_id(client: MlflowClient, experiment: str) -> str:
    """The id of `experiment`; a missing name lists the experiments the store has."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = [e.name for e in client.search_experiments(view_type=ViewType.ALL)]
        raise ValueError(f"experiment={experiment!r} is not in the store; it has: {', '.join(names) or 'none'}")
    return found.experiment_id


def search_all(client: MlflowClient, experiment_ids: list[str], filter_string: str = "") -> list[Run]:
    """Every run that matches, page after page."""
    runs: list[Run] = []
    token: str | None = None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=5000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def resolve_sweep(client: MlflowClient, exp_id: str, sweep: str | None) -> str | None:
    """`sweep` as given; "latest" names the newest sweep of the experiment; None means all runs."""
    if sweep != "latest":
        return sweep
    parents = client.search_runs([exp_id], f"tags.{ROLE_TAG} = '{ROLE_SWEEP}'", order_by=["attributes.start_time DESC"],
                                 max_results=1)
    if not parents:
        raise ValueError("sweep='latest': the experiment has no sweep (no run tagged role=sweep)")
    return parents[0].data.tags[SWEEP_TAG]


def tidy_runs(runs: Iterable[Run], params: bool = True) -> pd.DataFrame:
    """One row per run: RUN_COLUMNS, then every metric by its name, then `params.<key>` columns."""
    rows = [_run_row(run, params) for run in runs]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=list(RUN_COLUMNS))
    extra = [c for c in frame.columns if c not in RUN_COLUMNS]
    metrics = sorted(c for c in extra if not c.startswith("params."))
    frame = frame[[*RUN_COLUMNS, *metrics, *sorted(c for c in extra if c.startswith("params."))]]
    for column in ("start_time", "end_time"):
        frame[column] = pd.to_datetime(frame[column], unit="ms")
    frame["seed"] = pd.to_numeric(frame["seed"], errors="coerce").astype("Int64")
    for column in [c for c in frame.columns if c.startswith("params.")]:
        frame[column] = _numeric_if_possible(frame[column])
    return frame


def _run_row(run: Run, params: bool) -> dict[str, Any]:
    tags = run.data.tags
    row: dict[str, Any] = {
        "run_id": run.info.run_id, "run_name": tags.get(MLFLOW_RUN_NAME, run.info.run_name),
        "status": run.info.status, "start_time": run.info.start_time, "end_time": run.info.end_time,
        "parent_run_id": tags.get(MLFLOW_PARENT_RUN_ID, ""),
        **{tag: tags.get(tag, "") for tag in ID_TAGS},
    }
    row[ROLE_TAG] = row[ROLE_TAG] or ROLE_RUN
    row.update(run.data.metrics)
    row[LATENCY_NOISY_TAG] = _says_yes(tags.get(LATENCY_NOISY_TAG)) or bool(run.data.metrics.get(LATENCY_NOISY_TAG))
    row[NOISY_REASON_COLUMN] = tags.get(LATENCY_NOISY_TAG, "")
    if params:
        row.update({f"params.{key}": value for key, value in run.data.params.items()})
    return row


def _says_yes(tag: str | None) -> bool:
    """A flag tag is set unless absent or written as a no ("false", "0", "no", "")."""
    return tag is not None and tag.strip().lower() not in ("", "false", "0", "no", "none")


def _numeric_if_possible(column: pd.Series) -> pd.Series:
    numbers = pd.to_numeric(column, errors="coerce")
    return numbers if numbers.notna().sum() == column.notna().sum() else column


def load_runs(
    tracking_uri: str | None = None,
    experiment: str = EXPERIMENT,
    sweep: str | None = None,
    statuses: Sequence[str] | None = ("FINISHED",),
    exclude_roles: Sequence[str] = (ROLE_SWEEP, ROLE_SENSITIVITY),
    params: bool = True,
) -> pd.DataFrame:
    """The runs of `experiment` (or of one `sweep`, "latest" for the newest) as a tidy DataFrame.

    By default only FINISHED runs of the grid: sweep parent runs and sensitivity runs are left out
    (`exclude_roles`), and `statuses=None` keeps FAILED and RUNNING ones too (the summaries still count only
    FINISHED ones: see `counted`). Each run is labelled with its method's configuration (`with_configs`).

    Raises:
        FileNotFoundError: no SQLite store at the URI.
        ValueError: the experiment is not in the store, or sweep="latest" finds no sweep.
    """
    client = open_client(tracking_uri)
    exp_id = experiment_id(client, experiment)
    sweep = resolve_sweep(client, exp_id, sweep)
    runs = tidy_runs(search_all(client, [exp_id], f"tags.{SWEEP_TAG} = '{sweep}'" if sweep else ""), params)
    keep = ~runs[ROLE_TAG].isin(list(exclude_roles))
    if statuses is not None:
        keep &= runs["status"].isin(list(statuses))
    return with_configs(runs[keep].reset_index(drop=True))


def not_counted(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs no summary counts (FAILED, KILLED, still RUNNING) with their `error` tag, newest first."""
    if "status" not in runs:
        return pd.DataFrame(columns=NOT_COUNTED_COLUMNS)
    left_out = _configured(runs[runs["status"] != FINISHED])
    return left_out.sort_values("start_time", ascending=False)[
        [c for c in NOT_COUNTED_COLUMNS if c in left_out]].reset_index(drop=True)


def unfinished_runs(tracking_uri: str | None = None, experiment: str = EXPERIMENT,
                    sweep: str | None = None) -> pd.DataFrame:
    """`not_counted` of the grid's runs in the store (or one sweep): what failed, was killed or still runs."""
    return not_counted(load_runs(tracking_uri, experiment, sweep, statuses=None))


def grid_table(runs: pd.DataFrame, mark_noisy: bool = True, columns: Sequence[str] = GRID_COLUMNS) -> pd.DataFrame:
    """The grid: one row per run, the `columns` the frame has (a distillation column only when some run
    logged it), sorted by data, model, method, configuration, hardware, seed. With `mark_noisy` a speedup
    timed under contention reads "1.23*" (text, for showing). The notebooks show it; the sweep prints it
    (sweep.SWEEP_COLUMNS) and logs it on its parent run."""
    runs = _configured(runs)
    keys = [c for c in ("data", "model", "method", "config", "hardware", "seed") if c in runs]
    shown = [c for c in columns if c in runs and (not c.endswith("_vs_teacher") and not c.startswith("teacher_")
                                                  or runs[c].notna().any())]
    table = runs.sort_values(keys).reset_index(drop=True)
    marked = mark_noisy_speedups(table, table.get(LATENCY_NOISY_TAG)) if mark_noisy else table
    return marked[shown]


def last_attempts(runs: pd.DataFrame) -> pd.DataFrame:
    """One run per sweep job (tag sweep_job): a job run more than once (a resumed sweep) keeps its last attempt."""
    if runs.empty or JOB_TAG not in runs:
        return runs
    job = runs[JOB_TAG].where(runs[JOB_TAG].astype(bool), runs["run_id"])  # a run with no job tag is its own
    latest = runs.assign(_job=job).sort_values(["start_time", "run_id"]).drop_duplicates("_job", keep="last")
    return latest.drop(columns="_job").sort_index()


def mark_noisy_speedups(table: pd.DataFrame, noisy: pd.Series | None) -> pd.DataFrame:
    """The speedup columns as text, with NOISY_MARK after each one `noisy` flags (a bool or a count per row)."""
    if noisy is None:
        return table
    flagged = noisy.fillna(0).astype(float) > 0
    marked = table.copy()
    for column in [c for c in table.columns if c.startswith("speedup_")]:
        marked[column] = [("" if pd.isna(v) else f"{v:.3g}") + (NOISY_MARK if flag and pd.notna(v) else "")
                          for v, flag in zip(table[column], flagged)]
    return marked


def run_summary(run_id: str, tracking_uri: str | None = None) -> pd.Series:
    """One run's tags and metrics (any run of the store, whatever its status or sweep)."""
    row = tidy_runs([open_client(tracking_uri).get_run(run_id)], params=False).iloc[0]
    return row.dropna()[lambda r: r.astype(str) != ""]


def describe(runs: pd.DataFrame) -> str:
    """One line saying what a frame of runs holds."""
    parts = [f"{len(runs)} runs"]
    for column in ("data", "model", "method", "hardware", "seed"):
        values = sorted(runs[column].dropna().astype(str).unique()) if column in runs else []
        parts.append(f"{column}: {', '.join(values) or '-'}")
    return "; ".join(parts)


# ----------------------------------------------------------------------------- configurations


def counted(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that are results: FINISHED ones (a frame without a status column is taken as is)."""
    return runs[runs["status"] == FINISHED] if "status" in runs else runs


def is_noise_param(column: str) -> bool:
    """Params that never change what a run measured: where files go, progress output, the seed itself."""
    key = column.removeprefix("params.")
    return key in NOT_KNOBS or key.startswith(NOT_KNOB_PREFIXES)


def _param_text(column: pd.Series) -> pd.Series:
    """A param column as comparable text (a missing param is its own value, UNSET)."""
    return column.map(lambda v: UNSET if v is None or (isinstance(v, float) and math.isnan(v))
                      else f"{v:.10g}" if isinstance(v, float) else str(v))


def _copies_the_seed(values: pd.Series, runs: pd.DataFrame) -> bool:
    """A param that equals the run's seed everywhere (e.g. `data.split_seed: ${seed}`) is a seed, not a knob."""
    return "seed" in runs and bool((values == runs["seed"].astype(str)).all())


def config_knobs(runs: pd.DataFrame) -> dict[str, list[str]]:
    """Per method, the `params.*` columns that define its configurations: those that vary among the FINISHED
    runs of one (data, model, hardware, method), the seed aside. `method.sparsity`, `method.bits`, ... and any
    `+`/`++` override, since the run logs its whole resolved config. A knob that only mirrors another (an
    interpolation, `callbacks.prune.final_sparsity: ${method.sparsity}`) gives way to the `method.*` one."""
    finished = counted(runs)
    params = [c for c in finished.columns if c.startswith("params.") and not is_noise_param(c)]
    if not params or "method" not in finished or finished.empty:
        return {}
    others = [k for k in GROUP_KEYS if k != "method" and k in finished]
    knobs: dict[str, list[str]] = {}
    for method, rows in finished.groupby("method", sort=True):
        text = rows[params].apply(_param_text)
        counts = (text.groupby([rows[k].astype(str) for k in others]).nunique().max() if others
                  else text.nunique())
        candidates = [c for c in params if counts[c] > 1 and not _copies_the_seed(text[c], rows)]
        found = _without_mirrors(sorted(candidates, key=_knob_preference), text)
        if found:
            knobs[str(method)] = found
    return knobs


def _knob_preference(column: str) -> tuple[bool, int, str]:
    """method.* knobs first, then the shallowest key (`method.sparsity` before its interpolated copies)."""
    return not column.startswith("params.method."), column.count("."), column


def _without_mirrors(candidates: list[str], text: pd.DataFrame) -> list[str]:
    """Keep a knob unless one already kept takes exactly the same partition of the runs (one-to-one values)."""
    kept: list[str] = []
    for column in candidates:
        mirrors = any(len(text[[column, other]].drop_duplicates()) == text[column].nunique() == text[other].nunique()
                      for other in kept)
        if not mirrors:
            kept.append(column)
    return kept


def _knob_names(columns: list[str]) -> dict[str, str]:
    """Short names for labels: `method.` dropped, then the shortest dotted suffix no other knob shares;
    other params keep their full key (`data.augment`), so an override reads as it was typed."""
    names = {}
    for column in columns:
        key = column.removeprefix("params.")
        if not key.startswith("method."):
            names[column] = key
            continue
        parts = key.removeprefix("method.").split(".")
        others = [c.removeprefix("params.") for c in columns if c != column]
        for size in range(1, len(parts) + 1):
            suffix = ".".join(parts[-size:])
            if not any(o == suffix or o.endswith(f".{suffix}") for o in others):
                break
        names[column] = suffix
    return names


def with_configs(runs: pd.DataFrame, leave_out: Sequence[str] = ()) -> pd.DataFrame:
    """The runs with `knobs` ("sparsity=0.9", "" when the method has none) and `config` ("agp sparsity=0.9"):
    the method's full configuration, so runs that share a config differ only by seed.

    `leave_out`: knob names not to label (a curve's x axis, e.g. "sparsity"). A run that logged no params at
    all (one that failed before its end, where they are logged) has no knobs to tell, not "unset" ones.
    """
    knobs = config_knobs(runs)
    labelled = runs.copy()
    labelled["knobs"] = ""
    params = [c for c in runs.columns if c.startswith("params.")]
    logged = runs[params].notna().any(axis=1) if params else pd.Series(False, index=runs.index)
    for method, columns in knobs.items():
        names = _knob_names(columns)
        columns = [c for c in columns if not names[c].split(".")[-1].endswith(tuple(leave_out))]
        if not columns:
            continue
        rows = (labelled["method"] == method) & logged
        if not rows.any():
            continue
        text = labelled.loc[rows, columns].apply(_param_text)
        labelled.loc[rows, "knobs"] = text.apply(lambda row: " ".join(f"{names[c]}={row[c]}" for c in columns), axis=1)
    method = labelled["method"].astype(str) if "method" in labelled else pd.Series("", index=labelled.index)
    labelled["config"] = (method + " " + labelled["knobs"]).str.strip()
    return labelled


def _configured(runs: pd.DataFrame) -> pd.DataFrame:
    return runs if "config" in runs else with_configs(runs)


def config_order(configs: Iterable[str]) -> list[str]:
    """Labels sorted with their numbers read as numbers (rank=4 before rank=16, sparsity=0.9 before 0.95)."""
    def key(label: str) -> list[tuple[int, Any]]:
        return [(0, float(part)) if NUMBER.fullmatch(part) else (1, part) for part in NUMBER.split(label) if part]
    return sorted(set(configs), key=key)


# ----------------------------------------------------------------------------- Pareto


def pareto_mask(x: Sequence[float], y: Sequence[float], x_larger_better: bool, y_larger_better: bool = True) -> np.ndarray:
    """True for the points no other point dominates (as good on both axes, strictly better on one).

    Duplicated points are all kept; a point with a NaN coordinate is never on the front. O(n log n).
    """
    xs = np.asarray(x, dtype=float) * (1 if x_larger_better else -1)
    ys = np.asarray(y, dtype=float) * (1 if y_larger_better else -1)
    on_front = np.zeros(len(xs), dtype=bool)
    valid = np.flatnonzero(~(np.isnan(xs) | np.isnan(ys)))
    best_y = -np.inf  # best y among points with a strictly larger x
    order = valid[np.lexsort((-ys[valid], -xs[valid]))]  # x descending, then y descending
    start = 0
    while start < len(order):
        stop = start
        while stop < len(order) and xs[order[stop]] == xs[order[start]]:
            stop += 1
        group = order[start:stop]
        group_best = ys[group].max()
        if group_best > best_y:
            on_front[group[ys[group] == group_best]] = True
        best_y = max(best_y, group_best)
        start = stop
    return on_front


def pareto_front(runs: pd.DataFrame, x: str, y: str, x_larger_better: bool, y_larger_better: bool = True,
                 by: Sequence[str] = ()) -> pd.DataFrame:
    """The FINISHED runs on the front of (x, y) within each group of `by`, sorted by x (none without x or y)."""
    runs = counted(runs)
    if runs.empty or not {x, y, *by} <= set(runs.columns):
        return runs.iloc[0:0].copy()
    groups = runs.groupby(list(by), dropna=False, sort=True) if by else [((), runs)]
    fronts = [group[pareto_mask(group[x], group[y], x_larger_better, y_larger_better)] for _, group in groups]
    return pd.concat(fronts).sort_values([*by, x]).reset_index(drop=True)


# ----------------------------------------------------------------------------- grid overview


@dataclass
class GridOverview:
    """The figures and tables of the grid overview."""

    figures: dict[str, Figure] = field(default_factory=dict)
    fronts: dict[str, pd.DataFrame] = field(default_factory=dict)
    best: pd.DataFrame = field(default_factory=pd.DataFrame)
    configs: pd.DataFrame = field(default_factory=pd.DataFrame)


def grid_overview(runs: pd.DataFrame, budget: float = 1.0, latency_batch: int = 1,
                  conservative: bool = False) -> GridOverview:
    """Every figure and table of the grid overview for the FINISHED runs of a frame (see notebooks/01)."""
    runs = _configured(counted(runs))
    latency = latency_ms_p50(latency_batch)
    overview = GridOverview()
    overview.configs = config_summary(runs, mark_noisy=False)
    overview.figures[ACCURACY_VS_COMPRESSION] = accuracy_vs_compression(runs)
    overview.fronts[ACCURACY_VS_COMPRESSION] = _front_table(
        pareto_front(runs, COMPRESSION_RATIO, TEST_ACC, x_larger_better=True, by=["data"]))
    overview.figures[ACCURACY_VS_LATENCY] = accuracy_vs_latency(runs, latency)
    overview.fronts[ACCURACY_VS_LATENCY] = _front_table(
        pareto_front(runs, latency, TEST_ACC, x_larger_better=False, by=["data", "hardware"]), latency,
        LATENCY_NOISY_TAG)
    overview.figures[HEATMAPS] = metric_heatmaps(runs, (*HEATMAP_METRICS[:2], speedup(latency_batch)))
    overview.best = best_under_budget(runs, budget, conservative=conservative, mark_noisy=True)
    return overview


def _front_table(front: pd.DataFrame, *extra: str) -> pd.DataFrame:
    columns = ["run_name", "data", "model", "method", "knobs", "hardware", "seed", TEST_ACC, ACC_DROP,
               COMPRESSION_RATIO, *extra, "run_id"]
    return front[[c for c in dict.fromkeys(columns) if c in front]]


def _facet_values(runs: pd.DataFrame, column: str | None) -> list[Any]:
    if column is None or column not in runs:
        return [None]
    return sorted(runs[column].dropna().unique(), key=str) or [None]


def _subset(runs: pd.DataFrame, column: str | None, value: Any) -> pd.DataFrame:
    return runs if value is None else runs[runs[column] == value]


def _facet_grid(rows: int, cols: int, width: float = 5.0, height: float = 4.0) -> tuple[Figure, np.ndarray]:
    figure = Figure(figsize=(width * cols + 1.5, height * rows), layout="constrained")
    axes = np.atleast_2d(figure.subplots(rows, cols, squeeze=False))
    return figure, axes


def scatter_with_front(runs: pd.DataFrame, x: str, y: str, x_larger_better: bool, row: str | None = None,
                       col: str | None = None, log_x: bool = False, title: str = "",
                       mark_noisy: bool = False) -> Figure:
    """Scatter of y vs x (hue method, style model), one panel per (row, col) value, front drawn in each.

    `mark_noisy`: runs tagged latency_noisy get a hatched red ring (their timing is to be redone).
    """
    plotted = runs.dropna(subset=[x, y]) if {x, y} <= set(runs.columns) else runs.iloc[0:0]
    row_values, col_values = _facet_values(plotted, row), _facet_values(plotted, col)
    figure, axes = _facet_grid(len(row_values), len(col_values))
    hue_order = sorted(plotted["method"].unique()) if "method" in plotted else None
    style_order = sorted(plotted["model"].unique()) if "model" in plotted else None
    for i, row_value in enumerate(row_values):
        for j, col_value in enumerate(col_values):
            ax: Axes = axes[i, j]
            panel = _subset(_subset(plotted, row, row_value), col, col_value)
            show_legend = i == 0 and j == len(col_values) - 1 and not panel.empty
            _draw_panel(ax, panel, x, y, x_larger_better, hue_order, style_order, show_legend)
            if mark_noisy:
                _ring_noisy(ax, panel, x, y)
            ax.set_title(" / ".join(str(v) for v in (row_value, col_value) if v is not None), fontsize=10)
            if log_x and not panel.empty and (panel[x] > 0).all():
                ax.set_xscale("log")
    noisy = mark_noisy and LATENCY_NOISY_TAG in plotted and bool(plotted[LATENCY_NOISY_TAG].any())
    note = "\nhatched red ring: latency timed under contention (tag latency_noisy), measure again"
    figure.suptitle((title or f"{y} vs {x} (dashed: Pareto front)") + (note if noisy else ""))
    return figure


def _ring_noisy(ax: Axes, panel: pd.DataFrame, x: str, y: str) -> None:
    if not {LATENCY_NOISY_TAG, x, y} <= set(panel.columns):
        return
    noisy = panel[panel[LATENCY_NOISY_TAG].fillna(False).astype(bool)]
    ax.scatter(noisy[x], noisy[y], s=260, facecolors="none", edgecolors="tab:red", hatch="////", linewidths=1.2)


def _draw_panel(ax: Axes, panel: pd.DataFrame, x: str, y: str, x_larger_better: bool,
                hue_order: list[str] | None, style_order: list[str] | None, legend: bool) -> None:
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    if panel.empty:
        ax.text(0.5, 0.5, "no runs with these metrics", ha="center", va="center", transform=ax.transAxes)
        return
    sns.scatterplot(data=panel, x=x, y=y, hue="method", style="model", hue_order=hue_order,
                    style_order=style_order, s=60, alpha=0.8, ax=ax, legend=legend)
    front = panel[pareto_mask(panel[x], panel[y], x_larger_better)].sort_values(x)
    ax.plot(front[x], front[y], "--", color="black", linewidth=1, zorder=0)
    ax.scatter(front[x], front[y], s=140, facecolors="none", edgecolors="black", linewidths=1)
    if legend:
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1), frameon=False, fontsize=8)


def accuracy_vs_compression(runs: pd.DataFrame, accuracy: str = TEST_ACC) -> Figure:
    """Accuracy vs compression ratio (log scale), one panel per dataset, with the Pareto front."""
    return scatter_with_front(runs, COMPRESSION_RATIO, accuracy, x_larger_better=True, col="data", log_x=True,
                              title=f"{accuracy} vs compression ratio (dashed: Pareto front)")


def accuracy_vs_latency(runs: pd.DataFrame, latency: str = latency_ms_p50(1), accuracy: str = TEST_ACC) -> Figure:
    """Accuracy vs latency, one panel per hardware (and dataset), with the Pareto front of each."""
    return scatter_with_front(runs, latency, accuracy, x_larger_better=False, row="data", col="hardware",
                              title=f"{accuracy} vs {latency} per hardware (dashed: Pareto front)", mark_noisy=True)


def metric_heatmaps(runs: pd.DataFrame, metrics: Sequence[str] = HEATMAP_METRICS) -> Figure:
    """Heatmaps configuration x model of each metric, one row per hardware; FINISHED runs only.

    A cell is the mean over the seeds of one configuration ("agp sparsity=0.9"), never over different
    knob values; it shows its n. A speedup cell with a run timed under contention carries NOISY_MARK.
    """
    runs = _configured(counted(runs))
    hardware = _facet_values(runs, "hardware")
    rows = config_order(runs["config"]) if "config" in runs else []
    figure, axes = _facet_grid(len(hardware), len(metrics), width=4.5, height=max(3.5, 0.3 * len(rows) + 1.5))
    table = runs
    if "data" in runs and runs["data"].nunique() > 1:  # several datasets: columns tell them apart
        table = runs.assign(model=runs["data"].astype(str) + "/" + runs["model"].astype(str))
    for i, hw in enumerate(hardware):
        for j, metric in enumerate(metrics):
            ax = axes[i, j]
            panel = _subset(table, "hardware", hw)
            if metric not in panel or panel[metric].isna().all():
                ax.text(0.5, 0.5, f"no {metric}", ha="center", va="center", transform=ax.transAxes)
            else:
                _draw_heatmap(ax, panel.dropna(subset=[metric]), metric, rows)
            ax.set_title(f"{metric}" + (f" ({hw})" if hw is not None else ""), fontsize=10)
    noisy = LATENCY_NOISY_TAG in runs and bool(runs[LATENCY_NOISY_TAG].any())
    marked = noisy and any(metric.startswith("speedup_") for metric in metrics)
    note = f"; {NOISY_MARK} = a run timed under contention (latency_noisy), measure again"
    figure.suptitle("configuration x model: mean over seeds (n = seeds, on the row when every cell has it)"
                    + (note if marked else ""))
    return figure


def _draw_heatmap(ax: Axes, panel: pd.DataFrame, metric: str, order: list[str]) -> None:
    cells = panel.groupby(["config", "model"], sort=True)
    means = cells[metric].mean().unstack()
    seeds = cells[metric].count().unstack()
    noisy = (cells[LATENCY_NOISY_TAG].sum().unstack() if LATENCY_NOISY_TAG in panel and metric.startswith("speedup_")
             else means * 0)
    means = means.reindex([c for c in order if c in means.index])
    seeds, noisy = seeds.reindex_like(means), noisy.reindex_like(means).fillna(0)
    # n goes on the row's label when all its cells share it (half the text to draw), else in each cell
    shared = seeds.nunique(axis=1, dropna=True) == 1
    text = [[("" if pd.isna(m) else f"{m:.3g}{NOISY_MARK if k > 0 else ''}" + ("" if one_n else f"\nn={int(n)}"))
             for m, n, k in zip(mean_row, seed_row, noisy_row)]
            for mean_row, seed_row, noisy_row, one_n in zip(means.values, seeds.values, noisy.values, shared)]
    row_n = seeds.max(axis=1)
    means.index = [f"{config}  n={int(row_n[config])}" if shared[config] else str(config) for config in means.index]
    _annotated_grid(ax, means, text)


def _annotated_grid(ax: Axes, values: pd.DataFrame, text: list[list[str]], cmap: str = "viridis") -> None:
    """A heatmap drawn directly (seaborn's redraws the whole figure per panel to check its tick labels: with
    a dozen configurations that was most of the overview's time), each cell annotated in a readable colour."""
    grid = values.to_numpy(dtype=float)
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto", interpolation="nearest")
    for (row, col), label in np.ndenumerate(np.array(text, dtype=object).reshape(grid.shape)):
        if label:
            red, green, blue, _ = image.cmap(image.norm(grid[row, col]))
            dark = 0.2126 * red + 0.7152 * green + 0.0722 * blue < 0.45
            ax.text(col, row, label, ha="center", va="center", fontsize=7, color="white" if dark else "black",
                    in_layout=False)  # inside its cell: the layout need not measure it (hundreds of cells)
    columns = [str(c) for c in values.columns]
    crowded = sum(len(c) for c in columns) > 30  # model names run into each other: slant them
    ax.set_xticks(range(grid.shape[1]), labels=columns, rotation=30 if crowded else 0, ha="right" if crowded else "center")
    ax.set_yticks(range(grid.shape[0]), labels=[str(r) for r in values.index])
    ax.set_xlabel(str(values.columns.name or ""))
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)


def best_under_budget(runs: pd.DataFrame, budget: float, objective: str = COMPRESSION_RATIO,
                      larger_better: bool = True, by: Sequence[str] = ("data", "model", "hardware"),
                      conservative: bool = False, mark_noisy: bool = False) -> pd.DataFrame:
    """The best FINISHED run by `objective` per group among those within the accuracy-drop budget (points).

    `conservative` judges a run by the upper end of its paired 95% interval instead of its drop; with
    `mark_noisy` a speedup timed under contention reads "1.5*".
    """
    drop = ACC_DROP_CI95_HIGH if conservative else ACC_DROP
    if runs.empty or drop not in runs or objective not in runs:
        return pd.DataFrame(columns=[*by, "method", "knobs", "seed", objective, ACC_DROP, "run_name", "run_id"])
    runs = _configured(counted(runs))
    within = runs[(runs[drop] <= budget) & runs[objective].notna()]
    ranked = within.sort_values([objective, ACC_DROP], ascending=[not larger_better, True])
    best = ranked.groupby(list(by), sort=True).head(1).sort_values(list(by))
    columns = [*by, "method", "knobs", "seed", objective, TEST_ACC, ACC_DROP, ACC_DROP_CI95_HIGH, speedup(1),
               LATENCY_NOISY_TAG, "run_name", "run_id"]
    best = best[[c for c in dict.fromkeys(columns) if c in best]].reset_index(drop=True)
    return mark_noisy_speedups(best, best.get(LATENCY_NOISY_TAG)) if mark_noisy else best


def figure_png(figure: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Render a figure to a PNG file (Agg), returning the path."""
    figure.savefig(path, format="png", dpi=dpi)
    return Path(path)


# ----------------------------------------------------------------------------- the sweep's parent run


def log_sweep_figures(info: SweepInfo, budget: float = 1.0) -> list[str]:
    """Log the grid overview of a finished sweep as artifacts of its parent run (shown in the UI).

    Never raises: a figure is a convenience, so any failure is logged as a warning and the sweep
    carries on. Returns the artifact paths logged.
    """
    try:
        runs = load_runs(info.tracking_uri, info.experiment, sweep=info.name)
        if runs.empty:
            log.warning("sweep %s has no finished runs: no figures logged", info.name)
            return []
        return _log_overview(MlflowClient(info.tracking_uri), info.parent_run_id, grid_overview(runs, budget), budget)
    except Exception as error:  # noqa: BLE001 - plotting must never fail the sweep
        log.warning("could not log the figures of sweep %s (%s: %s); the sweep's runs are unaffected",
                    info.name, type(error).__name__, error, exc_info=log.isEnabledFor(logging.DEBUG))
        return []


def _log_overview(client: MlflowClient, run_id: str, overview: GridOverview, budget: float) -> list[str]:
    logged = []
    for name, figure in overview.figures.items():
        path = figure_artifact(name)
        client.log_figure(run_id, figure, path, save_kwargs={"dpi": 100})
        logged.append(path)
    tables = {pareto_artifact(name): table for name, table in overview.fronts.items()}
    tables[best_artifact(budget)] = overview.best
    tables[CONFIGURATIONS_ARTIFACT] = overview.configs
    for path, table in tables.items():
        client.log_text(run_id, table.to_csv(index=False), path)
        logged.append(path)
    log.info("logged %d figures and tables of the grid on parent run %s", len(logged), run_id)
    return logged


# ----------------------------------------------------------------------------- one run in depth


def pick_run(runs: pd.DataFrame) -> str:
    """A run worth a look when none is named: the most compressed non-baseline run (lowest drop on ties)."""
    if runs.empty:
        raise ValueError("no runs to pick from")
    compressed = runs[runs["method"] != BASELINE_METHOD]
    pool = compressed if not compressed.empty else runs
    ranked = pool.sort_values([COMPRESSION_RATIO, ACC_DROP], ascending=[False, True], na_position="last")
    return str(ranked.iloc[0]["run_id"])


def read_csv_artifact(client: MlflowClient, run_id: str, artifact: str) -> pd.DataFrame | None:
    """A CSV artifact of a run as a DataFrame, None when the run has no such file."""
    folder = str(Path(artifact).parent) if Path(artifact).parent != Path(".") else None
    if artifact not in {a.path for a in client.list_artifacts(run_id, folder)}:
        return None
    with tempfile.TemporaryDirectory(prefix="workbench-analysis-") as scratch, quiet_downloads():
        return pd.read_csv(client.download_artifacts(run_id, artifact, scratch))


@contextmanager
def quiet_downloads() -> Iterator[None]:
    """No MLflow progress bar per downloaded file (they flood notebook outputs); the user's setting comes back."""
    previous = os.environ.get(PROGRESS_BAR_ENV)
    os.environ[PROGRESS_BAR_ENV] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(PROGRESS_BAR_ENV, None)
        else:
            os.environ[PROGRESS_BAR_ENV] = previous


def layer_facts(run_id: str, tracking_uri: str | None = None) -> pd.DataFrame:
    """Per layer: layers.csv joined with every `<method>_summary.csv` (sparsity, bits, rank, ...).

    A column a summary repeats keeps the value of layers.csv; new ones join under their own name.
    """
    client = open_client(tracking_uri)
    table = read_csv_artifact(client, run_id, LAYERS_TABLE)
    summaries = [a.path for a in client.list_artifacts(run_id) if a.path.endswith(SUMMARY_SUFFIX)]
    for artifact in sorted(summaries):
        summary = read_csv_artifact(client, run_id, artifact)
        if summary is None or "layer" not in summary:
            continue
        if table is None:
            table = summary
            continue
        table = _join_layers(table, summary)
    if table is None:
        raise ValueError(f"run {run_id} has no layers.csv nor any *_summary.csv artifact")
    return table


def _join_layers(table: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """Add the summary's new columns by layer, keeping the table's layer order; its extra layers go last."""
    new = ["layer", *[c for c in summary.columns if c not in table.columns]]
    joined = table.merge(summary[new], on="layer", how="left")
    extra = summary[~summary["layer"].isin(table["layer"])]
    return pd.concat([joined, extra], ignore_index=True) if not extra.empty else joined


def plot_layer_facts(facts: pd.DataFrame, columns: Sequence[str] = LAYER_FACTS) -> Figure:
    """One bar chart per fact the run has (sparsity, bits, rank), layers on the x axis."""
    present = [c for c in columns if c in facts and facts[c].notna().any()]
    figure, axes = _facet_grid(1, max(len(present), 1), width=max(4.0, 0.5 * len(facts)), height=3.5)
    if not present:
        axes[0, 0].text(0.5, 0.5, f"none of {', '.join(columns)} per layer", ha="center", va="center")
    for ax, column in zip(axes[0], present):
        sns.barplot(data=facts, x="layer", y=column, ax=ax, color="tab:blue")
        ax.tick_params(axis="x", rotation=45, labelsize=8)
        ax.set_title(f"{column} per layer", fontsize=10)
    return figure


@dataclass
class RunModels:
    """A finalized model, the dense baseline it started from, and the run's resolved config."""

    run_id: str
    model: nn.Module
    baseline: nn.Module
    config: Any  # omegaconf.DictConfig


def load_run_models(run_id: str, tracking_uri: str | None = None) -> RunModels:
    """Download the run's deployable model, its baseline's (tag baseline_run_id) and its config.yaml."""
    from omegaconf import OmegaConf

    from lightning_modules.evaluation.artifact import load_deployable

    client = open_client(tracking_uri)
    baseline_id = client.get_run(run_id).data.tags.get(BASELINE_RUN_TAG) or run_id
    with tempfile.TemporaryDirectory(prefix="workbench-analysis-") as scratch, quiet_downloads():
        config = OmegaConf.load(client.download_artifacts(run_id, CONFIG_ARTIFACT, scratch))
        model = load_deployable(client.download_artifacts(run_id, MODEL_ARTIFACT, f"{scratch}/run"))
        baseline = model if baseline_id == run_id else \
            load_deployable(client.download_artifacts(baseline_id, MODEL_ARTIFACT, f"{scratch}/baseline"))
    return RunModels(run_id, model, baseline, config)


def weight_histograms(model: nn.Module, baseline: nn.Module, max_layers: int = 8, bins: int = 60) -> Figure:
    """Per Linear/Conv layer (by name, first `max_layers`): baseline weights vs the finalized model's nonzero ones."""
    from lightning_modules.layers import weighted_layers

    after = dict(weighted_layers(model))
    layers = [(name, module) for name, module in weighted_layers(baseline) if name in after][:max_layers]
    cols = min(4, max(len(layers), 1))
    figure, axes = _facet_grid(math.ceil(max(len(layers), 1) / cols), cols, width=3.5, height=2.8)
    for ax, (name, module) in zip(axes.flat, layers):
        before = module.weight.detach().float().flatten().numpy()
        weights = after[name].weight.detach().float().flatten().numpy()
        edges = np.histogram_bin_edges(np.concatenate([before, weights]), bins=bins)
        ax.hist(before, bins=edges, alpha=0.5, label="baseline", color="tab:gray")
        ax.hist(weights[weights != 0], bins=edges, alpha=0.6, label="finalized (nonzero)", color="tab:orange")
        ax.set_yscale("log")
        ax.set_title(f"{name}: {np.mean(weights == 0):.0%} zero", fontsize=9)
    for ax in list(axes.flat)[len(layers):]:
        ax.set_visible(False)
    if layers:
        axes.flat[0].legend(fontsize=7)
    figure.suptitle("weights before (baseline) and after (finalized model)")
    return figure


def predicted_labels(model: nn.Module, images: torch.Tensor, runtime: str = "torch", batch_size: int = 512) -> np.ndarray:
    """Class predictions of a model deployed on the CPU with the run's runtime."""
    import torch

    from lightning_modules.evaluation.runtime import deploy

    deployed = deploy(model, runtime, torch.device("cpu"))
    with torch.no_grad():
        return torch.cat([deployed(batch).argmax(1) for batch in images.split(batch_size)]).numpy()


@dataclass
class Confusion:
    """Confusion matrices (rows: true class, columns: predicted) of a run and its baseline."""

    model: np.ndarray
    baseline: np.ndarray
    labels: list[int]

    @property
    def accuracies(self) -> tuple[float, float]:
        """Test accuracy in percent of (model, baseline), from the matrices."""
        return tuple(100.0 * float(np.trace(m) / m.sum()) for m in (self.model, self.baseline))


def confusion_matrices(models: RunModels) -> Confusion:
    """Both models scored on the run's test split (rebuilt from its config.yaml)."""
    import hydra.utils
    from sklearn.metrics import confusion_matrix

    data = hydra.utils.instantiate(models.config.data)
    images, targets = data.split("test").tensors
    labels = list(range(int(targets.max()) + 1))
    runtime = models.config.hardware.get("runtime", "torch")
    return Confusion(confusion_matrix(targets.numpy(), predicted_labels(models.model, images, runtime), labels=labels),
                     confusion_matrix(targets.numpy(), predicted_labels(models.baseline, images, runtime), labels=labels),
                     labels)


def plot_confusion(confusion: Confusion) -> Figure:
    """Baseline, finalized model, and their difference (finalized - baseline) side by side."""
    figure, axes = _facet_grid(1, 3, width=4.2, height=3.8)
    model_acc, baseline_acc = confusion.accuracies
    panels = [(confusion.baseline, f"baseline ({baseline_acc:.1f}%)", "Blues", None),
              (confusion.model, f"finalized ({model_acc:.1f}%)", "Blues", None),
              (confusion.model - confusion.baseline, "finalized - baseline", "RdBu_r", 0)]
    for ax, (matrix, title, cmap, center) in zip(axes[0], panels):
        sns.heatmap(matrix, annot=True, fmt="d", cmap=cmap, center=center, ax=ax, cbar=False,
                    xticklabels=confusion.labels, yticklabels=confusion.labels, annot_kws={"size": 7})
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
    return figure


# ----------------------------------------------------------------------------- statistics over seeds


def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval of the mean; NaN bounds with fewer than two values."""
    array = np.asarray(values, dtype=float)
    array = array[~np.isnan(array)]
    if len(array) == 0:
        return math.nan, math.nan, math.nan
    mean = float(array.mean())
    if len(array) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, len(array) - 1) * array.std(ddof=1) / math.sqrt(len(array)))
    return mean, mean - half, mean + half


def seed_summary(runs: pd.DataFrame, metric: str = TEST_ACC,
                 by: Sequence[str] = ("data", "model", "hardware", "method", "knobs"),
                 level: float = 0.95) -> pd.DataFrame:
    """Per configuration (FINISHED runs): seeds, mean, standard deviation and t-interval of `metric` over them.

    `by` names the cell; its default keeps each configuration of a method apart (see `with_configs`), so only
    seeds are averaged.
    """
    runs = _configured(counted(runs))
    rows = []
    for key, group in runs.dropna(subset=[metric]).groupby(list(by), sort=True):
        mean, low, high = mean_interval(group[metric], level)
        rows.append({**dict(zip(by, key)), "n": len(group), "seeds": _seed_list(group),
                     "mean": mean, "std": group[metric].std(ddof=1), "ci_low": low, "ci_high": high})
    return _in_config_order(pd.DataFrame(rows, columns=[*by, "n", "seeds", "mean", "std", "ci_low", "ci_high"]))


def _in_config_order(table: pd.DataFrame) -> pd.DataFrame:
    """Rows sorted with knob values read as numbers (rank=4 before rank=16)."""
    if table.empty or "knobs" not in table:
        return table
    rank = {label: i for i, label in enumerate(config_order(table["knobs"].astype(str)))}
    keys = [c for c in table.columns[: table.columns.get_loc("knobs")] if c != "method"]
    order = table.assign(_rank=table["knobs"].astype(str).map(rank)).sort_values(
        [*keys, *(["method"] if "method" in table else []), "_rank"], kind="stable")
    return order.drop(columns="_rank").reset_index(drop=True)


def config_summary(runs: pd.DataFrame, metrics: Sequence[str] = SUMMARY_METRICS, mark_noisy: bool = True,
                   by: Sequence[str] = ("data", "model", "hardware", "method", "knobs")) -> pd.DataFrame:
    """One row per configuration: n seeds, which, and the mean over them of each metric the runs have.

    Only FINISHED runs count (`not_counted` lists the others). `latency_noisy` counts the seeds timed under
    contention; with `mark_noisy` their speedups read "1.23*" (text, for showing). Distillation figures against
    the teacher (TEACHER_METRICS) appear when some run logged them, blank for configurations without a teacher.
    """
    runs = _configured(counted(runs))
    present = [m for m in metrics if m in runs and runs[m].notna().any()]
    spread = [f"{present[0]}_std"] if present else []
    columns = [*by, "n", "seeds", *present, *spread, LATENCY_NOISY_TAG]
    if runs.empty:
        return pd.DataFrame(columns=columns)
    runs = runs.assign(**{LATENCY_NOISY_TAG: runs.get(LATENCY_NOISY_TAG, False), "seed": runs.get("seed", pd.NA)})
    runs[LATENCY_NOISY_TAG] = runs[LATENCY_NOISY_TAG].fillna(False)
    cells = runs.groupby(list(by), sort=True, dropna=False)
    table = pd.concat([cells.size().rename("n"), cells["seed"].agg(_seed_text).rename("seeds"), cells[present].mean(),
                       *([cells[present[0]].std(ddof=1).rename(spread[0])] if present else []),
                       cells[LATENCY_NOISY_TAG].agg(lambda flags: int(flags.astype(bool).sum()))], axis=1)
    table = _in_config_order(table.reset_index()[columns])
    return mark_noisy_speedups(table, table[LATENCY_NOISY_TAG]) if mark_noisy else table


def teacher_table(runs: pd.DataFrame, mark_noisy: bool = True) -> pd.DataFrame:
    """The configurations distilled from a teacher, with the student against it (empty when no run logged
    `teacher_test_acc`: the runs predate those metrics, or no method had a teacher)."""
    if TEACHER_TEST_ACC not in runs:
        return pd.DataFrame(columns=["data", "model", "hardware", "method", "knobs", "n", *TEACHER_METRICS])
    taught = counted(runs)[lambda f: f[TEACHER_TEST_ACC].notna()]
    metrics = [TEST_ACC, *TEACHER_METRICS, ACC_DROP, COMPRESSION_RATIO, speedup(32)]
    return config_summary(taught, metrics, mark_noisy)


def _seed_list(group: pd.DataFrame) -> str:
    return _seed_text(group["seed"]) if "seed" in group else ""


def _seed_text(seeds: pd.Series) -> str:
    return ",".join(str(s) for s in sorted(seeds.dropna().unique()))


def seed_spread(runs: pd.DataFrame, x: str = SPARSITY, y: str = TEST_ACC,
                by: Sequence[str] = ("data", "model", "method"), x_decimals: int = 3,
                level: float = 0.95) -> pd.DataFrame:
    """Points of a curve: y's mean and interval over seeds at each x (rounded, so seeds line up), per
    configuration: the knobs other than x itself (`with_configs(..., leave_out=[x])`) tell the curves apart."""
    runs = counted(runs)
    table = with_configs(runs, leave_out=[x]).dropna(subset=[x, y]).assign(**{x: lambda f: f[x].round(x_decimals)})
    return seed_summary(table, y, (*by, "knobs", x), level).rename(columns={"mean": y})


def difference_test(values: pd.Series, reference: pd.Series, level: float = 0.95) -> dict[str, Any]:
    """Mean difference (values - reference) with its t-interval and p-value.

    Both series are indexed by seed. With the same seeds on both sides (at least two) the test is
    paired, seed by seed (a seed fixes the baseline, so pairing removes its share of the noise);
    otherwise Welch's unequal-variance test.
    """
    values, reference = values.dropna(), reference.dropna()
    paired = len(values) >= 2 and set(values.index) == set(reference.index)
    if paired:
        differences = values - reference.reindex(values.index)
        mean, n = float(differences.mean()), len(differences)
        se, dof = float(differences.std(ddof=1)) / math.sqrt(n), n - 1
    elif len(values) >= 2 and len(reference) >= 2:
        mean = float(values.mean() - reference.mean())
        va, vb = values.var(ddof=1) / len(values), reference.var(ddof=1) / len(reference)
        se = math.sqrt(va + vb)
        dof = (va + vb) ** 2 / (va**2 / (len(values) - 1) + vb**2 / (len(reference) - 1)) if se > 0 else 1.0
    else:
        mean = float(values.mean() - reference.mean()) if len(values) and len(reference) else math.nan
        return {"test": "too few seeds", "diff": mean, "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan}
    half = float(stats.t.ppf(0.5 + level / 2, dof)) * se
    p_value = float(2 * stats.t.sf(abs(mean) / se, dof)) if se > 0 else float(mean == 0)
    return {"test": "paired t" if paired else "Welch t", "diff": mean, "ci_low": mean - half,
            "ci_high": mean + half, "p_value": p_value}


def compare_methods(runs: pd.DataFrame, metric: str = TEST_ACC, reference: str = BASELINE_METHOD,
                    by: Sequence[str] = ("data", "model", "hardware"), level: float = 0.95) -> pd.DataFrame:
    """Each configuration against `reference` within each group: is the difference larger than the noise?

    `reference` is a configuration ("agp sparsity=0.9") or a method with a single configuration in the group
    ("baseline"). `verdict` is "larger than the noise" when the interval of the difference excludes zero.

    Raises:
        ValueError: `reference` names a method with several configurations in one group.
    """
    runs = _configured(counted(runs))
    rows = []
    per_seed = runs.dropna(subset=[metric]).groupby([*by, "config", "seed"], sort=True)[metric].mean()
    for key, group in per_seed.groupby(level=list(range(len(by))), sort=True):
        key = key if isinstance(key, tuple) else (key,)
        by_config = {config: series.droplevel(list(range(len(by) + 1)))
                     for config, series in group.groupby(level=len(by))}
        chosen = _reference_config(reference, list(by_config), runs, dict(zip(by, key)))
        if chosen is None:
            continue
        for config, values in by_config.items():
            if config == chosen:
                continue
            method, knobs = _config_parts(runs, config)
            result = difference_test(values, by_config[chosen], level)
            rows.append({**dict(zip(by, key)), "method": method, "knobs": knobs,
                         "reference": chosen, "n": len(values), "n_reference": len(by_config[chosen]),
                         **result, "verdict": _verdict(result)})
    columns = [*by, "method", "knobs", "reference", "n", "n_reference", "test", "diff", "ci_low", "ci_high",
               "p_value", "verdict"]
    return _in_config_order(pd.DataFrame(rows, columns=columns))


def _reference_config(reference: str, configs: list[str], runs: pd.DataFrame, group: dict[str, Any]) -> str | None:
    if reference in configs:
        return reference
    of_method = [c for c in configs if _config_parts(runs, c)[0] == reference]
    if len(of_method) > 1:
        raise ValueError(f"reference={reference!r} has {len(of_method)} configurations in {group}: "
                         f"{', '.join(config_order(of_method))}; name one of them")
    return of_method[0] if of_method else None


def _config_parts(runs: pd.DataFrame, config: str) -> tuple[str, str]:
    """(method, knobs) of a configuration label."""
    row = runs.loc[runs["config"] == config].iloc[0]
    return str(row["method"]), str(row["knobs"])


def _verdict(result: dict[str, Any]) -> str:
    if math.isnan(result["ci_low"]):
        return "too few seeds"
    return "larger than the noise" if result["ci_low"] > 0 or result["ci_high"] < 0 else "within the noise"


def plot_seed_intervals(summary: pd.DataFrame, metric: str = TEST_ACC) -> Figure:
    """Mean and interval over seeds per configuration, one panel per (data, model, hardware)."""
    keys = [c for c in ("data", "model", "hardware") if c in summary]
    groups = list(summary.groupby(keys, sort=True)) if not summary.empty else []
    figure, axes = _facet_grid(1, max(len(groups), 1), width=4.0, height=3.2)
    for ax, (key, group) in zip(axes[0], groups):
        low = (group["mean"] - group["ci_low"]).fillna(0)
        high = (group["ci_high"] - group["mean"]).fillna(0)
        labels = (group["method"].astype(str) + " " + group["knobs"].astype(str)).str.strip() if "knobs" in group \
            else group["method"]
        ax.errorbar(labels, group["mean"], yerr=[low, high], fmt="o", capsize=4)
        ax.set_title(" / ".join(map(str, key if isinstance(key, tuple) else (key,))), fontsize=10)
        ax.set_ylabel(f"{metric} (mean, CI over seeds)")
        ax.tick_params(axis="x", rotation=30)
    figure.suptitle(f"{metric}: mean and interval over seeds")
    return figure


# ----------------------------------------------------------------------------- pruning curves, sensitivity


def plot_pruning_curves(runs: pd.DataFrame, x: str = SPARSITY, y: str = TEST_ACC, x_decimals: int = 3) -> Figure:
    """y vs x per configuration (a method and its knobs other than x), one panel per (data, model): each FINISHED
    run a dot, the mean over seeds a line, shaded (and barred) +- one standard deviation over seeds."""
    runs = with_configs(counted(runs), leave_out=[x])
    curve = seed_spread(runs, x, y, ("data", "model", "method"), x_decimals) if not runs.empty else pd.DataFrame()
    panels = list(curve.groupby(["data", "model"], sort=True)) if not curve.empty else []
    figure, axes = _facet_grid(1, max(len(panels), 1), width=4.5, height=3.5)
    lines = config_order((curve["method"] + " " + curve["knobs"]).str.strip()) if not curve.empty else []
    palette = dict(zip(lines, sns.color_palette(n_colors=max(len(lines), 1))))
    for ax, ((data, model), panel) in zip(axes[0], panels):
        dots = runs[(runs["data"] == data) & (runs["model"] == model)]
        for (method, knobs), points in panel.groupby(["method", "knobs"], sort=True):
            line = f"{method} {knobs}".strip()
            _draw_spread(ax, points.sort_values(x), dots[(dots["method"] == method) & (dots["knobs"] == knobs)],
                         x, y, palette[line], line)
        ax.set_title(f"{data} / {model}", fontsize=10)
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.legend(fontsize=8)
    figure.suptitle(f"{y} vs {x}: runs (dots), mean over seeds (line), +- 1 sd (band)")
    return figure


def _draw_spread(ax: Axes, points: pd.DataFrame, runs: pd.DataFrame, x: str, y: str, color: Any, label: str) -> None:
    spread = points["std"].fillna(0.0)
    ax.scatter(runs[x], runs[y], color=color, s=12, alpha=0.5)
    ax.errorbar(points[x], points[y], yerr=spread, fmt="o-", color=color, capsize=3, label=label)
    ax.fill_between(points[x], points[y] - spread, points[y] + spread, color=color, alpha=0.15)


def load_sensitivity(tracking_uri: str | None = None, experiment: str = EXPERIMENT,
                     sweep: str | None = None) -> pd.DataFrame:
    """Every `sensitivity.csv` of the runs tagged role=sensitivity, with the run's identity columns.

    An empty frame (SENSITIVITY_COLUMNS) when there are none; a run without the artifact is skipped
    with a warning.
    """
    client = open_client(tracking_uri)
    exp_id = experiment_id(client, experiment)
    sweep = resolve_sweep(client, exp_id, sweep)
    query = f"tags.{ROLE_TAG} = '{ROLE_SENSITIVITY}'" + (f" and tags.{SWEEP_TAG} = '{sweep}'" if sweep else "")
    tables = []
    for run in search_all(client, [exp_id], query):
        table = read_csv_artifact(client, run.info.run_id, SENSITIVITY_ARTIFACT)
        if table is None:
            log.warning("sensitivity run %s has no %s: skipped", run.info.run_id, SENSITIVITY_ARTIFACT)
            continue
        tags = run.data.tags
        identity = {"run_id": run.info.run_id, **{t: tags.get(t, "") for t in ("data", "model", "method", "seed")}}
        tables.append(table.assign(**identity))
    if not tables:
        return pd.DataFrame(columns=SENSITIVITY_COLUMNS)
    frame = pd.concat(tables, ignore_index=True)
    return frame[[*SENSITIVITY_COLUMNS, *[c for c in frame.columns if c not in SENSITIVITY_COLUMNS]]]


def sensitivity_table(sensitivity: pd.DataFrame, value: str = TEST_ACC) -> pd.DataFrame:
    """Layers as rows, sparsities as columns, `value` averaged over runs (seeds); one block per model."""
    return sensitivity.pivot_table(index=["data", "model", "layer"], columns="sparsity", values=value,
                                   aggfunc="mean", sort=True)


def plot_sensitivity(sensitivity: pd.DataFrame, value: str = TEST_ACC) -> Figure:
    """value vs sparsity, one line per layer, one panel per (data, model)."""
    panels = list(sensitivity.groupby(["data", "model"], sort=True))
    figure, axes = _facet_grid(1, max(len(panels), 1), width=4.5, height=3.5)
    for ax, ((data, model), panel) in zip(axes[0], panels):
        mean = panel.groupby(["layer", "sparsity"], sort=True)[value].mean().reset_index()
        sns.lineplot(data=mean, x="sparsity", y=value, hue="layer", marker="o", ax=ax)
        ax.set_title(f"{data} / {model}: one layer pruned at a time", fontsize=10)
        ax.legend(fontsize=7)
    return figure


# ----------------------------------------------------------------------------- Deep Compression beside the paper

DEEP_COMPRESSION_METHOD = "deep_compression"
#: Han, Mao and Dally (ICLR 2016), Table 1 / Figure 1: the compression ratio after pruning, after pruning and
#: weight sharing, after Huffman coding too; top-1 error (%) of the dense reference and of the compressed model
DEEP_COMPRESSION_PAPER: dict[str, dict[str, float]] = {
    "lenet300": {"pruned": 12.0, "quantized": 32.0, "huffman": 40.0, "error_before": 1.64, "error_after": 1.58},
    "lenet5": {"pruned": 12.0, "quantized": 33.0, "huffman": 39.0, "error_before": 0.80, "error_after": 0.74},
}
#: the paper's kept weights (%) per layer (its Tables 2 and 3) under this workbench's layer names; this LeNet-5 has
#: a middle fully-connected layer (classifier.3) the paper's has not: no figure for it
DEEP_COMPRESSION_PAPER_KEPT: dict[str, dict[str, float]] = {
    "lenet300": {"classifier.1": 8.0, "classifier.3": 9.0, "classifier.5": 26.0},
    "lenet5": {"features.0": 66.0, "features.3": 12.0, "classifier.1": 8.0, "classifier.5": 19.0},
}
PAPER_SOURCE = "paper"
STAGE_RATIOS = {"pruned": COMPRESSION_RATIO_PRUNED, "quantized": COMPRESSION_RATIO_QUANTIZED,
                "huffman": COMPRESSION_RATIO_HUFFMAN}
STAGE_COLUMNS = ["model", "source", "n", "seeds", *STAGE_RATIOS, "error_before", "error_after", ACC_DROP,
                 BITS_PER_WEIGHT]
LAYER_STAGE_COLUMNS = ["layer", "weights", "kept_percent", "paper_kept_percent", "index_bits",
                       "huffman_bits_per_index", "huffman_bits_per_value", "bytes_dense", "bytes_pruned",
                       "bytes_quantized", "bytes_huffman", "ratio"]
NO_DEEP_COMPRESSION_MESSAGE = (
    "No FINISHED `deep_compression` run here: `python train.py experiment=deep_compression_lenet300 seed=0` "
    "(or `_lenet5`, or `scripts/benchmark_deep_compression.py` for three seeds of both) makes one.")


def deep_compression_stages(runs: pd.DataFrame, method: str = DEEP_COMPRESSION_METHOD,
                            paper: dict[str, dict[str, float]] | None = None) -> pd.DataFrame:
    """Deep Compression's stages the way the paper's Table 1 shows them: per model, the paper's row, then one
    row per configuration of `method` (data, hardware, knobs: the `source`) with the mean over its FINISHED seeds.

    pruned / quantized / huffman are the compression ratios after each stage (huffman: the real file against
    the baseline's); error_before / error_after are 100 - accuracy (%) of the dense baseline and of the
    compressed model; acc_drop is in points (the paper's: error_after - error_before). A model the paper has no
    row for shows its runs alone; an empty frame when no run of `method` FINISHED.
    """
    paper = DEEP_COMPRESSION_PAPER if paper is None else paper
    runs = _configured(counted(runs))
    runs = runs[runs["method"] == method] if "method" in runs else runs.iloc[0:0]
    if runs.empty:
        return pd.DataFrame(columns=STAGE_COLUMNS)
    runs = runs.assign(**{column: runs.get(column, np.nan) for column in
                          (*STAGE_RATIOS.values(), TEST_ACC, BASELINE_TEST_ACC, ACC_DROP, BITS_PER_WEIGHT)})
    rows = []
    for model, of_model in runs.groupby("model", sort=True):
        if model in paper:
            row = paper[model]
            rows.append({"model": model, "source": PAPER_SOURCE, **row,
                         ACC_DROP: row["error_after"] - row["error_before"]})
        for (data, hardware, knobs), cell in of_model.groupby(["data", "hardware", "knobs"], sort=True):
            source = " ".join(str(part) for part in (data, hardware, knobs) if str(part))
            rows.append({"model": model, "source": source, "n": len(cell), "seeds": _seed_list(cell),
                         **{stage: cell[metric].mean() for stage, metric in STAGE_RATIOS.items()},
                         "error_before": 100.0 - cell[BASELINE_TEST_ACC].mean(),
                         "error_after": 100.0 - cell[TEST_ACC].mean(),
                         ACC_DROP: cell[ACC_DROP].mean(), BITS_PER_WEIGHT: cell[BITS_PER_WEIGHT].mean()})
    return pd.DataFrame(rows, columns=STAGE_COLUMNS)


def plot_deep_compression_stages(stages: pd.DataFrame) -> Figure:
    """The compression ratio after each stage (log scale), the paper's bars beside the runs', one panel per model."""
    models = list(stages["model"].unique()) if not stages.empty else []
    figure, axes = _facet_grid(1, max(len(models), 1), width=4.5, height=3.5)
    for ax, model in zip(axes[0], models):
        bars = stages[stages["model"] == model].melt(id_vars="source", value_vars=list(STAGE_RATIOS),
                                                     var_name="stage", value_name="ratio")
        sns.barplot(data=bars, x="stage", y="ratio", hue="source", ax=ax)
        ax.set_yscale("log")
        ax.set_title(f"{model}: compression ratio after each stage", fontsize=10)
        ax.legend(fontsize=7)
    return figure


def deep_compression_layers(run_id: str, tracking_uri: str | None = None,
                            paper_kept: dict[str, dict[str, float]] | None = None) -> pd.DataFrame:
    """One run's per-layer table (cluster_summary.csv) as the paper's Tables 2 and 3: weights, kept % beside
    the paper's, index bits, Huffman-coded bits per index and per value, the bytes of each stage and the
    layer's ratio (dense fp32 bytes / Huffman-coded bytes), then a `total` row (sums; kept % and bits weighted
    by the weights each layer keeps). Biases, codebooks and the file's header are not in it: the run's
    compression_ratio_huffman counts them.

    Raises:
        ValueError: the run has no cluster_summary.csv (it did not cluster).
    """
    paper_kept = DEEP_COMPRESSION_PAPER_KEPT if paper_kept is None else paper_kept
    client = open_client(tracking_uri)
    table = read_csv_artifact(client, run_id, CLUSTER_SUMMARY)
    if table is None:
        raise ValueError(f"run {run_id} has no {CLUSTER_SUMMARY}: not a clustered (deep_compression) run")
    model = client.get_run(run_id).data.tags.get("model", "")
    table["paper_kept_percent"] = table["layer"].map(paper_kept.get(model, {}))
    kept = table["weights"] * table["kept_percent"] / 100.0
    total: dict[str, Any] = {"layer": "total", **table[["weights", "bytes_dense", "bytes_pruned", "bytes_quantized",
                                                        "bytes_huffman"]].sum().to_dict()}
    total["kept_percent"] = 100.0 * kept.sum() / total["weights"]
    for column in ("huffman_bits_per_index", "huffman_bits_per_value"):
        total[column] = float((table[column] * kept).sum() / kept.sum()) if kept.sum() else math.nan
    table = pd.concat([table, pd.DataFrame([total])], ignore_index=True).astype({"weights": int})
    table["ratio"] = table["bytes_dense"] / table["bytes_huffman"]
    return table[LAYER_STAGE_COLUMNS]
