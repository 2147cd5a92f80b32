"""Build what a stage needs from its recipe: the teacher model and the batch sources."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from common.config import ConfigError
from common.runtime import Rank, parse_dtype
from data.reader import ReaderConfig, ShardLoader, resolve_shards
from models.diffusion import GaussianDiffusion, NoiseSchedule
from models.dit import DiT
from models.pixart import PixArtSigma
from models.pretrained import PretrainedModel
from recipes.batches import BatchSource, SyntheticBatches
from recipes.config import Recipe, ShardPatterns

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
    schedule = replace(schedule, **overrides)
    return GaussianDiffusion(schedule, section.min_snr_gamma)


def build_source(recipe: Recipe, model: PretrainedModel, rank: int, world_size: int, split: str = "train",
                 shards: ShardPatterns = None, batch_size: int | None = None) -> BatchSource:
    """A resumable batch source for `split`, sharded over `world_size` ranks and batched as `data.reader` says
    (`batch_size`: a stage's own, default data.reader.batch_size); `shards` overrides data.train for a stage.
    Splits: `train`; `val`, the held-out data (data.val; the training shards if there is none); `train_eval`, the
    training data read for evaluation. Evaluation batches are neither shuffled nor flipped."""
    data, val = recipe.data, split != "train"
    reader = replace(data.reader, batch_size=batch_size or data.reader.batch_size)
    check_reader_fits(reader, model)
    reader = model_reader(reader, model)
    if data.source == "synthetic":
        config = model.config
        height, width = reader.latent_size
        return SyntheticBatches(
            recipe.model.family, (config.in_channels, height, width), reader.batch_size,
            data.synthetic_val_samples if val else data.synthetic_samples,
            seed=recipe.seed + (7_777_777 if split == "val" else 0), rank=rank, world_size=world_size,
            caption_tokens=reader.caption_tokens, caption_channels=getattr(config, "caption_channels", 0),
            num_classes=getattr(config, "num_classes", 0), dtype=parse_dtype(reader.dtype) if reader.dtype else None,
            pin_memory=reader.pin_memory)
    patterns = (data.val or shards or data.train) if split == "val" else (shards or data.train)
    config = replace(reader, shards=[patterns] if isinstance(patterns, str) else list(patterns),
                     seed=recipe.seed + int(val), shuffle_buffer=0 if val else reader.shuffle_buffer,
                     flip=reader.flip and not val)
    return ShardLoader(config, Rank(rank, world_size))


def check_held_out(recipe: Recipe, shards: ShardPatterns) -> None:
    """data.val must not share a shard with a stage's training data (`shards`, default data.train)."""
    if recipe.data.source != "shards" or not recipe.data.val:
        return
    def paths(patterns) -> set[str]:
        return {str(Path(p).resolve()) for p in resolve_shards([patterns] if isinstance(patterns, str)
                                                               else list(patterns))}
    shared = sorted(paths(recipe.data.val) & paths(shards or recipe.data.train))
    if shared:
        raise ConfigError(f"data.val: shares {len(shared)} shard(s) with the training data ({shared[0]}, …), so "
                          "stage 1 would pick its best students on data it trains on; point data.val at held-out "
                          "shards")


def model_latent_size(model: PretrainedModel) -> tuple[int, int]:
    """The (h, w) of the latents the model was trained on."""
    side = getattr(model.config, "sample_size", None) or model.config.input_size
    return side, side


def model_reader(reader: ReaderConfig, model: PretrainedModel) -> ReaderConfig:
    """The reader settings with the model's shapes filled in where the recipe leaves them open: latents of the
    model's size and text features of its width; other samples are skipped and counted, never trained on."""
    text_dim = reader.text_dim or getattr(model.config, "caption_channels", None)
    return replace(reader, latent_size=tuple(reader.latent_size or model_latent_size(model)), text_dim=text_dim)


def check_reader_fits(reader: ReaderConfig, model: PretrainedModel) -> None:
    """Reader settings that contradict the model are a config error, not a run of skipped samples."""
    config = model.config
    if reader.latent_channels != config.in_channels:
        raise ConfigError(f"data.reader.latent_channels is {reader.latent_channels}, but the model takes "
                          f"{config.in_channels} latent channels")
    caption_channels = getattr(config, "caption_channels", None)
    if reader.text_dim is not None and caption_channels is not None and reader.text_dim != caption_channels:
        raise ConfigError(f"data.reader.text_dim is {reader.text_dim}, but the model takes {caption_channels}-wide "
                          "text features")
