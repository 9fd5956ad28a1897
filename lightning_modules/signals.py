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
"""

from __future__ import annotations

import os
import signal
import threading
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
    what a chained handler (submitit's requeue: SystemExit) raised while it handled a signal."""
    if isinstance(error, RunKilled):
        return error
    if isinstance(error, KeyboardInterrupt):
        return RunKilled(signal.SIGINT)
    return getattr(error, KILLED_BY, None)


def _raise_killed(signum: int, frame) -> None:
    raise RunKilled(signum)


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
