"""The MLflow store: where it is, runs with their tags and artifacts, the sweep's parent run, and
the lookup of trained baselines.

Everything goes through one `MlflowClient` per store (no global "active run"), so several runs in
one process (a multirun, a baseline trained on demand) never step on each other.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import shutil
import sqlite3
import subprocess
import tempfile
import time
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from omegaconf import DictConfig, OmegaConf

from lightning_modules.evaluation.timing_lock import idle
from lightning_modules.liveness import HEARTBEAT_S, STALE_AFTER_S, end_if_dead, end_killed, heartbeat, liveness_tags
from lightning_modules.signals import kill_reason, signals_held
from lightning_modules.contract import (
    DATA_TAG, ERROR_ARTIFACT, ERROR_TAG, EXPERIMENT, EXPERIMENT_KIND, EXPERIMENT_KIND_TAG,
    FINGERPRINT_TAG, GIT_COMMIT_TAG, GIT_DIRTY_TAG,
    HARDWARE_TAG, HOST_TAG, METHOD_TAG, PID_TAG, MODEL_ARTIFACT, MODEL_FILE, MODEL_TAG, REJECTED_TAG, SEED_TAG, STORE_ARTIFACTS,
    SWEEP_FILE,
    STORE_DB, SWEEP_TAG, resolve_store_uri, sqlite_path,
)

log = logging.getLogger(__name__)


class RunRejected(RuntimeError):
    """A run that completed its steps but whose result is not a result (a collapsed model, a
    non-finite training loss): it ends FAILED, and its message alone is the `error` tag."""


# A run's start time is taken before its row is written, so a claim opened a moment before another can
# reach the store a moment after it: a claim that looks oldest looks again this long after, and wins
# only if it still does (4 processes claiming at once: 2-3 winners in half of 40 rounds without it).
# tracking.claim_settle_s; the tests' fast settings set 0 where jobs run one at a time.
CLAIM_SETTLE_SECONDS = 2.0


class Store:
    """An MLflow tracking URI plus the experiment the workbench writes to."""

    def __init__(self, uri: str, experiment: str, heartbeat_s: float = HEARTBEAT_S,
                 stale_after_s: float = STALE_AFTER_S, claim_settle_s: float = CLAIM_SETTLE_SECONDS) -> None:
        self.uri = uri
        self.experiment = experiment
        self.heartbeat_s = heartbeat_s  # how often an open run refreshes its heartbeat tag (liveness.py)
        self.stale_after_s = stale_after_s  # a RUNNING run of another host with an older heartbeat is dead
        self.claim_settle_s = claim_settle_s  # a baseline claim that looks first looks again this much later

    @classmethod
    def from_config(cls, tracking: DictConfig, overrides: list[str] | None = None) -> Store:
        """tracking.uri given on the command line wins; then MLFLOW_TRACKING_URI; then tracking.uri from
        the config files; else the SQLite file in store_dir. `overrides`: the command line's (default:
        Hydra's, when a Hydra app runs)."""
        uri = tracking.get("uri")
        explicit = uri if uri is not None and given_on_command_line("tracking.uri", overrides) else None
        return cls(resolve_store_uri(explicit, configured=uri, store_dir=tracking.store_dir), tracking.experiment,
                   **store_settings(tracking))

    @property
    def artifact_root(self) -> str | None:
        """A local SQLite store keeps its artifacts beside the database; a server decides for itself."""
        database = sqlite_path(self.uri)
        return (database.resolve().parent / STORE_ARTIFACTS).as_uri() if database is not None else None

    @cached_property
    def client(self) -> MlflowClient:
        """The store's MlflowClient; each of its calls completes before a signal ends the run (HeldClient)."""
        if (database := sqlite_path(self.uri)) is not None:
            database.parent.mkdir(parents=True, exist_ok=True)
        if self.uri.startswith(("http://", "https://")):
            self.check_server()
        return HeldClient(MlflowClient(tracking_uri=self.uri))  # type: ignore[return-value]

    def check_server(self, timeout_s: float = 10.0) -> None:
        """Fail at once, before any work, when no MLflow server answers (the client would retry for minutes)."""
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.uri.rstrip('/')}/health", timeout=timeout_s) as response:
                if response.status == 200:
                    return
                problem = f"HTTP {response.status}"
        except OSError as error:  # refused, unknown host, timeout
            problem = str(error)
        raise ConnectionError(f"tracking.uri (or MLFLOW_TRACKING_URI) = {self.uri}: no MLflow server answers at "
                              f"{self.uri.rstrip('/')}/health ({problem}); start one with scripts/mlflow_server.sh "
                              "or use tracking=local")

    @cached_property
    def experiment_id(self) -> str:
        """The experiment, created on first use and marked as model training; an older store's
        experiment that lacks the mark gets it (one that says otherwise is left as it is)."""
        found = self.client.get_experiment_by_name(self.experiment)
        if found is None:
            return self.client.create_experiment(self.experiment, artifact_location=self.artifact_root,
                                                 tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        if EXPERIMENT_KIND_TAG not in found.tags:
            self.client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return found.experiment_id


class HeldClient:
    """An MlflowClient whose calls run inside signals_held: a SIGTERM that comes mid-write is raised once
    the write is done, not inside SQLAlchemy's transaction (which left the SQLite file locked)."""

    def __init__(self, client: MlflowClient) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute

        @functools.wraps(attribute)
        def held(*args: Any, **kwargs: Any) -> Any:
            with signals_held():
                return attribute(*args, **kwargs)

        return held


def store_settings(tracking: DictConfig) -> dict[str, float]:
    """tracking.heartbeat_s, stale_after_s and claim_settle_s as Store's keyword arguments (defaults where unset)."""
    settle = tracking.get("claim_settle_s")
    return {"heartbeat_s": float(tracking.get("heartbeat_s") or HEARTBEAT_S),
            "stale_after_s": float(tracking.get("stale_after_s") or STALE_AFTER_S),
            "claim_settle_s": float(CLAIM_SETTLE_SECONDS if settle is None else settle)}


def given_on_command_line(key: str, overrides: list[str] | None = None) -> bool:
    """Whether `key` is set by one of `overrides` (`key=...`, `+key=...`, `++key=...`); without
    `overrides`, by the command line of the running Hydra app (none: False)."""
    if overrides is None:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    return any(item.partition("=")[0].lstrip("+") == key for item in overrides)


# ----------------------------------------------------------------------------- runs


class TrackedRun:
    """Logging into one MLflow run."""

    def __init__(self, store: Store, run_id: str) -> None:
        self.store = store
        self.run_id = run_id
        self.started = time.perf_counter()  # for run_time_s: the run's wall time as tracked

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        for start in range(0, len(batch), 1000):  # MLflow's limit per batch
            self.store.client.log_batch(self.run_id, metrics=batch[start : start + 1000])

    def log_params(self, params: Mapping[str, Any]) -> None:
        batch = [Param(key, str(value)[:6000]) for key, value in params.items()]
        for start in range(0, len(batch), 100):  # MLflow's limit of params per batch
            self.store.client.log_batch(self.run_id, params=batch[start : start + 100])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.store.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_text(self, text: str, artifact_file: str) -> None:
        self.store.client.log_text(self.run_id, text, artifact_file)

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """A list of dicts as a CSV artifact (per-layer tables)."""
        if rows:
            self.log_text(csv_text(rows), artifact_file)

    def log_folder(self, folder: str | Path) -> None:
        """Every file under `folder` as artifacts, keeping the sub-folders, in one call."""
        self.store.client.log_artifacts(self.run_id, str(folder))


def csv_text(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def open_run(store: Store, name: str, tags: Mapping[str, Any], parent_run_id: str | None) -> TrackedRun:
    all_tags = {**liveness_tags(), **{key: str(value) for key, value in tags.items()}}
    if parent_run_id is not None:
        all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    run = store.client.create_run(store.experiment_id, run_name=name, tags=all_tags)
    return TrackedRun(store, run.info.run_id)


@contextmanager
def closing_run(tracked: TrackedRun) -> Iterator[TrackedRun]:
    """Close the run FINISHED, or FAILED with its error, or KILLED with the signal that ended it
    (signals.py: SIGTERM, Ctrl-C, preemption), never left RUNNING; its heartbeat beats meanwhile."""
    try:
        with heartbeat(tracked.store, tracked.run_id):
            yield tracked
    except BaseException as error:
        if (killed := kill_reason(error)) is not None:
            try:
                end_killed(tracked.store, tracked.run_id, str(killed))
            except Exception:  # the store is unreachable: the kill still ends the process (and the sweep)
                log.exception("run %s could not be recorded KILLED; the next job or sweep to start ends it "
                              "(its process is gone)", tracked.run_id)
        else:
            record_failure(tracked, error)
        raise
    tracked.store.client.set_terminated(tracked.run_id, "FINISHED")


@contextmanager
def tracked_run(store: Store, name: str, tags: Mapping[str, Any], parent_run_id: str | None) -> Iterator[TrackedRun]:
    """Open a run and close it as closing_run does."""
    with closing_run(open_run(store, name, tags, parent_run_id)) as tracked:
        yield tracked


def record_failure(run: TrackedRun, error: BaseException) -> None:
    """Mark the run FAILED, with the error as a tag (UI-searchable) and the traceback as an artifact."""
    rejected = isinstance(error, RunRejected)
    message = str(error) if rejected else f"{type(error).__name__}: {error}"
    with signals_held():  # recorded whole: a signal now waits until the run is FAILED
        try:
            run.set_tags({ERROR_TAG: message[:5000], **({REJECTED_TAG: "true"} if rejected else {})})
            run.log_text("".join(traceback.format_exception(error)), ERROR_ARTIFACT)
        finally:
            run.store.client.set_terminated(run.run_id, "FAILED")


def run_name(cfg: DictConfig) -> str:
    return f"{cfg.model.name}-{cfg.method.name}-{cfg.hardware.name}-s{cfg.seed}"


def run_tags(cfg: DictConfig, sweep: str | None) -> dict[str, str]:
    commit, dirty = git_state(str(Path(cfg.paths.root).resolve()))
    return {
        DATA_TAG: cfg.data.name, MODEL_TAG: cfg.model.name, METHOD_TAG: cfg.method.name,
        HARDWARE_TAG: cfg.hardware.name, SEED_TAG: str(cfg.seed), SWEEP_TAG: sweep or "",
        GIT_COMMIT_TAG: commit, GIT_DIRTY_TAG: str(dirty).lower(),
    }


def config_params(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config flattened to dotted keys (MLflow params), hydra's own node left out."""
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node

    walk(container, "")
    return flat


@lru_cache(maxsize=8)
def git_state(root: str) -> tuple[str, bool]:
    """(commit, has uncommitted changes) of the repository at `root`; ('unknown', False) outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, check=True).stdout
        return commit, bool(status.strip())
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False


class EpochMetricsLogger(pl.Callback):
    """Sends the epoch's logged metrics (train_loss, val_acc, ...) to the run, one batch per epoch."""

    def __init__(self, run: TrackedRun) -> None:
        self.run = run

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if value.numel() == 1}
        if metrics:
            self.run.log_metrics(metrics, step=trainer.current_epoch)


# ----------------------------------------------------------------------------- baselines


def find_baseline_run(store: Store, fingerprint: str) -> str | None:
    """Id of the newest FINISHED run that trained the baseline with this fingerprint."""
    runs = baseline_runs(store, fingerprint, "FINISHED")
    return runs[-1].info.run_id if runs else None


def baseline_runs(store: Store, fingerprint: str, status: str) -> list:
    """Runs with this baseline fingerprint and status, oldest first (ties broken by run id)."""
    runs = store.client.search_runs(
        [store.experiment_id],
        filter_string=f"tags.{FINGERPRINT_TAG} = '{fingerprint}' and attributes.status = '{status}'",
        max_results=1000,
    )
    return sorted(runs, key=lambda run: (run.info.start_time, run.info.run_id))


# Parallel jobs (joblib, submitit) may need the same missing baseline at once. The store is the
# arbiter, so it works across machines: a job that trains a baseline opens its run (tagged with the
# fingerprint) first, as a claim; the oldest RUNNING claim wins, the others delete theirs and wait
# for it to finish. A claim whose process is gone (liveness.why_dead: its pid on this host, its heartbeat
# elsewhere) is marked KILLED and retaken.
CLAIM_POLL_SECONDS = 2.0


def won_claim(store: Store, fingerprint: str, run_id: str) -> bool:
    """Whether `run_id` is the oldest live claim on the baseline (call it right after opening the run):
    it is at once and still `store.claim_settle_s` later, and no job has finished that baseline meanwhile."""
    for look in range(2 if store.claim_settle_s > 0 else 1):
        if look:
            with idle():  # a job of this machine that times meanwhile need not wait for this one
                time.sleep(store.claim_settle_s)
        claims = live_claims(store, fingerprint)
        if claims and claims[0].info.run_id != run_id:
            return False
    return find_baseline_run(store, fingerprint) is None


def wait_for_baseline(store: Store, fingerprint: str, timeout_s: float) -> str | None:
    """The FINISHED baseline run with this fingerprint, waiting while another job trains it.

    None when nobody is training it (anymore): the caller trains it.
    """
    deadline = time.monotonic() + timeout_s
    announced = False
    while True:
        finished = find_baseline_run(store, fingerprint)
        if finished is not None:
            return finished
        live = live_claims(store, fingerprint)
        if not live:
            return None
        if time.monotonic() > deadline:
            owner = live[0]
            raise TimeoutError(
                f"baseline {fingerprint} is still being trained by run {owner.info.run_id} (host "
                f"{owner.data.tags.get(HOST_TAG)}, pid {owner.data.tags.get(PID_TAG)}) after "
                f"waiting {timeout_s:.0f} s (tracking.baseline_wait_s); if that job is gone, mark its run KILLED")
        if not announced:
            log.info("baseline %s is being trained by run %s: waiting for it", fingerprint, live[0].info.run_id)
            announced = True
        with idle():
            time.sleep(CLAIM_POLL_SECONDS)


def live_claims(store: Store, fingerprint: str) -> list:
    """RUNNING claims on the baseline, oldest first, after ending KILLED those whose process is gone."""
    return [run for run in baseline_runs(store, fingerprint, "RUNNING") if not end_if_dead(store, run)]


def unfinished_attempts(store: Store, filter_string: str) -> list[str]:
    """Ids of the KILLED or FAILED runs matching `filter_string`, newest first: earlier attempts of a job
    whose training a relaunch may go on from. They stop at a rejected run (REJECTED_TAG): what trained
    before it led to a model that is not a result, and resuming it would only evaluate that model again."""
    runs = store.client.search_runs([store.experiment_id], filter_string=filter_string, max_results=100,
                                    order_by=["attributes.start_time DESC"])
    attempts = []
    for run in runs:
        if run.data.tags.get(REJECTED_TAG) == "true":
            break
        if run.info.status in ("KILLED", "FAILED"):
            attempts.append(run.info.run_id)
    return attempts


def download_model_file(store: Store, run_id: str, destination: Path) -> Path:
    return Path(store.client.download_artifacts(run_id, MODEL_ARTIFACT, str(destination)))


def download_uri(store: Store, uri: str, destination: Path) -> Path:
    """A model file from an MLflow URI (`runs:/<id>/model/model.pt`, `runs:/<id>`, `models:/<name>/<version>`).

    A URI naming a folder resolves to the workbench artifact inside it (`model/model.pt` or `model.pt`).
    """
    import mlflow.artifacts

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(destination), tracking_uri=store.uri))
    if local.is_dir():
        candidates = [local / MODEL_ARTIFACT, local / MODEL_FILE]
        local = next((path for path in candidates if path.is_file()), None)
        if local is None:
            raise FileNotFoundError(f"{uri} holds no workbench model file ({MODEL_ARTIFACT} or model.pt)")
    return local


# ----------------------------------------------------------------------------- sweeps


@dataclass(frozen=True)
class SweepInfo:
    """What every job of a multirun needs to attach its run to the sweep's parent run."""

    name: str
    tracking_uri: str
    experiment: str
    parent_run_id: str


def write_sweep_info(sweep_dir: str | Path, info: SweepInfo) -> None:
    path = Path(sweep_dir) / SWEEP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(info), indent=2))


def read_sweep_info(sweep_dir: str | Path) -> SweepInfo | None:
    path = Path(sweep_dir) / SWEEP_FILE
    return SweepInfo(**json.loads(path.read_text())) if path.exists() else None


def scratch_dir() -> tempfile.TemporaryDirectory:
    """A folder for files on their way into the store (artifacts are copied, then it is removed)."""
    return tempfile.TemporaryDirectory(prefix="workbench-")


def copy_baselines(store: Path, source: Path) -> str | None:
    """Baselines trained in another SQLite store, made available to `store` (a folder holding mlflow.db),
    so benchmarks and the scorecard do not train them again; returns what it did, or None.

    A store with no database yet gets the whole file, its experiment pointed at `store`'s own artifacts
    folder (new runs write beside the new database; the copied runs keep reading theirs where they are).
    A RUNNING run of the copy (a baseline still training there) is marked FAILED: its claim would make
    jobs here wait for it forever. A store that exists gets the FINISHED baseline runs it lacks (matched
    on their fingerprint), copied row by row with their tags, params and metrics."""
    database = store / STORE_DB
    if not database.exists():
        store.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, database)
        with sqlite3.connect(database) as connection:
            connection.execute("UPDATE experiments SET artifact_location = ? WHERE name = ?",
                               ((store.resolve() / "artifacts").as_uri(), EXPERIMENT))
            connection.execute("UPDATE runs SET status = 'FAILED' WHERE status = 'RUNNING'")
        return f"baselines copied from {source} into {database}"
    with sqlite3.connect(database) as connection:
        connection.execute("ATTACH DATABASE ? AS source", (str(source),))
        missing = [row[0] for row in connection.execute(
            "SELECT r.run_uuid FROM source.runs r JOIN source.tags t ON t.run_uuid = r.run_uuid "
            "WHERE t.key = ? AND r.status = 'FINISHED' AND t.value NOT IN "
            "(SELECT t2.value FROM main.tags t2 JOIN main.runs r2 ON r2.run_uuid = t2.run_uuid "
            " WHERE t2.key = ? AND r2.status = 'FINISHED')", (FINGERPRINT_TAG, FINGERPRINT_TAG))]
        if not missing:
            return None
        marks = ",".join("?" * len(missing))
        for table in ("runs", "tags", "params", "metrics", "latest_metrics"):
            connection.execute(f"INSERT OR REPLACE INTO main.{table} SELECT * FROM source.{table} "
                               f"WHERE run_uuid IN ({marks})", missing)
    return f"{len(missing)} baseline runs merged from {source} into {database}"
