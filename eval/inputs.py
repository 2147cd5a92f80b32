"""What the speed benchmarks feed the models: random inputs of a model's trained size (the values do not change
the latency). Timing itself is `eval.measure`."""
from __future__ import annotations

import torch

from models.dit import DiTConfig
from models.pixart import PixArtConfig

TIMESTEP = 500  # any timestep costs the same


def random_inputs(config: PixArtConfig | DiTConfig, batch: int, device: torch.device, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, ...]:
    """Latents at the config's trained size and a timestep, then class labels (DiT) or random caption features of the
    model's T5 length and an all-ones mask (PixArt-Sigma)."""
    g = torch.Generator().manual_seed(0)
    dit = isinstance(config, DiTConfig)
    side = config.input_size if dit else config.sample_size
    latents = torch.randn(batch, config.in_channels, side, side, generator=g).to(device, dtype)
    t = torch.full((batch,), float(TIMESTEP), device=device)
    if dit:
        return latents, t, torch.randint(config.num_classes, (batch,), generator=g).to(device)
    captions = torch.randn(batch, config.model_max_length, config.caption_channels, generator=g).to(device, dtype)
    return latents, t, captions, torch.ones(batch, config.model_max_length, dtype=torch.long, device=device)
