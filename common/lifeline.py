"""Worker processes end with their launcher. torchrun starts each worker in a session of its own, so when torchrun
is SIGKILLed (by a user, or the OOM killer) its workers would train on, writing checkpoints into the folder that
the next job resumes from. Linux delivers a signal to a process whose parent dies if asked (prctl
PR_SET_PDEATHSIG); elsewhere a watchdog thread polls the parent pid. A process that must end with another one
that is not its parent (a fork server's worker, reading for the server's client) waits on a pidfd of it."""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import select
import signal
import sys
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1
WATCH_INTERVAL = 1.0  # seconds between parent checks of the watchdog


def end_with_launcher() -> None:
    """`exit_with_parent` in a worker of torchrun or the deepspeed launcher: they set LOCAL_RANK for the workers
    they start. Elsewhere nothing changes (under srun the parent is slurmstepd, which ends the job's tasks itself;
    a plain `python` may outlive its shell on purpose)."""
    if "LOCAL_RANK" in os.environ:
        exit_with_parent()


def exit_with_parent() -> None:
    """From now on this process is killed (SIGKILL) as soon as its parent dies; exits at once if it already has."""
    parent = os.getppid()
    if not _pdeathsig(signal.SIGKILL):
        _watch_in_thread(parent, lambda: os.getppid() == parent)
    if os.getppid() != parent:  # the parent died before the signal was armed
        _gone(parent)


def exit_with(pid: int) -> None:
    """From now on this process exits as soon as process `pid` ends, its parent or not; at once if it has."""
    if pid == os.getppid():
        exit_with_parent()
        return
    try:
        handle = os.pidfd_open(pid)  # Linux ≥ 5.3: readable once the process has ended
    except ProcessLookupError:
        _gone(pid)
    except (AttributeError, OSError):  # no pidfd here: poll
        _watch_in_thread(pid, lambda: _exists(pid))
    else:
        threading.Thread(target=_wait_then_exit, args=(pid, handle), name="lifeline", daemon=True).start()


def _pdeathsig(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def _watch_in_thread(pid: int, alive: Callable[[], bool]) -> None:
    def watch() -> None:
        while alive():
            threading.Event().wait(WATCH_INTERVAL)
        _gone(pid)

    threading.Thread(target=watch, name="lifeline watchdog", daemon=True).start()


def _wait_then_exit(pid: int, handle: int) -> None:
    select.select([handle], [], [])
    _gone(pid)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _gone(pid: int) -> None:
    log.error("process %d, which this one works for, is gone; exiting", pid)
    os._exit(1)
