"""AdamW whose param groups are independent problems: each group's gradient is clipped by its own norm.

Stage 1's students share no parameters and no loss term, so one global clip would scale every student down when
one of them spikes. The official code trains each layer in its own job, clipped on its own; here every student is
a param group, clipped on its own norm right before its update, after the gradients were reduced across ranks.

The clipping lives in the optimizer's `step` because that is where DeepSpeed hands over the reduced gradients:
under ZeRO 1-3 the optimizer sees this rank's partition of each group (flat fp32 master tensors), so the squared
norms are summed over the ranks; without ZeRO (or on one rank's own students) it sees whole parameters. DeepSpeed's
own `gradient_clipping` must then be 0 (`recipes.distributed.deepspeed_config` sets it).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.utils import clip_grads_with_norm_, get_total_norm


class GroupClippedAdamW(torch.optim.AdamW):
    """`max_norm` ≤ 0 disables clipping. `partitioned`: the groups' tensors are partitions to sum over the default
    process group (ZeRO), not whole parameters. `norms` holds each group's last pre-clip norm (a 0-d tensor, read
    when logged), by the group's `name`."""

    def __init__(self, params, *, max_norm: float, partitioned: bool, **adamw):
        super().__init__(params, **adamw)
        self.max_norm, self.partitioned = max_norm, partitioned
        self.norms: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, closure=None):
        if self.max_norm > 0:
            self.clip_groups()
        return super().step(closure)

    def clip_groups(self) -> None:
        """Clip every group that has gradients by its own norm. DeepSpeed's ZeRO steps one group (or sub-group) at
        a time in the same order on every rank, so the all-reduce below pairs up across ranks."""
        groups = [g for g in self.param_groups if any(p.grad is not None for p in g["params"])]
        if not groups:
            return
        grads = [[p.grad for p in g["params"] if p.grad is not None] for g in groups]
        device = grads[0][0].device
        squares = torch.stack([get_total_norm(g).to(device, torch.float32) ** 2 for g in grads])
        if self.partitioned and dist.is_initialized():
            dist.all_reduce(squares)
        norms = squares.sqrt()
        for group, norm in zip(groups, norms):
            clip_grads_with_norm_([p for p in group["params"] if p.grad is not None], self.max_norm, norm)
            self.norms[group["name"]] = norm
