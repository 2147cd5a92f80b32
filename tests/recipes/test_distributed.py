"""One place knows the launchers' variables: `prepare_environment` takes the rank from `Rank.from_env` and writes
what torch.distributed reads, under torchrun, the deepspeed launcher, Slurm's srun or a plain `python`."""
from __future__ import annotations

import os
from unittest import mock

import pytest

from common.runtime import Rank
from recipes.distributed import prepare_environment

VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR", "SLURM_PROCID",
             "SLURM_NTASKS", "SLURM_LOCALID")


@pytest.fixture
def environ():
    """A launcher-free environment; everything prepare_environment writes is undone afterwards (added variables
    too, which monkeypatch would leave behind)."""
    with mock.patch.dict(os.environ):
        for name in VARIABLES:
            os.environ.pop(name, None)
        yield os.environ


def written() -> tuple[str, str, str]:
    return os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]


def test_slurm_ranks_become_torch_distributed_ranks(environ):
    environ.update(SLURM_PROCID="5", SLURM_NTASKS="8", SLURM_LOCALID="1", MASTER_PORT="29500")
    assert prepare_environment() == Rank(5, 8, 1)
    assert written() == ("5", "8", "1") and os.environ["MASTER_ADDR"] == "127.0.0.1"


def test_torchrun_variables_win_over_the_surrounding_allocation(environ):
    environ.update(SLURM_PROCID="0", SLURM_NTASKS="1", RANK="3", WORLD_SIZE="4", LOCAL_RANK="3", MASTER_ADDR="node7",
                   MASTER_PORT="29501")
    assert prepare_environment() == Rank(3, 4, 3)
    assert written() == ("3", "4", "3") and os.environ["MASTER_ADDR"] == "node7"


def test_a_plain_python_is_a_one_process_job_on_a_free_port(environ):
    assert prepare_environment() == Rank()
    assert written() == ("0", "1", "0") and 0 < int(os.environ["MASTER_PORT"]) < 65536


def test_many_processes_without_a_rendezvous_port_is_an_error(environ):
    environ.update(SLURM_PROCID="0", SLURM_NTASKS="2")
    with pytest.raises(RuntimeError, match="MASTER_PORT"):
        prepare_environment()
