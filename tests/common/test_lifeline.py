"""A worker ends with its launcher: SIGKILL the parent, and the child (which armed `exit_with_parent`) is gone
within seconds, by the parent-death signal or, where there is none, by the watchdog thread. The same for a
process that is not the worker's parent (`exit_with`: a fork server's worker and the server's client)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import REPO

CHILD = """
import sys, time
from common import lifeline
if sys.argv[1] == "watchdog":
    lifeline._pdeathsig = lambda sig: False  # as on a system without prctl
    lifeline.WATCH_INTERVAL = 0.1
lifeline.exit_with_parent()
print("armed", flush=True)
time.sleep(120)
"""
SERVANT = """
import os, sys, time
from common import lifeline
if sys.argv[2] == "poll":
    del os.pidfd_open  # as where there is no pidfd
    lifeline.WATCH_INTERVAL = 0.1
lifeline.exit_with(int(sys.argv[1]))
print("armed", flush=True)
time.sleep(120)
"""
PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdout=subprocess.PIPE, text=True,
                         start_new_session=True)  # its own session, as torchrun starts workers
assert child.stdout.readline().strip() == "armed"
print(child.pid, flush=True)
time.sleep(120)
"""


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("mode", ["pdeathsig", "watchdog"])
def test_a_worker_dies_with_its_killed_launcher(mode):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, mode], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    child = None
    try:
        child = int(parent.stdout.readline())
        assert psutil.pid_exists(child)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        assert gone_within(child, 5), f"worker {child} outlived its launcher"
    finally:
        parent.kill()
        parent.wait()
        if child is not None and psutil.pid_exists(child):
            os.kill(child, signal.SIGKILL)


@pytest.mark.parametrize("mode", ["pidfd", "poll"])
def test_a_worker_dies_with_the_process_it_serves_which_is_not_its_parent(mode):
    served = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    worker = subprocess.Popen([sys.executable, "-c", SERVANT, str(served.pid), mode], cwd=REPO, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert worker.stdout.readline().strip() == "armed"
        served.kill()
        if mode == "poll":  # a zombie still answers kill(pid, 0); a pidfd reports the exit at once
            served.wait()
        assert gone_within(worker.pid, 5), f"worker {worker.pid} outlived the process it serves"
    finally:
        for process in (served, worker):
            process.kill()
            process.wait()
