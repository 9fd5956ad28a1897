"""Jobs of one machine pause while one of them times (evaluation/timing_lock.py), and a timing says what else ran."""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_modules.evaluation.latency import OthersCpu
from lightning_modules.evaluation.report import noisy_timing_reason
from lightning_modules.evaluation.timing_lock import TimingLock

FORK = multiprocessing.get_context("fork")  # each child opens its own lock files (a TimingLock of its own)


def _train(folder: str, steps, stop, step_aside: bool = True) -> None:
    """A busy job: counts its batches, stepping aside before each when `step_aside`."""
    lock = TimingLock(Path(folder))
    with lock.busy():
        while not stop.is_set():
            if step_aside:
                lock.step_aside_if_asked()
            with steps.get_lock():
                steps.value += 1
            time.sleep(0.001)


def _start_training(folder: Path, step_aside: bool = True):
    steps, stop = FORK.Value("i", 0), FORK.Event()
    child = FORK.Process(target=_train, args=(str(folder), steps, stop, step_aside), daemon=True)
    child.start()
    deadline = time.monotonic() + 20
    while steps.value == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert steps.value > 0, "the training child never started"
    return child, steps, stop


def _stop(child, stop) -> None:
    stop.set()
    child.join(10)
    if child.is_alive():
        child.kill()


def test_a_busy_job_pauses_while_another_times_and_goes_on_after(tmp_path: Path) -> None:
    child, steps, stop = _start_training(tmp_path)
    try:
        with TimingLock(tmp_path).timing_alone(max_wait_s=20) as alone:
            assert alone.alone
            paused_at = steps.value
            time.sleep(0.3)
            assert steps.value == paused_at  # not one batch while the timing held the machine
        time.sleep(0.3)
        assert steps.value > paused_at  # and it trains again after
    finally:
        _stop(child, stop)


def test_a_timer_that_waits_too_long_times_anyway_and_says_so(tmp_path: Path) -> None:
    child, _, stop = _start_training(tmp_path, step_aside=False)  # a job that never reaches a safe point
    try:
        started = time.monotonic()
        with TimingLock(tmp_path).timing_alone(max_wait_s=0.3) as alone:
            assert not alone.alone
            assert 0.3 <= alone.waited_s < 5
            assert alone.gave_up_after_s == alone.waited_s  # what the run's latency_noisy reason says
        assert time.monotonic() - started < 5
    finally:
        _stop(child, stop)


def test_a_killed_job_leaves_nobody_waiting(tmp_path: Path) -> None:
    child, _, _ = _start_training(tmp_path, step_aside=False)
    os.kill(child.pid, signal.SIGKILL)  # the kernel drops its locks
    child.join(10)
    with TimingLock(tmp_path).timing_alone(max_wait_s=10) as alone:
        assert alone.alone


def _time_repeatedly(folder: str, rounds: int, done) -> None:
    """A busy job that times now and then, as a run whose gate times layers while it trains."""
    lock = TimingLock(Path(folder))
    with lock.busy():
        for _ in range(rounds):
            lock.step_aside_if_asked()
            with lock.timing_alone(max_wait_s=30) as alone:
                assert alone.alone
                time.sleep(0.002)
            with lock.idle():  # waiting for something outside the job
                time.sleep(0.001)
    with done.get_lock():
        done.value += 1


def test_two_jobs_that_both_time_while_busy_never_deadlock(tmp_path: Path) -> None:
    done = FORK.Value("i", 0)
    children = [FORK.Process(target=_time_repeatedly, args=(str(tmp_path), 100, done), daemon=True) for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
    assert done.value == 2 and all(child.exitcode == 0 for child in children)


def test_a_job_waiting_for_another_does_not_hold_the_timer(tmp_path: Path) -> None:
    waiting = TimingLock(tmp_path)
    with waiting.busy(), waiting.idle():  # e.g. waiting for a baseline another job trains
        script = ("import sys; from pathlib import Path; from lightning_modules.evaluation.timing_lock import "
                  "TimingLock\nwith TimingLock(Path(sys.argv[1])).timing_alone(max_wait_s=10) as a: print(a.alone)")
        out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                             timeout=120, cwd=Path(__file__).resolve().parents[1])
        assert out.stdout.strip() == "True", out.stderr[-2000:]


def test_turned_off_a_job_neither_pauses_nor_waits(tmp_path: Path) -> None:
    child, _, stop = _start_training(tmp_path, step_aside=False)
    try:
        lock = TimingLock(tmp_path)
        lock.enabled = False
        started = time.monotonic()
        with lock.timing_alone(max_wait_s=30) as alone:
            assert not alone.alone
            assert alone.gave_up_after_s is None  # nobody was asked to pause: not a reason to call it noisy
        assert time.monotonic() - started < 1
    finally:
        _stop(child, stop)


def test_others_cpu_counts_a_busy_neighbour_not_this_process() -> None:
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        others = OthersCpu()
        end = time.monotonic() + 0.5
        while time.monotonic() < end:  # this process's own work is not counted
            pass
        cores = others.stop()
    finally:
        spinner.kill()
        spinner.wait()
    if math.isnan(cores):
        pytest.skip("no /proc/stat here")
    assert cores > 0.5


def test_a_timing_beside_busy_processes_or_jobs_that_did_not_pause_is_noisy() -> None:
    steady = {"speedup_bs1": 1.0, "speedup_bs1_ci95_low": 0.98, "speedup_bs1_ci95_high": 1.02}
    assert noisy_timing_reason(1.9, steady, [1], 0.1, others_cores=0.02) is None  # a stale load average: not judged
    assert "0.95 cores" in noisy_timing_reason(0.2, steady, [1], 0.1, others_cores=0.95)
    assert "did not pause" in noisy_timing_reason(0.2, steady, [1], 0.1, others_cores=0.0, not_alone_after_s=300)
    assert "load 1.90" in noisy_timing_reason(1.9, steady, [1], 0.1)  # where others' CPU is not measured


def test_a_noisy_timing_is_taken_again_until_quiet_or_out_of_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from lightning_modules.evaluation import report

    readings = iter(["other processes used 0.97 cores while timing (above 0.25)", None, None])
    monkeypatch.setattr(report, "_time_once",
                        lambda *args: report.Timing({"model": {}}, 0.5, next(readings), 0.0))
    shipped = SimpleNamespace(deployment=SimpleNamespace(deployed=object()))
    hardware = OmegaConf.create({"latency": {"retries": 2, "retry_wait_s": 0}})
    timing = report.time_models(shipped, {}, (1, 28, 28), hardware, None)
    assert timing.noise is None and timing.attempts == 2  # the second was quiet: kept

    always = "speedup_bs32 0.90 has a 95% interval [0.70, 1.05] (+-22%, over 0.1)"
    monkeypatch.setattr(report, "_time_once", lambda *args: report.Timing({"model": {}}, 0.5, always, 0.0))
    once_more = OmegaConf.create({"latency": {"retries": 1, "retry_wait_s": 0}})
    timing = report.time_models(shipped, {}, (1, 28, 28), once_more, None)
    assert timing.noise == always and timing.attempts == 2  # out of retries: the last, still noisy
