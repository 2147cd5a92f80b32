"""One live job per run folder: rank 0 holds `run.lock` while the job runs, so a second job (a resubmission while
the first still trains, a duplicate array task) cannot write the same checkpoints.

The lock file names its holder (host, pid, the process's start time, the machine's boot id, the Slurm job and
restart count) and is touched every `HEARTBEAT` seconds. A lock whose holder is dead is taken over: on the same
host at once (the pid is gone or belongs to another process); for a requeued Slurm job at once (same job id,
another restart count); for another host once its heartbeat has not moved for `STALE_AFTER` seconds. Creating
and taking over are atomic (link, rename), so two starters never both win; a holder that finds its lock taken
stops at once rather than write beside the new one.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)
LOCK_FILE = "run.lock"
HEARTBEAT = 10.0  # seconds between touches of the lock file
STALE_AFTER = 60.0  # a foreign host's lock whose heartbeat has not moved for this long is a dead job's
LOST_LOCK_EXIT = 75


class RunLockedError(RuntimeError):
    """Another live job holds the run folder."""


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError:
        return None


def process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, from /proc), to tell it from a later process that
    reuses its pid; None where /proc is missing or the process is gone."""
    stat = _read(f"/proc/{pid}/stat")
    return stat.rsplit(")", 1)[1].split()[19] if stat else None


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, and enough to tell whether that process still lives."""

    token: str
    host: str
    pid: int
    started: str | None
    boot_id: str | None
    slurm_job: str | None
    slurm_restart: str | None
    since: str

    @classmethod
    def me(cls) -> Holder:
        return cls(uuid.uuid4().hex, socket.gethostname(), os.getpid(), process_start(os.getpid()),
                   (_read("/proc/sys/kernel/random/boot_id") or "").strip() or None,
                   os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_RESTART_COUNT", "0"),
                   time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError):
            return None

    def describe(self) -> str:
        job = f", Slurm job {self.slurm_job}" if self.slurm_job else ""
        return f"{self.host} pid {self.pid}{job}, since {self.since}"

    def alive(self, me: Holder) -> bool | None:
        """Whether this holder still runs; None when it cannot be told from here (another host)."""
        if self.slurm_job and self.slurm_job == me.slurm_job and self.slurm_restart != me.slurm_restart:
            return False  # Slurm requeued this very job: its earlier run is over
        if self.host != me.host or self.boot_id != me.boot_id:
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # exists, another user's
        return self.started is None or process_start(self.pid) == self.started


class RunLock:
    """`with RunLock(folder):` holds `folder/run.lock` for the block (see the module docstring)."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_FILE
        self.me = Holder.me()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):  # each round: create, or judge and take over the lock found
            if self._create():
                self._beat = threading.Thread(target=self._heartbeat, name="run-lock heartbeat", daemon=True)
                self._beat.start()
                return
            text = _read(str(self.path))
            if text is None:
                continue  # released meanwhile
            holder = Holder.parse(text)
            alive = holder.alive(self.me) if holder else False  # an unreadable lock is no one's
            if alive is None:
                alive = self._heartbeat_moves()
            if alive:
                raise RunLockedError(
                    f"{self.path.parent} is in use by {holder.describe()}: two jobs must not write one run folder. "
                    f"Wait for that job to end, or stop it (a dead job's lock is taken over: on its host at once, "
                    f"from another host after {STALE_AFTER:.0f} s without its heartbeat)")
            self._take_over(text, holder)
        raise RunLockedError(f"{self.path}: could not take the lock (it keeps changing hands)")

    def _create(self) -> bool:
        """Atomically create the lock with our record (link fails if it exists, also on NFS)."""
        tmp = self.path.with_name(f".{LOCK_FILE}.{self.me.token}")
        tmp.write_text(json.dumps(asdict(self.me)), encoding="utf-8")
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def _heartbeat_moves(self) -> bool | None:
        """Watch a foreign host's lock for up to STALE_AFTER seconds: True once its heartbeat moves, False if it
        stands still that long, None if the lock went away meanwhile."""
        try:
            first = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return None
        log.info("%s is held by another host; waiting up to %.0f s for its heartbeat", self.path, STALE_AFTER)
        deadline = time.monotonic() + STALE_AFTER
        while time.monotonic() < deadline:
            time.sleep(min(1.0, STALE_AFTER / 10))
            try:
                if self.path.stat().st_mtime_ns != first:
                    return True
            except FileNotFoundError:
                return None
        return False

    def _take_over(self, text: str, holder: Holder | None) -> None:
        """Move the dead holder's lock aside, unless it changed hands meanwhile (then put it back)."""
        aside = self.path.with_name(f".{LOCK_FILE}.stale.{self.me.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if aside.read_text(encoding="utf-8") != text:  # a live starter's fresh lock: restore it
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        else:
            log.warning("took over the run lock of %s, which is no longer running",
                        holder.describe() if holder else "an unreadable lock file")
        aside.unlink()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            holder = Holder.parse(_read(str(self.path)) or "")
            if holder is None or holder.token != self.me.token:
                log.critical("the run lock %s was taken over by %s while this job ran (was this process "
                             "stopped?); stopping at once so that two jobs do not write one run folder", self.path,
                             holder.describe() if holder else "no one")
                os._exit(LOST_LOCK_EXIT)
            try:
                os.utime(self.path)
            except FileNotFoundError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        holder = Holder.parse(_read(str(self.path)) or "")
        if holder is not None and holder.token == self.me.token:
            self.path.unlink()
