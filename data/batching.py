"""Batches of same-shaped samples: latents of different sizes (or text features of different widths) are never
stacked together; each shape fills its own batch."""
from __future__ import annotations

from collections.abc import Hashable, Iterator

import torch

from data.shard_io import TensorRef


class ShapeBuckets:
    """Holds samples per shape key; a bucket is released as soon as it holds a full batch.

    Samples are tagged with their position in the stream, so a reader can record which ones are still held
    (`pending`) and put exactly those back after a restart.
    """

    def __init__(self, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch size must be ≥ 1, got {batch_size}")
        self.batch_size = batch_size
        self.buckets: dict[Hashable, list[tuple[int, dict]]] = {}

    def add(self, position: int, shape: Hashable, sample: dict) -> list[dict] | None:
        """Add a sample; returns the full batch it completed, if any."""
        bucket = self.buckets.setdefault(shape, [])
        bucket.append((position, sample))
        if len(bucket) < self.batch_size:
            return None
        del self.buckets[shape]
        return [s for _, s in bucket]

    def pending(self) -> list[int]:
        """Stream positions of the samples held in partial buckets."""
        return sorted(p for bucket in self.buckets.values() for p, _ in bucket)

    def flush(self) -> Iterator[list[dict]]:
        """The partial buckets, oldest shape first, each removed before it is yielded."""
        while self.buckets:
            yield [s for _, s in self.buckets.pop(next(iter(self.buckets)))]


def collate(samples: list[dict], text_tokens: int | None, dtype: torch.dtype | None = None,
            pin_memory: bool = False) -> dict:
    """Latents (B, C, h, w); text features padded to (B, text_tokens, D) with a (B, text_tokens) bool mask, or
    class labels (B,) when `text_tokens` is None; `keys` names the samples. Each tensor is read or copied once,
    straight into the batch; padding is zeros, which a masked attention never reads. `dtype` None keeps the
    stored dtype; `pin_memory` needs CUDA."""
    def empty(shape: tuple[int, ...], stored: torch.dtype) -> torch.Tensor:
        return torch.empty(len(samples), *shape, dtype=dtype or stored, pin_memory=pin_memory)

    first = samples[0]
    latents = empty(first["latent"].shape, first["latent"].dtype)
    for out, sample in zip(latents, samples):
        _fill(out, sample["latent"])
    batch = {"latent": latents, "keys": [s["key"] for s in samples]}
    if text_tokens is None:
        batch["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)
        return batch
    text = empty((text_tokens, first["text"].shape[1]), first["text"].dtype)
    mask = torch.zeros(len(samples), text_tokens, dtype=torch.bool, pin_memory=pin_memory)
    for i, sample in enumerate(samples):
        n = sample["text"].shape[0]
        _fill(text[i, :n], sample["text"])
        text[i, n:] = 0
        mask[i, :n] = True
    batch.update(text=text, text_mask=mask)
    return batch


def _fill(out: torch.Tensor, source: torch.Tensor | TensorRef) -> None:
    """Copy a tensor, or read a `TensorRef` from its shard, into `out`."""
    if isinstance(source, torch.Tensor):
        out.copy_(source)
    else:
        source.read_into(out)
