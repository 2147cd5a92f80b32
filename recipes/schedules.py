"""Learning-rate schedules: a linear warm-up, then constant, cosine or multi-step decay, times a ReduceLROnPlateau
scale per param group (each stage-1 student is its own group, reduced on its own held-out error).

The lr of group g after s optimizer steps is base_lr × factor(s) × scale[g], in closed form: a plateau reduction
and the step schedule compose as a product (as torch's chained MultiStepLR and ReduceLROnPlateau do), and
`state_dict` holds every scale, so a resumed run continues with the same lrs.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch

from data.reader import resolve_shards
from data.shard_writer import index_path
from recipes.config import OptimSection, PlateauSection, Recipe, ShardPatterns

log = logging.getLogger(__name__)


def lr_factor(optim: OptimSection, total_steps: int, milestones: list[int] = ()) -> Callable[[int], float]:
    """Multiplier of the base lr at an optimizer step: linear warm-up, then constant, cosine to min_lr, or × gamma
    at each of `milestones` (optimizer steps, see `milestone_steps`)."""

    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        if optim.schedule == "constant":
            return 1.0
        if optim.schedule == "multistep":
            return optim.gamma ** sum(step >= m for m in milestones)
        progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
        floor = optim.min_lr / optim.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def milestone_steps(optim: OptimSection, steps_per_epoch: float | None) -> list[int]:
    """`optim.milestones` in optimizer steps; epochs are rounded to the nearest step."""
    if optim.milestone_unit == "steps":
        return [round(m) for m in optim.milestones]
    if steps_per_epoch is None:
        raise ValueError("optim.milestone_unit=epochs needs the size of the training data")
    return [round(m * steps_per_epoch) for m in optim.milestones]


def dataset_samples(recipe: Recipe, shards: ShardPatterns) -> int:
    """Samples in one epoch of a stage's training data: the synthetic stream's size, or the counts in the shard
    indexes (`<shard>.json`, written next to every shard by data.generate and data.precompute)."""
    if recipe.data.source == "synthetic":
        return recipe.data.synthetic_samples
    patterns = shards or recipe.data.train
    total = 0
    for shard in resolve_shards([patterns] if isinstance(patterns, str) else list(patterns)):
        index = index_path(Path(shard))
        if not index.is_file():
            raise FileNotFoundError(f"{index} is missing: epochs are counted from the shard indexes that "
                                    "data.generate / data.precompute write; give the milestones in steps instead")
        total += int(json.loads(index.read_text())["samples"])
    return total


def steps_per_epoch(samples: int, batch_size: int, data_ranks: int, accumulation: int) -> float:
    """Optimizer steps in one pass over `samples` when `data_ranks` ranks each read `batch_size` × `accumulation`
    samples a step (every rank reads its own share; in stage 1's split mode every rank reads everything)."""
    return samples / (batch_size * data_ranks * accumulation)


class GroupSchedule(torch.optim.lr_scheduler.LRScheduler):
    """base_lr × factor(step) × scale[group]; `plateau_step` lowers a group's scale when its metric stalls."""

    def __init__(self, optimizer, factor: Callable[[int], float], plateau: PlateauSection | None = None,
                 min_lr: float = 0.0):
        self.factor, self.plateau, self.min_lr = factor, plateau, min_lr
        groups = len(optimizer.param_groups)
        self.scales, self.best, self.bad = [1.0] * groups, [math.inf] * groups, [0] * groups
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [base * self.factor(self.last_epoch) * scale for base, scale in zip(self.base_lrs, self.scales)]

    def plateau_step(self, metrics: list[float]) -> list[int]:
        """ReduceLROnPlateau (mode min, relative threshold, no cooldown) for each group on its own metric; the
        new lrs apply from the next optimizer step. Returns the groups whose lr was reduced."""
        if self.plateau is None:
            return []
        reduced = []
        for g, metric in enumerate(metrics):
            if metric < self.best[g] * (1 - self.plateau.threshold):
                self.best[g], self.bad[g] = metric, 0
                continue
            self.bad[g] += 1
            if self.bad[g] <= self.plateau.patience:
                continue
            self.bad[g] = 0
            lr = self.base_lrs[g] * self.factor(self.last_epoch) * self.scales[g]
            new = max(lr * self.plateau.factor, self.min_lr)
            if lr - new > 1e-12:
                self.scales[g] *= new / lr
                reduced.append(g)
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        return reduced

    def state_dict(self) -> dict:
        """Plain values only (the step, base lrs, plateau state): the schedule function is rebuilt from the
        recipe."""
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "factor", "plateau")}
