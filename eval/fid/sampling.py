"""Class-balanced, resumable, rank-sharded DiT sampling for FID: chunk files → one ADM-format `samples.npz`.

Sample i has class i mod num_classes and seed `seed + i`. Its initial noise and its DDPM step noise come from CPU
generators seeded from that seed alone, so a sample is the same whatever batch, chunk, rank or world size draws it.
Samples are written in chunks of fixed index ranges (`chunks/000123.npz`, atomically); rank r of W takes chunks
r, r + W, …; finished chunks are skipped on a rerun. Rank 0 alone packs them, once every chunk exists, and only when
`samples.npz` is missing, of another shape, or older than some chunk.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from common.files import atomic_write
from common.runtime import Rank
from eval.fid.npz import LABELS_KEY, npz_array_shape, write_npz_streaming
from models.dit import DiT
from models.sampling import sample_dit, seeded_noise, to_uint8
from models.vae import LatentVAE

log = logging.getLogger(__name__)

SETTINGS_FILE = "sampling.json"
SAMPLES_FILE = "samples.npz"
CHUNK_IMAGES = "images"  # chunk members: images, labels, seeds


@dataclass(frozen=True)
class SamplingSettings:
    """Everything that determines the samples; stored beside the chunks so a resumed run cannot mix settings.
    Model files are recorded by content (sha256), with the paths they were read from."""

    checkpoint: str
    checkpoint_sha256: str
    graft: str | None
    graft_sha256: str | None
    preset: str | None
    arch: dict[str, Any]
    vae_sha256: str
    num_samples: int
    num_classes: int
    image_size: int
    steps: int
    cfg_scale: float
    guidance_channels: int | None
    seed: int
    chunk_size: int
    dtype: str

    def __post_init__(self):
        if self.num_samples < 1 or self.num_samples % self.num_classes:
            raise ValueError(f"--num-samples {self.num_samples} must be a positive multiple of the model's "
                             f"{self.num_classes} classes for class-balanced sampling (e.g. 50000 for ImageNet)")
        if self.chunk_size < 1:
            raise ValueError(f"--chunk-size must be positive, got {self.chunk_size}")

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.chunk_size)

    def chunk_indexes(self, chunk: int) -> range:
        """Sample indexes of one chunk: a fixed range, independent of ranks and batch size."""
        return range(chunk * self.chunk_size, min((chunk + 1) * self.chunk_size, self.num_samples))

    def label(self, index: int) -> int:
        return index % self.num_classes


def chunk_path(out: Path, chunk: int) -> Path:
    return out / "chunks" / f"{chunk:06d}.npz"


def chunk_is_complete(path: Path, size: int, image_size: int) -> bool:
    """A chunk file that exists and holds `size` images of the expected size (read from the header; writes are
    atomic, so an existing file is whole)."""
    return path.is_file() and npz_array_shape(path, CHUNK_IMAGES)[0] == (size, image_size, image_size, 3)


def sample_images(model: DiT, vae: LatentVAE, settings: SamplingSettings, indexes: list[int],
                  device: torch.device) -> np.ndarray:
    """Decoded uint8 images (len(indexes), H, W, 3) of the given sample indexes, in one batch."""
    c = model.config
    seeds = [settings.seed + i for i in indexes]
    labels = torch.tensor([settings.label(i) for i in indexes], device=device)
    noise = seeded_noise(seeds, (c.in_channels, c.input_size, c.input_size), device=device)
    latents = sample_dit(model, noise, labels, settings.steps, settings.cfg_scale, settings.guidance_channels,
                         seeds=seeds, progress=False)
    return to_uint8(vae.decode(latents)).numpy()


def sample_chunks(model: DiT, vae: LatentVAE, settings: SamplingSettings, out: Path, batch_size: int,
                  device: torch.device, rank: Rank) -> int:
    """Draw this rank's unfinished chunks; returns how many it drew."""
    mine = rank.shard(list(range(settings.num_chunks)))
    todo = [c for c in mine if not chunk_is_complete(chunk_path(out, c), len(settings.chunk_indexes(c)),
                                                     settings.image_size)]
    log.info("rank %d/%d: %d of its %d chunks to draw (%d samples each)", rank.rank, rank.world_size, len(todo),
             len(mine), settings.chunk_size)
    for chunk in tqdm(todo, desc=f"chunks (rank {rank.rank})", unit="chunk"):
        indexes = list(settings.chunk_indexes(chunk))
        images = np.concatenate([sample_images(model, vae, settings, indexes[i:i + batch_size], device)
                                 for i in range(0, len(indexes), batch_size)])
        labels = np.array([settings.label(i) for i in indexes], dtype=np.int64)
        seeds = np.array([settings.seed + i for i in indexes], dtype=np.int64)
        atomic_write(chunk_path(out, chunk),
                     lambda tmp: _save_npz(tmp, **{CHUNK_IMAGES: images, "labels": labels, "seeds": seeds}))
    return len(todo)


def _save_npz(path: str, **arrays: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: numpy.savez would append .npz to a temporary name
        np.savez(f, **arrays)


def missing_chunks(out: Path, settings: SamplingSettings) -> list[Path]:
    """Chunk files not (yet) on disk with their full size."""
    paths = [chunk_path(out, c) for c in range(settings.num_chunks)]
    return [p for c, p in enumerate(paths)
            if not chunk_is_complete(p, len(settings.chunk_indexes(c)), settings.image_size)]


def samples_shape(settings: SamplingSettings) -> tuple[int, int, int, int]:
    """Shape of the packed `arr_0`: (N, H, W, 3)."""
    return settings.num_samples, settings.image_size, settings.image_size, 3


def is_packed(out: Path, settings: SamplingSettings) -> bool:
    """`samples.npz` exists with the expected shape and no chunk is newer (a lost chunk redrawn since is)."""
    path = out / SAMPLES_FILE
    if not path.is_file() or npz_array_shape(path)[0] != samples_shape(settings):
        return False
    packed_at = path.stat().st_mtime_ns
    return all(chunk_path(out, c).stat().st_mtime_ns <= packed_at for c in range(settings.num_chunks))


def pack_if_complete(out: Path, settings: SamplingSettings) -> Path | None:
    """Stream every chunk into `samples.npz` (`arr_0` images, `arr_1` labels) once all exist; else None. An
    up-to-date `samples.npz` is not written again."""
    missing = missing_chunks(out, settings)
    if missing:
        log.info("%d of %d chunks still missing (drawn by other ranks or a later run); not packing yet",
                 len(missing), settings.num_chunks)
        return None
    path = out / SAMPLES_FILE
    if is_packed(out, settings):
        log.info("%s is up to date with the %d chunks; not packing again", path, settings.num_chunks)
        return path

    def parts():
        for chunk in range(settings.num_chunks):
            with np.load(chunk_path(out, chunk)) as data:
                yield data[CHUNK_IMAGES]

    labels = np.array([settings.label(i) for i in range(settings.num_samples)], dtype=np.int64)
    write_npz_streaming(path, samples_shape(settings), np.uint8, parts(), extra={LABELS_KEY: labels})
    log.info("packed %d samples → %s", settings.num_samples, path)
    return path
