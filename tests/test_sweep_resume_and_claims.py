"""Sweeps that survive failures: resuming a sweep folder, and parallel jobs sharing one baseline."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lightning_modules.contract import (
    BASELINE_RUN_TAG, HOST_TAG, PID_TAG, FINGERPRINT_TAG, JOB_TAG, ROLE_SWEEP, ROLE_TAG,
)
from lightning_modules.tracking import Store, open_run, wait_for_baseline, won_claim
from tests.conftest import FAST, all_runs, run_train


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(f"sqlite:///{tmp_path / 'mlflow.db'}", "claims")


def _claim(store: Store, fingerprint: str, **tags: str):
    return open_run(store, "baseline", {FINGERPRINT_TAG: fingerprint, **tags}, None)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_oldest_claim_on_a_baseline_wins(store: Store) -> None:
    first, second = _claim(store, "abc"), _claim(store, "abc")
    assert won_claim(store, "abc", first.run_id)
    assert not won_claim(store, "abc", second.run_id)
    assert won_claim(store, "other", _claim(store, "other").run_id)  # claims on other baselines do not compete


def test_a_claim_whose_process_is_gone_is_killed_and_retaken(store: Store) -> None:
    dead = _claim(store, "abc", **{PID_TAG: str(_dead_pid())})
    assert wait_for_baseline(store, "abc", timeout_s=0) is None  # nobody alive trains it: train it here
    assert store.client.get_run(dead.run_id).info.status == "KILLED"
    assert "is gone" in store.client.get_run(dead.run_id).data.tags["error"]
    assert won_claim(store, "abc", _claim(store, "abc").run_id)


def test_waiting_returns_the_finished_baseline_and_times_out_on_a_live_claim(store: Store) -> None:
    elsewhere = _claim(store, "abc", **{HOST_TAG: "another-machine"})
    with pytest.raises(TimeoutError, match="tracking.baseline_wait_s"):
        wait_for_baseline(store, "abc", timeout_s=0)
    store.client.set_terminated(elsewhere.run_id, "FINISHED")
    assert wait_for_baseline(store, "abc", timeout_s=0) == elsewhere.run_id


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "tracking.claim_settle_s=2"],
                                      ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                                       "tracking.claim_settle_s=2"]],
                         ids=["joblib", "submitit_local"])
def test_parallel_jobs_train_a_missing_baseline_once(tmp_path: Path, store_uri: str, launcher: list[str]) -> None:
    if "submitit" in launcher[0]:
        pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[cluster]'")
    result = run_train(["-m", *FAST, "model=lenet300", "method=magnitude", "method.sparsity=0.5,0.8",
                        "method.fine_tune.epochs=1", *launcher], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = all_runs(store_uri)
    baselines = [run for run in runs if FINGERPRINT_TAG in run.data.tags]
    assert [run.info.status for run in baselines] == ["FINISHED"]
    pruned = [run for run in runs if run.data.tags.get("method") == "magnitude"]
    assert len(pruned) == 2
    assert {run.data.tags[BASELINE_RUN_TAG] for run in pruned} == {baselines[0].info.run_id}


@pytest.mark.slow
def test_a_resumed_sweep_reruns_only_the_jobs_that_did_not_finish(tmp_path: Path, store_uri: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKBENCH_TEST_PREEMPT", "1")
    sweep = ["-m", *FAST, "model=lenet300", "method=baseline",
             "model.net._target_=lightning_modules.models.LeNet300,tests.helpers.PreemptedNet"]
    first = run_train(sweep, tmp_path)
    assert first.returncode == 1 and "1 of 2 runs FAILED" in first.stderr

    monkeypatch.delenv("WORKBENCH_TEST_PREEMPT")  # the cause is gone: resume the same sweep folder
    second = run_train(sweep, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "already FINISHED in this sweep" in second.stderr + second.stdout

    jobs = [run for run in all_runs(store_uri) if run.data.tags.get(JOB_TAG)]
    by_job = {}
    for run in jobs:
        by_job.setdefault(run.data.tags[JOB_TAG], []).append(run.info.status)
    assert sorted(sorted(statuses) for statuses in by_job.values()) == [["FAILED", "FINISHED"], ["FINISHED"]]
    parent = next(run for run in all_runs(store_uri) if run.data.tags.get(ROLE_TAG) == ROLE_SWEEP)
    assert parent.info.status == "FINISHED"
    assert "2 runs" in second.stdout  # the grid shows each job's last attempt
