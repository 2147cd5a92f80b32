"""Image codecs a pipeline decodes its latents with: a diffusers VAE, or a parameter-free pixel (un)shuffle.

A pipeline folder's `vae/config.json` says which: `"_class_name": "PixelUnshuffleCodec"` (our tiny worlds, whose
images are small enough to diffuse in pixel space) or a diffusers AutoencoderKL (PixArt-Sigma, DiT).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from common.config import ConfigError
from common.files import save_json
from models.pretrained import component_folder
from models.vae import LatentVAE

PIXEL_CODEC = "PixelUnshuffleCodec"


class Codec(Protocol):
    """What sampling and data generation need of a VAE."""

    scaling_factor: float
    downsample: int

    @property
    def device(self) -> torch.device: ...

    def encode(self, images: torch.Tensor, sample: bool = True,
               generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


class PixelCodec:
    """Images (B, 3, H, W) in [−1, 1] ↔ latents (B, 3·f², H/f, W/f): pixel unshuffle by `factor` f, times
    `scaling_factor`. Lossless, so a latent's x0 lies in [−s, s] exactly and samplers may clip to it."""

    def __init__(self, factor: int = 2, scaling_factor: float = 1.0, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        if factor < 1 or scaling_factor <= 0:
            raise ConfigError(f"{PIXEL_CODEC}: factor must be ≥ 1 and scaling_factor > 0, got {factor}, "
                              f"{scaling_factor}")
        self.downsample, self.scaling_factor = factor, float(scaling_factor)
        self._device, self.dtype = torch.device(device), dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def latent_channels(self) -> int:
        return 3 * self.downsample**2

    def encode(self, images: torch.Tensor, sample: bool = True,
               generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """Images in [−1, 1] → scaled latents (deterministic: `sample` and `generator` are accepted and unused)."""
        return F.pixel_unshuffle(images.to(self.device, self.dtype), self.downsample) * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → images (B, 3, H, W) in [−1, 1]."""
        images = F.pixel_shuffle(latents.to(self.device, self.dtype) / self.scaling_factor, self.downsample)
        return images.clamp(-1, 1)

    def config(self) -> dict:
        return {"_class_name": PIXEL_CODEC, "factor": self.downsample, "scaling_factor": self.scaling_factor}

    def save_pretrained(self, folder: str | Path) -> Path:
        """`config.json` in a `vae/` folder of a pipeline (the codec has no weights)."""
        save_json(self.config(), Path(folder) / "config.json")
        return Path(folder)


def load_codec(path: str | Path, scaling_factor: float | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> Codec:
    """The codec of a pipeline folder (`vae/`) or a bare codec folder: a PixelCodec or a diffusers VAE."""
    root = Path(path)
    config_file = component_folder(root, "vae") / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if config.get("_class_name") == PIXEL_CODEC:
            unknown = sorted(set(config) - {"_class_name", "factor", "scaling_factor"})
            if unknown:
                raise ConfigError(f"{config_file}: unknown key(s) {unknown} for {PIXEL_CODEC}")
            return PixelCodec(int(config.get("factor", 2)), scaling_factor or config.get("scaling_factor", 1.0),
                              device, dtype)
    return LatentVAE(root, scaling_factor, device, dtype)
