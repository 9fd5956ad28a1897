"""A quiet machine while a run times: the workbench's jobs on one machine pause while one of them times.

Two jobs of a parallel sweep share the cores: one that times its model while the other trains reads a
speedup 7-53% off (scripts/benchmark_latency_noise.py), so parallel sweeps either ran one job at a time
or logged `latency_noisy` timings. Here every job holds a shared lock while it computes (`busy`: the
whole run), and steps aside at its next safe point (`step_aside_if_asked`: every training, validation and
test batch, through the StepAsideForTiming callback) when another job asks to time (`timing_alone`):
the timer takes the lock exclusively, times on a machine where the workbench's other jobs sleep, and
lets them go on. Timings stay serial; everything else runs in parallel.

Two lock files (fcntl.flock, released by the kernel when a process dies, so a killed job never leaves
the others waiting): `gate`, which a timer holds exclusively from the moment it asks, and `machine`,
which busy jobs hold shared and a timer exclusively. A busy job tests the gate at each safe point (one
non-blocking system call): when a timer holds it, the job lets go of `machine`, waits for the gate, and
takes `machine` again. A job never waits for the gate while it holds `machine` (that would deadlock two
timers), and a job that waits for another (a baseline being trained elsewhere) steps aside meanwhile
(`idle`). Every wait has a deadline: past it, a timer times anyway and says it was not alone.

The lock files live in `<temp dir>/workbench-timing-<uid>/` (one set per user and machine), or the
folder named by the environment variable WORKBENCH_TIMING_LOCK_DIR. `hardware.latency.exclusive: false`
turns the pausing off for a run (it then neither pauses for others nor asks them to pause).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl

log = logging.getLogger(__name__)

LOCK_DIR_ENV = "WORKBENCH_TIMING_LOCK_DIR"
POLL_S = 0.005  # between non-blocking attempts while waiting: a paused job costs no CPU
TIMER_WAIT_S = 300.0  # a timer waits at most this long for the others to step aside (a resnet20 batch takes < 1 s)
BUSY_WAIT_S = 1800.0  # a paused job waits at most this long for a timer (a timer holds the lock for seconds)


def lock_dir() -> Path:
    """The folder of the lock files: one per user on this machine, unless WORKBENCH_TIMING_LOCK_DIR says."""
    named = os.environ.get(LOCK_DIR_ENV)
    return Path(named) if named else Path(tempfile.gettempdir()) / f"workbench-timing-{os.getuid()}"


@dataclass
class Alone:
    """What `timing_alone` got: whether every other job stepped aside, and how long that took."""

    alone: bool
    waited_s: float
    asked: bool = True  # False where pausing is off (hardware.latency.exclusive=false): nobody was asked

    @property
    def gave_up_after_s(self) -> float | None:
        """Seconds the timer waited before timing beside jobs that did not pause, or None."""
        return None if self.alone or not self.asked else self.waited_s


class TimingLock:
    """This process's side of the machine-wide lock (one per process: `the_lock()`)."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder
        self.enabled = True
        self._gate: int | None = None
        self._machine: int | None = None
        self._busy = 0  # nesting depth of busy()
        self._timing = 0  # nesting depth of timing_alone()
        self._holds_machine = False
        self._alone = Alone(True, 0.0)

    # ------------------------------------------------------------------ the three ways a job takes part

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Hold the machine shared: a timer waits for this job to step aside. Nested calls are free."""
        if not self.enabled or self._timing:
            yield
            return
        self._busy += 1
        try:
            if self._busy == 1:
                self._join()
            yield
        finally:
            self._busy -= 1
            if self._busy == 0:
                self._release_machine()

    def step_aside_if_asked(self) -> None:
        """A safe point of a busy job: when a timer has asked, sleep until it is done."""
        if not self.enabled or not self._busy or self._timing or not self._holds_machine:
            return
        if self._try(self._gate_fd(), fcntl.LOCK_SH):
            fcntl.flock(self._gate_fd(), fcntl.LOCK_UN)  # nobody asked
            return
        self._release_machine()
        self._join()

    @contextlib.contextmanager
    def idle(self) -> Iterator[None]:
        """A busy job that waits for something outside it (another job's baseline): step aside meanwhile."""
        if not self.enabled or not self._busy or self._timing:
            yield
            return
        self._release_machine()
        try:
            yield
        finally:
            self._join()

    @contextlib.contextmanager
    def timing_alone(self, max_wait_s: float = TIMER_WAIT_S) -> Iterator[Alone]:
        """Hold the machine exclusively: the other jobs pause at their next safe point. Nested calls are free."""
        if not self.enabled:
            yield Alone(False, 0.0, asked=False)
            return
        if self._timing:
            self._timing += 1
            try:
                yield self._alone
            finally:
                self._timing -= 1
            return
        self._timing = 1
        was_busy = self._holds_machine
        self._release_machine()  # never wait for the gate while holding the machine
        started = time.monotonic()
        deadline = started + max_wait_s
        got_gate = self._wait(self._gate_fd(), fcntl.LOCK_EX, deadline)
        alone = got_gate and self._wait(self._machine_fd(), fcntl.LOCK_EX, deadline)
        self._alone = Alone(alone, time.monotonic() - started)
        if not alone:
            log.warning("timing without the machine to itself: other jobs did not step aside within %.0f s "
                        "(the timing is marked noisy)", max_wait_s)
        try:
            yield self._alone
        finally:
            self._timing = 0
            if alone:
                fcntl.flock(self._machine_fd(), fcntl.LOCK_UN)
            if was_busy and self._busy:  # take the machine back before the others may run again
                self._wait(self._machine_fd(), fcntl.LOCK_SH, time.monotonic() + BUSY_WAIT_S)
                self._holds_machine = True
            if got_gate:
                fcntl.flock(self._gate_fd(), fcntl.LOCK_UN)

    # ------------------------------------------------------------------ the locks

    def _join(self) -> None:
        """Wait until no timer holds the gate, then hold the machine shared."""
        deadline = time.monotonic() + BUSY_WAIT_S
        if not self._wait(self._gate_fd(), fcntl.LOCK_SH, deadline):
            log.warning("a timing job held the machine for over %.0f s: going on beside it", BUSY_WAIT_S)
            return
        try:
            # the gate is ours (shared): no timer can hold the machine now, so this returns at once
            self._holds_machine = self._wait(self._machine_fd(), fcntl.LOCK_SH, deadline)
        finally:
            fcntl.flock(self._gate_fd(), fcntl.LOCK_UN)

    def _release_machine(self) -> None:
        if self._holds_machine:
            fcntl.flock(self._machine_fd(), fcntl.LOCK_UN)
            self._holds_machine = False

    @staticmethod
    def _try(fd: int, mode: int) -> bool:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _wait(self, fd: int, mode: int, deadline: float) -> bool:
        while not self._try(fd, mode):
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_S)
        return True

    def _gate_fd(self) -> int:
        if self._gate is None:
            self._gate = self._open("gate")
        return self._gate

    def _machine_fd(self) -> int:
        if self._machine is None:
            self._machine = self._open("machine")
        return self._machine

    def _open(self, name: str) -> int:
        folder = self.folder or lock_dir()
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        return os.open(folder / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


_LOCK = TimingLock()


def the_lock() -> TimingLock:
    """This process's TimingLock."""
    return _LOCK


def timing_alone(max_wait_s: float = TIMER_WAIT_S) -> contextlib.AbstractContextManager[Alone]:
    return _LOCK.timing_alone(max_wait_s)


def busy() -> contextlib.AbstractContextManager[None]:
    return _LOCK.busy()


def idle() -> contextlib.AbstractContextManager[None]:
    return _LOCK.idle()


def step_aside_if_asked() -> None:
    _LOCK.step_aside_if_asked()


def set_exclusive(enabled: bool) -> None:
    """hardware.latency.exclusive: whether this process pauses for other jobs' timings and asks them to."""
    _LOCK.enabled = bool(enabled)


class StepAsideForTiming(pl.Callback):
    """Steps aside before every batch when another job asks to time (a batch of resnet20 lasts < 1 s)."""

    def on_train_batch_start(self, *args) -> None:
        step_aside_if_asked()

    def on_validation_batch_start(self, *args) -> None:
        step_aside_if_asked()

    def on_test_batch_start(self, *args) -> None:
        step_aside_if_asked()
