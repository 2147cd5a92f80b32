"""Process-group set-up that works under torchrun, the deepspeed launcher, Slurm's srun, or a plain `python`,
and the DeepSpeed config derived from a recipe."""
from __future__ import annotations

import os
import socket
from typing import Any

import torch
import torch.distributed as dist

from common.config import deep_merge
from common.runtime import Rank, pick_device
from recipes.config import Recipe
from recipes.precision import Precision


def prepare_environment() -> Rank:
    """This process's rank (`Rank.from_env`: torchrun, the deepspeed launcher, Slurm's srun, or a single process),
    written to RANK / WORLD_SIZE / LOCAL_RANK with MASTER_* defaults for torch.distributed; DeepSpeed's CPU
    accelerator when there is no GPU. Must run before `import deepspeed`."""
    rank = Rank.from_env()
    os.environ.update(RANK=str(rank.rank), WORLD_SIZE=str(rank.world_size), LOCAL_RANK=str(rank.local_rank))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if rank.world_size != 1:
            raise RuntimeError("MASTER_PORT is not set for a multi-process run; launch with torchrun, deepspeed, "
                               "or set MASTER_ADDR/MASTER_PORT (the slurm/ scripts do)")
        os.environ["MASTER_PORT"] = str(free_port())
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return rank


def free_port() -> int:
    """An unused TCP port on this host."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group() -> tuple[int, int]:
    """(rank, world size) after initialising torch.distributed through DeepSpeed (NCCL on GPU, gloo on CPU)."""
    prepare_environment()
    import deepspeed

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(pick_device())
    return dist.get_rank(), dist.get_world_size()


def deepspeed_config(recipe: Recipe, optim, world_size: int, batch_size: int | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON for one stage (`batch_size` per rank, default data.reader.batch_size), derived from the
    recipe, then `deepspeed.overrides` merged in."""
    ds = recipe.deepspeed
    batch_size = batch_size or recipe.data.reader.batch_size
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": ds.gradient_accumulation,
        "train_batch_size": batch_size * ds.gradient_accumulation * world_size,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": {"stage": ds.zero_stage, "contiguous_gradients": True, "overlap_comm": False,
                              "reduce_scatter": True},
        **Precision.resolve(ds.precision).deepspeed(),
        "optimizer": {"type": "AdamW", "params": {
            "lr": optim.lr, "betas": list(optim.betas), "weight_decay": optim.weight_decay, "eps": 1e-8,
            "torch_adam": not torch.cuda.is_available()}},  # on CPU: no JIT-compiled cpu_adam
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    return deep_merge(config, ds.overrides)


def all_ranks_true(flag: bool) -> bool:
    """True only if `flag` holds on every rank (used to stop every rank together)."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=pick_device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def broadcast_tensors(tensors: dict[str, torch.Tensor], src: int = 0) -> dict[str, torch.Tensor]:
    """Rank `src`'s tensors on every rank (others pass tensors of the same names and shapes to overwrite)."""
    if dist.is_initialized():
        device = pick_device()
        for name in sorted(tensors):
            moved = tensors[name].to(device)
            dist.broadcast(moved, src)
            tensors[name] = moved.to(tensors[name].device)
    return tensors


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
