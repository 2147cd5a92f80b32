"""A real one-node Slurm cluster on localhost for the tests marked `slurm`: Debian's slurm-wlm and munge, with every
file (slurm.conf, munge key and socket, state, spool, logs, pid files) in one temporary folder and free ports, so
nothing outside it is written and a running system Slurm or munge is left alone. The daemons stop by their pids."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
PACKAGES = ("slurm-wlm", "munge")


def missing_binaries() -> list[str]:
    return [name for name in BINARIES if shutil.which(name) is None]


def install() -> str | None:
    """Install Slurm and munge from Debian's registry when they are missing and this is root; None when they are
    there, else the reason they are not."""
    if not missing_binaries():
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return (f"Slurm is not installed ({', '.join(missing_binaries())} missing), and installing "
                f"{' and '.join(PACKAGES)} needs root and apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            return f"{' '.join(command)} failed: {done.stderr[-500:]}"
    return None if not missing_binaries() else f"still missing after the install: {missing_binaries()}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    """munged + slurmctld + slurmd for this host, configured in a fresh temporary folder."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="grafting-slurm-"))
        self.root.chmod(0o755)  # munged wants its socket's folders open to everyone (they hold nothing secret)
        self.conf = self.root / "slurm.conf"
        self.pid_files = {"slurmd": self.root / "slurmd.pid", "slurmctld": self.root / "slurmctld.pid",
                          "munged": self.root / "munge" / "munged.pid"}

    @property
    def env(self) -> dict[str, str]:
        """The environment that points Slurm's commands at this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> None:
        try:
            self._start_munge()
            self._write_conf()
            for daemon in ("slurmctld", "slurmd"):
                subprocess.run([daemon, "-f", str(self.conf)], env=self.env, check=True, capture_output=True,
                               timeout=60)
            self._wait_until_idle()
        except BaseException:
            self.stop()
            raise

    def _start_munge(self) -> None:
        keys, sockets = self.root / "munge", self.root / "socket"
        keys.mkdir(mode=0o700)
        sockets.mkdir(mode=0o755)
        subprocess.run(["mungekey", "--create", "--keyfile", str(keys / "munge.key")], check=True, capture_output=True)
        self.munge_socket = sockets / "munge.socket"
        subprocess.run(["munged", f"--socket={self.munge_socket}", f"--key-file={keys / 'munge.key'}",
                        f"--log-file={keys / 'munged.log'}", f"--pid-file={self.pid_files['munged']}",
                        f"--seed-file={keys / 'munged.seed'}"], check=True, capture_output=True, timeout=60)

    def _write_conf(self) -> None:
        host = socket.gethostname()
        (self.root / "state").mkdir()
        (self.root / "spool").mkdir()
        self.conf.write_text("\n".join([
            f"ClusterName=grafting{os.getpid()}",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            "KillWait=5",  # seconds between SIGTERM and SIGKILL when a job ends early (default 30)
            "MinJobAge=3600",  # keep finished jobs' records for the tests' checks
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.pid_files['slurmctld']}",
            f"SlurmdPidFile={self.pid_files['slurmd']}",
            f"SlurmctldLogFile={self.root / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'slurmd.log'}",
            f"NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=1000 State=UNKNOWN",
            f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n")

    def _wait_until_idle(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"the local Slurm node did not become idle (state {state!r}); see {self.root}/*.log")

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        """A Slurm command against this cluster."""
        return subprocess.run(command, env=self.env, capture_output=True, text=True, check=check, timeout=120)

    def stop(self) -> None:
        """Cancel every job, stop the daemons by their pids, remove the folder."""
        if self.pid_files["slurmctld"].is_file():
            self.run("scancel", "--user", str(os.getuid()), check=False)
            deadline = time.time() + 60
            while self.run("squeue", "-h", check=False).stdout.strip() and time.time() < deadline:
                time.sleep(0.5)
        for daemon in ("slurmd", "slurmctld", "munged"):
            pid_file = self.pid_files[daemon]
            if pid_file.is_file():
                stop_pid(int(pid_file.read_text().split()[0]))
        shutil.rmtree(self.root, ignore_errors=True)


def stop_pid(pid: int, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if the process is still there after `timeout` seconds."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + timeout
    while alive(pid):
        if time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.1)


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a parent that never reaps it counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False
