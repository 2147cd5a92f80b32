"""The fp32 master weights of a trained module, wherever its engine keeps them.

Under DeepSpeed's bf16 mode the module holds bf16 copies; the optimizer holds the fp32 values it updates,
partitioned over the ranks by ZeRO. Exports, stage-1 best students and the EMA read those, never the rounded
copies. Under bf16-mixed and fp32 the module's own fp32 parameters are the master weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Shard:
    """This rank's part of one parameter's master weights: `values` (flat fp32, a view the optimizer updates in
    place) hold elements [start, start + numel) of the flattened parameter."""

    start: int
    values: torch.Tensor


def data_parallel_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def master_shard(engine, param: nn.Parameter) -> Shard | None:
    """This rank's shard of `param`'s master weights, or None if another rank holds them all. Parameters that are
    not partitioned (no ZeRO) belong to data-parallel rank 0; on a `LocalEngine` they are this rank's own."""
    local_master = getattr(engine, "master_of", None)
    if local_master is not None:
        return Shard(0, local_master(param).view(-1))
    if hasattr(param, "ds_id"):  # ZeRO-3: equal partitions in rank order, the last one padded
        from deepspeed.utils import safe_get_local_fp32_param

        local = safe_get_local_fp32_param(param).view(-1)
        start = data_parallel_rank() * local.numel()
        numel = min(local.numel(), param.ds_numel - start)
        return Shard(start, local.narrow(0, 0, numel)) if numel > 0 else None
    if hasattr(param, "_hp_mapping"):  # ZeRO 1/2 and DeepSpeed's bf16 optimizer: a fragment, or nothing
        mapping = param._hp_mapping
        return None if mapping is None else Shard(mapping.lp_fragment_address.start, mapping.get_hp_fragment())
    if param.dtype != torch.float32:
        raise TypeError(f"a {param.dtype} parameter without fp32 master weights; use ZeRO ≥ 1 for bf16")
    return Shard(0, param.detach().view(-1)) if data_parallel_rank() == 0 else None


def gather_shards(shards: dict[str, Shard | None], shapes: dict[str, torch.Size], device: torch.device,
                  collective: bool) -> dict[str, torch.Tensor]:
    """Full fp32 CPU tensors from the ranks' shards. `collective`: every rank calls it with the same names in the
    same order, the disjoint shards are summed on data-parallel rank 0, and the other ranks get an empty dict."""
    collective = collective and dist.is_initialized()
    full = {}
    for name, shape in shapes.items():
        buffer = torch.zeros(shape.numel(), dtype=torch.float32, device=device)
        shard = shards.get(name)
        if shard is not None:
            buffer.narrow(0, shard.start, shard.values.numel()).copy_(shard.values)
        if collective:
            dist.reduce(buffer, dst=0)
        if not collective or data_parallel_rank() == 0:
            full[name] = buffer.view(shape).cpu()
    return full


def trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def master_state_dict(engine, module: nn.Module) -> dict[str, torch.Tensor]:
    """Full fp32 CPU copies of `module`'s trained parameters, read from the master weights: collective under
    DeepSpeed, where only rank 0 gets them; a `LocalEngine`'s own on its rank."""
    params = trainable(module)
    shapes = {name: getattr(p, "ds_shape", p.shape) for name, p in params.items()}
    device = next(iter(params.values())).device
    local = getattr(engine, "master_of", None) is not None
    return gather_shards({name: master_shard(engine, p) for name, p in params.items()}, shapes, device,
                         collective=not local)
