"""Frozen VAE from a local path (diffusers AutoencoderKL): images in [-1, 1] ↔ scaled latents."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL

from common.hub import local_path
from models.pretrained import component_folder

#: Latent scaling of the VAEs our models were trained with.
SDXL_SCALING = 0.13025  # PixArt-Sigma (SDXL VAE)
SD_SCALING = 0.18215  # DiT and PixArt-alpha (sd-vae-ft-ema / ft-mse)


class LatentVAE:
    """AutoencoderKL from a pipeline folder (`vae/`) or a bare VAE folder, a local path or a cached Hub repo id.

    `scaling_factor` defaults to the VAE's own config value (0.13025 for SDXL's, 0.18215 for SD's).
    """

    def __init__(self, path: str | Path, scaling_factor: float | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        root = local_path(path, "VAE folder")
        if not root.is_dir():
            raise FileNotFoundError(f"VAE folder {path}: {root} is not a folder")
        self.vae = AutoencoderKL.from_pretrained(component_folder(root, "vae"), local_files_only=True,
                                                 torch_dtype=dtype)
        self.vae = self.vae.to(device).eval().requires_grad_(False)
        self.scaling_factor = float(scaling_factor or self.vae.config.scaling_factor)
        self.downsample = 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool = True,
               generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] → scaled latents (a posterior sample, or its mean)."""
        dist = self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist
        latents = dist.sample(generator) if sample else dist.mode()
        return latents * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → images (B, 3, H, W) in [-1, 1]."""
        return self.vae.decode(latents.to(self.device, self.vae.dtype) / self.scaling_factor).sample.clamp(-1, 1)
