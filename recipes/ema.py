"""Exponential moving average of the trained parameters, kept in fp32 on rank 0 (the rank that exports)."""
from __future__ import annotations

import torch
from torch import nn

from recipes.engine import gathered


class EMA:
    """Shadow copies of `module`'s trainable parameters. `update` is collective under ZeRO-3 (it gathers)."""

    def __init__(self, module: nn.Module, decay: float, keep: bool):
        self.decay, self.keep = decay, keep
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        params = dict(module.named_parameters())
        with gathered([params[n] for n in self.names]):
            self.shadow = {n: params[n].detach().float().cpu().clone() for n in self.names} if keep else {}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        params = dict(module.named_parameters())
        with gathered([params[n] for n in self.names]):
            if self.keep:
                for n in self.names:
                    self.shadow[n].lerp_(params[n].detach().float().cpu(), 1 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.keep:
            missing = sorted(set(self.names) - set(state))
            if missing:
                raise KeyError(f"EMA state lacks {missing[:5]} ({len(missing)} parameters)")
            self.shadow = {n: state[n].float().clone() for n in self.names}
