"""Training engines: DeepSpeed (ZeRO 0-3, data parallel) and a local one for students that live on one rank.

Both satisfy `Engine`, the part of DeepSpeed's engine the stages use.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from models.weights import save_torch
from recipes.config import OptimSection, Recipe
from recipes.distributed import deepspeed_config


@runtime_checkable
class Engine(Protocol):
    """A module with its optimizer: called like the module, `step()` after every micro-batch's `backward` (the
    optimizer steps at accumulation boundaries), checkpoints in DeepSpeed's folder-and-tag layout."""

    module: nn.Module

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def backward(self, loss: torch.Tensor) -> Any: ...

    def step(self) -> Any: ...

    def get_lr(self) -> list[float]: ...

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool = ...) -> Any: ...

    def load_checkpoint(self, load_dir: str, tag: str, **kwargs: Any) -> Any: ...


def lr_factor(optim: OptimSection, total_steps: int):
    """Multiplier of the base lr at an optimizer step: linear warm-up, then constant or cosine to min_lr."""

    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        if optim.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
        floor = optim.min_lr / optim.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def deepspeed_engine(module: nn.Module, recipe: Recipe, optim: OptimSection, total_steps: int, world_size: int
                     ) -> Engine:
    """`deepspeed.initialize` with the recipe-derived config; only parameters that require grad are trained."""
    import deepspeed

    config = deepspeed_config(recipe, optim, world_size)
    params = [p for p in module.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=module, model_parameters=params, config=config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(optim, total_steps)))
    return engine


class LocalEngine:
    """AdamW on one rank without communication (stage 1 in `split` mode: each rank owns its students)."""

    def __init__(self, module: nn.Module, optim: OptimSection, total_steps: int, accumulation: int, rank: int,
                 bf16: bool):
        self.module, self.rank, self.accumulation, self.grad_clip = module, rank, accumulation, optim.grad_clip
        params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(optim, total_steps))
        self.micro_steps = 0
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext())

    def __call__(self, *args, **kwargs):
        with self.autocast:
            return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.accumulation:
            return
        if self.grad_clip:
            nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def _file(self, folder: str, tag: str) -> Path:
        return Path(folder) / tag / f"local_rank{self.rank}.pt"

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool = False) -> None:
        save_torch({"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "micro_steps": self.micro_steps},
                   self._file(save_dir, tag))

    def load_checkpoint(self, load_dir: str, tag: str, **_: Any) -> None:
        state = torch.load(self._file(load_dir, tag), map_location="cpu", weights_only=True)
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.micro_steps = state["micro_steps"]


def gathered(params: list[nn.Parameter]):
    """Full parameters inside the block, also under ZeRO-3 (which partitions them across ranks); collective."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of `module`'s full state dict (collective under ZeRO-3)."""
    with gathered(list(module.parameters())):
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
