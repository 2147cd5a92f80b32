"""The pixel codec and the codec loader: lossless pixel (un)shuffle, config files, dispatch to a VAE."""
from __future__ import annotations

import json

import pytest
import torch

from common.config import ConfigError
from models.codec import PixelCodec, load_codec
from models.vae import LatentVAE


def test_pixel_codec_is_lossless_and_shapes_latents(tmp_path):
    codec = PixelCodec(factor=2, scaling_factor=0.5)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    latents = codec.encode(images)
    assert latents.shape == (3, 12, 16, 16) and codec.latent_channels == 12 and codec.downsample == 2
    assert torch.equal(latents[0, ::4, 0, 0] / 0.5, images[0, :, 0, 0])  # channel 4c is pixel (0, 0) of colour c
    assert torch.allclose(codec.decode(latents), images)
    assert codec.decode(latents * 10).abs().max() <= 1  # decoded images are clipped to the pixel range


def test_load_codec_reads_a_pipeline_vae_folder_or_falls_back_to_a_vae(tmp_path, tiny_pipeline):
    PixelCodec(factor=4, scaling_factor=2.0).save_pretrained(tmp_path / "pipe" / "vae")
    codec = load_codec(tmp_path / "pipe")
    assert isinstance(codec, PixelCodec) and codec.downsample == 4 and codec.scaling_factor == 2.0
    assert isinstance(load_codec(tiny_pipeline), LatentVAE)
    (tmp_path / "bad" / "vae").mkdir(parents=True)
    (tmp_path / "bad" / "vae" / "config.json").write_text(json.dumps({"_class_name": "PixelUnshuffleCodec",
                                                                      "factr": 2}))
    with pytest.raises(ConfigError, match="factr"):
        load_codec(tmp_path / "bad")
    with pytest.raises(ConfigError, match="factor"):
        PixelCodec(factor=0)
