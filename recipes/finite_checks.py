"""Which of a training state's tensors hold NaN or inf: the weights this rank holds (its ZeRO-3 partition), the
optimizer's master weights and moments, and a stage's own state (EMA). Checked before a checkpoint is written, so
the last checkpoint is never a poisoned one."""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from recipes.engine import Engine


def _innermost_optimizer(engine: Engine) -> torch.optim.Optimizer | None:
    """The torch optimizer under DeepSpeed's wrappers (ZeRO keeps its fp32 master partitions there)."""
    optimizer = getattr(engine, "optimizer", None)
    while optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


def _state_tensors(state: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(state, torch.Tensor):
        yield prefix, state
    elif isinstance(state, Mapping):
        for key, value in state.items():
            yield from _state_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            yield from _state_tensors(value, f"{prefix}[{i}]")


def training_tensors(engine: Engine, stage_state: Mapping[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of everything a checkpoint of this rank would hold, as held locally (no communication)."""
    for name, param in engine.module.named_parameters():
        yield f"weights {name}", getattr(param, "ds_tensor", param)  # ZeRO-3: only this rank's partition
    optimizer = _innermost_optimizer(engine)
    if optimizer is not None:
        for g, group in enumerate(optimizer.param_groups):
            for i, param in enumerate(group["params"]):
                yield f"optimizer group {g} param {i}", param
                for key, value in optimizer.state.get(param, {}).items():
                    if isinstance(value, torch.Tensor) and value.is_floating_point():
                        yield f"optimizer group {g} param {i} {key}", value
    for name, tensor in _state_tensors(stage_state, ""):
        if tensor.is_floating_point():
            yield f"stage state {name}", tensor


def nonfinite(engine: Engine, stage_state: Mapping[str, Any], limit: int = 5) -> list[str]:
    """Names of up to `limit` tensors that hold NaN or inf (empty when everything is finite)."""
    bad = []
    for name, tensor in training_tensors(engine, stage_state):
        if tensor.numel() and not bool(torch.isfinite(tensor).all()):
            bad.append(name)
            if len(bad) == limit:
                break
    return bad
