"""Shared fixtures: tiny diffusers reference models, built from configs and saved in the official formats."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the parity measure used throughout the tests."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    """A tiny PixArt-Sigma pipeline folder (transformer/, text_encoder/, tokenizer/, vae/)."""
    from models.tiny import write_tiny_pipeline

    return write_tiny_pipeline(tmp_path_factory.mktemp("pipeline"))


@pytest.fixture(scope="session")
def shapes_pipeline(tmp_path_factory) -> Path:
    """A tiny, random stand-in of the shapes teacher's pipeline (the teacher's own components, unpretrained T5 of
    width 32, a 2-block transformer)."""
    from models.pixart import PixArtSigma
    from recipes.shapes_teacher import write_components

    folder = write_components(tmp_path_factory.mktemp("shapes-pipeline"), text_dim=32, text_steps=0)
    config = PixArtSigma.make_config(None, hidden_size=32, depth=2, num_heads=2, in_channels=12, out_channels=12,
                                     sample_size=16, interpolation_scale=1.0, caption_channels=32,
                                     model_max_length=16)
    torch.manual_seed(0)
    PixArtSigma(config).save_pretrained(folder / "transformer")
    return folder
