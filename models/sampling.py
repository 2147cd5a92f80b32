"""Sampling loops for PixArt-Sigma (text → image) and DiT (class → image), with per-sample seeds.

Each sample's initial noise comes from its own CPU generator, so a sample is the same whatever batch, rank or
device it is drawn in; that is what makes generation jobs resumable and shardable.
"""
from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import SchedulerMixin
from PIL import Image
from tqdm.auto import tqdm

from common.files import atomic_write
from models import compile as compiling
from models.codec import Codec, load_codec
from models.diffusion import NoiseSchedule, ddpm_scheduler, pixart_scheduler, respaced_timesteps
from models.dit import DiT
from models.pixart import PixArtSigma
from models.text_encoder import T5TextEncoder

STEP_SEED_OFFSET = 1 << 32  # step-noise generators are seeded apart from the initial noise of the same seed


def seeded_noise(seeds: Sequence[int], shape: tuple[int, ...], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(len(seeds), *shape) standard normal noise, sample i drawn from a CPU generator seeded with seeds[i]."""
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(device=device, dtype=dtype)


@torch.no_grad()
def sample_pixart(model: PixArtSigma, latents: torch.Tensor, prompt_embeds: torch.Tensor, prompt_mask: torch.Tensor,
                  negative_embeds: torch.Tensor, negative_mask: torch.Tensor, steps: int = 20,
                  cfg_scale: float = 4.5, progress: bool = True, schedule: NoiseSchedule | None = None
                  ) -> torch.Tensor:
    """DPM-Solver++ with classifier-free guidance, step for step as diffusers' PixArtSigmaPipeline, on the model's
    noise schedule and prediction type (PixArt-Sigma's ε and linear β when None), clipping x0 if it says so."""
    scheduler = pixart_scheduler(schedule)
    scheduler.set_timesteps(steps, device=latents.device)
    guided = cfg_scale > 1.0
    if guided:
        embeds = torch.cat([negative_embeds, prompt_embeds])
        mask = torch.cat([negative_mask, prompt_mask])
    else:
        embeds, mask = prompt_embeds, prompt_mask
    dtype = next(model.parameters()).dtype
    latents = latents * scheduler.init_noise_sigma
    for t in tqdm(scheduler.timesteps, desc="denoising", leave=False, disable=not progress):
        model_in = torch.cat([latents] * 2) if guided else latents
        model_in = scheduler.scale_model_input(model_in, t)
        out = model(model_in.to(dtype), t.expand(model_in.shape[0]), embeds.to(dtype), mask).float()
        if guided:
            uncond, cond = out.chunk(2)
            out = uncond + cfg_scale * (cond - uncond)
        prediction = out[:, : latents.shape[1]]  # drop the learned-variance channels
        latents = scheduler.step(prediction, t, latents).prev_sample
    return latents


@torch.no_grad()
def sample_dit(model: DiT, latents: torch.Tensor, class_labels: torch.Tensor, steps: int = 250,
               cfg_scale: float = 1.5, guidance_channels: int | None = 3, seeds: Sequence[int] | None = None,
               progress: bool = True, scheduler: SchedulerMixin | None = None) -> torch.Tensor:
    """Ancestral DDPM on IDDPM-respaced timesteps with learned variance, as facebookresearch/DiT samples.

    `seeds` (the samples' own seeds) give every sample a CPU generator for the noise of all its steps, seeded
    with seed + STEP_SEED_OFFSET, so a sample does not depend on its batch; without them the global RNG is used.
    Another diffusers `scheduler` (e.g. the DDIM a DiTPipeline ships) is stepped as DiTPipeline steps it: a copy,
    `set_timesteps(steps)`, scaled inputs, only the ε channels (no learned variance), and the samples' generators
    when its `step` takes them.
    """
    learned_variance = scheduler is None
    if learned_variance:
        scheduler = ddpm_scheduler()
        scheduler.set_timesteps(timesteps=respaced_timesteps(steps), device=latents.device)
    else:
        scheduler = copy.deepcopy(scheduler)
        scheduler.set_timesteps(steps, device=latents.device)
    guided = cfg_scale > 1.0
    generators = None
    if seeds is not None:
        generators = [torch.Generator().manual_seed(int(s) + STEP_SEED_OFFSET) for s in seeds]
        # the null-class half is overwritten by the guided half at every step: it reuses the same generators
        generators = generators * 2 if guided else generators
    # as diffusers' pipelines do (prepare_extra_step_kwargs): generators go to schedulers whose step takes them
    step_kwargs = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
    labels = class_labels
    if guided:
        latents = torch.cat([latents, latents])
        labels = torch.cat([class_labels, torch.full_like(class_labels, model.config.num_classes)])
    dtype = next(model.parameters()).dtype
    for t in tqdm(scheduler.timesteps, desc="denoising", leave=False, disable=not progress):
        ts = t.expand(latents.shape[0])
        model_in = scheduler.scale_model_input(latents, t).to(dtype)
        if guided:
            out = model.forward_with_cfg(model_in, ts, labels, cfg_scale, guidance_channels)
        else:
            out = model(model_in, ts, labels)
        out = out.float() if learned_variance else out[:, : latents.shape[1]].float()
        latents = scheduler.step(out, t, latents, **step_kwargs).prev_sample
    return latents[: len(class_labels)]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] → (B, H, W, 3) uint8 on the CPU."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def save_png(image: torch.Tensor, path: str | Path) -> None:
    """Atomically write one (H, W, 3) uint8 image: a killed run leaves no truncated PNG to be mistaken for done."""
    atomic_write(path, lambda tmp: Image.fromarray(image.numpy()).save(tmp, format="PNG"))


def image_grid(images: torch.Tensor, columns: int | None = None) -> torch.Tensor:
    """(B, H, W, 3) uint8 → one (rows·H, columns·W, 3) grid, white where the last row is short."""
    b, h, w, c = images.shape
    columns = columns or max(1, int(b**0.5 + 0.5))
    rows = -(-b // columns)
    grid = torch.full((rows * h, columns * w, c), 255, dtype=torch.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = image
    return grid


@dataclass
class TextToImage:
    """PixArt-Sigma + T5 + codec (a VAE, or a parameter-free pixel codec) on its noise schedule: prompts and seeds →
    latents and images."""

    transformer: PixArtSigma
    text_encoder: T5TextEncoder
    vae: Codec
    schedule: NoiseSchedule = NoiseSchedule()

    @classmethod
    def from_paths(cls, pipeline: str | Path, transformer: str | Path | None = None, preset: str | None = None,
                   device: str = "cpu", dtype: torch.dtype = torch.float32, compile: bool = False) -> TextToImage:
        """Components from a diffusers-style pipeline folder (its `scheduler/` sets the noise schedule when
        present); `transformer` may point elsewhere (e.g. the 2K transformer folder, an original `.pth` with
        `preset`, or one of our grafted export folders). `compile`: the transformer runs under torch.compile
        (`models.compile.for_inference`)."""
        model = PixArtSigma.from_pretrained(transformer or pipeline, preset=preset, dtype=dtype).to(device).eval()
        if compile:
            compiling.for_inference(model)
        t5 = T5TextEncoder(pipeline, max_length=model.config.model_max_length, device=device, dtype=dtype)
        codec = load_codec(pipeline, device=device, dtype=dtype)
        return cls(model, t5, codec, NoiseSchedule.from_pipeline(pipeline))

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        multiple = self.vae.downsample * self.transformer.config.patch_size
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, got {height}×{width}")
        f = self.vae.downsample
        return self.transformer.config.in_channels, height // f, width // f

    def __call__(self, prompts: Sequence[str], seeds: Sequence[int], height: int, width: int, steps: int = 20,
                 cfg_scale: float = 4.5, negative_prompt: str = "", progress: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents (B, C, h, w) as the sampler produced them, and decoded images (B, 3, H, W) in [-1, 1]."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        device = self.vae.device
        embeds, mask = self.text_encoder.encode(list(prompts))
        neg_embeds, neg_mask = self.text_encoder.encode([negative_prompt] * len(prompts))
        noise = seeded_noise(seeds, self.latent_shape(height, width), device=device)
        latents = sample_pixart(self.transformer, noise, embeds, mask, neg_embeds, neg_mask, steps, cfg_scale,
                                progress, self.schedule)
        return latents, self.vae.decode(latents)
