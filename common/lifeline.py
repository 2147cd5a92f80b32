"""Worker processes end with their launcher. torchrun starts each worker in a session of its own, so when torchrun
is SIGKILLed (by a user, or the OOM killer) its workers would train on, writing checkpoints into the folder that
the next job resumes from. Linux delivers a signal to a process whose parent dies if asked (prctl
PR_SET_PDEATHSIG); elsewhere a watchdog thread polls the parent pid."""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading

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
        threading.Thread(target=_watch, args=(parent,), name="parent watchdog", daemon=True).start()
    if os.getppid() != parent:  # the parent died before the signal was armed
        log.error("the launcher of this worker is gone; exiting")
        os._exit(1)


def _pdeathsig(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        threading.Event().wait(WATCH_INTERVAL)
    log.error("the launcher of this worker (pid %d) is gone; exiting", parent)
    os._exit(1)
