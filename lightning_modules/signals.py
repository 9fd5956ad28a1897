"""Signals that end a run: it is recorded KILLED, with the signal as its `error` tag, never left RUNNING.

SIGTERM is what `timeout`, Slurm at a time limit or on preemption, `docker stop` and `kill` send;
SIGINT is Ctrl-C; SIGHUP a closed terminal. Each raises RunKilled in the main thread, wherever the
run is (training, measuring, compiling, exporting); `tracking.closing_run` records the run KILLED
and lets it go on up, so a sweep closes its parent run KILLED too and the process exits with
128 + the signal's number, as a shell reports a process killed by it. A relaunched sweep reruns
the job (and its training resumes from the last checkpoint).

Under submitit, the preemption signal (SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise) is
submitit's: it requeues the job and exits. The handler here notes the signal first and then hands
over to submitit's, so the run it interrupts is recorded KILLED (preempted) as well.

A signal that comes while the main thread writes to the store waits until the write is done
(`signals_held`): raised inside SQLAlchemy mid-transaction, it left the SQLite file write-locked by a
connection nothing would close, and recording the run KILLED then failed with "database is locked".
"""

from __future__ import annotations

import _thread
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

REASONS = {
    signal.SIGTERM: "terminated (a timeout, a Slurm time limit or preemption, docker stop or kill)",
    signal.SIGINT: "interrupted (Ctrl-C)",
    signal.SIGHUP: "hung up (its terminal closed)",
}
PREEMPTION_SIGNAL_ENV = "SUBMITIT_PREEMPT_SIGNAL"  # submitit's own variable: the signal it requeues on


class RunKilled(BaseException):
    """A signal ended the run. A BaseException, like KeyboardInterrupt: no `except Exception` of a
    library or of the workbench swallows it on its way up."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        name = signal.Signals(self.signum).name
        super().__init__(f"killed by {name}: {REASONS.get(self.signum, 'preempted or timed out (submitit requeues it)')}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


KILLED_BY = "workbench_killed_by"  # set on what a chained handler (submitit's requeue) raises: the signal


def kill_reason(error: BaseException) -> RunKilled | None:
    """The RunKilled behind `error`: itself, a KeyboardInterrupt (SIGINT without the handler), or
    what a chained handler (submitit's requeue: SystemExit) raised while it handled a signal. Asking
    counts as seeing it: the signal is not delivered again."""
    if isinstance(error, RunKilled):
        return _seen(error)
    if isinstance(error, KeyboardInterrupt):
        return _seen(RunKilled(signal.SIGINT))
    killed = getattr(error, KILLED_BY, None)
    return _seen(killed) if killed is not None else None


# A handler's exception can land where Python swallows it (a weakref callback or __del__ running when the
# signal arrives: "Exception ignored in ..."), and the process would go on as if nothing came. So the first
# signal also starts a watchdog that delivers it again every few seconds until the RunKilled has been seen
# on its way up (kill_reason, which closing_run and train.py call).
REDELIVER_S = 5.0
_pending: list[RunKilled] = []  # the signal being acted on, until its RunKilled is seen


_held_depth = 0  # how many signals_held sections the main thread is inside
_held_back: list[RunKilled] = []  # a signal that came inside one: raised when the outermost one ends


def _raise_killed(signum: int, frame) -> None:
    killed = RunKilled(signum)
    if not _pending:
        _pending.append(killed)
        threading.Thread(target=_redeliver_until_seen, args=(killed,), daemon=True, name="redeliver-signal").start()
    if _held_depth:
        _held_back[:] = _held_back or [killed]
        return
    raise killed


@contextmanager
def signals_held() -> Iterator[None]:
    """While the main thread is inside, a signal does not interrupt it: its RunKilled is raised when the
    outermost section ends (a store write completes, or fails and rolls back, before the run ends; its
    error, if any, stays attached as the context). In other threads nothing changes: signals only ever
    interrupt the main thread."""
    global _held_depth
    main = threading.current_thread() is threading.main_thread()
    _held_depth += main
    try:
        yield
    finally:
        _held_depth -= main
        if main and not _held_depth and _held_back:
            raise _held_back.pop()


def _redeliver_until_seen(killed: RunKilled) -> None:
    while True:
        time.sleep(REDELIVER_S)
        if not _pending or _pending[0] is not killed:
            return
        _thread.interrupt_main(killed.signum)  # runs the handler in the main thread again


def _seen(killed: RunKilled) -> RunKilled:
    _pending.clear()
    _held_back.clear()
    return killed


def _preemption_signal() -> signal.Signals | None:
    name = "SIG" + os.environ.get(PREEMPTION_SIGNAL_ENV, "USR2")
    return getattr(signal, name, None)


@contextmanager
def runs_end_killed_on_signals() -> Iterator[None]:
    """While inside: SIGTERM, SIGINT and SIGHUP raise RunKilled; the preemption signal is noted, then
    handled by the handler installed before (submitit's), if any. Handlers are restored on the way out.
    Only the main thread can install handlers: elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _raise_killed) for signum in REASONS}
    preemption = _preemption_signal()
    if preemption is not None and callable(earlier := signal.getsignal(preemption)):
        def note_then_hand_over(signum: int, frame) -> None:
            try:
                earlier(signum, frame)  # returns when it is not the job's main task: the run goes on
            except BaseException as error:  # its exit (after requeuing): the run ends KILLED on the way out
                setattr(error, KILLED_BY, RunKilled(signum))
                raise

        previous[preemption] = signal.signal(preemption, note_then_hand_over)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _pending.clear()
        _held_back.clear()
