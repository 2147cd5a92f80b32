"""Exponential moving average of the trained parameters, kept in fp32 on rank 0 (the rank that exports)."""
from __future__ import annotations

import torch
from torch import nn

from recipes.engine import gathered


class EMA:
    """Shadow copies of `module`'s trainable parameters. `update` is collective under ZeRO-3 (it gathers).

    With `warmup`, the decay at optimizer step t is min(decay, (1 + t) / (10 + t)), so that a model trained from
    scratch has a useful average early (the warm-up of diffusers' EMAModel and timm's ModelEmaV2)."""

    def __init__(self, module: nn.Module, decay: float, keep: bool, warmup: bool = False):
        self.decay, self.keep, self.warmup = decay, keep, warmup
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        params = dict(module.named_parameters())
        with gathered([params[n] for n in self.names]):
            self.shadow = {n: params[n].detach().float().cpu().clone() for n in self.names} if keep else {}

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, module: nn.Module, step: int = 0) -> None:
        """Average in the parameters after optimizer step `step` (counted from 1)."""
        params = dict(module.named_parameters())
        decay = self.decay_at(step)
        with gathered([params[n] for n in self.names]):
            if self.keep:
                for n in self.names:
                    self.shadow[n].lerp_(params[n].detach().float().cpu(), 1 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.keep:
            missing = sorted(set(self.names) - set(state))
            if missing:
                raise KeyError(f"EMA state lacks {missing[:5]} ({len(missing)} parameters)")
            self.shadow = {n: state[n].float().clone() for n in self.names}
