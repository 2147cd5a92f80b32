"""Synthetic shards for the data tests: random bf16 tensors written with the real shard writer (no model needed)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data.sample_format import LATENT, LATENT_FLIP, TEXT, sample_key, shard_sample
from data.shard_writer import SHARD_NAME, ShardPlan, write_shard

TEXT_DIM = 16


def synthetic_tensors(index: int, latent_hw: tuple[int, int] = (8, 8), text: bool = True,
                      flip: bool = False) -> dict[str, torch.Tensor]:
    """Sample `index`'s tensors: a (4, h, w) latent and 1 + index % 7 tokens of (n, 16) text features, bf16."""
    g = torch.Generator().manual_seed(index)
    tensors = {LATENT: torch.randn(4, *latent_hw, generator=g).bfloat16()}
    if text:
        tensors[TEXT] = torch.randn(1 + index % 7, TEXT_DIM, generator=g).bfloat16()
    if flip:
        tensors[LATENT_FLIP] = torch.randn(4, *latent_hw, generator=g).bfloat16()
    return tensors


def write_synthetic(folder: Path, num_samples: int, shard_size: int, kind: str = "text",
                    latent_hw=lambda i: (8, 8), flip: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """Shards of `num_samples` samples (class labels i % 5 for kind 'class'); returns key → tensors written."""
    plan = ShardPlan(num_samples, shard_size)
    written = {}
    for shard in range(plan.num_shards):
        samples = []
        for i in plan.samples(shard):
            tensors = synthetic_tensors(i, latent_hw(i), text=kind == "text", flip=flip)
            written[sample_key(i)] = tensors
            samples.append(shard_sample(i, tensors, {"index": i}, caption=f"caption {i}" if kind == "text" else None,
                                        label=i % 5 if kind == "class" else None))
        write_shard(folder / SHARD_NAME.format(rank=0, index=shard), shard, plan.samples(shard), samples)
    return written


@pytest.fixture
def text_shards(tmp_path) -> tuple[Path, dict[str, dict[str, torch.Tensor]]]:
    """8 shards × 5 text samples."""
    folder = tmp_path / "shards"
    return folder, write_synthetic(folder, 40, 5)
