"""The recipe's optimizer settings survive a resume. Loading a checkpoint restores the optimizer's param groups
(lr, betas, weight decay), the scheduler's base lrs and, in DeepSpeed's ZeRO optimizers, the gradient clipping as
they were saved, so a resumed run with `--allow-change stage1.optim.lr` would go on with the old values. The
settings of the freshly built engine are taken before the load and put back after it; the scheduler's position
(its step) is the checkpoint's, and the lr is recomputed there from the new settings."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from torch.optim.lr_scheduler import LambdaLR

log = logging.getLogger(__name__)


def _scheduler(engine: Any) -> Any:
    """The engine's lr scheduler: DeepSpeed's `lr_scheduler`, or `scheduler` (LocalEngine)."""
    return getattr(engine, "lr_scheduler", None) or getattr(engine, "scheduler", None)


@dataclass
class OptimizerSettings:
    """Hyperparameters of an engine's optimizer and scheduler (not its moments or step counts)."""

    groups: list[dict[str, Any]]  # each param group without its params and its current lr
    base_lrs: list[float] | None
    clip_grad: float | None  # DeepSpeed ZeRO / bf16 optimizers keep (and restore) their own clipping

    @classmethod
    def of(cls, engine: Any) -> OptimizerSettings:
        scheduler = _scheduler(engine)
        groups = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in engine.optimizer.param_groups]
        base_lrs = list(scheduler.base_lrs) if scheduler is not None and hasattr(scheduler, "base_lrs") else None
        return cls(groups, base_lrs, getattr(engine.optimizer, "clip_grad", None))

    def apply(self, engine: Any) -> None:
        """Put these settings back after a checkpoint load; the lr at the restored step follows from them."""
        scheduler = _scheduler(engine)
        restored = OptimizerSettings.of(engine)
        old_lrs = [g["lr"] for g in engine.optimizer.param_groups]
        for group, settings in zip(engine.optimizer.param_groups, self.groups):
            group.update(settings)
        if self.clip_grad is not None:
            engine.optimizer.clip_grad = self.clip_grad
        if self.base_lrs is None:
            if scheduler is not None:
                log.warning("%s keeps no base lr: the lr goes on from the checkpoint's, whatever the recipe's lr "
                            "now is", type(scheduler).__name__)
            return
        scheduler.base_lrs = list(self.base_lrs)
        for i, group in enumerate(engine.optimizer.param_groups):
            if isinstance(scheduler, LambdaLR):  # ours: the lr is a function of the step
                group["lr"] = self.base_lrs[i] * scheduler.lr_lambdas[i](scheduler.last_epoch)
            elif restored.base_lrs and restored.base_lrs[i]:  # a multiplicative schedule: keep its factor
                group["lr"] = old_lrs[i] * self.base_lrs[i] / restored.base_lrs[i]
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = [g["lr"] for g in engine.optimizer.param_groups]
