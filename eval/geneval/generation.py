"""Generate GenEval's images with PixArt-Sigma (plain or grafted) in the official folder layout.

Sample j of every prompt uses seed + j, like the reference generator, which reseeds 42 before each prompt. Work is
split across ranks by prompt, in fixed batches; a batch whose files all exist is skipped, any other batch is
generated whole (only its missing files are written), so a restarted run with the same batch size and world size
computes exactly what an uninterrupted one would have.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tqdm.auto import tqdm

from common.files import check_or_record
from common.runtime import Rank
from eval.geneval.layout import sample_path, write_metadata
from eval.geneval.prompts import Prompt
from models.sampling import TextToImage, save_png, to_uint8

log = logging.getLogger(__name__)
SETTINGS_FILE = "generation.json"  # in the image folder; the official evaluator ignores non-digit entries


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that decides the pixels of a sample (batch size and device aside). A size of None is the model's
    default, filled in once the model is loaded; `world_size` (which decides the batches, as the batch size does)
    is filled in by `generate` from its rank."""

    ckpt: str
    pipeline: str
    preset: str | None
    grafted: bool
    seed: int
    samples_per_prompt: int
    steps: int
    cfg_scale: float
    negative_prompt: str
    height: int | None
    width: int | None
    dtype: str
    world_size: int | None = None


@dataclass(frozen=True)
class SampleJob:
    index: int
    sample: int
    seed: int
    prompt: str
    path: Path


def plan_samples(prompts: Sequence[Prompt], images_dir: Path, samples_per_prompt: int, seed: int) -> list[SampleJob]:
    """Every image of `prompts`, prompt-major."""
    return [SampleJob(index, j, seed + j, record["prompt"], sample_path(images_dir, index, j))
            for index, record in prompts for j in range(samples_per_prompt)]


def check_settings(images_dir: Path, settings: GenerationSettings) -> None:
    """Record the settings next to the images; refuse to add to a folder made with other settings. Unset (None)
    size and world size are not compared."""
    check_or_record(images_dir / SETTINGS_FILE, asdict(settings), "images",
                    ignore_unset=("height", "width", "world_size"))


def generate(load_pipe: Callable[[], TextToImage], prompts: Sequence[Prompt], images_dir: Path,
             settings: GenerationSettings, batch_size: int, rank: Rank = Rank(), progress: bool = True) -> int:
    """This rank's share of the images; returns how many files it wrote. The pipeline is loaded only when some
    image is missing; height and width of None mean the model's trained size."""
    mine = rank.shard(list(prompts))
    for index, record in mine:
        write_metadata(images_dir, index, record)
    jobs = plan_samples(mine, images_dir, settings.samples_per_prompt, settings.seed)
    batches = [jobs[i:i + batch_size] for i in range(0, len(jobs), batch_size)]
    todo = [b for b in batches if not all(job.path.is_file() for job in b)]
    log.info("rank %d: %d prompts, %d images, %d of %d batches to generate", rank.rank, len(mine), len(jobs),
             len(todo), len(batches))
    if not todo and (images_dir / SETTINGS_FILE).is_file():
        check_settings(images_dir, replace(settings, world_size=None))  # nothing to generate: no pixel depends on it
        return 0
    pipe = load_pipe()
    side = pipe.transformer.config.sample_size * pipe.vae.downsample
    settings = replace(settings, height=settings.height or side, width=settings.width or side,
                       world_size=rank.world_size)
    check_settings(images_dir, settings)
    written = 0
    for batch in tqdm(todo, desc="generating", disable=not progress):
        _, images = pipe([job.prompt for job in batch], [job.seed for job in batch], settings.height, settings.width,
                         settings.steps, settings.cfg_scale, settings.negative_prompt, progress=False)
        for job, image in zip(batch, to_uint8(images)):
            if not job.path.is_file():
                save_png(image, job.path)
                written += 1
    return written


def missing_images(prompts: Sequence[Prompt], images_dir: Path, samples_per_prompt: int) -> list[Path]:
    """Images of `prompts` not on disk yet (e.g. another rank's, still being generated)."""
    return [job.path for job in plan_samples(prompts, images_dir, samples_per_prompt, seed=0) if not job.path.is_file()]
