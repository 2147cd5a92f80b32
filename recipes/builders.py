"""Build what a stage needs from its recipe: the teacher model and the batch sources."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from models.diffusion import GaussianDiffusion, NoiseSchedule
from models.dit import DiT
from models.pixart import PixArtSigma
from models.pretrained import PretrainedModel
from recipes.batches import SyntheticBatches
from recipes.config import Recipe

FAMILIES: dict[str, type[PretrainedModel]] = {"pixart": PixArtSigma, "dit": DiT}


def build_teacher(recipe: Recipe) -> PretrainedModel:
    """The pretrained model (or a seeded random one for tiny recipes), in fp32 on the CPU, eval mode."""
    section = recipe.model
    cls = FAMILIES[section.family]
    if section.pretrained:
        return cls.from_pretrained(section.pretrained, preset=section.preset, ema=section.ema, **section.arch)
    torch.manual_seed(section.init_seed)
    return cls(cls.make_config(section.preset, **section.arch)).eval()


def build_diffusion(recipe: Recipe) -> GaussianDiffusion:
    """The recipe's training objective: the teacher's noise schedule (from its pipeline folder's scheduler config
    when it has one, else PixArt-Sigma's / DiT's) with the recipe's `diffusion` keys on top."""
    section = recipe.diffusion
    pretrained = Path(recipe.model.pretrained) if recipe.model.pretrained else None
    schedule = NoiseSchedule.from_pipeline(pretrained) if pretrained and pretrained.is_dir() else NoiseSchedule()
    keys = ("prediction_type", "beta_schedule", "beta_start", "beta_end")
    overrides = {k: getattr(section, k) for k in keys if getattr(section, k) is not None}
    schedule = dataclasses.replace(schedule, **overrides)
    return GaussianDiffusion(schedule, section.min_snr_gamma)


def build_source(recipe: Recipe, model: PretrainedModel, rank: int, world_size: int, split: str = "train",
                 shards: str | None = None):
    """A resumable batch source for `split` (train / val), sharded over `world_size` ranks; `shards` overrides
    data.train for a stage."""
    data = recipe.data
    if data.source == "synthetic":
        config = model.config
        side = data.latent_size or (config.sample_size if recipe.model.family == "pixart" else config.input_size)
        val = split == "val"
        return SyntheticBatches(
            recipe.model.family, (config.in_channels, side, side), data.batch_size,
            data.synthetic_val_samples if val else data.synthetic_samples,
            seed=recipe.seed + (7_777_777 if val else 0), rank=rank, world_size=world_size,
            caption_tokens=data.caption_tokens, caption_channels=getattr(config, "caption_channels", 0),
            num_classes=getattr(config, "num_classes", 0))
    from data.reader import training_batches  # the shard reader (data/)

    pattern = (shards or data.train) if split == "train" else (data.val or shards or data.train)
    return training_batches(pattern, batch_size=data.batch_size, rank=rank, world_size=world_size,
                            seed=recipe.seed + (0 if split == "train" else 1), num_workers=data.num_workers,
                            shuffle_buffer=data.shuffle_buffer if split == "train" else 0,
                            caption_tokens=data.caption_tokens, latent_channels=model.config.in_channels)
