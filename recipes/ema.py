"""Exponential moving average of the trained parameters' fp32 master weights, kept where those live.

Each rank keeps the EMA of its own shard of the master weights (`recipes.master`): under ZeRO 1-3 that is its
partition, so the EMA costs 4 bytes per parameter spread over the ranks and no communication; without ZeRO,
rank 0 keeps it all. One fused `torch._foreach_lerp_` updates every shard on the device. Only the export gathers
it (`full_state_dict`, collective, onto rank 0); checkpoints hold each rank's shards.
"""
from __future__ import annotations

import torch
from torch import nn

from recipes.master import Shard, gather_shards, master_shard, trainable


class EMA:
    """EMA of `engine`'s trained parameters of `module`, started at their current master values.

    With `warmup`, the decay at optimizer step t is min(decay, (1 + t) / (10 + t)), so that a model trained from
    scratch has a useful average early (the warm-up of diffusers' EMAModel and timm's ModelEmaV2)."""

    def __init__(self, engine, module: nn.Module, decay: float, warmup: bool = False):
        self.engine, self.module, self.decay, self.warmup = engine, module, decay, warmup
        params = trainable(module)
        self.shapes = {name: getattr(p, "ds_shape", p.shape) for name, p in params.items()}
        self.device = next(iter(params.values())).device
        masters = self.masters()
        self.shards = {name: Shard(s.start, s.values.detach().clone()) for name, s in masters.items()}

    def masters(self) -> dict[str, Shard]:
        """This rank's master shards, looked up afresh: a view can change when DeepSpeed reloads or offloads."""
        shards = {name: master_shard(self.engine, p) for name, p in trainable(self.module).items()}
        return {name: shard for name, shard in shards.items() if shard is not None}

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, step: int = 0) -> None:
        """Average in the master weights after optimizer step `step` (counted from 1)."""
        masters = self.masters()
        names = list(self.shards)
        if names:  # a rank may hold no shard (no ZeRO: rank 0 holds them all)
            torch._foreach_lerp_([self.shards[n].values for n in names], [masters[n].values for n in names],
                                 1 - self.decay_at(step))

    def state_dict(self) -> dict[str, dict]:
        """This rank's shards (for its checkpoint)."""
        return {"values": {n: s.values for n, s in self.shards.items()},
                "starts": {n: s.start for n, s in self.shards.items()}}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        layout = {n: (s.start, s.values.numel()) for n, s in self.shards.items()}
        saved = {n: (state["starts"][n], v.numel()) for n, v in state["values"].items()}
        if saved != layout:
            raise ValueError("the saved EMA shards do not match this run's partition of the parameters; resume with "
                             "the same number of ranks and ZeRO stage")
        with torch.no_grad():
            for name, values in state["values"].items():
                self.shards[name].values.copy_(values)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole EMA as fp32 CPU tensors on rank 0, an empty dict elsewhere (collective)."""
        return gather_shards(self.shards, self.shapes, self.device, collective=True)
