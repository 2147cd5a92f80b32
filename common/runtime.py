"""Where and how this process runs: rank within a job, device, dtype, logging. The one answer for every command
(training, data generation, evaluation), whatever launched it: torchrun, the deepspeed launcher, Slurm's srun, or
a plain `python`."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Rank:
    """This process's place in a job, read from torchrun / DeepSpeed / Slurm environment variables."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Rank:
        for rank_var, size_var, local_var in (("RANK", "WORLD_SIZE", "LOCAL_RANK"),
                                              ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")):
            if rank_var in os.environ and size_var in os.environ:
                return cls(int(os.environ[rank_var]), int(os.environ[size_var]), int(os.environ.get(local_var, 0)))
        return cls()

    def shard(self, items: list) -> list:
        """Every world_size-th item starting at rank: disjoint across ranks, covering all items."""
        return items[self.rank::self.world_size]


def pick_device(name: str = "auto") -> torch.device:
    """`auto` → this rank's CUDA device when there is one (by local rank), else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", Rank.from_env().local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    return torch.device(name)


def parse_dtype(name: str) -> torch.dtype:
    """fp32 / bf16 / fp16 → torch dtype, with an error that lists the choices."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def setup_logging(rank: int = 0, level: int = logging.INFO) -> None:
    """Timestamped logs on rank 0; warnings only on other ranks."""
    logging.basicConfig(level=level if rank == 0 else logging.WARNING, force=True,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
