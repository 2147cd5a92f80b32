"""Training batches for the engine and how a batch becomes a model call.

A batch is a dict: `latent` (B, C, h, w) clean latents, and either `text` (B, L, C) + `text_mask` (B, L) or
`label` (B,), plus `keys` (sample ids, named in errors). Sources (`BatchSource`) are resumable: `state_dict()`
after k batches, `load_state_dict()` on a fresh source, and iteration continues with batch k + 1.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from data.batching import collate
from models.diffusion import GaussianDiffusion


@runtime_checkable
class BatchSource(Protocol):
    """What the training loop reads batches from: the shard reader (`data.reader.ShardLoader`) or
    `SyntheticBatches`. Endless; `state_dict()` is the exact position, restored before iterating."""

    def __iter__(self) -> Iterator[dict[str, Any]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class SyntheticBatches:
    """Deterministic random batches (sample i is a function of seed and i only), split across ranks.

    For tests and benchmarks of the engine: the teacher's activations are what stage 1 learns from, and those
    exist for any input; stage 2 on random latents still exercises the whole objective.
    """

    def __init__(self, family: str, latent_shape: tuple[int, int, int], batch_size: int, num_samples: int,
                 seed: int, rank: int = 0, world_size: int = 1, caption_tokens: int = 16,
                 caption_channels: int = 32, num_classes: int = 1000, dtype: torch.dtype | None = None,
                 pin_memory: bool = False):
        if num_samples < batch_size * world_size:
            raise ValueError(f"{num_samples} synthetic samples are fewer than one global batch "
                             f"({batch_size} × {world_size} ranks)")
        self.family, self.latent_shape, self.batch_size = family, latent_shape, batch_size
        self.num_samples, self.seed, self.rank, self.world_size = num_samples, seed, rank, world_size
        self.caption_tokens, self.caption_channels, self.num_classes = caption_tokens, caption_channels, num_classes
        self.dtype, self.pin_memory = dtype, pin_memory  # of the batches, as the shard reader's
        self.batches_done = 0

    def state_dict(self) -> dict[str, Any]:
        return {"batches_done": self.batches_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches_done = int(state["batches_done"])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        per_rank = self.num_samples // self.world_size // self.batch_size  # batches per epoch per rank
        while True:
            epoch, within = divmod(self.batches_done, per_rank)
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))
            mine = order[self.rank::self.world_size]
            indexes = mine[within * self.batch_size:(within + 1) * self.batch_size].tolist()
            self.batches_done += 1
            text_tokens = self.caption_tokens if self.family == "pixart" else None
            yield collate([self.sample(i) for i in indexes], text_tokens, self.dtype, self.pin_memory)

    def sample(self, index: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        sample: dict[str, Any] = {"latent": torch.randn(self.latent_shape, generator=g), "key": f"synthetic-{index}"}
        if self.family == "pixart":  # the valid tokens only, as shards store them; collate pads and masks
            length = int(torch.randint(1, self.caption_tokens + 1, (1,), generator=g))
            sample["text"] = torch.randn(self.caption_tokens, self.caption_channels, generator=g)[:length]
        else:
            sample["label"] = int(torch.randint(self.num_classes, (1,), generator=g))
        return sample


def to_device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Move tensors; floating tensors take the compute dtype, masks and labels keep theirs."""
    moved = {}
    for name, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, dtype=dtype if value.is_floating_point() else None)
        moved[name] = value
    return moved


def noise_batch(diffusion: GaussianDiffusion, batch: dict[str, Any], generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, t, ε): t uniform in [0, 1000), ε standard normal, drawn from `generator` on the CPU."""
    x0 = batch["latent"]
    t = torch.randint(0, diffusion.train_steps, (x0.shape[0],), generator=generator)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    t = t.to(x0.device)
    return diffusion.q_sample(x0, t, noise).to(x0.dtype), t, noise


def call_model(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """The model's own conditioning: caption features and mask (PixArt-Sigma) or class labels (DiT)."""
    if "text" in batch:
        return model(x_t, t, batch["text"], batch["text_mask"])
    return model(x_t, t, batch["label"])
