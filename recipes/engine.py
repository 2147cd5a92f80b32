"""Training engines: DeepSpeed (ZeRO 0-3, data parallel) and a local one for students that live on one rank.

Both satisfy `Engine`, the part of DeepSpeed's engine the stages use.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from models.weights import load_torch, save_torch
from recipes.config import OptimSection, Recipe
from recipes.distributed import deepspeed_config
from recipes.group_clip import GroupClippedAdamW
from recipes.precision import Precision
from recipes.schedules import GroupSchedule, lr_factor


@runtime_checkable
class Engine(Protocol):
    """A module with its optimizer: called like the module, `step()` after every micro-batch's `backward` (the
    optimizer steps at accumulation boundaries), checkpoints in DeepSpeed's folder-and-tag layout."""

    module: nn.Module
    lr_scheduler: Any  # a `recipes.schedules.GroupSchedule`

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def backward(self, loss: torch.Tensor) -> Any: ...

    def step(self) -> Any: ...

    def get_lr(self) -> list[float]: ...

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool = ..., **kwargs: Any) -> Any: ...

    def load_checkpoint(self, load_dir: str, tag: str, **kwargs: Any) -> Any: ...


def schedule(optimizer, optim: OptimSection, total_steps: int, milestones: list[int] = ()) -> GroupSchedule:
    """The recipe's lr schedule over every param group of `optimizer` (`milestones` in optimizer steps)."""
    return GroupSchedule(optimizer, lr_factor(optim, total_steps, milestones), optim.plateau, optim.min_lr)


def group_adamw(groups: dict[str, list[nn.Parameter]], optim: OptimSection, partitioned: bool) -> GroupClippedAdamW:
    """AdamW with one param group per name (a stage-1 student), each clipped on its own gradient norm."""
    return GroupClippedAdamW([{"name": name, "params": params} for name, params in groups.items()],
                             max_norm=optim.grad_clip, partitioned=partitioned, lr=optim.lr, betas=optim.betas,
                             weight_decay=optim.weight_decay)


def deepspeed_engine(module: nn.Module, recipe: Recipe, optim: OptimSection, total_steps: int, world_size: int,
                     batch_size: int, groups: dict[str, list[nn.Parameter]] | None = None,
                     milestones: list[int] = ()) -> Engine:
    """`deepspeed.initialize` with the recipe-derived config; only parameters that require grad are trained.
    `groups`: independent param groups (stage-1 students), each clipped on its own norm by `GroupClippedAdamW`
    after DeepSpeed reduced the gradients, instead of DeepSpeed's one global clip."""
    import deepspeed

    from recipes.deepspeed_loading import make_loads_safe

    config = deepspeed_config(recipe, optim, world_size, batch_size)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = None
    if groups is not None:
        del config["optimizer"]
        config.update(gradient_clipping=0.0, zero_allow_untested_optimizer=True)
        optimizer = group_adamw(groups, optim, partitioned=recipe.deepspeed.zero_stage > 0 and world_size > 1)
    engine, *_ = deepspeed.initialize(
        model=module, model_parameters=None if optimizer else params, optimizer=optimizer, config=config,
        lr_scheduler=lambda opt: schedule(opt, optim, total_steps, milestones))
    make_loads_safe(engine)
    return engine


class LocalEngine:
    """AdamW on one rank without communication (stage 1 in `split` mode: each rank owns its students), one param
    group per student, each clipped on its own norm. Under pure bf16 the module computes in bf16 and the optimizer
    updates fp32 master copies, as DeepSpeed's bf16 mode does."""

    def __init__(self, module: nn.Module, optim: OptimSection, total_steps: int, accumulation: int, rank: int,
                 precision: Precision, groups: dict[str, list[nn.Parameter]] | None = None,
                 milestones: list[int] = ()):
        self.module, self.rank, self.accumulation, self.precision = module, rank, accumulation, precision
        groups = groups or {"all": [p for p in module.parameters() if p.requires_grad]}
        bf16 = precision.param_dtype != torch.float32
        self.masters = {p: p.detach().float().clone() if bf16 else p for params in groups.values() for p in params}
        module.to(precision.param_dtype)  # in place: the parameters stay the objects in `groups`
        self.optimizer = group_adamw({name: [self.masters[p] for p in params] for name, params in groups.items()},
                                     optim, partitioned=False)
        self.lr_scheduler = schedule(self.optimizer, optim, total_steps, milestones)
        self.micro_steps = 0

    def master_of(self, param: nn.Parameter) -> torch.Tensor:
        """The fp32 values the optimizer updates for `param` (the parameter itself unless the module is bf16)."""
        return self.masters[param]

    def __call__(self, *args, **kwargs):
        with self.precision.autocast(next(self.module.parameters()).device):
            return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.accumulation:
            return
        copies = [(p, m) for p, m in self.masters.items() if m is not p]
        for p, master in copies:
            master.grad = None if p.grad is None else p.grad.float()
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.module.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, master in copies:
                p.copy_(master)

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def _file(self, folder: str, tag: str) -> Path:
        return Path(folder) / tag / f"local_rank{self.rank}.pt"

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool = False, **_: Any) -> None:
        names = {p: name for name, p in self.module.named_parameters()}
        save_torch({"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "master": {names[p]: m for p, m in self.masters.items() if m is not p},
                    "scheduler": self.lr_scheduler.state_dict(), "micro_steps": self.micro_steps},
                   self._file(save_dir, tag))

    def load_checkpoint(self, load_dir: str, tag: str, **_: Any) -> None:
        state = load_torch(self._file(load_dir, tag))
        self.module.load_state_dict(state["module"])
        params = dict(self.module.named_parameters())
        with torch.no_grad():
            for name, values in state["master"].items():
                self.masters[params[name]].copy_(values)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["scheduler"])
        self.micro_steps = state["micro_steps"]

