"""DeepSpeed checkpoints read without unpickling: DeepSpeed's own checkpoint engine calls
`torch.load(weights_only=False)`, so a crafted `mp_rank_00_model_states.pt` in a resumed folder would run code.

Every file DeepSpeed reads back goes through its engine's `checkpoint_engine.load` (module states, ZeRO optimizer
partitions, MoE experts); `make_loads_safe` swaps that engine for one that reads with `weights_only=True`,
allowing only the plain records DeepSpeed stores next to its tensors. Import after `prepare_environment`.
"""
from __future__ import annotations

from typing import Any

from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from common.config import ConfigError
from models.weights import load_torch

#: what DeepSpeed 0.19 pickles besides tensors: loss-scaler settings, the ZeRO stage, and the slice addresses of
#: flattened parameters; plain attribute records with no code of their own
DEEPSPEED_RECORDS = (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, reading with `weights_only=True` (writing is unchanged)."""

    def load(self, path: str, map_location: Any = None) -> Any:
        return load_torch(path, allowed=DEEPSPEED_RECORDS, map_location=map_location)


def make_loads_safe(engine: Any) -> None:
    """Replace a DeepSpeed engine's checkpoint engine by `WeightsOnlyCheckpointEngine`."""
    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine:
        raise ConfigError(f"deepspeed.overrides selects the {type(current).__name__} checkpoint engine, which reads "
                          "checkpoints by unpickling them; only DeepSpeed's default (torch) engine is supported")
    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)  # the config DeepSpeed built it from
