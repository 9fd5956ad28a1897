"""Runs never stay RUNNING without a process: signals end them KILLED with the reason, and a run
whose process died without a word (kill -9, out of memory, a lost node) is found and ended KILLED."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_modules.checkpoints import RESUMED_AT_EPOCH
from lightning_modules.contract import CHECKPOINT_FOLDER, RESUMED_FROM_TAG
from lightning_modules.contract import ERROR_TAG, HEARTBEAT_TAG, HOST_TAG, JOB_TAG, PID_TAG, PROCESS_START_TAG, ROLE_SWEEP, ROLE_TAG
from lightning_modules.liveness import end_dead_runs, liveness_tags, process_start, why_dead
from lightning_modules.signals import RunKilled, runs_end_killed_on_signals
from lightning_modules.tracking import Store, closing_run, open_run
from tests.conftest import FAST, ROOT, all_runs, compose_config


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(f"sqlite:///{tmp_path / 'mlflow.db'}", "liveness", stale_after_s=60)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_every_run_names_its_process_and_beats() -> None:
    tags = liveness_tags()
    assert tags[HOST_TAG] == socket.gethostname() and tags[PID_TAG] == str(os.getpid())
    assert abs(float(tags[HEARTBEAT_TAG]) - time.time()) < 5
    if Path("/proc/self/stat").exists():
        assert tags[PROCESS_START_TAG] == process_start(os.getpid())


def test_why_dead_tells_a_gone_process_from_a_live_one() -> None:
    here, now = socket.gethostname(), time.time()
    assert why_dead({HOST_TAG: here, PID_TAG: str(os.getpid())}, 0, 60) is None  # this process
    assert "is gone" in why_dead({HOST_TAG: here, PID_TAG: str(_dead_pid())}, 0, 60)
    parent = os.getppid()  # alive, but a process started at another time holds the pid now
    reused = {HOST_TAG: here, PID_TAG: str(parent), PROCESS_START_TAG: "1"}
    if process_start(parent) not in (None, "1"):
        assert "later process" in why_dead(reused, 0, 60)
    elsewhere = {HOST_TAG: "another-machine", PID_TAG: "1", HEARTBEAT_TAG: f"{now - 30:.0f}"}
    assert why_dead(elsewhere, 0, stale_after_s=60, now=now) is None  # its heartbeat is fresh
    assert "no heartbeat for 130 s" in why_dead({**elsewhere, HEARTBEAT_TAG: f"{now - 130:.0f}"}, 0, 60, now=now)
    assert why_dead({}, start_time_ms=int((now - 10) * 1000), stale_after_s=60, now=now) is None  # an old run, recent
    assert "presumed gone" in why_dead({}, start_time_ms=int((now - 100) * 1000), stale_after_s=60, now=now)


def test_end_dead_runs_kills_only_the_runs_without_a_process(store: Store) -> None:
    dead = open_run(store, "dead", {PID_TAG: str(_dead_pid())}, None)
    stale = open_run(store, "stale", {HOST_TAG: "another-machine", HEARTBEAT_TAG: f"{time.time() - 3600:.0f}"}, None)
    alive = open_run(store, "alive", {}, None)
    remote = open_run(store, "remote", {HOST_TAG: "another-machine"}, None)  # fresh heartbeat
    assert sorted(end_dead_runs(store)) == sorted([dead.run_id, stale.run_id])
    status = {run_id: store.client.get_run(run_id) for run_id in (dead.run_id, stale.run_id, alive.run_id, remote.run_id)}
    assert [status[r].info.status for r in (dead.run_id, stale.run_id)] == ["KILLED", "KILLED"]
    assert "kill -9" in status[dead.run_id].data.tags[ERROR_TAG]
    assert "no heartbeat" in status[stale.run_id].data.tags[ERROR_TAG]
    assert [status[r].info.status for r in (alive.run_id, remote.run_id)] == ["RUNNING", "RUNNING"]


def test_an_open_run_refreshes_its_heartbeat(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'mlflow.db'}", "beats", heartbeat_s=0.2)
    with closing_run(open_run(store, "beating", {}, None)) as run:
        first = float(store.client.get_run(run.run_id).data.tags[HEARTBEAT_TAG])
        time.sleep(1.5)
        later = float(store.client.get_run(run.run_id).data.tags[HEARTBEAT_TAG])
    assert later > first


def test_a_signal_ends_the_open_run_killed_with_the_signal(store: Store) -> None:
    with runs_end_killed_on_signals(), pytest.raises(RunKilled) as killed:
        with closing_run(open_run(store, "terminated", {}, None)) as run:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
    assert killed.value.exit_code == 128 + signal.SIGTERM
    ended = store.client.get_run(run.run_id)
    assert ended.info.status == "KILLED"
    assert ended.data.tags[ERROR_TAG].startswith("killed by SIGTERM")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


def test_submitits_preemption_signal_requeues_and_the_run_ends_killed(store: Store) -> None:
    """Under submitit the preemption signal (SIGUSR2) is submitit's: it requeues the job and exits; the
    run it interrupts is recorded KILLED with that signal, and submitit's exit goes on unchanged."""
    requeued = []

    def submitits_handler(signum, frame):  # what submitit's checkpoint_and_try_requeue does, in short
        requeued.append(signum)
        raise SystemExit(-1)

    previous = signal.signal(signal.SIGUSR2, submitits_handler)
    try:
        with runs_end_killed_on_signals(), pytest.raises(SystemExit):
            with closing_run(open_run(store, "preempted", {}, None)) as run:
                os.kill(os.getpid(), signal.SIGUSR2)
                time.sleep(5)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert requeued == [signal.SIGUSR2]
    ended = store.client.get_run(run.run_id)
    assert ended.info.status == "KILLED"
    assert ended.data.tags[ERROR_TAG].startswith("killed by SIGUSR2: preempted or timed out")


def test_sigterm_while_the_model_is_measured_ends_the_run_killed(store_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside Trainer.fit (measuring, compiling, exporting) nothing of Lightning's handles the signal."""
    from lightning_modules import experiment

    measured = experiment.measure

    def measure_interrupted(*args, **kwargs):
        if experiment.BASELINE_METHOD in {run.data.tags.get("method") for run in all_runs(store_uri)
                                          if run.info.status == "FINISHED"}:  # the baseline is done: now the run
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        return measured(*args, **kwargs)

    monkeypatch.setattr(experiment, "measure", measure_interrupted)
    cfg = compose_config([*FAST, "model=lenet300", "method=magnitude", "method.fine_tune.epochs=1"])
    with runs_end_killed_on_signals(), pytest.raises(RunKilled):
        experiment.run_experiment(cfg)
    runs = {run.data.tags["method"]: run for run in all_runs(store_uri)}
    assert runs["baseline"].info.status == "FINISHED"  # trained before the signal
    assert runs["magnitude"].info.status == "KILLED"
    assert "SIGTERM" in runs["magnitude"].data.tags[ERROR_TAG]


def _wait_for(predicate, timeout_s: float = 120.0, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (found := predicate()):
            return found
        time.sleep(poll_s)
    raise TimeoutError("the condition did not come true in time")


@pytest.mark.slow
def test_a_sweep_terminated_mid_training_ends_killed_exits_143_and_resumes(tmp_path: Path, store_uri: str) -> None:
    sweep = ["-m", *FAST, "model=lenet300", "method=magnitude", "method.sparsity=0.5,0.8",
             "method.fine_tune.epochs=60", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
             f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *sweep], cwd=ROOT, env=os.environ.copy(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def checkpointed_job():  # a job inside Trainer.fit, with an epoch checkpointed
        return [path for path in (tmp_path / "sweep" / CHECKPOINT_FOLDER).glob("*/last.ckpt")
                if not path.parent.name.startswith("baseline-")]

    _wait_for(checkpointed_job, poll_s=0.1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]
    assert "killed by SIGTERM" in stderr
    runs = all_runs(store_uri)
    assert not [run for run in runs if run.info.status == "RUNNING"]
    killed = [run for run in runs if run.info.status == "KILLED"]
    assert {run.data.tags.get(ROLE_TAG) for run in killed} == {None, ROLE_SWEEP}  # the job's run and the sweep's
    assert all(run.data.tags[ERROR_TAG].startswith("killed by SIGTERM") for run in killed)

    resumed = subprocess.run([sys.executable, str(ROOT / "train.py"), *sweep], cwd=ROOT, env=os.environ.copy(),
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    job_runs = [run for run in all_runs(store_uri) if run.data.tags.get(JOB_TAG)]
    finished = [run for run in job_runs if run.info.status == "FINISHED"]
    assert len(finished) == 2  # one FINISHED run per job
    went_on = [run for run in finished if RESUMED_FROM_TAG in run.data.tags]
    assert [run.data.tags[RESUMED_FROM_TAG] for run in went_on] == [r.info.run_id for r in killed if not r.data.tags.get(ROLE_TAG)]
    assert went_on[0].data.metrics[RESUMED_AT_EPOCH] >= 1  # the checkpointed epochs were not trained again
    assert not (tmp_path / "sweep" / CHECKPOINT_FOLDER).exists() or not any((tmp_path / "sweep" / CHECKPOINT_FOLDER).iterdir())


def test_a_signal_whose_exception_python_swallowed_is_delivered_again(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A signal that arrives while a weakref callback or __del__ runs raises there, and Python only prints
    "Exception ignored": the signal comes again until its RunKilled is seen on the way up."""
    from lightning_modules import signals

    monkeypatch.setattr(signals, "REDELIVER_S", 0.2)
    swallowed = []
    with runs_end_killed_on_signals(), pytest.raises(RunKilled):
        with closing_run(open_run(store, "swallowed once", {}, None)) as run:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
            except RunKilled as killed:  # what Python does to an exception raised in a weakref callback
                swallowed.append(killed)
            time.sleep(5)  # the second delivery raises here
    assert len(swallowed) == 1
    assert store.client.get_run(run.run_id).info.status == "KILLED"


def test_a_signal_waits_until_the_store_write_it_interrupts_is_done() -> None:
    from lightning_modules.signals import signals_held

    with runs_end_killed_on_signals(), pytest.raises(RunKilled) as raised:
        with signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the handler has run by now, and raised nothing here
            done = True
    assert done and raised.value.signum == signal.SIGTERM


def test_sigterm_mid_write_leaves_the_sqlite_store_writable(store: Store, tmp_path: Path) -> None:
    """The CI failure of 2026-12-01: SIGTERM raised inside MLflow's SQLAlchemy transaction left the SQLite
    file write-locked, recording the run KILLED failed with "database is locked" and the sweep went on.
    Without the fix, the first or second of these kills left the lock behind."""
    import random
    import sqlite3
    import threading

    from mlflow.entities import Metric

    from lightning_modules.liveness import end_killed

    rng = random.Random(0)
    for _ in range(15):
        run_id = store.client.create_run(store.experiment_id).info.run_id
        threading.Timer(rng.uniform(0.0, 0.2), os.kill, (os.getpid(), signal.SIGTERM)).start()
        with runs_end_killed_on_signals(), pytest.raises(RunKilled):
            for step in range(100_000):  # metrics written as an epoch's end writes them
                store.client.log_batch(run_id, metrics=[Metric("loss", 1.0, 0, step), Metric("acc", 0.5, 0, step)])
        probe = sqlite3.connect(tmp_path / "mlflow.db", timeout=1.0)
        try:
            probe.execute("BEGIN IMMEDIATE")  # raises "database is locked" while another connection writes
            probe.execute("ROLLBACK")
        finally:
            probe.close()
        assert end_killed(store, run_id, "killed by SIGTERM")


def test_a_kill_that_cannot_be_recorded_still_ends_the_process(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store that fails while the kill is recorded must not turn the kill into an ordinary error (a sweep
    logs those and goes on to its next job): RunKilled goes on up, and the process exits 128 + signal."""
    from lightning_modules import tracking

    def store_down(*args, **kwargs):
        raise ConnectionError("the store is down")

    monkeypatch.setattr(tracking, "end_killed", store_down)
    with runs_end_killed_on_signals(), pytest.raises(RunKilled):
        with closing_run(open_run(store, "unrecorded kill", {}, None)):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
