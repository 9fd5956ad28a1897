"""Parallel writers into one SQLite store: claims on a baseline made at the same moment by several
processes have one winner, and a joblib grid ends with every job FINISHED, each baseline trained
once and no "database is locked"."""

from __future__ import annotations

import importlib.util
import multiprocessing
import multiprocessing.queues
import multiprocessing.synchronize
import sys
from collections import Counter
from pathlib import Path

import pytest

from lightning_modules.contract import FINGERPRINT_TAG
from lightning_modules.tracking import Store, open_run, won_claim
from tests.conftest import ROOT, run_train


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_parallel_writers",
                                                  ROOT / "scripts" / "benchmark_parallel_writers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


bench = _load_benchmark()

CLAIMANTS, ROUNDS = 4, 5


def _claim_in_lockstep(uri: str, first: bool, created: multiprocessing.synchronize.Event,
                       start: multiprocessing.synchronize.Barrier, wins: multiprocessing.queues.Queue) -> None:
    """One process: in each round, claim baseline `round<n>` together with the others; report the rounds won.

    The first makes the schema and the experiment, alone (as a sweep's launcher does), the others wait.
    """
    store = Store(uri, "claims")
    if not first:
        created.wait(timeout=120)
    store.experiment_id
    created.set()
    won = []
    for number in range(ROUNDS):
        fingerprint = f"round{number}"
        start.wait(timeout=120)  # a claimant that died breaks the barrier: the others stop too
        claim = open_run(store, "baseline", {FINGERPRINT_TAG: fingerprint}, None)
        if won_claim(store, fingerprint, claim.run_id):
            won.append(fingerprint)
        else:
            store.client.delete_run(claim.run_id)
    wins.put(won)


def test_claims_made_at_the_same_moment_have_one_winner(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # forked (torch and MLflow already imported: seconds, not a minute); this process never opens the store,
    # so no SQLite connection crosses the fork
    context = multiprocessing.get_context("fork")
    created, start, wins = context.Event(), context.Barrier(CLAIMANTS), context.Queue()
    processes = [context.Process(target=_claim_in_lockstep, args=(uri, number == 0, created, start, wins))
                 for number in range(CLAIMANTS)]
    for process in processes:
        process.start()
    won = [wins.get(timeout=300) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    assert [process.exitcode for process in processes] == [0] * CLAIMANTS
    winners = Counter(fingerprint for rounds in won for fingerprint in rounds)
    assert winners == {f"round{number}": 1 for number in range(ROUNDS)}


@pytest.mark.slow
def test_a_16_run_grid_at_2_joblib_workers_finishes_every_job_and_trains_each_baseline_once(
        tmp_path: Path, store_uri: str) -> None:
    result = run_train(["-m", *bench.GRID, *bench.FAST, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = bench.grid_outcome(store_uri, tmp_path / "sweep", result.stdout + result.stderr)
    assert outcome.statuses == {"FINISHED": bench.GRID_JOBS}
    assert outcome.baselines_trained == {(model, seed): 1 for model in ("lenet5", "lenet300") for seed in ("0", "1")}
    assert outcome.locked == 0
