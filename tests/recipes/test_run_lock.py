"""One live job per run folder: a live holder's lock is refused, a dead one's is taken over (same host at once, a
requeued Slurm job at once, another host once its heartbeat stands still), and a holder that loses its lock
stops."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from recipes import run_lock
from recipes.run_lock import LOCK_FILE, LOST_LOCK_EXIT, Holder, RunLock, RunLockedError, process_start
from tests.conftest import REPO


def plant(folder: Path, holder: Holder) -> Path:
    """A lock file as another job would have left it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    path.write_text(json.dumps(asdict(holder)))
    return path


def test_lock_is_exclusive_and_released(tmp_path):
    with RunLock(tmp_path) as lock:
        held = json.loads((tmp_path / LOCK_FILE).read_text())
        assert held["pid"] == os.getpid() and held["token"] == lock.me.token
        with pytest.raises(RunLockedError, match=rf"{tmp_path} is in use by .* pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_live_process_on_this_host_keeps_its_lock_and_a_dead_ones_is_taken_over(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        them = replace(Holder.me(), token="theirs", pid=sleeper.pid, started=process_start(sleeper.pid))
        plant(tmp_path, them)
        with pytest.raises(RunLockedError, match=f"pid {sleeper.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    with RunLock(tmp_path) as lock:  # its process is gone: taken over at once
        assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == lock.me.token
    plant(tmp_path, replace(Holder.me(), token="reused", started="1"))  # our pid, but another process's start time
    with RunLock(tmp_path):
        pass


def test_a_requeued_slurm_job_takes_over_its_earlier_runs_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    plant(tmp_path, replace(Holder.me(), token="before", host="node-a", slurm_restart="0", boot_id="x"))
    with RunLock(tmp_path):
        pass


def test_another_hosts_lock_is_waited_for_until_its_heartbeat_stops(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "STALE_AFTER", 1.0)
    path = plant(tmp_path, replace(Holder.me(), token="remote", host="node-b", boot_id="y"))
    stop = threading.Event()

    def beat():
        while not stop.wait(0.05):
            os.utime(path)

    beating = threading.Thread(target=beat)
    beating.start()
    try:
        with pytest.raises(RunLockedError, match="in use by node-b pid"):
            RunLock(tmp_path).acquire()
    finally:
        stop.set()
        beating.join()
    started = time.monotonic()
    with RunLock(tmp_path) as lock:  # no heartbeat any more: taken over after STALE_AFTER
        assert time.monotonic() - started >= 1.0
        assert json.loads(path.read_text())["token"] == lock.me.token


def test_a_holder_whose_lock_was_taken_stops_at_once(tmp_path):
    script = (f"import time\nfrom recipes import run_lock\nrun_lock.HEARTBEAT = 0.1\n"
              f"run_lock.RunLock({str(tmp_path)!r}).acquire()\nprint('held', flush=True)\ntime.sleep(30)\n")
    holder = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        plant(tmp_path, replace(Holder.me(), token="usurper"))
        assert holder.wait(timeout=10) == LOST_LOCK_EXIT
    finally:
        holder.kill()
        holder.wait()
