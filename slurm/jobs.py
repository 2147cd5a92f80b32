"""What a submitit job of the pipeline runs: one repository command, in the job's own processes, with its rank.

A `Command` is a module's `main(argv)` (`recipes.train`, `data.generate`, …) called in every task of a job. Rank,
world size, master address and port come from the job (submitit's `JobEnvironment`, which reads Slurm's variables
or the local executor's), or are fixed for a job-array task, which is one rank of a rank-split command. On a timeout
or a preemption submitit calls `checkpoint()`: the job is requeued with the same command, which resumes by itself
(training from its last complete checkpoint, generation and evaluation from their finished files).
"""
from __future__ import annotations

import functools
import importlib
import os
import shlex
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import submitit

from common.files import save_text


@dataclass
class Command(submitit.helpers.Checkpointable):
    """`python -m MODULE ARGV...` as a job; on success, rank 0 records it in `marker` (a finished step)."""

    module: str
    argv: list[str]
    cwd: str  # relative paths in argv and in recipes are relative to where the launcher ran
    marker: str
    rank: int | None = None  # a job-array task: this rank of `world_size`, one process
    world_size: int | None = None

    def __call__(self) -> str:
        handle_signals_in_this_process_only()
        os.chdir(self.cwd)
        if self.rank is None:
            env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                                        overwrite=True)
            rank, tasks = env.rank, env.local_world_size
        else:
            os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
            rank, tasks = self.rank, 1
        limit_threads(tasks)
        result = importlib.import_module(self.module).main(self.argv)
        if rank == 0:
            save_text(self.line(), self.marker)
        return str(result)

    def line(self) -> str:
        """The command as a shell line: what a finished step's marker holds."""
        return shlex.join(["python", "-m", self.module, *self.argv])


def handle_signals_in_this_process_only() -> None:
    """Slurm signals every process of a job step, DataLoader workers included, and a forked worker inherits
    submitit's handlers: it would checkpoint and requeue the job a second time, racing the task itself."""
    pid = os.getpid()
    for signum in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGCONT):
        handler = signal.getsignal(signum)
        if callable(handler):
            signal.signal(signum, functools.partial(_if_in_process, pid, handler))


def _if_in_process(pid: int, handler: Callable, signum: int, frame: FrameType | None) -> None:
    if os.getpid() == pid:
        handler(signum, frame)


def limit_threads(tasks_on_node: int) -> None:
    """Each task uses its own cores (Slurm's cpus-per-task, or its share of this machine), as in the sbatch scripts;
    the thread count also decides the last bits of CPU results, so both launchers produce the same bytes."""
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("SLURM_CPUS_PER_TASK")
                          or str(max(1, (os.cpu_count() or 1) // tasks_on_node)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def finished(path: Path, line: str) -> bool:
    """Did this very command already finish (its marker holds the same line)?"""
    return path.is_file() and path.read_text() == line
