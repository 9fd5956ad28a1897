"""Which RUNNING runs still have a process behind them: no run stays RUNNING once nothing runs it.

Every run is tagged with its process (`host`, `pid`, the process's start time where /proc gives it)
and a `heartbeat` (unix seconds) that a daemon thread refreshes every `tracking.heartbeat_s` while
the run is open. `end_dead_runs` marks KILLED, with the reason as the `error` tag:
    - a run of this host whose process is gone (or whose pid now belongs to a later process);
    - a run of another host (or without a process tag) whose heartbeat is older than
      `tracking.stale_after_s` (a run that cannot be checked by pid: only its heartbeat speaks for it).
A sweep calls it when it starts or resumes, and every job when it starts; a kill -9, an OOM kill or
a lost node leaves a RUNNING run behind that the next job of the experiment ends.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from lightning_modules.contract import ERROR_TAG, HEARTBEAT_TAG, HOST_TAG, PID_TAG, PROCESS_START_TAG
from lightning_modules.signals import signals_held

if TYPE_CHECKING:
    from lightning_modules.tracking import Store

log = logging.getLogger(__name__)

HEARTBEAT_S = 60.0  # tracking.heartbeat_s: how often an open run refreshes its heartbeat tag
STALE_AFTER_S = 900.0  # tracking.stale_after_s: a heartbeat this old means the run's process is gone


def process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (/proc/<pid>/stat field 22): with the pid,
    it names one process, so a pid reused by a later process is not mistaken for the run's. None off Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]  # fields after the command name, which may hold spaces


def liveness_tags() -> dict[str, str]:
    """The tags that say which process runs a run, and its first heartbeat."""
    tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), HEARTBEAT_TAG: f"{time.time():.0f}"}
    if (started := process_start(os.getpid())) is not None:
        tags[PROCESS_START_TAG] = started
    return tags


@contextmanager
def heartbeat(store: Store, run_id: str) -> Iterator[None]:
    """Refresh the run's heartbeat tag every `store.heartbeat_s` seconds while inside (a daemon thread:
    it never keeps a killed process alive). A failed refresh is logged and tried again next time."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(store.heartbeat_s):
            try:
                store.client.set_tag(run_id, HEARTBEAT_TAG, f"{time.time():.0f}")
            except Exception as error:  # a busy store: the next beat tries again
                log.warning("heartbeat of run %s not written: %s", run_id, error)

    thread = threading.Thread(target=beat, name=f"heartbeat-{run_id[:8]}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()


def why_dead(tags: dict[str, str], start_time_ms: int, stale_after_s: float, now: float | None = None) -> str | None:
    """Why a RUNNING run with these tags has no process behind it any more, or None when it may still run."""
    now = time.time() if now is None else now
    pid = tags.get(PID_TAG, "")
    if tags.get(HOST_TAG) == socket.gethostname() and pid.isdigit():
        if int(pid) == os.getpid():
            return None
        if not _process_alive(int(pid)):
            return f"its process (pid {pid} on {tags[HOST_TAG]}) is gone: killed (kill -9, out of memory) or crashed"
        recorded, current = tags.get(PROCESS_START_TAG), process_start(int(pid))
        if recorded is not None and current is not None and recorded != current:
            return f"its process (pid {pid} on {tags[HOST_TAG]}) is gone; the pid now belongs to a later process"
        return None
    beat = tags.get(HEARTBEAT_TAG)
    last = float(beat) if beat and beat.replace(".", "", 1).isdigit() else start_time_ms / 1000.0
    if now - last > stale_after_s:
        where = f"on {tags[HOST_TAG]}" if HOST_TAG in tags else "of unknown host"
        return (f"no heartbeat for {now - last:.0f} s (tracking.stale_after_s={stale_after_s:g}): its process "
                f"{where} is presumed gone")
    return None


def end_dead_runs(store: Store) -> list[str]:
    """Mark KILLED every RUNNING run of the store's experiment whose process is gone; returns their ids."""
    ended = [run.info.run_id for run in store.client.search_runs(
        [store.experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=5000) if end_if_dead(store, run)]
    if ended:
        log.warning("marked %d RUNNING run(s) KILLED: their processes are gone (%s)", len(ended), ", ".join(ended))
    return ended


def end_if_dead(store: Store, run) -> bool:
    """Mark a RUNNING run KILLED when its process is gone (why_dead); True when it did."""
    reason = why_dead(run.data.tags, run.info.start_time, store.stale_after_s)
    return reason is not None and end_killed(store, run.info.run_id, reason)


def end_killed(store: Store, run_id: str, reason: str) -> bool:
    """Mark the run KILLED with `reason` as its error, unless it ended meanwhile; True when it did."""
    with signals_held():  # recorded whole: a second signal waits until the run is KILLED
        if store.client.get_run(run_id).info.status != "RUNNING":
            return False
        store.client.set_tag(run_id, ERROR_TAG, reason[:5000])
        store.client.set_terminated(run_id, "KILLED")
    return True


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True
